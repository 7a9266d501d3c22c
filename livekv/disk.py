"""The disk host tier: a ``HostStore`` in a memory-mapped file kept out of the page cache, and ``make_host_store``,
which builds the host tier a method names (``"ram"`` or ``"disk"``, exact or quantized)."""

from __future__ import annotations

import mmap
import os
import tempfile

import torch

from livekv.quantized import QuantHostStore
from livekv.store import HostStore


class DiskHostStore(HostStore):
    """A ``HostStore`` whose pages live in a memory-mapped file: a cold tier, where recall really costs I/O.

    Same layout and API as ``HostStore`` (digests stay in memory). The file is created in ``directory`` (default:
    the system temp dir) and unlinked at once, so it disappears with the store. Growing makes a new, larger file
    and copies the pages over (amortised like ``grow``).

    Keeping it cold: after every append the mapping is synced and dropped from this process
    (``madvise(MADV_DONTNEED)``) and the file from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``), so a
    recall after an append faults its pages in from the block device. Readahead is off (``MADV_RANDOM``): a recall
    reads the 4 KiB blocks it touches, not their neighbours. Between two appends of the layer, pages read by a
    recall stay in the page cache; the hypervisor may also cache the virtual disk.
    """

    def __init__(self, *args, directory: str | None = None, **kwargs):
        self.directory = directory
        self._file = self._map = None
        super().__init__(*args, **kwargs)
        self._reserve_pages(0)

    def _reserve_pages(self, n: int) -> None:
        old = self.pages
        cap = old.shape[1]
        if self._map is not None and n <= cap:
            return
        shape = list(old.shape)
        shape[1] = max(n, cap + cap // 4, 8)
        nbytes = old.element_size() * torch.Size(shape).numel()
        file = tempfile.TemporaryFile(dir=self.directory)  # already unlinked
        file.truncate(nbytes)
        mapping = mmap.mmap(file.fileno(), nbytes)
        mapping.madvise(mmap.MADV_RANDOM)
        self.pages = torch.frombuffer(mapping, dtype=old.dtype).view(shape)  # keeps the mapping alive
        self.pages[:, :cap].copy_(old)
        self._file, self._map = file, mapping

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        super().append(k, v)
        self.drop_page_cache()

    def select_rows(self, rows: torch.Tensor) -> None:
        super().select_rows(rows)
        self.drop_page_cache()

    def _loaded(self) -> None:
        self.drop_page_cache()

    def drop_page_cache(self) -> None:
        """Write the pages back and drop them from memory: the next reads go to the device."""
        self._map.flush()
        self._map.madvise(mmap.MADV_DONTNEED)
        os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


class QuantDiskHostStore(QuantHostStore, DiskHostStore):
    """A quantized host tier whose codes live in the disk tier's file (scales, zero points, residual in memory)."""

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        QuantHostStore.append(self, k, v)
        self.drop_page_cache()


def make_host_store(kind: str, *args, directory: str | None = None, bits: int = 16, **kwargs) -> HostStore:
    """The host tier: ``"ram"`` (``HostStore``) or ``"disk"`` (``DiskHostStore`` in ``directory``), exact
    (``bits`` 16: the KV's own dtype) or quantized in 8 or 4 bits (``livekv.quantized``)."""
    if kind not in ("ram", "disk"):
        raise ValueError(f"unknown host tier {kind!r}; expected 'ram' or 'disk'")
    if bits == 16:
        return HostStore(*args, **kwargs) if kind == "ram" else DiskHostStore(*args, directory=directory, **kwargs)
    if kind == "ram":
        return QuantHostStore(*args, bits=bits, **kwargs)
    return QuantDiskHostStore(*args, bits=bits, directory=directory, **kwargs)


def state_layout(tensors: dict[str, torch.Tensor]) -> tuple[int, int, int, torch.dtype]:
    """Batch, KV heads, head dim and KV dtype of a host tier from its ``state()``."""
    if "residual" in tensors:  # quantized: the residual [B, G, 2, r, D] holds the KV's dtype
        r = tensors["residual"]
        return r.shape[0], r.shape[1], r.shape[-1], r.dtype
    pages = tensors["pages"]  # [B, P, G, 2, p, D]
    return pages.shape[0], pages.shape[2], pages.shape[-1], pages.dtype
