"""ReKV (ICLR 2025) on a video stream: sliding-window encoding; tokens leaving the window are offloaded to the host
tier in blocks of one frame, each with its mean key (without rotary positions); a question retrieves, per layer, the
frames whose mean key is most similar (cosine) to the question's mean query, and reads them at consecutive
positions right before the window.

Retrieval is bounded in tokens, ``top_frames x tokens_per_frame``: frames are taken in score order while they fit.
The window starts that many positions after the sink, so the retrieved frames always fit before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from livekv import retrieval
from livekv.protocol import Plan, Recall
from livekv.methods.base import HostTier, StreamMethod, knob


@dataclass(kw_only=True)
class ReKVConfig(HostTier, StreamMethod):
    """Sliding window; older frames offloaded to the host tier, the most similar retrieved per layer (ReKV)."""

    name: ClassVar[str] = "rekv"
    top_frames: int | None = knob(None, "frames a question retrieves (default: from the memory)")

    def resolve(self, memory_tokens: int, tokens_per_frame: float) -> None:
        """Half the memory is the window, half the frames a question retrieves (the paper: a 15k-token window and
        64 frames of 196 tokens)."""
        if self.short_term is None:
            self.short_term = max(1, memory_tokens // 2)
        if self.top_frames is None:
            self.top_frames = max(1, int((memory_tokens - self.short_term) // tokens_per_frame))
        self.capacity = int(self.top_frames * tokens_per_frame)  # tokens a question may retrieve, positions reserved
        super().resolve(memory_tokens, tokens_per_frame)

    def validate_stream(self) -> None:
        super().validate_stream()
        self.check_host()
        if self.top_frames < 1:
            raise ValueError(f"rekv: top_frames must be >= 1, got {self.top_frames}")

    def settle(self, layer, n: int) -> Plan:
        S, N = layer.n_sink, layer.ctx.length
        return Plan(keep=torch.cat([torch.arange(S), torch.arange(S + n, N)]), n_long=0,
                    offload=torch.arange(S, S + n), blocks=layer.frame[S : S + n])

    def short_term_start(self, cache) -> int:
        return cache.sink_end + self.capacity

    def recall(self, layer, queries, scaling) -> Recall | None:
        blocks = layer.blocks
        if blocks is None:
            return None
        similar = retrieval.cosine(queries.mean(dim=1).cpu(), blocks.means)  # [G, H/G, n_blocks]
        order, ends = retrieval.ranked_prefix(similar.mean(dim=(0, 1)), blocks.sizes, self.capacity)
        host = torch.isin(blocks.block, order[ends <= self.capacity]).nonzero()[:, 0]
        end, m = layer.short_start(), len(host)
        positions = torch.arange(end - m, end).expand(layer.position_dims, m)
        return Recall(read=torch.arange(layer.ctx.length), host=host, positions=positions)
