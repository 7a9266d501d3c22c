"""The disk host tier: a ``HostStore`` in a memory-mapped file kept out of the page cache, and ``make_host_store``,
which builds the host tier a method names (``"ram"`` or ``"disk"``)."""

from __future__ import annotations

import mmap
import os
import tempfile

import torch

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


def make_host_store(kind: str, *args, directory: str | None = None, **kwargs) -> HostStore:
    """The host tier: ``"ram"`` (``HostStore``) or ``"disk"`` (``DiskHostStore`` in ``directory``)."""
    if kind == "ram":
        return HostStore(*args, **kwargs)
    if kind == "disk":
        return DiskHostStore(*args, directory=directory, **kwargs)
    raise ValueError(f"unknown host tier {kind!r}; expected 'ram' or 'disk'")
