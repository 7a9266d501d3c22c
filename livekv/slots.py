"""Fast-tier slot sets that keep what was recalled across decode steps, so that only what is newly selected is
copied: ``ResidentSet`` (slots of one token, clusterkv) and ``PageSlots`` (slots of one page, freekv).

A recall keeps the slots whose token (page) is selected again, evicts the others (they were not selected: the
lowest-scoring) and fills the freed slots with what is missing. ``PageSlots`` keeps its page table on the CPU so
that planning a recall never synchronises a GPU. Shapes: B batch, G KV heads, S slots, p page size, D head dim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from livekv.tensors import grow

if TYPE_CHECKING:
    from livekv.store import HostStore


def assign_slots(held: torch.Tensor, wanted: torch.Tensor):
    """Slot assignment for a resident set: ``held [B, G, S]`` ids in the slots (-1: empty), ``wanted [B, G, k]``
    ids to make resident (no duplicates per row, k <= S).

    Returns ``keep [B, G, S]`` (int8: the slot holds a wanted id), ``missing [B, G, k]`` (bool: not resident) and
    ``target [B, G, k]``: the slot a missing id goes to (the r-th missing id of a row takes its r-th free slot).
    """
    B, G, S = held.shape
    ids, order = held.sort(dim=-1)
    pos = torch.searchsorted(ids, wanted.contiguous()).clamp(max=S - 1)
    hit = ids.gather(-1, pos) == wanted
    keep = torch.zeros(B, G, S, dtype=torch.int8, device=held.device)
    keep.scatter_reduce_(-1, order.gather(-1, pos), hit.to(torch.int8), "amax")
    missing = ~hit
    rank = (missing.cumsum(-1) - 1).clamp(min=0)
    return keep, missing, keep.argsort(dim=-1, stable=True).gather(-1, rank)


class ResidentSet:
    """Fast-tier slots that keep recalled tokens across decode steps, so that only newly selected tokens are copied.

    ``keys, values [B, G, S, D]``; ``token [B, G, S]`` is the logical id held by each slot (-1: empty). A recall
    keeps the slots whose token is selected again, evicts the others (they were not selected: the lowest-scoring)
    and copies the missing tokens into the freed slots. Slots not selected this step are masked out.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.keys = torch.empty(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.token = torch.empty(batch, kv_heads, 0, dtype=torch.long, device=device)

    def _grow(self, n: int) -> None:
        S = self.token.shape[-1]
        if n <= S:
            return
        self.keys, self.values = grow(self.keys, 2, n), grow(self.values, 2, n)
        self.token = torch.cat([self.token, self.token.new_full((*self.token.shape[:2], self.keys.shape[2] - S), -1)], -1)

    def recall(self, host: "HostStore", token_idx: torch.Tensor):
        """Make ``token_idx [B, G, k]`` (no duplicates per row) resident.

        Returns ``keys, values [B, G, S, D]``, ``valid [B, G, S]`` (the slots holding selected tokens; ``None`` if
        all are) and the number of tokens copied from the host tier.
        """
        self._grow(token_idx.shape[-1])
        keep, missing, target = assign_slots(self.token, token_idx)
        b, g, j = missing.nonzero(as_tuple=True)
        if len(j):
            slot, tok = target[b, g, j], token_idx[b, g, j]
            k_new, v_new = host.gather_rows(host.rows(b.cpu(), g.cpu(), tok.cpu()))
            self.keys[b, g, slot] = k_new.to(self.keys.device, non_blocking=True)
            self.values[b, g, slot] = v_new.to(self.keys.device, non_blocking=True)
            self.token[b, g, slot] = tok
            keep[b, g, slot] = 1
        valid = keep.bool()
        evicted = ~valid
        self.token[evicted] = -1
        return self.keys, self.values, (None if bool(valid.all()) else valid), len(j)

    def select_rows(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.keys.device)
        self.keys, self.values, self.token = (x.index_select(0, rows) for x in (self.keys, self.values, self.token))

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.token.nbytes

    @property
    def used(self) -> int:
        """Bytes of the slots that hold a token."""
        S = self.token.shape[-1]
        return self.nbytes * int((self.token >= 0).sum()) // max(1, self.token.numel()) if S else 0

    def state(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "token": self.token}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        device = self.keys.device
        self.keys, self.values, self.token = (tensors[k].to(device) for k in ("keys", "values", "token"))


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
