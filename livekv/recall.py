"""Page-granular fast tier and the background, double-buffered recall engine (FreeKV).

``PageSlots`` is one layer's fast tier: ``S`` slots of one page each, in the layout attention reads
(``keys, values [B, G, S * p, D]``), with a page table ``page [B, G, S]`` (page id per slot, -1 empty) kept on the
CPU so that planning a recall never synchronises a GPU. A recall of a page set keeps the resident pages that are
selected again, evicts the others (the pages that lost the selection: the lowest-scoring) and copies only the
missing ones, each (page, KV head) one contiguous ``[2, p, D]`` block of the host tier.

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

from livekv.store import HostStore, assign_slots


class PageSlots:
    """One layer's fast tier of page slots. ``mask [B, G, 1, S * p]`` (or ``None``: all visible) and ``columns
    [B, G, S * p]`` (logical token per column, -1 not visible) describe the last plan's selection."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype, device: torch.device):
        self.p = page_size
        self.keys = torch.empty(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.page = torch.empty(batch, kv_heads, 0, dtype=torch.long)
        self.tail = torch.zeros(batch, kv_heads, 1, 1, dtype=torch.long, device=device)
        self.mask = self.columns = None
        self.read = self.done = None  # CUDA events: compute has read the slots; the background recall is done

    def mark_read(self) -> None:
        """CUDA: the next background recall may overwrite slots only after what the compute stream has queued so
        far (the attention that reads them)."""
        if self.keys.device.type == "cuda":
            self.read = torch.cuda.Event()
            self.read.record()

    def clear(self) -> None:
        """Forget every resident page (after a multi-token step wrote tokens the slots have not seen)."""
        self.page.fill_(-1)

    def plan(self, pages: torch.Tensor, length: int, host_pages: int):
        """Make ``pages [B, G, k]`` (page ids, no duplicates per row; the last is the tail page that receives
        token ``length - 1``) the resident set of a sequence of ``length`` tokens.

        Updates the page table and the mask; returns ``b, g, page, slot [n]`` (CPU): the missing pages that exist
        in the host tier (``< host_pages``) and must be copied. A new, empty tail page only gets a slot.
        """
        pages = pages.cpu().contiguous()
        B, G, k = pages.shape
        self._grow(k)
        keep, missing, target = assign_slots(self.page, pages)
        self.page.masked_fill_(keep == 0, -1)
        b, g, j = missing.nonzero(as_tuple=True)
        slot, page = target[b, g, j], pages[b, g, j]
        self.page[b, g, slot] = page
        tail = pages[:, :, -1:]
        self.tail = (self.page == tail).to(torch.int8).argmax(-1).view(B, G, 1, 1).to(self.keys.device, non_blocking=True)
        self._set_mask(length)
        copy = page < host_pages
        return b[copy], g[copy], page[copy], slot[copy]

    def _grow(self, k: int) -> None:
        """At least ``k`` slots (exactly ``k`` when growing: the selection size reaches its maximum early)."""
        S = self.page.shape[-1]
        if k <= S:
            return
        B, G, _, D = self.keys.shape
        grown = self.keys.new_zeros(2, B, G, k * self.p, D)  # zeros: masked columns must hold no NaN
        grown[0, :, :, : S * self.p], grown[1, :, :, : S * self.p] = self.keys, self.values
        self.keys, self.values = grown[0], grown[1]
        self.page = torch.cat((self.page, self.page.new_full((B, G, k - S), -1)), -1)

    def _set_mask(self, length: int) -> None:
        B, G, S = self.page.shape
        tokens = (self.page.unsqueeze(-1) * self.p + torch.arange(self.p)).view(B, G, S * self.p)
        visible = (self.page >= 0).repeat_interleave(self.p, -1) & (tokens < length)
        device = self.keys.device
        self.columns = tokens.masked_fill(~visible, -1).to(device, non_blocking=True)
        self.mask = None if bool(visible.all()) else visible.unsqueeze(2).to(device, non_blocking=True)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Row ``b`` becomes row ``rows[b]`` (beam search)."""
        dev = rows.to(self.keys.device)
        self.keys, self.values, self.tail = (x.index_select(0, dev) for x in (self.keys, self.values, self.tail))
        self.page = self.page.index_select(0, rows.cpu())
        if self.columns is not None:
            self.columns = self.columns.index_select(0, dev)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, dev)

    def put(self, b: torch.Tensor, g: torch.Tensor, slot: torch.Tensor, blocks: torch.Tensor) -> None:
        """Write ``blocks [n, 2, p, D]`` (keys, values of one page each) into the slots ``(b, g, slot) [n]``."""
        B, G, _, D = self.keys.shape
        self.keys.view(B, G, -1, self.p, D)[b, g, slot] = blocks[:, 0]
        self.values.view(B, G, -1, self.p, D)[b, g, slot] = blocks[:, 1]

    def write_tail(self, k: torch.Tensor, v: torch.Tensor, token: int) -> None:
        """Write the newest token ``k, v [B, G, 1, D]`` (position ``token``) into the tail page's slot."""
        idx = (self.tail * self.p + token % self.p).expand(-1, -1, 1, k.shape[-1])
        self.keys.scatter_(2, idx, k)
        self.values.scatter_(2, idx, v)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def used(self) -> int:
        """Bytes of the slots that hold a page."""
        return self.nbytes * int((self.page >= 0).sum()) // max(1, self.page.numel())

    def state(self) -> dict[str, torch.Tensor]:
        """Slots, page table and the last plan's selection (after any background recall into them finished)."""
        out = {"keys": self.keys, "values": self.values, "page": self.page, "tail": self.tail}
        if self.columns is not None:
            out["columns"] = self.columns
        if self.mask is not None:
            out["mask"] = self.mask
        return out

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], page_size: int, device) -> PageSlots:
        keys = tensors["keys"]
        slots = cls(keys.shape[0], keys.shape[1], keys.shape[3], page_size, keys.dtype, torch.device(device))
        slots.keys, slots.values = keys.to(device), tensors["values"].to(device)
        slots.page, slots.tail = tensors["page"].cpu(), tensors["tail"].to(device)
        slots.columns = tensors["columns"].to(device) if "columns" in tensors else None
        slots.mask = tensors["mask"].to(device) if "mask" in tensors else None
        return slots


