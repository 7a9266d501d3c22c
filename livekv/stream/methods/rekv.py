"""``rekv`` (ReKV, ICLR 2025): sliding-window encoding; tokens leaving the window are offloaded to the host tier in
blocks of one frame, each with its mean pre-RoPE key; a question retrieves, per layer, the frames whose mean key is
most similar (cosine) to the question's mean query and reads them as consecutive positions before the window.

Retrieval is bounded in tokens, ``top_frames x tokens_per_frame``: blocks are taken in score order while they
fit. The window starts that many positions after the sink, so the retrieved frames always fit before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from livekv.store import FastBuffer
from livekv.stream.memory import rotate
from livekv.stream.methods.base import StreamMethod, context, question_query


class FrameBlocks:
    """The host tier of one layer: offloaded tokens ``[1, G, M, D]`` (pre-RoPE keys, values) in arrival order, the
    block (frame) of each, and per block the sum of its keys ``[G, n_blocks, D]`` and its size."""

    def __init__(self, keys: torch.Tensor):
        G, D = keys.shape[1], keys.shape[3]
        self.tokens = FastBuffer(1, G, D, keys.dtype, torch.device("cpu"))
        self.frame = torch.empty(0, dtype=torch.long)
        self.block = torch.empty(0, dtype=torch.long)
        self.sums = torch.zeros(G, 0, D, dtype=keys.dtype)
        self.sizes = torch.zeros(0, dtype=torch.long)

    def add(self, keys: torch.Tensor, values: torch.Tensor, frame: torch.Tensor) -> None:
        """Offload keys (pre-RoPE), values ``[1, G, n, D]`` of frames ``[n]`` (a new block wherever the frame changes)."""
        new_block = torch.ones(len(frame), dtype=torch.bool)
        new_block[1:] = frame[1:] != frame[:-1]
        if len(self.frame):  # the last block continues if its frame does
            new_block[0] = frame[0] != self.frame[-1]
        block = len(self.sizes) - 1 + new_block.long().cumsum(0)
        n_blocks = int(block[-1]) + 1
        grow = n_blocks - len(self.sizes)
        self.sums = torch.cat([self.sums, self.sums.new_zeros(self.sums.shape[0], grow, self.sums.shape[2])], dim=1)
        self.sizes = torch.cat([self.sizes, self.sizes.new_zeros(grow)])
        keys, values = keys.cpu(), values.cpu()
        self.sums.index_add_(1, block, keys[0])
        self.sizes.index_add_(0, block, torch.ones_like(block))
        self.tokens.append(keys, values)
        self.frame, self.block = torch.cat([self.frame, frame]), torch.cat([self.block, block])

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + self.sums.nbytes


@dataclass(kw_only=True)
class ReKV(StreamMethod):
    """Sliding window; older frames offloaded, the most similar retrieved per layer (ReKV)."""

    name = "rekv"
    top_frames: int | None = None

    def resolve(self, memory_tokens: int, tokens_per_frame: float) -> None:
        """Half the memory is the window, half the frames a question retrieves (the paper: a 15k-token window and
        64 frames of 196 tokens, about 28k tokens)."""
        if self.short_term is None:
            self.short_term = max(1, memory_tokens // 2)
        if self.top_frames is None:
            self.top_frames = max(1, int((memory_tokens - self.short_term) // tokens_per_frame))
        super().resolve(memory_tokens, tokens_per_frame)

    def validate(self) -> None:
        super().validate()
        if self.top_frames < 1:
            raise ValueError(f"rekv: top_frames must be >= 1, got {self.top_frames}")

    def capacity(self, cache) -> int:
        """Tokens a question may retrieve (and the positions reserved for them)."""
        return int(self.top_frames * cache.adapter.tokens_per_frame)

    def overflow(self, layer, n: int) -> None:
        S, N = layer.n_sink, layer.ctx.length
        if layer.host is None:
            layer.host = FrameBlocks(layer.ctx.keys)
        # the host layout: pre-RoPE keys and the block sums, computed once, here, off the question's path
        layer.host.add(layer.unrotated(S, S + n), layer.ctx.values[:, :, S : S + n], layer.frame[S : S + n])
        layer.keep(torch.cat([torch.arange(S), torch.arange(S + n, N)]), n_long=0)

    def short_term_start(self, cache) -> int:
        return cache.sink_end + self.capacity(cache)

    def answer_context(self, layer, query, scaling):
        host = layer.host
        if host is None:
            return None
        G, D = host.sums.shape[0], host.sums.shape[2]
        means = host.sums / host.sizes[:, None]
        q = question_query(layer, query).to(means.dtype).cpu()  # [H, D]
        sim = F.cosine_similarity(q.view(G, -1, 1, D), means[:, None], dim=-1)  # [G, H/G, n_blocks]
        order = sim.mean(dim=(0, 1)).argsort(descending=True)
        taken = order[host.sizes[order].cumsum(0) <= self.capacity(layer.cache)]
        chosen = torch.isin(host.block, taken).nonzero()[:, 0]
        keys, values = host.tokens.view()
        device = layer.ctx.keys.device
        k, v = keys[:, :, chosen].to(device), values[:, :, chosen].to(device)
        m = k.shape[2]
        end = layer.short_start()
        cos, sin = layer.cache.rope(torch.arange(end - m, end).expand(layer.cache.position_dims, m), k.dtype)
        return context(layer, torch.arange(layer.ctx.length), insert=(rotate(k, cos, sin), v))
