"""LiveVLM (arXiv 2505.15269) on a video stream: short-term memory of the newest clips, long-term memory compressed
by Vision Sink Bucketing, and position-agnostic retrieval when a question arrives.

* Encoding: each clip attends to sink + long-term + short-term memory. Tokens leaving short-term memory join
  long-term memory (first in, first out), which stays in the fast tier.
* Vision Sink Bucketing (VSB), when long-term memory exceeds ``long_term`` (M) tokens: every token is scored by the
  attention it received from the queries of the clip's last ``vsb_rows`` (r) visual tokens (softmax per head and
  row, mean over heads and rows: one score per token, so a layer keeps the same tokens in all heads). The
  ``vision_sinks`` (R) best tokens are kept first; the rest fill M / ``bucket`` (B) temporal buckets of capacity B
  in descending score while their bucket has room, up to M tokens; survivors keep their temporal order. Once
  compressed, long-term memory is re-packed 1-D into the M positions right before short-term memory, so
  positions stay bounded.
* Position-agnostic retrieval (PaR): long-term memory in pages of ``page`` (C) tokens; a page's score is the
  attention the question pays to it without rotary positions (``retrieval.received_attention`` of the question's
  un-rotated queries over the un-rotated long-term keys, summed over the page). Each layer keeps its top
  ``retrieve`` share of pages and answers over sink + those pages + short-term memory + the question; the retrieved
  tokens keep the slots they hold in memory (their keys are stored rotated to them).
* ``offload`` (no anchor has it): what VSB removes goes to the host tier instead of being discarded, in pages of C
  with their mean keys; a question also recalls, per layer, the host pages its queries attend to most (softmax
  over their mean keys), up to ``recall_tokens``, in temporal order at the positions reserved for them right after
  the sink. The fast tier stays bounded; nothing seen is lost.

Paper defaults: M = 12k tokens, B = 1, C = 16, 40% of pages. Ours: budgets from the session's memory (``resolve``),
r = min(32, short-term), R = M / 4, the page score (measured on intermediate weights of the embedded VLM: 0.692 /
0.688 answered on two sets of 480 questions, against 0.677 / 0.669 scoring pages by the dot product of the mean
question query with the mean page key; docs/trials.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from livekv import retrieval
from livekv.protocol import Plan, Recall
from livekv.methods.base import HostTier, StreamMethod, knob


@dataclass(kw_only=True)
class LiveVLMConfig(HostTier, StreamMethod):
    """Short-term + VSB-compressed long-term memory, position-agnostic page retrieval (LiveVLM); ``offload`` keeps
    what compression removes in the host tier, for questions to recall."""

    name: ClassVar[str] = "livevlm"
    long_term: int | None = knob(None, "long-term memory budget M, tokens (default: from the memory)")
    bucket: int | None = knob(None, "VSB bucket capacity B (default: long_term, one bucket)")
    vision_sinks: int | None = knob(None, "VSB vision sinks R (default: long_term / 4)")
    vsb_rows: int | None = knob(None, "the last r visual queries of a clip score the memory (default: min(32, "
                                      "short_term))")
    page: int = knob(16, "PaR page size C, tokens")
    retrieve: float = knob(0.4, "share of long-term pages a question reads")
    offload: bool = knob(False, "keep what compression removes in the host tier; questions recall from it")
    recall_tokens: int | None = knob(None, "offload: host tokens a question may recall (default: long_term / 2)")

    def resolve(self, memory_tokens: int, tokens_per_frame: float) -> None:
        """A quarter of the memory short-term, the rest long-term (the paper: 4096 and 12288 tokens), in one bucket
        (VSB keeps the best-scored tokens; at a long-term memory of a few frames the paper's one-token buckets thin
        it evenly in time, mostly background, whatever the scores)."""
        if self.short_term is None:
            self.short_term = max(1, memory_tokens // 4)
        if self.long_term is None:
            self.long_term = max(1, memory_tokens - self.short_term)
        if self.bucket is None:
            self.bucket = self.long_term
        if self.vision_sinks is None:
            self.vision_sinks = self.long_term // 4
        if self.vsb_rows is None:
            self.vsb_rows = min(32, self.short_term)
        if self.recall_tokens is None:
            self.recall_tokens = self.long_term // 2 if self.offload else 0
        super().resolve(memory_tokens, tokens_per_frame)

    def validate_stream(self) -> None:
        super().validate_stream()
        self.check_host()
        if not 1 <= self.bucket <= self.long_term:
            raise ValueError(f"livevlm: need 1 <= bucket ({self.bucket}) <= long_term ({self.long_term})")
        if not 0 <= self.vision_sinks <= self.long_term:
            raise ValueError(f"livevlm: vision_sinks ({self.vision_sinks}) must be in [0, long_term={self.long_term}]")
        if not 0 < self.retrieve <= 1:
            raise ValueError(f"livevlm: retrieve is the share of pages kept, in (0, 1], got {self.retrieve}")
        if self.page < 1 or self.vsb_rows < 1 or self.recall_tokens < 0:
            raise ValueError("livevlm: page and vsb_rows must be >= 1, recall_tokens >= 0")
        if self.recall_tokens and not self.offload:
            raise ValueError("livevlm: recall_tokens needs offload")

    def settle(self, layer, n: int) -> Plan:
        """The ``n`` oldest short-term tokens join long-term memory; past ``long_term``, VSB compresses it (and with
        ``offload``, what it removes goes to the host tier)."""
        S, n_long, N = layer.n_sink, layer.n_long + n, layer.ctx.length
        if n_long <= self.long_term and not layer.packed:
            return Plan(keep=None, n_long=n_long)  # original positions until the first compression
        kept = vision_sink_buckets(layer.scores[S : S + n_long], self.long_term, self.vision_sinks, self.bucket)
        m = len(kept)
        end = layer.sink_end + self.recall_tokens + self.long_term
        plan = Plan(keep=torch.cat([torch.arange(S), S + kept, torch.arange(S + n_long, N)]), n_long=m,
                    long_positions=torch.arange(end - m, end).expand(layer.position_dims, m))
        if self.offload:
            evicted = S + torch.ones(n_long, dtype=torch.bool).index_fill_(0, kept, False).nonzero()[:, 0]
            done = layer.host.length if layer.host is not None else 0
            plan.offload, plan.blocks = evicted, (done + torch.arange(len(evicted))) // self.page
        return plan

    def short_term_start(self, cache) -> int | None:
        return cache.sink_end + self.recall_tokens + self.long_term if cache.long_term_packed else None

    def recall(self, layer, queries, scaling) -> Recall | None:
        S, n, C = layer.n_sink, layer.n_long, self.page
        host = self._recall_host(layer, queries, scaling)
        if (n == 0 or self.retrieve >= 1) and host is None:
            return None
        N = layer.ctx.length
        chosen = torch.arange(n)
        if n and self.retrieve < 1:
            scores = retrieval.block_sums(retrieval.received_attention(queries, layer.unrotated(slice(S, S + n))[0],
                                                                       scaling), C)
            top = retrieval.top_blocks(scores, math.ceil(self.retrieve * len(scores)))
            chosen = torch.isin(torch.arange(n, device=top.device) // C, top).nonzero()[:, 0]
        read = torch.cat([torch.arange(S), S + chosen, torch.arange(S + n, N)])
        if host is None:
            return Recall(read=read)
        m = len(host)
        end = layer.sink_end + self.recall_tokens
        return Recall(read=read, host=host, positions=torch.arange(end - m, end).expand(layer.position_dims, m))

    def _recall_host(self, layer, queries, scaling) -> torch.Tensor | None:
        """Host tokens (ascending) of the pages the question's queries attend to most, as far as ``recall_tokens``
        reach (whole pages)."""
        blocks = layer.blocks
        if not self.offload or blocks is None or not self.recall_tokens:
            return None
        scores = retrieval.received_attention(queries.cpu(), blocks.means, scaling)  # softmax over the pages
        order, ends = retrieval.ranked_prefix(scores, blocks.sizes, self.recall_tokens)
        return torch.isin(blocks.block, order[ends <= self.recall_tokens]).nonzero()[:, 0]


def vision_sink_buckets(scores: torch.Tensor, budget: int, sinks: int, bucket: int) -> torch.Tensor:
    """Indices (ascending) of the tokens VSB keeps: ``scores [n]`` in temporal order, at most ``budget`` kept."""
    n = scores.shape[0]
    if n <= budget:
        return torch.arange(n)
    n_buckets = budget // bucket
    which = torch.arange(n) * n_buckets // n  # temporal bucket of each token
    order = scores.argsort(descending=True, stable=True)
    top, rest = order[:sinks], order[sinks:]
    room = (bucket - torch.bincount(which[top], minlength=n_buckets)).clamp(min=0)
    # Within each bucket, the best `room` of the remaining tokens are eligible (a stable sort by bucket keeps
    # the descending score order inside each bucket); of those, the best fill the budget.
    by_bucket = which[rest].sort(stable=True)
    rank = torch.arange(len(rest)) - torch.searchsorted(by_bucket.values, by_bucket.values)
    eligible = rest[by_bucket.indices[rank < room[by_bucket.values]]]
    eligible = eligible[scores[eligible].argsort(descending=True, stable=True)][: budget - len(top)]
    return torch.cat([top, eligible]).sort().values
