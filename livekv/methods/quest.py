"""Quest (Tang et al., 2024): query-aware page selection by per-page min/max key digests, blocking recall.

A decode step reads sink + the best-scoring full pages between sink and window + the window. A page's score for a
query head is an upper bound of ``q . k`` over its keys (``retrieval.minmax_bound``); the group's query heads are
pooled (Quest: max) so that one KV head reads one set of pages.

Two-level selection (``coarse_pages``): the store also keeps min/max digests over runs of ``coarse_pages`` full
pages; a step scores those first, keeps ``coarse_keep`` runs per page it needs, and scores only the pages inside
them (copied run by run; those before the candidate range masked) and the pages past the last full run. A run's
bound is at least the bound of each of its pages, so a page whose run is not kept is one whose run's bound ranks
below that many others. With int8 digests and max pooling, both levels run in one compiled call per layer where
the CPU has AVX-512 VNNI (``livekv.kernels``; ``pick`` is the PyTorch path it is tested against).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch

from livekv import kernels, retrieval
from livekv.methods.base import SparseConfig, knob

if TYPE_CHECKING:
    from livekv.store import HostStore


@dataclass(kw_only=True)
class QuestConfig(SparseConfig):
    """Quest (Tang et al., 2024): min/max page digests, first 2 layers dense, group pooling by max; pages of 16
    (fewer tokens at budgets under 1024: ``budget // budget_pages``, at least 2; at budget 256, pages of 2).

    budget_pages: 128 (was 64: pages of 4 at budget 256). On the RULER dev split (4k, budget 256, niah_* x 2
        cases), pages of 4 scored retrieval 78.1 / 65.6 (prompt / fed) where dense scored 71.9 / 71.9; pages of 2
        scored 71.9 / 71.9, as dense in every task; pages of 8: 28.1 / 21.9. On failing dev needles, of the
        needle pages that dense heads attend (>= 5 % of their attention) quest at pages of 4 missed about a
        quarter because a 4-token page's min/max bound was loose (the exact page max ranked them in) and about
        a seventh through the group's max pooling; the sink and window's share of the budget hardly mattered.
    """

    name: ClassVar[str] = "quest"
    gqa_pool: retrieval.Pool = knob("max", "pooling of the page scores over a GQA group")
    budget_pages: int = knob(128, "page_size left None below budget 1024: budget // budget_pages tokens (a power "
                                  "of 2, at least 2): smaller pages, tighter min/max bounds")
    coarse_pages: int = knob(0, "pages per coarse block of the two-level selection (0: one level, every page scored)")
    coarse_keep: int = knob(1, "two-level selection: coarse blocks kept per page to select")
    digest_bits: int = knob(32, "page digests in float32 (32) or int8 (8: a quarter of the bytes, rounded outward)")

    def default_page_size(self) -> int:
        if self.budget_pages < 1:
            raise ValueError(f"{self.name}: budget_pages must be >= 1, got {self.budget_pages}")
        if self.budget >= 1024:
            return 16
        return max(2, 1 << max(0, (self.budget // self.budget_pages).bit_length() - 1))

    def validate(self) -> None:
        super().validate()
        if self.coarse_pages < 0 or self.coarse_pages == 1:
            raise ValueError(f"{self.name}: coarse_pages must be 0 (one level) or >= 2, got {self.coarse_pages}")
        if self.digest_bits not in (32, 8):
            raise ValueError(f"{self.name}: digest_bits must be 32 or 8, got {self.digest_bits}")
        if self.coarse_keep < 1:
            raise ValueError(f"{self.name}: coarse_keep must be >= 1, got {self.coarse_keep}")

    def make_selector(self, layer_idx: int) -> QuestSelector:
        return QuestSelector(self)


class StepPages(NamedTuple):
    """A decode step's layout over ``length`` tokens: ``[0, sink)``, ``n`` pages of ``page_size`` picked from the
    full pages ``[first, last)``, and the window ``[window_start, length)``."""

    sink: int
    page_size: int
    first: int
    last: int
    n: int
    window_start: int
    length: int

    @property
    def tokens(self) -> int:
        """Token ids the step reads: sink + picked pages + window."""
        return self.sink + self.n * self.page_size + self.length - self.window_start


def step_pages(cfg: SparseConfig, length: int) -> StepPages:
    """The window starts at the page boundary at or before ``length - window`` so that no token falls between the
    last candidate page and the window (call only with ``length > budget``)."""
    p = cfg.page_size
    window_start = max(cfg.sink, (length - cfg.window) // p * p)
    first, last = cfg.sink // p, window_start // p
    n = min(last - first, (cfg.budget - cfg.sink - (length - window_start)) // p)
    return StepPages(cfg.sink, p, first, last, n, window_start, length)


class QuestSelector:
    def __init__(self, cfg: QuestConfig):
        self.cfg = cfg
        self.select_nbytes = 0  # digest bytes the last selection read

    def bound(self, query: torch.Tensor, digests: torch.Tensor) -> torch.Tensor:
        """Blocks' min/max bounds for query ``[B, H, D]``, pooled over each GQA group: digests ``[B, G, n, 2D]`` ->
        ``[B, G, n]``."""
        bounds = retrieval.minmax_bound(query, digests)
        return retrieval.pool_group(bounds, self.cfg.gqa_pool, scale=query.shape[-1] ** -0.5)

    def score(self, query: torch.Tensor, store: HostStore, first: int, last: int) -> torch.Tensor:
        """Pooled scores ``[B, G, last - first]`` of full pages ``[first, last)`` for query ``[B, H, D]``."""
        return self.bound(query, store.digests()[:, :, first:last])

    def levels(self, store: HostStore, first: int, last: int, n: int):
        """How ``n`` pages of ``[first, last)`` are picked: ``(per, keep, runs)``, two levels (the digests of the
        full runs of ``per`` pages, the best ``keep`` of them) where there are more full runs than runs to keep,
        else ``(0, 0, None)``. Counts the digest bytes the pick reads."""
        per, keep = self.cfg.coarse_pages, n * self.cfg.coarse_keep
        full = last // per if per else 0
        page_bytes = store.page_digests.page_bytes
        if full <= keep:  # one level: no fewer pages to score in two
            self.select_nbytes = (last - first) * page_bytes
            return 0, 0, None
        self.select_nbytes = (full + keep * per + last - full * per) * page_bytes
        return per, keep, store.coarse_digests(per, full)

    def pick(self, query: torch.Tensor, store: HostStore, first: int, last: int, n: int) -> torch.Tensor:
        """The ``n`` best full pages of ``[first, last)`` for query ``[B, H, D]``: page ids ``[B, G, n]``."""
        per, keep, runs = self.levels(store, first, last, n)
        if runs is None:
            return retrieval.top_blocks(self.score(query, store, first, last), n) + first
        B, G, full = runs.shape[:3]
        kept = retrieval.top_blocks(self.bound(query, runs), keep)
        tail = torch.arange(full * per, last, device=query.device).expand(B, G, -1)
        ids = torch.cat((retrieval.page_tokens(kept, per), tail), dim=-1)  # [B, G, keep * per + tail]
        digests = retrieval.cat_rows(store.run_digests(per, kept), store.digests()[:, :, full * per:last])
        pages = self.bound(query, digests).masked_fill_(ids < first, float("-inf"))
        return ids.gather(-1, retrieval.top_blocks(pages, n))

    def select(self, query: torch.Tensor, store: HostStore, length: int | None = None) -> torch.Tensor:
        """query ``[B, H, D]`` (post-RoPE) -> token ids ``[B, G, k]``, k <= budget, for a sequence of ``length``
        tokens (default: all stored). Int8 digests with max pooling go through the compiled kernel where it runs
        (``livekv.kernels.quest_select``); ``sink_pages_window`` over ``pick`` is the reference."""
        T = store.length if length is None else length
        if T > self.cfg.budget and self.cfg.gqa_pool == "max" and store.page_digests.bits == 8:
            step = step_pages(self.cfg, T)
            if step.n > 0:  # the kernel reads pages [first, last) only: the whole buffer is passed, not a slice
                per, keep, runs = self.levels(store, step.first, step.last, step.n)
                tokens = kernels.quest_select(query, store.page_digests.packed, runs, per, keep, step)
                if tokens is not None:
                    return tokens
        return sink_pages_window(store, self.cfg, self.pick, query, length)


def sink_pages_window(store: HostStore, cfg: SparseConfig, pick, query: torch.Tensor,
                      length: int | None = None) -> torch.Tensor:
    """Sink + the best full pages between sink and window by ``pick(query, store, first, last, n)`` + the window
    (``step_pages``), as token ids ``[B, G, k]``; with ``length <= budget`` every token is read (exactness).
    ``length``: select for a sequence of that many tokens instead of ``store.length`` (speculative selection for
    the next step: its candidate pages are all full already)."""
    B, G, device = query.shape[0], store.kv_heads, query.device
    T = store.length if length is None else length
    if T <= cfg.budget:
        return torch.arange(T, device=device).expand(B, G, -1)
    step = step_pages(cfg, T)
    parts = [torch.arange(cfg.sink, device=device).expand(B, G, -1)]
    if step.n > 0:
        parts.append(retrieval.page_tokens(pick(query, store, step.first, step.last, step.n), step.page_size))
    parts.append(torch.arange(step.window_start, T, device=device).expand(B, G, -1))
    return torch.cat(parts, dim=-1)
