"""ClusterKV: recall at the granularity of semantic clusters of keys instead of text positions.

Per layer and KV head, the post-RoPE keys after the sink are clustered by k-means with cosine assignment. The
index (per (batch, KV head) row) holds the centroids, the cluster sizes, their exclusive prefix sums and the token
ids grouped by cluster. A decode step scores the clusters by ``q . centroid`` (pooled over the GQA group), takes
whole clusters in descending score and truncates the last one to fill the budget, and reads sink + those tokens +
every token stored since the last clustering. Recalled tokens stay in the fast tier across steps
(``ResidentSet``): only newly selected tokens are copied.

Choices the paper leaves OPEN, made here:

* Budget: ``sink + clustered tokens + recent tokens <= budget``, the recent (not yet clustered) tokens included.
  ``window`` is the paper's incremental-clustering period m: once ``window`` tokens have accumulated after the
  current one, they are clustered (next point) and their clusters appended to the index, so at most ``window``
  recent tokens are read and clusters always get at least ``budget - sink - window``. Default
  ``min(320, (budget - sink) // 3)``: the paper's m = 320 from budget ~1k, a third of the selectable budget below.
* Clustering is lazy: at the first decode step with more tokens than the budget, everything stored before the
  current token is clustered, into ``max(new_clusters, n // tokens_per_cluster)`` clusters for ``n`` tokens (one
  per ``tokens_per_cluster`` after a prefill; per ``window`` decoded tokens the paper's ``new_clusters`` from
  budget 1024 up, clusters of ``tokens_per_cluster`` below; the same rule catches up after a multi-token step
  such as a chat turn). With ``T <= budget`` every token is read (exactness).
* Cluster size scales down with small budgets (``tokens_per_cluster``, as Quest's pages do here): the paper's 80
  leaves room for ~3 clusters at budget 256, which misses a needle whose digits share their clusters with the
  filler's numbers. Fine clusters are many (~1,400 for 4k tokens at budget 256): beyond ``TWO_LEVEL_FROM``
  clusters, k-means runs in two levels (``two_level_kmeans``), as tight and several times cheaper. Their
  centroids cost fast-tier memory: a sixth of the KV size at 3 tokens per cluster (Quest's digests of 4-token
  pages: a quarter).
* Init: ``C`` distinct random keys (seeded: reproducible), the same positions for every row. A truncated cluster
  contributes its first tokens in position order. GQA pooling: Quest's ``max`` over the group's ``q . centroid``
  (measured, needle 2k, budget 256, 80-token clusters: ``max`` 2/5, ``softmax_mean`` 0/5).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F

from livekv.methods.base import SparseConfig, all_tokens
from livekv.methods.quest import pool_group

if TYPE_CHECKING:
    from livekv.cache import LiveKVCache
    from livekv.store import HostStore


TWO_LEVEL_FROM = 64  # more clusters than this: two-level k-means (the flat one's cost grows with the clusters)


def kmeans(x: torch.Tensor, n_clusters: int, iters: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched k-means with cosine assignment: ``x [R, N, D]`` -> ``assign [R, N]``, ``centroids [R, C, D]``.

    A centroid is the mean of its members (not normalised); an empty cluster keeps its previous centroid. Stops
    after ``iters`` assignments or when the assignment no longer changes.
    """
    x = x.float()
    init = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(seed))[:n_clusters].to(x.device)
    return _lloyd(x, x[:, init], iters)