def gather_blocks(host: HostStore, b: torch.Tensor, g: torch.Tensor, page: torch.Tensor, out: torch.Tensor | None = None):
    """The host tier's ``(b, g, page) [n]`` blocks as ``[n, 2, p, D]`` (one contiguous block each)."""
    B, cap, G, _, p, D = host.pages.shape
    blocks = host.pages.view(B * cap * G, 2, p, D)
    return torch.index_select(blocks, 0, (b * cap + page) * G + g, out=out)


def copy_pages(host: HostStore, slots: PageSlots, b, g, page, slot) -> None:
    """Blocking recall of pages ``(b, g, page) [n]`` into ``slots`` at ``slot [n]`` (CPU indices)."""
    if len(page):
        device = slots.keys.device
        blocks = gather_blocks(host, b, g, page).to(device, non_blocking=True)
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
        return self._worker.submit(_timed, fn, *args)

    def _buffers(self, like: torch.Tensor, pinned: bool) -> list[torch.Tensor]:
        key = (like.shape[1:], like.dtype, like.device, pinned)
        if key not in self._staging:
            shape = (self.group, *like.shape[1:])
            self._staging[key] = [torch.empty(shape, dtype=like.dtype, pin_memory=pinned) for _ in range(2)]
        return self._staging[key]

    def stream(self, host: HostStore, slots: PageSlots, b, g, page, slot) -> None:
        """Copy pages ``(b, g, page) [n]`` of ``host`` into ``slots`` at ``slot [n]``, in groups, double-buffered."""
        if not len(page):
            return
        if slots.keys.device.type == "cuda":
            return self._stream_cuda(host, slots, b, g, page, slot)
        if len(page) <= self.group:  # one group: nothing to overlap
            return copy_pages(host, slots, b, g, page, slot)
        staging = self._buffers(host.pages[0, :1, 0], pinned=False)
        scatters: list[Future | None] = [None, None]
        for i, start in enumerate(range(0, len(page), self.group)):
            part = slice(start, start + self.group)
            if scatters[i % 2] is not None:
                scatters[i % 2].result()  # its buffer is free again
            buf = staging[i % 2][: len(page[part])]
            gather_blocks(host, b[part], g[part], page[part], out=buf)
            scatters[i % 2] = self._scatter.submit(slots.put, b[part], g[part], slot[part], buf)
        for f in scatters:
            if f is not None:
                f.result()

    def _stream_cuda(self, host: HostStore, slots: PageSlots, b, g, page, slot) -> None:
        """Copy stream: pinned staging -> device staging; scatter stream: device staging -> slots. Events order
        the reuse of each buffer; ``done`` (waited for by ``wait_cuda``) marks the end of the recall."""
        device, like = slots.keys.device, host.pages[0, :1, 0]  # like: one block, [1, 2, p, D]
        key = (device, like.shape, like.dtype)
        if key not in self._cuda:
            dev = [torch.empty((self.group, *like.shape[1:]), dtype=like.dtype, device=device) for _ in range(2)]
            events = [[torch.cuda.Event() for _ in range(2)] for _ in range(2)]  # [h2d done, scatter done]
            self._cuda[key] = (torch.cuda.Stream(device), torch.cuda.Stream(device), dev, events)
        copy_stream, scatter_stream, dev, (h2d, scattered) = self._cuda[key]
        pinned = self._buffers(like, pinned=True)
        if slots.read is not None:
            scatter_stream.wait_event(slots.read)
        for i, start in enumerate(range(0, len(page), self.group)):
            j, part = i % 2, slice(start, start + self.group)
            n = len(page[part])
            h2d[j].synchronize()  # the pinned buffer's previous upload has finished
            gather_blocks(host, b[part], g[part], page[part], out=pinned[j][:n])
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


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


_ENGINE: RecallEngine | None = None


def engine() -> RecallEngine:
    """The process-wide recall engine (its worker threads start on first use)."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = RecallEngine()
    return _ENGINE
