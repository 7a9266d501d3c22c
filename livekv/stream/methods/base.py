"""What every streaming method shares.

A streaming method decides two things about the stream memory (``livekv.stream.memory``):

* ``overflow(layer, n)``: the ``n`` oldest short-term tokens leave short-term memory: drop them, offload them,
  or keep them as long-term memory (compressed when it exceeds its budget); and ``short_term_start(cache)``:
  the position short-term memory is moved to afterwards (``None``: it stays), which keeps positions bounded;
* ``answer_context(layer, query, scaling)``: the KV a question is answered over, built with the question's
  queries ``[1, H, n, D]`` (``None``: the whole memory, read in place).

Budgets are in tokens of one layer (one stream). Knobs left ``None`` are filled by ``resolve`` for the model the
session runs: each method owns its rule for a fast-tier memory of about ``memory_tokens`` tokens per layer
(``StreamSession`` takes it from the model: ``VideoLMAdapter.default_memory_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from livekv.methods.base import check_knob_types
from livekv.store import FastBuffer
from livekv.stream.memory import rotate

if TYPE_CHECKING:
    from livekv.stream.memory import StreamCache, StreamLayer


@dataclass(kw_only=True)
class StreamMethod:
    """Base of every streaming method's config. ``name`` is the registry key."""

    name: ClassVar[str]
    short_term: int | None = None
    vsb_rows: ClassVar[int] = 0  # > 0: the last r visual queries of each clip score the memory (livevlm)

    def __post_init__(self):
        check_knob_types(self)

    def resolve(self, memory_tokens: int, tokens_per_frame: float) -> None:
        """Fill the knobs left ``None`` for a memory of about ``memory_tokens`` tokens per layer (a frame adds about
        ``tokens_per_frame``), then check the knobs fit together (``ValueError``)."""
        self.validate()

    def validate(self) -> None:
        if self.short_term is not None and self.short_term < 1:
            raise ValueError(f"{self.name}: short_term must be >= 1 token, got {self.short_term}")

    def overflow(self, layer: StreamLayer, n: int) -> None:
        raise NotImplementedError(f"{self.name} keeps everything: nothing overflows")

    def short_term_start(self, cache: StreamCache) -> int | None:
        return None

    def answer_context(self, layer: StreamLayer, query: torch.Tensor, scaling: float) -> FastBuffer | None:
        return None


def context(layer: StreamLayer, idx: torch.Tensor, insert: tuple[torch.Tensor, torch.Tensor] | None = None) -> FastBuffer:
    """A fresh fast-tier buffer with the memory tokens ``idx [n]`` (ascending), and ``insert`` (keys, values
    ``[1, G, m, D]``) placed right after the sink: an answer context."""
    keys, values = layer.ctx.view()
    out = FastBuffer(1, keys.shape[1], keys.shape[3], keys.dtype, keys.device)
    sink, rest = idx[idx < layer.n_sink], idx[idx >= layer.n_sink]
    out.append(keys[:, :, sink], values[:, :, sink])
    if insert is not None:
        out.append(*insert)
    out.append(keys[:, :, rest], values[:, :, rest])
    return out


def question_queries(layer: StreamLayer, query: torch.Tensor) -> torch.Tensor:
    """The question's queries ``[1, H, m, D]`` without their rotary positions: ``[H, m, D]``."""
    cos, sin = layer.cache.rope(-layer.cache.chunk_positions, query.dtype)
    return rotate(query[0], cos, sin)


def question_query(layer: StreamLayer, query: torch.Tensor) -> torch.Tensor:
    """The question's queries without their rotary positions, averaged over its tokens: ``[H, D]``."""
    return question_queries(layer, query).mean(dim=1)
