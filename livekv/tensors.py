"""Helpers every tier and index uses: ``Bytes`` (what a part holds and what it has allocated), ``grow`` (capacity
that grows by a quarter, contents kept) and ``capacity_for`` (the same growth, rounded to a multiple)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Bytes(NamedTuple):
    """Bytes of a part of a tier: ``used`` by its content, ``nbytes`` allocated."""

    used: int
    nbytes: int


def capacity_for(needed: int, current: int, multiple: int) -> int:
    """A capacity of at least ``needed`` grown as ``grow`` grows (by a quarter at least), rounded up to a multiple
    of ``multiple`` (int8 kernels need row counts they can tile; two-level selection needs runs that divide it)."""
    return -(-max(needed, current + current // 4) // multiple) * multiple


def grow(buf: torch.Tensor, dim: int, needed: int) -> torch.Tensor:
    """Return ``buf`` with capacity >= ``needed`` along ``dim``, contents kept. Grows by 1/4 at least (amortised
    O(1) appends at most 25% slack: capacity is what the tiers report as resident). The new part is zeros: masked
    slots must not hold NaNs (masked attention still multiplies their values by 0)."""
    if buf.shape[dim] >= needed:
        return buf
    shape = list(buf.shape)
    shape[dim] = max(needed, shape[dim] + shape[dim] // 4, 8)
    new = torch.zeros(shape, dtype=buf.dtype, device=buf.device, pin_memory=buf.is_pinned())
    new.narrow(dim, 0, buf.shape[dim]).copy_(buf)
    return new
