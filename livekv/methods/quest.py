"""Quest (Tang et al., 2024): query-aware page selection by per-page min/max key digests, blocking recall.

A decode step reads sink + the best-scoring full pages between sink and window + the window. A page's score for a
query head is an upper bound of ``q . k`` over its keys (``retrieval.minmax_bound``); the group's query heads are
pooled (Quest: max) so that one KV head reads one set of pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from livekv import retrieval
from livekv.methods.base import SparseConfig, knob

if TYPE_CHECKING:
    from livekv.store import HostStore


@dataclass(kw_only=True)
class QuestConfig(SparseConfig):
    """Quest (Tang et al., 2024): min/max page digests, first 2 layers dense, group pooling by max; pages of 16
    (fewer tokens at budgets under 1024)."""

    name: ClassVar[str] = "quest"
    gqa_pool: Literal["max", "softmax_mean"] = knob("max", "pooling of the page scores over a GQA group")

    def make_selector(self, layer_idx: int) -> QuestSelector:
        return QuestSelector(self)


class QuestSelector:
    def __init__(self, cfg: QuestConfig):
        self.cfg = cfg

    def score(self, query: torch.Tensor, store: HostStore, first: int, last: int) -> torch.Tensor:
        """Pooled scores ``[B, G, last - first]`` of full pages ``[first, last)`` for query ``[B, H, D]``."""
        key_max, key_min = store.digests()
        bounds = retrieval.minmax_bound(query, key_max[:, :, first:last], key_min[:, :, first:last])
        return retrieval.pool_group(bounds, self.cfg.gqa_pool)

    def select(self, query: torch.Tensor, store: HostStore) -> torch.Tensor:
        """query ``[B, H, D]`` (post-RoPE) -> token ids ``[B, G, k]``, k <= budget."""
        return sink_pages_window(store, self.cfg, self.score, query)


def sink_pages_window(store: HostStore, cfg: SparseConfig, score, query: torch.Tensor,
                      length: int | None = None) -> torch.Tensor:
    """Sink + the best full pages between sink and window by ``score(query, store, first, last)`` + the window, as
    token ids ``[B, G, k]``.

    The window starts at the page boundary at or before ``T - window`` so that no token falls between the last
    candidate page and the window; with ``T <= budget`` every token is read (exactness). ``length``: select for a
    sequence of that many tokens instead of ``store.length`` (speculative selection for the next step: its
    candidate pages are all full already)."""
    B, G, device = query.shape[0], store.pages.shape[2], query.device
    T, p = (store.length if length is None else length), cfg.page_size
    if T <= cfg.budget:
        return torch.arange(T, device=device).expand(B, G, -1)
    window_start = max(cfg.sink, (T - cfg.window) // p * p)
    first, last = cfg.sink // p, window_start // p
    n_select = min(last - first, (cfg.budget - cfg.sink - (T - window_start)) // p)
    parts = [torch.arange(cfg.sink, device=device).expand(B, G, -1)]
    if n_select > 0:
        pages = retrieval.top_blocks(score(query, store, first, last), n_select) + first  # [B, G, n]
        parts.append(retrieval.page_tokens(pages, p))
    parts.append(torch.arange(window_start, T, device=device).expand(B, G, -1))
    return torch.cat(parts, dim=-1)
