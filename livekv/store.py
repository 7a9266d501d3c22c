"""Tiered, paged KV storage for one attention layer.

Two tiers, each in the layout its reader wants:

* host tier (``HostStore``): keeps every token ever appended, in pages of ``page_size`` tokens laid out as
  ``[B, P, G, 2, p, D]`` (FreeKV's host layout): one (page, KV head) is one contiguous block holding that page's
  keys and values, so recalling a page of a head is one copy. It also keeps a digest per page and KV head, the
  element-wise max and min of the page's post-RoPE keys, packed ``[B, G, P, 2D]`` (``PageDigests``) so that
  bounding all pages is one matmul. The host tier is CPU memory (pinned when the fast tier is a GPU).
* fast tier (``FastBuffer``): what attention reads, ``[B, G, S, D]`` keys and values, on the compute device (the
  slot sets that keep recalled tokens or pages across steps are in ``livekv.slots``).

Recall copies tokens from the host tier into the fast tier; what comes back is bit-identical to what was stored
(``livekv.quantized`` keeps a host tier in 8 or 4 bits behind the same API: readers go through ``rows`` /
``gather_rows``, ``gather``, ``blocks`` and ``all_tokens``, never ``pages`` itself).
Shapes: B batch, G KV heads, T tokens, D head dim, P pages, p page size.
"""

from __future__ import annotations

import torch

from livekv.attention import attend
from livekv.summaries import PageDigests
from livekv.tensors import Bytes, grow


