"""``livevlm`` (LiveVLM, arXiv 2505.15269): short-term memory of the newest clips, long-term memory compressed by
Vision Sink Bucketing, and position-agnostic retrieval when a question arrives.

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
  attention the question pays to it without rotary positions (softmax of each head's un-rotated question
  queries over the un-rotated long-term keys, mean over heads and question tokens, summed over the page: the
  same measure VSB scores tokens by). Each layer keeps its top ``retrieve`` share of pages and answers over
  sink + those pages + short-term memory + the question. Positions re-applied: the
  retrieved tokens keep the slots they hold in memory (their keys are stored rotated to them), so the question
  sits right after short-term memory whatever was retrieved.

Paper defaults: M = 12k tokens, B = 1, C = 16, 40% of pages. Ours: budgets from the session's memory (``resolve``:
a quarter short-term, the rest long-term in one bucket), r = min(32, short-term) (the last queries of a clip),
R = M / 4, the page score
(measured on intermediate weights of the embedded VLM, 2-minute streams, 56 tokens of memory: 0.692 / 0.688
answered on two sets of 480 questions, against 0.677 / 0.669 scoring pages by the dot product of the mean
question query with the mean page key; ``docs/results.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from livekv.stream.memory import received_attention
from livekv.stream.methods.base import StreamMethod, context, question_queries


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


def page_scores(keys: torch.Tensor, queries: torch.Tensor, page: int, scaling: float) -> torch.Tensor:
    """PaR's page scores ``[ceil(n / page)]``: the attention un-rotated question queries ``[H, m, D]`` pay to
    un-rotated keys ``[G, n, D]`` (softmax per head and query, mean over heads and queries), summed per page."""
    n = keys.shape[1]
    received = received_attention(queries, keys, scaling)  # [n]
    page_of = torch.arange(n, device=keys.device) // page
    return torch.zeros(-(-n // page), device=keys.device).index_add_(0, page_of, received)


@dataclass(kw_only=True)
class LiveVLM(StreamMethod):
    """Short-term + VSB-compressed long-term memory, position-agnostic page retrieval (LiveVLM)."""

    name = "livevlm"
    long_term: int | None = None  # M
    bucket: int | None = None  # B
    vision_sinks: int | None = None  # R, default M / 4
    vsb_rows: int | None = None  # r
    page: int = 16  # C
    retrieve: float = 0.4

    def resolve(self, memory_tokens: int, tokens_per_frame: float) -> None:
        """A quarter of the memory short-term, the rest long-term (the paper: 4096 and 12288 tokens); one bucket
        (``bucket = long_term``: VSB keeps the best-scored tokens; at a long-term memory of a few frames the
        paper's one-token buckets thin it evenly in time, mostly background, whatever the scores); the last
        ``min(32, short_term)`` visual queries of a clip score the memory."""
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
        super().resolve(memory_tokens, tokens_per_frame)

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.bucket <= self.long_term:
            raise ValueError(f"livevlm: need 1 <= bucket ({self.bucket}) <= long_term ({self.long_term})")
        if not 0 <= self.vision_sinks <= self.long_term:
            raise ValueError(f"livevlm: vision_sinks ({self.vision_sinks}) must be in [0, long_term={self.long_term}]")
        if not 0 < self.retrieve <= 1:
            raise ValueError(f"livevlm: retrieve is the share of pages kept, in (0, 1], got {self.retrieve}")
        if self.page < 1 or self.vsb_rows < 1:
            raise ValueError("livevlm: page and vsb_rows must be >= 1")

    def overflow(self, layer, n: int) -> None:
        S = layer.n_sink
        layer.n_long += n
        if layer.n_long <= self.long_term and not layer.cache.long_term_packed:
            return  # long-term memory keeps its original positions until the first compression
        kept = vision_sink_buckets(layer.scores[S : S + layer.n_long], self.long_term, self.vision_sinks, self.bucket)
        m = len(kept)
        layer.keep(torch.cat([torch.arange(S), S + kept, torch.arange(S + layer.n_long, layer.ctx.length)]), n_long=m)
        end = layer.cache.sink_end + self.long_term
        packed = torch.arange(end - m, end).expand(layer.cache.position_dims, m)
        layer.shift(S, S + m, packed - layer.pos[:, S : S + m])
        layer.cache.long_term_packed = True

    def short_term_start(self, cache) -> int | None:
        return cache.sink_end + self.long_term if cache.long_term_packed else None

    def answer_context(self, layer, query, scaling):
        S, n, C = layer.n_sink, layer.n_long, self.page
        if n == 0 or self.retrieve >= 1:
            return None
        scores = page_scores(layer.unrotated(S, S + n)[0], question_queries(layer, query), C, scaling)
        top = scores.topk(math.ceil(self.retrieve * len(scores))).indices
        chosen = torch.isin(torch.arange(n, device=top.device) // C, top)
        N = layer.ctx.length
        return context(layer, torch.cat([torch.arange(S), S + chosen.nonzero()[:, 0], torch.arange(S + n, N)]))
