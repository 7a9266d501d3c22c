"""Summaries of blocks of host-tier tokens, what selection reads instead of the tokens themselves: Quest's page
digests (``PageDigests``, in float32 or int8, with their coarse level over runs of pages) and the mean keys of
blocks in arrival order (``BlockSummaries``: ReKV's frames, LiveVLM's offloaded pages).

Shapes: B batch, G KV heads, P pages, D head dim.
"""

from __future__ import annotations

import torch

from livekv import retrieval
from livekv.tensors import Bytes, capacity_for, grow


class PageDigests:
    """Quest's page digests of one layer: the element-wise max and min of each page's keys per KV head, packed
    ``[B, G, P, 2D]`` (max | min), so that bounding every page is one matmul over contiguous rows
    (``retrieval.minmax_bound``); and a coarse level over runs of pages, made when first asked for and extended as
    pages fill (a full page's digest never changes).

    ``bits`` 32: float32 whatever the KV's dtype (torch's bfloat16 matmul copied the strided digest slice before
    every bound: 47% of a bfloat16 quest step at 32k). ``bits`` 8: ``retrieval.Int8Rows``, a quarter of the bytes,
    rounded outward (max up, min down) so that the bound stays an upper bound.

    Packed: one matmul over ``2D`` columns reads the bytes of two over ``D`` in about half their time (32k tokens,
    pages of 2, 28 layers, 2 threads: 54 vs 98 ms a step)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, device: torch.device, bits: int = 32):
        if bits not in (32, 8):
            raise ValueError(f"page digests are kept in 32 or 8 bits, not {bits}")
        self.bits = bits
        self.packed = self._encode(torch.empty(batch, kv_heads, 0, 2 * head_dim, device=device))
        self.coarse: tuple[int, torch.Tensor | retrieval.Int8Rows, int] | None = None  # (pages per run, runs, count)

    def _encode(self, digests: torch.Tensor) -> torch.Tensor | retrieval.Int8Rows:
        """float32 digests ``[B, G, n, 2D]`` in this store's form."""
        return digests if self.bits == 32 else retrieval.Int8Rows.encode(digests, outward=True)

    def _put(self, buf: torch.Tensor | retrieval.Int8Rows, first: int, new: torch.Tensor | retrieval.Int8Rows):
        """``buf`` (grown as needed, to a multiple of 64 rows and by a quarter at least) with rows ``first,
        first + 1, ...`` set to ``new``'s."""
        last, cap = first + new.shape[2], buf.shape[2]
        if last > cap:
            cap = capacity_for(last, cap, 64)
        if self.bits == 8:
            buf = buf.grow(cap)
            buf.codes[:, :, first:last], buf.scales[:, :, first:last] = new.codes, new.scales
            return buf
        buf = grow(buf, 2, cap)
        buf[:, :, first:last] = new
        return buf

    def set(self, first: int, keys: torch.Tensor) -> None:
        """Digests of pages ``first, first + 1, ...`` from their keys ``[B, n, G, p, D]``."""
        keys = keys.to(self.packed.device, non_blocking=True)
        new = torch.cat((keys.amax(dim=3), keys.amin(dim=3)), dim=-1).transpose(1, 2).float()
        self.packed = self._put(self.packed, first, self._encode(new))

    def runs(self, per: int, count: int) -> torch.Tensor | retrieval.Int8Rows:
        """Digests of the first ``count`` runs of ``per`` full pages, ``[B, G, count, 2D]``: made when first asked
        for and extended as pages fill (a full run's digest never changes)."""
        if self.coarse is None or self.coarse[0] != per:
            self.coarse = (per, self.packed[:, :, :0], 0)
        _, runs, done = self.coarse
        if count > done:
            runs = self._put(runs, done, self._reduce(done * per, count * per, per))
            self.coarse = (per, runs, count)
        return runs[:, :, :count]

    def _reduce(self, first: int, last: int, per: int) -> torch.Tensor | retrieval.Int8Rows:
        """Digests of pages ``[first, last)`` reduced over runs of ``per``: ``[B, G, (last - first) / per, 2D]``."""
        pages = self.packed[:, :, first:last].float()
        B, G, _, D2 = pages.shape
        pages = pages.reshape(B, G, -1, per, D2)
        return self._encode(torch.cat((pages[..., : D2 // 2].amax(3), pages[..., D2 // 2 :].amin(3)), dim=-1))

    def of_runs(self, per: int, runs: torch.Tensor) -> torch.Tensor | retrieval.Int8Rows:
        """The page digests of runs ``runs [B, G, k]`` of ``per`` pages: ``[B, G, k * per, 2D]``."""
        if self.packed.shape[2] % per:  # capacity is a multiple of 64 pages: for runs of a size that does not divide it
            pages = retrieval.page_tokens(runs, per).clamp(max=self.packed.shape[2] - 1)  # beyond: masked anyway
            return retrieval.gather_summaries(self.packed, pages)
        return retrieval.gather_runs(self.packed, runs, per)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page's digests (every batch row and KV head)."""
        return self.packed.nbytes // max(1, self.packed.shape[2])  # every page alike: no slice on the decode path

    def memory(self, n: int) -> Bytes:
        """Bytes used by ``n`` pages' digests and the coarse level, and allocated."""
        if self.coarse is None:
            return Bytes(self.page_bytes * n, self.packed.nbytes)
        _, runs, count = self.coarse
        used = runs.nbytes // max(1, runs.shape[2]) * count  # the runs made so far, not the room for more
        return Bytes(self.page_bytes * n + used, self.packed.nbytes + runs.nbytes)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.packed = self.packed.index_select(0, rows.to(self.packed.device))
        self.coarse = None

    def state(self, n: int) -> dict[str, torch.Tensor]:
        """The first ``n`` pages' digests: ``key_max`` and ``key_min`` ``[B, G, n, D]`` in float32, or the int8
        ``digest_codes [B, G, n, 2D]`` and ``digest_scales [B, G, n]``."""
        pages = self.packed[:, :, :n]
        if self.bits == 8:
            return {"digest_codes": pages.codes.contiguous(), "digest_scales": pages.scales.contiguous()}
        key_max, key_min = pages.chunk(2, dim=-1)
        return {"key_max": key_max.contiguous(), "key_min": key_min.contiguous()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if ("digest_codes" in tensors) != (self.bits == 8):
            raise ValueError(f"this snapshot's page digests are not in {self.bits} bits (digest_bits differ)")
        device = self.packed.device
        if self.bits == 8:
            pages = retrieval.Int8Rows(tensors["digest_codes"].to(device), tensors["digest_scales"].to(device))
        else:
            pages = torch.cat((tensors["key_max"], tensors["key_min"]), dim=-1).to(device, torch.float32)
        self.packed = self._put(self.packed[:, :, :0], 0, pages)  # capacity in multiples of 64, as appends leave it
        self.coarse = None


class BlockSummaries:
    """Blocks of host-tier tokens in arrival order, each summarised by the sum of its keys (``means``: the mean key
    per KV head, ``[G, n_blocks, D]``). ``block [T]`` is the block of each token. A new block starts wherever a
    token's block key differs from the previous token's (a frame for ReKV, a page for LiveVLM's offload)."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype):
        self.block = torch.empty(0, dtype=torch.long)
        self.sums = torch.zeros(kv_heads, 0, head_dim, dtype=dtype)
        self.sizes = torch.zeros(0, dtype=torch.long)
        self.last: int | None = None  # the block key of the last token

    def add(self, keys: torch.Tensor, key: torch.Tensor) -> None:
        """Account keys ``[G, n, D]`` of new tokens with block keys ``[n]``."""
        new_block = torch.ones(len(key), dtype=torch.bool)
        new_block[1:] = key[1:] != key[:-1]
        if self.last is not None:
            new_block[0] = int(key[0]) != self.last
        block = len(self.sizes) - 1 + new_block.long().cumsum(0)
        grow = int(block[-1]) + 1 - len(self.sizes)
        self.sums = torch.cat([self.sums, self.sums.new_zeros(self.sums.shape[0], grow, self.sums.shape[2])], dim=1)
        self.sizes = torch.cat([self.sizes, self.sizes.new_zeros(grow)])
        self.sums.index_add_(1, block, keys.to(self.sums.device))
        self.sizes.index_add_(0, block, torch.ones_like(block))
        self.block = torch.cat([self.block, block])
        self.last = int(key[-1])

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.sizes[:, None]

    @property
    def nbytes(self) -> int:
        return self.block.nbytes + self.sums.nbytes + self.sizes.nbytes

    used = nbytes

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {"block": self.block, "sums": self.sums, "sizes": self.sizes}, {"last": self.last}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> BlockSummaries:
        out = cls(tensors["sums"].shape[0], tensors["sums"].shape[2], tensors["sums"].dtype)
        out.block, out.sums, out.sizes, out.last = tensors["block"], tensors["sums"], tensors["sizes"], meta["last"]
        return out
