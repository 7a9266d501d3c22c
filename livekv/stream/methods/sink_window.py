"""``sink_window``: the sink (system prompt) and the most recent frames only (StreamingLLM on a video stream).
Tokens that leave the window are dropped; the window is re-positioned right after the sink."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from livekv.stream.methods.base import StreamMethod


@dataclass(kw_only=True)
class SinkWindow(StreamMethod):
    """Sink + the most recent frames; older ones dropped (StreamingLLM)."""

    name = "sink_window"

    def resolve(self, memory_tokens: int, tokens_per_frame: float) -> None:
        """The whole memory is the window."""
        if self.short_term is None:
            self.short_term = memory_tokens
        super().resolve(memory_tokens, tokens_per_frame)

    def overflow(self, layer, n: int) -> None:
        N, S = layer.ctx.length, layer.n_sink
        layer.keep(torch.cat([torch.arange(S), torch.arange(S + n, N)]), n_long=0)

    def short_term_start(self, cache) -> int:
        return cache.sink_end
