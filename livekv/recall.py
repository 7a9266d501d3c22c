"""Page-granular fast tier and the background, double-buffered recall engine (FreeKV).

Recalls into ``livekv.slots.PageSlots`` (one layer's fast tier of page slots) copy only the missing pages, each
(page, KV head) one ``[2, p, D]`` block of the host tier (``HostStore.blocks``: dequantized from a quantized tier).

``RecallEngine`` runs recalls off the critical path: a worker thread takes jobs in order; each job streams its
pages in groups through two staging buffers, so that gathering group n from the host tier overlaps scattering
group n-1 into the fast tier. On CPU the scatter runs on a second thread (torch releases the GIL in copies); on a
GPU it is two CUDA streams (copy, scatter) with pinned staging buffers and events. The GPU path has not been run.

Shapes: B batch, G KV heads, S slots, p page size, D head dim, n pages to copy.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from livekv.slots import PageSlots
from livekv.store import HostStore


def copy_pages(host: HostStore, slots: PageSlots, b, g, page, slot) -> None:
    """Blocking recall of pages ``(b, g, page) [n]`` into ``slots`` at ``slot [n]`` (CPU indices)."""
    if len(page):
        device = slots.keys.device
        blocks = host.blocks(b, g, page).to(device, non_blocking=True)
        slots.put(*(x.to(device, non_blocking=True) for x in (b, g, slot)), blocks)


class RecallEngine:
    """Background recalls: ``submit(fn, *args)`` runs ``fn`` on the worker thread, in submission order, and
    returns a ``Future`` with the seconds it took; ``stream`` is the double-buffered copy a job calls."""

    def __init__(self, group: int = 256):
        self.group = group  # pages per staging buffer
        # The recall threads run torch single-threaded: on a small CPU a second OpenMP team would fight the
        # compute thread's. set_num_threads is per thread for OpenMP, but also sets the default of threads
        # started later: restore that.
        threads = torch.get_num_threads()
        pools = [ThreadPoolExecutor(1, name, initializer=_single_threaded) for name in ("livekv-recall", "livekv-scatter")]
        for pool in pools:
            pool.submit(int).result()  # start the thread now
        torch.set_num_threads(threads)
        self._worker, self._scatter = pools
        self._staging: dict = {}
        self._cuda: dict = {}

    def submit(self, fn, *args) -> Future:
        """Run ``fn(*args)`` on the worker, in the caller's inference mode (it is per thread: tensors the caller
        made in inference mode can be updated in place only in inference mode)."""
        return self._worker.submit(_timed, torch.is_inference_mode_enabled(), fn, *args)

    def _buffers(self, host: HostStore, pinned: bool) -> list[torch.Tensor]:
        """Two staging buffers of ``group`` blocks ``[2, p, D]`` in the KV's dtype, on the CPU."""
        shape = (self.group, 2, host.page_size, host.head_dim)
        key = (shape, host.dtype, pinned)
        if key not in self._staging:
            self._staging[key] = [torch.empty(shape, dtype=host.dtype, pin_memory=pinned) for _ in range(2)]
        return self._staging[key]

    def stream(self, host: HostStore, slots: PageSlots, b, g, page, slot) -> None:
        """Copy pages ``(b, g, page) [n]`` of ``host`` into ``slots`` at ``slot [n]``, in groups, double-buffered."""
        if not len(page):
            return
        if slots.keys.device.type == "cuda":
            return self._stream_cuda(host, slots, b, g, page, slot)
        if len(page) <= self.group:  # one group: nothing to overlap
            return copy_pages(host, slots, b, g, page, slot)
        staging = self._buffers(host, pinned=False)
        scatters: list[Future | None] = [None, None]
        for i, start in enumerate(range(0, len(page), self.group)):
            part = slice(start, start + self.group)
            if scatters[i % 2] is not None:
                scatters[i % 2].result()  # its buffer is free again
            buf = staging[i % 2][: len(page[part])]
            host.blocks(b[part], g[part], page[part], out=buf)
            scatters[i % 2] = self._scatter.submit(_as, torch.is_inference_mode_enabled(), slots.put, b[part], g[part],
                                                   slot[part], buf)
        for f in scatters:
            if f is not None:
                f.result()

    def _stream_cuda(self, host: HostStore, slots: PageSlots, b, g, page, slot) -> None:
        """Copy stream: pinned staging -> device staging; scatter stream: device staging -> slots. Events order
        the reuse of each buffer; ``done`` (waited for by ``wait_cuda``) marks the end of the recall."""
        device = slots.keys.device
        pinned = self._buffers(host, pinned=True)
        key = (device, pinned[0].shape, pinned[0].dtype)
        if key not in self._cuda:
            dev = [torch.empty_like(pinned[0], device=device) for _ in range(2)]
            events = [[torch.cuda.Event() for _ in range(2)] for _ in range(2)]  # [h2d done, scatter done]
            self._cuda[key] = (torch.cuda.Stream(device), torch.cuda.Stream(device), dev, events)
        copy_stream, scatter_stream, dev, (h2d, scattered) = self._cuda[key]
        if slots.read is not None:
            scatter_stream.wait_event(slots.read)
        for i, start in enumerate(range(0, len(page), self.group)):
            j, part = i % 2, slice(start, start + self.group)
            n = len(page[part])
            h2d[j].synchronize()  # the pinned buffer's previous upload has finished
            host.blocks(b[part], g[part], page[part], out=pinned[j][:n])
            with torch.cuda.stream(copy_stream):
                copy_stream.wait_event(scattered[j])  # the device buffer's previous scatter has finished
                dev[j][:n].copy_(pinned[j][:n], non_blocking=True)
                h2d[j].record(copy_stream)
            with torch.cuda.stream(scatter_stream):
                scatter_stream.wait_event(h2d[j])
                idx = [x.to(device, non_blocking=True) for x in (b[part], g[part], slot[part])]
                slots.put(*idx, dev[j][:n])
                scattered[j].record(scatter_stream)
        slots.done = torch.cuda.Event()
        slots.done.record(scatter_stream)


def wait_cuda(slots: PageSlots) -> None:
    """Make the current CUDA stream wait for the last background recall into ``slots`` (no-op on CPU)."""
    if slots.done is not None:
        torch.cuda.current_stream(slots.keys.device).wait_event(slots.done)
        slots.done = None


def _single_threaded() -> None:
    torch.get_num_threads()  # torch initialises a thread's OpenMP settings lazily, from the global default
    torch.set_num_threads(1)


def _as(inference: bool, fn, *args):
    with torch.inference_mode(inference):
        return fn(*args)


def _timed(inference: bool, fn, *args) -> float:
    t0 = time.perf_counter()
    _as(inference, fn, *args)
    return time.perf_counter() - t0


_ENGINE: RecallEngine | None = None


def engine() -> RecallEngine:
    """The process-wide recall engine (its worker threads start on first use)."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = RecallEngine()
    return _ENGINE
