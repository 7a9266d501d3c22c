"""The layer protocol's types: what a layer reports (``Memory``, ``LayerStats``), what picks a decode step's
tokens (``Selector``), and the stream protocol (``Plan``: what a method tells a stream layer to keep, offload or
re-position after a chunk; ``Recall``: what a question reads). The layers themselves are in ``livekv.layers``
(text) and ``livekv.stream.memory`` (streams); the protocol they implement is described there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from livekv.store import HostStore


@dataclass
class Memory:
    """KV bytes per tier: ``used`` what the content needs, ``reserved`` what is allocated for it."""

    fast_used: int = 0
    fast_reserved: int = 0
    host_used: int = 0
    host_reserved: int = 0

    def __add__(self, other: Memory) -> Memory:
        return Memory(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclass
class LayerStats:
    """Counters of the sparse decode steps of one layer (timings only when the cache is profiled)."""

    steps: int = 0
    tokens_read: int = 0  # per KV head, summed over steps
    tokens_copied: int = 0  # (token, KV head) pairs copied from the host tier; < tokens_read * G when reused
    bytes_recalled: int = 0
    select_s: float = 0.0
    recall_s: float = 0.0
    background_s: float = 0.0  # recall work done off the critical path (speculative methods)
    waited_s: float = 0.0  # of which the critical path waited for

    @property
    def recall_hidden(self) -> float | None:
        """Share of the background recall time the critical path did not wait for (``None``: no background
        recall). It does not say the work was free: on a CPU whose cores all compute, the worker's time lengthens
        the compute instead (measured: docs/results.md, "what background work costs")."""
        return max(0.0, 1 - self.waited_s / self.background_s) if self.background_s else None


class Selector(Protocol):
    """Maps a decode step's query to the tokens attention reads: ``query [B, H, D]`` -> token ids ``[B, G, k]``
    (logical positions, no duplicates per row; all query heads of a GQA group read the same tokens).
    ``select_nbytes``: the bytes of its index (digests, centroids) the last selection read."""

    select_nbytes: int

    def select(self, query: torch.Tensor, store: HostStore) -> torch.Tensor: ...


@dataclass
class Plan:
    """What a stream method tells a layer to do with its memory after a chunk (``StreamLayer.apply``).

    keep: ctx indices ``[m]`` (ascending) kept in the fast tier (``None``: all); ``n_long`` of them, after the sink,
        are long-term.
    offload: ctx indices ``[o]`` moved to the host tier (keys without their rotary positions), with ``blocks [o]``,
        a key per token: a new host block (a frame, a page) starts wherever it changes.
    long_positions: ``[P, n_long]``, the positions long-term tokens move to (their keys rotated there), or ``None``.
    """

    keep: torch.Tensor | None
    n_long: int
    offload: torch.Tensor | None = None
    blocks: torch.Tensor | None = None
    long_positions: torch.Tensor | None = None


@dataclass
class Recall:
    """What a question reads of a stream layer (``StreamLayer.answer_context``): the ctx tokens ``read [k]``
    (ascending, the sink among them) in place, and host tokens ``host [j]`` (ascending) placed right after the sink
    at ``positions [P, j]`` (their keys rotated there)."""

    read: torch.Tensor
    host: torch.Tensor | None = None
    positions: torch.Tensor | None = None