class FastBuffer:
    """A growable ``[B, G, capacity, D]`` key/value buffer on the compute device; ``length`` tokens are valid."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.keys = torch.empty(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k, v [B, G, n, D]`` after the valid tokens."""
        end = self.length + k.shape[2]
        self.keys = grow(self.keys, 2, end)
        self.values = grow(self.values, 2, end)
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end

    def reserve(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Resize to exactly ``n`` valid tokens (contents undefined) and return writable views ``[B, G, n, D]``."""
        self.keys = grow(self.keys, 2, n)
        self.values = grow(self.values, 2, n)
        self.length = n
        return self.view()

    def hold(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Take ``k, v [B, G, n, D]`` as the valid tokens, without a copy (a recall on the CPU, where the host
        tier's gather already lands in the memory attention reads); returns them. The capacity is then exactly
        ``n``: what a step's recall holds, without ``grow``'s slack."""
        self.keys, self.values, self.length = k, v, k.shape[2]
        return k, v

    def truncate(self, length: int, capacity: int) -> None:
        """Keep the first ``length`` tokens and at most ``capacity`` slots (give back what a transient use grew)."""
        self.length = length
        if self.keys.shape[2] > capacity:
            self.keys, self.values = self.keys[:, :, :capacity].clone(), self.values[:, :, :capacity].clone()

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def compact(self, idx: torch.Tensor) -> None:
        """Keep only the tokens ``idx [m]`` (ascending), moved to the front in place; tokens before the first one
        that leaves do not move."""
        m = len(idx)
        moved = (idx != torch.arange(m, device=idx.device)).nonzero()
        first = int(moved[0, 0]) if len(moved) else m
        src = idx[first:].to(self.keys.device)
        self.keys[:, :, first:m] = self.keys[:, :, src]
        self.values[:, :, first:m] = self.values[:, :, src]
        self.length = m

    def select_rows(self, rows: torch.Tensor) -> None:
        """Row ``b`` becomes row ``rows[b]`` (beam search)."""
        rows = rows.to(self.keys.device)
        self.keys, self.values = self.keys.index_select(0, rows), self.values.index_select(0, rows)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid keys and values, ``[B, G, length, D]`` each."""
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def attend(self, query: torch.Tensor, scaling: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attention.attend`` of ``query [B, H, n, D]`` over the valid tokens -> ``[B, n, H, D]``."""
        return attend(query, *self.view(), scaling, mask)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (the capacity)."""
        return self.keys.nbytes + self.values.nbytes

    @property
    def used(self) -> int:
        """Bytes of the valid tokens."""
        return self.nbytes * self.length // max(1, self.capacity)

    def state(self) -> dict[str, torch.Tensor]:
        keys, values = self.view()
        return {"keys": keys.contiguous(), "values": values.contiguous()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> FastBuffer:
        keys = tensors["keys"]
        buf = cls(keys.shape[0], keys.shape[1], keys.shape[3], keys.dtype, torch.device(device))
        buf.append(keys.to(device), tensors["values"].to(device))
        return buf


class HostStore:
    """Every appended token of one layer, paged, with per-page min/max key digests.

    ``length`` is the number of tokens stored; the last page may be partial (its digest is only computed once
    the page is full, because only full pages are candidates for selection).
    """

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
        digests: bool = True,
        digest_bits: int = 32,
    ):
        self.page_size = page_size
        self.track_digests = digests
        self.device = device  # where digests live and recalled tokens go
        self.dtype, self.head_dim = dtype, head_dim  # of the KV (what recall returns)
        self.pages = self._empty_pages(batch, kv_heads, pin=device.type == "cuda")
        self.page_digests = PageDigests(batch, kv_heads, head_dim, device, digest_bits)
        self.length = 0

    def _empty_pages(self, batch: int, kv_heads: int, pin: bool) -> torch.Tensor:
        """The host tier's pages, none yet: ``[B, 0, G, 2, p, D]`` in the KV's dtype, on the CPU."""
        return torch.empty(batch, 0, kv_heads, 2, self.page_size, self.head_dim, dtype=self.dtype, pin_memory=pin)

    @property
    def batch(self) -> int:
        return self.pages.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.pages.shape[2]

    @property
    def num_full_pages(self) -> int:
        return self.length // self.page_size

    @property
    def token_bytes(self) -> int:
        """Host-tier bytes of one token's key and value of one KV head (what recalling it reads)."""
        return 2 * self.head_dim * self.pages.element_size()

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v [B, G, n, D]`` (post-RoPE keys) after the tokens already stored."""
        self._check_shapes(k, v)
        n, p = k.shape[2], self.page_size
        start, end = self.length, self.length + n
        self._reserve_pages(-(-end // p))
        # Scatter the new tokens into their (page, offset) slots: [B, G, n, D] -> pages[b, t // p, g, kv, t % p].
        if n == 1:  # a decode step: one slot, set without index tensors
            page, slot = divmod(start, p)
            self.pages[:, page, :, 0, slot] = k[:, :, 0]
            self.pages[:, page, :, 1, slot] = v[:, :, 0]
        else:
            t = torch.arange(start, end)
            kv = torch.stack((k, v), dim=2).to(self.pages.device)  # [B, G, 2, n, D]; blocking: the CPU reads it next
            self.pages[:, t // p, :, :, t % p] = kv.permute(3, 0, 1, 2, 4)  # advanced dims first: [n, B, G, 2, D]
        self.length = end
        self._update_digests(start // p, self.num_full_pages)

    def _check_shapes(self, k: torch.Tensor, v: torch.Tensor) -> None:
        B, G, D = self.batch, self.kv_heads, self.head_dim
        if k.ndim != 4 or k.shape[:2] != (B, G) or k.shape[3] != D or v.shape != k.shape:
            raise ValueError(f"expected keys and values of shape [{B}, {G}, n, {D}], got {list(k.shape)} and {list(v.shape)}")

    def _reserve_pages(self, n: int) -> None:
        self.pages = grow(self.pages, 1, n)

    def _update_digests(self, first: int, last: int) -> None:
        """Compute digests of full pages ``[first, last)``."""
        if last <= first or not self.track_digests:
            return
        self._set_digests(first, self.pages[:, first:last, :, 0])

    def _set_digests(self, first: int, keys: torch.Tensor) -> None:
        """Digests of the full pages ``first, first + 1, ...`` from their keys ``[B, n, G, p, D]``."""
        self.page_digests.set(first, keys)

    def digests(self) -> torch.Tensor:
        """Key max and min of the full pages, packed ``[B, G, P_full, 2D]`` (max | min)."""
        return self.page_digests.packed[:, :, : self.num_full_pages]

    def coarse_digests(self, per: int, count: int | None = None) -> torch.Tensor:
        """Key max and min over the first ``count`` runs of ``per`` full pages (default: every full run; the
        coarse level of a two-level selection), packed ``[B, G, count, 2D]``."""
        full = self.num_full_pages // per
        if count is not None and count > full:
            raise ValueError(f"{count} runs of {per} pages asked for, {full} are full")
        return self.page_digests.runs(per, full if count is None else count)

    def run_digests(self, per: int, runs: torch.Tensor) -> torch.Tensor:
        """The page digests of runs ``runs [B, G, k]`` of ``per`` pages, ``[B, G, k * per, 2D]`` (pages that are
        not full yet have none: mask them)."""
        return self.page_digests.of_runs(per, runs)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Row ``b`` becomes row ``rows[b]`` (beam search): pages copied in place (the disk tier stays a file)."""
        self.pages.copy_(self.pages.index_select(0, rows.to(self.pages.device)))
        self.page_digests.select_rows(rows)

    def rows(self, b: torch.Tensor, g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Row numbers of the keys of tokens ``t`` of (batch ``b``, KV head ``g``) in ``pages`` viewed as
        ``[B*P*G*2*p, D]`` (broadcasting); a token's value is ``page_size`` rows further."""
        _, cap, G, _, p, _ = self.pages.shape
        page = t >> (p.bit_length() - 1) if p & (p - 1) == 0 else t // p  # a shift is 3x faster than a division
        return t + page * (2 * G * p - p) + (b * cap * G + g) * (2 * p)  # = ((b*cap + page)*G + g)*2p + t % p

    def gather_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[*rows.shape, D]`` at ``rows`` (from ``rows()``), still in the host tier."""
        flat = self.pages.view(-1, self.pages.shape[-1])
        flat_rows = rows.to(flat.device).reshape(-1)
        shape = (*rows.shape, flat.shape[-1])
        return flat.index_select(0, flat_rows).view(shape), flat.index_select(0, flat_rows + self.page_size).view(shape)

    def gather(self, token_idx: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Recall tokens: ``token_idx [B, G, k]`` -> keys, values ``[B, G, k, D]`` (exact copies).

        With ``out`` (fast-tier views of the same shape) the recalled tokens are written there.
        """
        B, G = token_idx.shape[:2]
        k, v = self.gather_rows(self.rows(torch.arange(B).view(B, 1, 1), torch.arange(G).view(1, G, 1), token_idx.cpu()))
        if out is None:
            return k.to(self.device, non_blocking=True), v.to(self.device, non_blocking=True)
        out[0].copy_(k, non_blocking=True)
        out[1].copy_(v, non_blocking=True)
        return out

    def blocks(self, b: torch.Tensor, g: torch.Tensor, page: torch.Tensor, out: torch.Tensor | None = None):
        """The ``(b, g, page) [n]`` blocks (one page of one KV head) as keys and values ``[n, 2, p, D]`` in the
        KV's dtype, on the CPU (into ``out`` if given): each one contiguous block of ``pages``."""
        B, cap, G, _, p, D = self.pages.shape
        flat = self.pages.view(B * cap * G, 2, p, D)
        return torch.index_select(flat, 0, (b * cap + page) * G + g, out=out)

    def all_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored token as keys, values ``[B, G, T, D]`` on the compute device (used by dense prefill)."""
        B, _, G, _, p, D = self.pages.shape
        n_pages = -(-self.length // p)
        kv = self.pages[:, :n_pages].permute(0, 2, 3, 1, 4, 5).reshape(B, G, 2, n_pages * p, D)
        kv = kv[:, :, :, : self.length].to(self.device, non_blocking=True)
        return kv[:, :, 0], kv[:, :, 1]

    @property
    def nbytes(self) -> int:
        """Bytes allocated in the host tier (pages). Digests live with the fast tier: ``digest_memory``."""
        return self.pages.nbytes

    @property
    def used(self) -> int:
        """Bytes of the stored tokens."""
        return self.batch * self.kv_heads * self.token_bytes * self.length

    def digest_memory(self) -> Bytes:
        """The digests' bytes (the coarse level's included): used (full pages) and allocated."""
        return self.page_digests.memory(self.num_full_pages if self.track_digests else 0)

    def state(self) -> dict[str, torch.Tensor]:
        """The used pages and the digests of the full pages (what ``load_state`` needs to go on exactly)."""
        used_pages, full = -(-self.length // self.page_size), self.num_full_pages
        out = {"pages": self.pages[:, :used_pages]}
        if self.track_digests:
            out.update(self.page_digests.state(full))
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], length: int) -> None:
        """Restore what ``state`` returned into this (empty) store of the same shape."""
        pages = tensors["pages"]
        if pages.dtype != self.pages.dtype:
            raise ValueError(f"this snapshot's host tier holds {pages.dtype}, this one {self.pages.dtype} "
                             "(host_bits differ)")
        self._reserve_pages(pages.shape[1])
        self.pages[:, : pages.shape[1]].copy_(pages)
        self.length = length
        if self.track_digests:
            self.page_digests.load_state(tensors)
        self._loaded()

    def _loaded(self) -> None:
        """After ``load_state`` wrote the pages (the disk tier drops them from memory)."""
