"""``rekv`` (ReKV, ICLR 2025): sliding-window encoding; tokens leaving the window are offloaded to the host tier in
blocks of one frame with their pre-RoPE keys; a question retrieves, per layer, the frames whose mean key is most
similar (cosine) to the question's mean query and reads them as consecutive positions before the window.

Retrieval is bounded in tokens, ``top_frames x tokens_per_frame``: blocks are taken in score order while they
fit. The window starts that many positions after the sink, so the retrieved frames always fit before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from livekv.stream.methods.base import StreamMethod, context, question_query
from livekv.stream.memory import rotate


@dataclass(kw_only=True)
class ReKV(StreamMethod):
    """Sliding window; older frames offloaded, the most similar retrieved per layer (ReKV)."""

    name = "rekv"
    short_term: int = 15 * 1024  # the paper's local window
    top_frames: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.top_frames < 1:
            raise ValueError(f"rekv: top_frames must be >= 1, got {self.top_frames}")

    def capacity(self, cache) -> int:
        """Tokens a question may retrieve (and the positions reserved for them)."""
        return int(self.top_frames * cache.adapter.tokens_per_frame)

    def overflow(self, layer, n: int) -> None:
        S, N = layer.n_sink, layer.ctx.length
        host = layer.host
        host["keys"].append(layer.unrotated(S, S + n).cpu().clone())  # the host layout: pre-RoPE, once, here
        host["values"].append(layer.ctx.values[:, :, S : S + n].cpu().clone())
        host["frame"].append(layer.frame[S : S + n].clone())
        layer.keep(torch.cat([torch.arange(S), torch.arange(S + n, N)]), n_long=0)

    def short_term_start(self, cache) -> int:
        return cache.sink_end + self.capacity(cache)

    def answer_context(self, layer, query, scaling):
        host = layer.host
        if not host["keys"]:
            return None
        keys, values, frame = (torch.cat(host[name], dim=-2 if name != "frame" else 0) for name in ("keys", "values", "frame"))
        # one block per run of equal frame ids (text between frames makes its own small block)
        block = torch.cat([torch.zeros(1, dtype=torch.long), (frame[1:] != frame[:-1]).long()]).cumsum(0)
        n_blocks = int(block[-1]) + 1
        G, D = keys.shape[1], keys.shape[3]
        sums = torch.zeros(G, n_blocks, D, dtype=keys.dtype).index_add_(1, block, keys[0])
        sizes = torch.bincount(block, minlength=n_blocks)
        means = sums / sizes[:, None]
        q = question_query(layer, query).to(keys.dtype).cpu()  # [H, D]
        H = q.shape[0]
        sim = F.cosine_similarity(q.view(G, H // G, 1, D), means[:, None], dim=-1)  # [G, H/G, n_blocks]
        order = sim.mean(dim=(0, 1)).argsort(descending=True)
        taken = (sizes[order].cumsum(0) <= self.capacity(layer.cache))
        chosen = torch.isin(block, order[taken])
        k, v = keys[:, :, chosen].to(layer.ctx.keys.device), values[:, :, chosen].to(layer.ctx.keys.device)
        m = k.shape[2]
        end = layer.short_start()
        positions = torch.arange(end - m, end).expand(layer.cache.position_dims, m)
        cos, sin = layer.cache.rope(positions, k.dtype)
        return context(layer, torch.arange(layer.ctx.length), insert=(rotate(k, cos, sin), v))