def two_level_kmeans(x: torch.Tensor, n_clusters: int, iters: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``kmeans`` in two levels, for many clusters: ``x [R, N, D]`` -> ``assign [R, N]``, ``centroids [R, C', D]``
    with ``C' = c * k >= n_clusters`` (``k = ceil(sqrt(n_clusters))``, ``c = ceil(n_clusters / k)``).

    First ``c`` coarse clusters over all tokens, then each split into ``k`` by k-means among its own members only
    (init: ``k`` members spread over the coarse cluster in position order). An iteration costs ``N (c + k)``
    similarities instead of ``N C``: on SmolLM2's keys (4k tokens, C = 1018) 6-11x faster than ``kmeans`` and as
    tight (mean member-centroid cosine 0.906 vs 0.905). Fine clusters of an empty coarse cluster stay empty.
    """
    R, N, D = x.shape
    k = math.ceil(math.sqrt(n_clusters))
    c = math.ceil(n_clusters / k)
    coarse, _ = kmeans(x, c, iters, seed)
    x = x.float()
    order = coarse.argsort(dim=-1, stable=True)  # token ids grouped by coarse cluster
    sizes = torch.zeros(R, c, dtype=torch.long, device=x.device).scatter_add_(-1, coarse, torch.ones_like(coarse))
    starts = sizes.cumsum(-1) - sizes
    M = int(sizes.max())
    slot = torch.arange(M, device=x.device)
    valid = slot < sizes[..., None]  # [R, c, M]: a coarse cluster's members, padded to the largest
    member = order.gather(-1, (starts[..., None] + slot).clamp(max=N - 1).flatten(1)).view(R, c, M)
    gather = lambda ids: x.gather(1, ids.flatten(1)[..., None].expand(-1, -1, D))  # noqa: E731
    init = (starts[..., None] + torch.arange(k, device=x.device) * sizes[..., None] // k).clamp(max=N - 1)
    # one row per coarse cluster: its members (padded) split into k
    assign, centroids = _lloyd(gather(member).view(R * c, M, D), gather(order.gather(-1, init.flatten(1))).view(R * c, k, D),
                               iters, valid.view(R * c, M))
    fine = assign.view(R, c, M) + torch.arange(c, device=x.device)[:, None] * k  # cluster ids within the row
    out = torch.empty(R, N, dtype=torch.long, device=x.device)
    rows = torch.arange(R, device=x.device)[:, None, None].expand(R, c, M)
    out[rows[valid], member[valid]] = fine[valid]
    return out, centroids.view(R, c * k, D)


def _lloyd(x: torch.Tensor, centroids: torch.Tensor, iters: int,
           valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations with cosine assignment: ``x [R, N, D]`` (float), initial ``centroids [R, C, D]`` ->
    ``assign [R, N]``, ``centroids``. ``valid [R, N]`` (bool): the tokens that count; the others are padding,
    assigned but never members."""
    R, N, D = x.shape
    C = centroids.shape[1]
    xn = F.normalize(x, dim=-1)
    members = x.flatten(0, 1) if valid is None else x[valid]
    row_base = torch.arange(R, device=x.device)[:, None] * C
    assign = None
    for _ in range(iters):
        cn = F.normalize(centroids, dim=-1).transpose(1, 2)
        # nearest centroid by cosine, [R, N]; in chunks of tokens so the [R, N, C] similarities never all exist
        new = torch.cat([(part @ cn).argmax(-1) for part in xn.split(4096, dim=1)], dim=1)
        if assign is not None and (torch.equal(new, assign) if valid is None else torch.equal(new[valid], assign[valid])):
            break
        assign = new
        flat = assign + row_base  # cluster ids numbered across rows: one index_add for all rows
        flat = flat.flatten() if valid is None else flat[valid]
        sums = torch.zeros(R * C, D, device=x.device).index_add_(0, flat, members).view(R, C, D)
        counts = torch.bincount(flat, minlength=R * C).view(R, C, 1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return assign, centroids


@dataclass(kw_only=True)
class ClusterKVConfig(SparseConfig):
    """ClusterKV (Liu et al., 2025): k-means clusters of keys, whole clusters by q.centroid, resident reuse;
    sink 16, 80 tokens per cluster and m = ``window`` = 320 into 8 new clusters from budget ~1k (both scale down with
    smaller budgets), first 2 layers dense.

    tokens_per_cluster: initial clusters = tokens / this. ``None``: the paper's 80 from budget 1024 up, below
        ``budget // 80`` (at least 2) so that the budget holds ~80 clusters (budget 256 -> 3, 128 -> 2). Measured
        on SmolLM2-135M (needle, 4k, budget 256): 21-token clusters 1/5, 4-token 4/5, 3-token 5/5 (dense 5/5).
    new_clusters: clusters made of every ``window`` decoded tokens: 8 (the paper's code; its text says 4).
        Measured, perplexity of 8k tokens (1024 prompt + 7168 fed one by one) at budget 1024 on two texts: 4 ->
        x1.028 and x1.018 of dense, 8 -> x1.019 and x1.011.
    kmeans_iters: at most this many k-means iterations (paper 20).
    page_size: only the host-tier layout (no page digests are kept).
    """

    name: ClassVar[str] = "clusterkv"
    uses_digests: ClassVar[bool] = False
    reuse_resident: ClassVar[bool] = True
    budget: int = 1024
    sink: int | None = 16
    page_size: int | None = 16
    tokens_per_cluster: int | None = None
    new_clusters: int = 8
    kmeans_iters: int = 20
    gqa_pool: Literal["max", "softmax_mean"] = "max"

    def set_defaults(self) -> None:
        if self.sink is not None and self.window is None:
            self.window = min(320, (self.budget - self.sink) // 3)
        if self.tokens_per_cluster is None:
            self.tokens_per_cluster = 80 if self.budget >= 1024 else max(2, self.budget // 80)
        super().set_defaults()

    def validate(self) -> None:
        if self.budget <= self.sink + self.window:
            raise ValueError(
                f"budget {self.budget} is too small: it must exceed sink ({self.sink}) + window ({self.window})"
            )
        for knob in ("tokens_per_cluster", "new_clusters", "kmeans_iters"):
            if getattr(self, knob) < 1:
                raise ValueError(f"{knob} must be >= 1, got {getattr(self, knob)}")

    def make_selector(self, layer_idx: int) -> "ClusterKVSelector":
        return ClusterKVSelector(self)


class ClusterKVSelector:
    """One layer's cluster index, built lazily from the host tier. Per row (batch, KV head), C clusters over the
    N tokens ``[sink, clustered)``: ``centroids [B, G, C, D]`` (float32), ``sizes [B, G, C]``, ``starts [B, G, C]``
    (exclusive prefix sums of the sizes), ``members [B, G, N]`` (token ids grouped by cluster, in position order
    within a cluster: cluster c is ``members[..., starts[c] : starts[c] + sizes[c]]``)."""

    def __init__(self, cfg: ClusterKVConfig):
        self.cfg = cfg
        self.clustered = cfg.sink  # tokens [sink, clustered) are in the index
        self.centroids = self.sizes = self.starts = self.members = None
        self.clusterings = 0
        self.cluster_s = 0.0

    def select(self, query: torch.Tensor, store: "HostStore") -> torch.Tensor:
        """query ``[B, H, D]`` (post-RoPE) -> token ids ``[B, G, k]``, k <= budget: sink, clustered tokens, recent."""
        cfg, T, device = self.cfg, store.length, query.device
        B, G = query.shape[0], store.pages.shape[2]
        if T <= cfg.budget:
            return all_tokens(store, B, G, device)
        if self.members is None or T - 1 - self.clustered >= cfg.window:
            self._cluster(store, T - 1)  # the current token stays recent
        fill = cfg.budget - cfg.sink - (T - self.clustered)
        # Clusters in descending score, as many as can contribute: each non-empty one gives at least one token.
        scores = self.score(query).masked_fill(self.sizes == 0, float("-inf"))
        order = scores.topk(min(fill, scores.shape[-1]), dim=-1).indices  # [B, G, <= fill]
        sizes = self.sizes.gather(-1, order)
        ends = sizes.cumsum(-1)  # [B, G, <= fill]: end of each cluster in the selection, best first
        slot = torch.arange(fill, device=device).expand(B, G, fill).contiguous()
        rank = torch.searchsorted(ends, slot, right=True)  # [B, G, fill]: which ranked cluster fills each slot
        offset = slot - (ends - sizes).gather(-1, rank)
        picked = self.members.gather(-1, self.starts.gather(-1, order.gather(-1, rank)) + offset)
        sink = torch.arange(cfg.sink, device=device).expand(B, G, -1)
        recent = torch.arange(self.clustered, T, device=device).expand(B, G, -1)
        return torch.cat((sink, picked, recent), dim=-1)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Row ``b`` of the index becomes row ``rows[b]`` (beam search)."""
        if self.members is not None:
            rows = rows.to(self.members.device)
            self.centroids, self.sizes, self.starts, self.members = (
                x.index_select(0, rows) for x in (self.centroids, self.sizes, self.starts, self.members))

    def score(self, query: torch.Tensor) -> torch.Tensor:
        """query ``[B, H, D]`` -> cluster scores ``[B, G, C]``: ``q . centroid`` pooled over the GQA group."""
        B, H, D = query.shape
        G = self.centroids.shape[1]
        return pool_group(query.view(B, G, H // G, D).float() @ self.centroids.transpose(-1, -2), self.cfg.gqa_pool)

    def _cluster(self, store: "HostStore", end: int) -> None:
        """Cluster tokens ``[clustered, end)`` and append their clusters to the index."""
        t0 = time.perf_counter()
        cfg, start = self.cfg, self.clustered
        B, G = store.pages.shape[0], store.pages.shape[2]
        n = end - start
        ids = torch.arange(start, end).expand(B, G, n)
        keys, _ = store.gather(ids)  # [B, G, n, D]
        n_clusters = min(n, max(cfg.new_clusters, n // cfg.tokens_per_cluster))
        cluster = kmeans if n_clusters <= TWO_LEVEL_FROM else two_level_kmeans
        assign, centroids = cluster(keys.flatten(0, 1), n_clusters, cfg.kmeans_iters)
        n_clusters = centroids.shape[1]
        assign = assign.view(B, G, n)
        sizes = torch.zeros(B, G, n_clusters, dtype=torch.long, device=keys.device)
        sizes.scatter_add_(-1, assign, torch.ones_like(assign))
        members = ids.to(keys.device).gather(-1, assign.argsort(dim=-1, stable=True))
        centroids = centroids.view(B, G, n_clusters, -1)
        if self.members is not None:
            centroids = torch.cat((self.centroids, centroids), 2)
            sizes = torch.cat((self.sizes, sizes), -1)
            members = torch.cat((self.members, members), -1)
        self.centroids, self.sizes, self.members = centroids, sizes, members
        self.starts = sizes.cumsum(-1) - sizes
        self.clustered = end
        self.clusterings += 1
        self.cluster_s += time.perf_counter() - t0

    @property
    def select_nbytes(self) -> int:
        """Bytes a selection reads: every centroid and cluster size."""
        return 0 if self.members is None else self.centroids.nbytes + self.sizes.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes of the index (it lives in the fast tier)."""
        if self.members is None:
            return 0
        return sum(t.nbytes for t in (self.centroids, self.sizes, self.starts, self.members))

    def diagnostics(self) -> dict:
        """Cluster count and size distribution (over all rows), tokens clustered, clustering count and seconds."""
        if self.sizes is None:
            return {"clusters": 0, "clustered_tokens": 0, "clusterings": 0, "cluster_s": 0.0}
        sizes = self.sizes.flatten().float()
        q = torch.quantile(sizes, torch.tensor([0.1, 0.5, 0.9], device=sizes.device)).tolist()
        return {
            "clusters": self.sizes.shape[-1],
            "clustered_tokens": self.clustered - self.cfg.sink,
            "size_min": int(sizes.min()),
            "size_p10": q[0],
            "size_median": q[1],
            "size_p90": q[2],
            "size_max": int(sizes.max()),
            "empty_clusters": int((sizes == 0).sum()),
            "clusterings": self.clusterings,
            "cluster_s": self.cluster_s,
        }


def diagnostics(cache: "LiveKVCache") -> dict:
    """ClusterKV diagnostics over a cache's sparse layers: clustering time, cluster sizes (per layer), fast-tier
    hit rate (share of the tokens read that were already resident), bytes recalled and selection time per step
    (selection time only when the cache is profiled: ``cache.set_profile()``)."""
    layers = cache.recallable_layers
    per_layer = {layer.layer_idx: layer.selector.diagnostics() for layer in layers}
    stats = cache.stats()
    read = sum(layer.stats.tokens_read * layer.host.pages.shape[0] * layer.host.pages.shape[2] for layer in layers
               if layer.is_initialized)  # (token, batch row, KV head) reads
    steps = stats["steps"] / max(len(layers), 1)
    return {
        "cluster_s": sum(d["cluster_s"] for d in per_layer.values()),
        "hit_rate": 1 - stats["tokens_copied"] / read if read else 0.0,
        "bytes_recalled_per_step": stats["bytes_recalled"] / steps if steps else 0.0,
        "select_ms_per_step": 1000 * stats["select_s"] / steps if steps else 0.0,
        "layers": per_layer,
    }
