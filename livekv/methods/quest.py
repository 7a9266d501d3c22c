"""Quest: query-aware page selection by per-page min/max key digests, blocking recall.

Score of page P for query head h: ``sum_d max(q_d * max_d, q_d * min_d)``, an upper bound of ``q . k`` over the
page's keys. The group's query heads are pooled (Quest: max) so that one KV head reads one set of pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from livekv.methods.base import SparseConfig, sink_pages_window

if TYPE_CHECKING:
    from livekv.store import HostStore


def page_upper_bounds(query: torch.Tensor, store: "HostStore", first: int, last: int) -> torch.Tensor:
    """Upper bounds of ``q . k`` per page: query ``[B, H, D]`` -> scores ``[B, G, H/G, last - first]``.

    ``max(q*M, q*m) = relu(q)*M + min(q, 0)*m`` because ``M >= m``: two matmuls instead of a [.., P, D] temporary.
    """
    key_max, key_min = store.digests()
    key_max, key_min = key_max[:, :, first:last], key_min[:, :, first:last]  # [B, G, n, D]
    B, H, D = query.shape
    q = query.view(B, key_max.shape[1], -1, D).to(key_max.dtype)  # [B, G, r, D]
    return q.clamp(min=0) @ key_max.transpose(-1, -2) + q.clamp(max=0) @ key_min.transpose(-1, -2)


def pool_group(scores: torch.Tensor, how: Literal["max", "softmax_mean"]) -> torch.Tensor:
    """Pool per-query-head page scores ``[B, G, r, n]`` over the GQA group -> ``[B, G, n]``.

    ``max``: Quest. ``softmax_mean``: FreeKV's best, a softmax over pages per query head, then the group mean.
    """
    if how == "max":
        return scores.amax(dim=2)
    if how == "softmax_mean":
        return scores.float().softmax(dim=-1).mean(dim=2)
    raise ValueError(f"unknown GQA pooling {how!r}; expected 'max' or 'softmax_mean'")


@dataclass(kw_only=True)
class QuestConfig(SparseConfig):
    """Quest (Tang et al., 2024): min/max page digests, first 2 layers dense, group pooling by max; pages of 16
    (fewer tokens at budgets under 1024, see ``SparseConfig``)."""

    name: ClassVar[str] = "quest"
    gqa_pool: Literal["max", "softmax_mean"] = "max"

    def make_selector(self, layer_idx: int) -> "QuestSelector":
        return QuestSelector(self)


class QuestSelector:
    def __init__(self, cfg: QuestConfig):
        self.cfg = cfg

    def score(self, query: torch.Tensor, store: "HostStore", first: int, last: int) -> torch.Tensor:
        return pool_group(page_upper_bounds(query, store, first, last), self.cfg.gqa_pool)

    def select(self, query: torch.Tensor, store: "HostStore") -> torch.Tensor:
        """query ``[B, H, D]`` (post-RoPE) -> token ids ``[B, G, k]``, k <= budget."""
        return sink_pages_window(store, self.cfg, self.score, query)
