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

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from livekv import kernels, retrieval
from livekv.methods.base import SparseConfig, knob
from livekv.methods.kmeans import TWO_LEVEL_FROM, kmeans, two_level_kmeans
from livekv.tensors import Bytes

if TYPE_CHECKING:
    from livekv.cache import LiveKVCache
    from livekv.store import HostStore


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
    budget: int = knob(1024, "tokens read per KV head per decode step (sink + clustered + recent)")
    sink: int | None = knob(16, "the first tokens, always read")
    page_size: int | None = knob(16, "tokens per page of the host tier (its layout only)")
    tokens_per_cluster: int | None = knob(None, "initial clusters = tokens / this (default: 80 from budget 1024, "
                                                "budget // 80 below)")
    new_clusters: int = knob(8, "clusters made of every `window` decoded tokens")
    kmeans_iters: int = knob(20, "at most this many k-means iterations")
    gqa_pool: retrieval.Pool = knob("max", "pooling of the cluster scores over a GQA group")
    centroid_bits: int = knob(32, "centroids in float32 (32) or int8 (8: a quarter of the bytes a selection reads)")

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
        if self.centroid_bits not in (32, 8):
            raise ValueError(f"centroid_bits must be 32 or 8, got {self.centroid_bits}")
        for knob in ("tokens_per_cluster", "new_clusters", "kmeans_iters"):
            if getattr(self, knob) < 1:
                raise ValueError(f"{knob} must be >= 1, got {getattr(self, knob)}")

    def make_selector(self, layer_idx: int) -> "ClusterKVSelector":
        return ClusterKVSelector(self)


class ClusterKVSelector:
    """One layer's cluster index, built lazily from the host tier. Per row (batch, KV head), C clusters over the
    N tokens ``[sink, clustered)``: ``centroids [B, G, C, D]`` (float32, or ``retrieval.Int8Rows`` with
    ``centroid_bits`` 8), ``sizes [B, G, C]``, ``starts [B, G, C]``
    (exclusive prefix sums of the sizes), ``members [B, G, N]`` (token ids grouped by cluster, in position order
    within a cluster: cluster c is ``members[..., starts[c] : starts[c] + sizes[c]]``)."""

    def __init__(self, cfg: ClusterKVConfig):
        self.cfg = cfg
        self.clustered = cfg.sink  # tokens [sink, clustered) are in the index
        self.centroids = self.sizes = self.starts = self.members = None
        self.clusterings = 0
        self.cluster_s = 0.0

    def select(self, query: torch.Tensor, store: "HostStore") -> torch.Tensor:
        """query ``[B, H, D]`` (post-RoPE) -> token ids ``[B, G, k]``, k <= budget: sink, clustered tokens, recent.
        Int8 centroids with max pooling go through the compiled kernel where it runs (``livekv.kernels``)."""
        cfg, T, device = self.cfg, store.length, query.device
        B, G = query.shape[0], store.kv_heads
        if T <= cfg.budget:
            return torch.arange(T, device=device).expand(B, G, -1)
        if self.members is None or T - 1 - self.clustered >= cfg.window:
            self._cluster(store, T - 1)  # the current token stays recent
        fill = cfg.budget - cfg.sink - (T - self.clustered)
        if cfg.gqa_pool == "max" and isinstance(self.centroids, retrieval.Int8Rows):
            tokens = kernels.clusterkv_select(query, self.centroids, self.sizes, self.starts, self.members, fill,
                                              cfg.sink, self.clustered, T)
            if tokens is not None:
                return tokens
        return self.reference_select(query, T, fill)

    def reference_select(self, query: torch.Tensor, T: int, fill: int) -> torch.Tensor:
        """``select`` in PyTorch (the compiled kernel's reference), ``fill`` tokens from clusters."""
        cfg, device = self.cfg, query.device
        B, G = self.sizes.shape[:2]
        order, ends = retrieval.ranked_prefix(self.score(query), self.sizes, fill)  # [B, G, <= fill], best first
        sizes = self.sizes.gather(-1, order)
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
        return retrieval.pool_group(retrieval.dot(query, self.centroids), self.cfg.gqa_pool,
                                    scale=query.shape[-1] ** -0.5)

    def _cluster(self, store: "HostStore", end: int) -> None:
        """Cluster tokens ``[clustered, end)`` and append their clusters to the index."""
        t0 = time.perf_counter()
        cfg, start = self.cfg, self.clustered
        B, G = store.batch, store.kv_heads
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
        if cfg.centroid_bits == 8:
            centroids = retrieval.Int8Rows.encode(centroids)
        if self.members is not None:
            centroids = retrieval.cat_rows(self.centroids, centroids)
            sizes = torch.cat((self.sizes, sizes), -1)
            members = torch.cat((self.members, members), -1)
        self.centroids, self.sizes, self.members = centroids, sizes, members
        self.starts = sizes.cumsum(-1) - sizes
        self.clustered = end
        self.clusterings += 1
        self.cluster_s += time.perf_counter() - t0

    INDEX = ("centroids", "sizes", "starts", "members")

    @property
    def memory(self) -> Bytes:
        """The index lives in the fast tier, all of it used."""
        return Bytes(self.nbytes, self.nbytes)

    def state(self) -> tuple[dict, dict]:
        tensors = {} if self.members is None else {k: getattr(self, k) for k in self.INDEX}
        if isinstance(tensors.get("centroids"), retrieval.Int8Rows):
            tensors["centroids"], tensors["centroid_scales"] = tensors["centroids"].codes, tensors["centroids"].scales
        return tensors, {"clustered": self.clustered, "clusterings": self.clusterings, "cluster_s": self.cluster_s}

    def load_state(self, tensors: dict, meta: dict, device: torch.device | str = "cpu") -> None:
        if "centroids" in tensors and ("centroid_scales" in tensors) != (self.cfg.centroid_bits == 8):
            raise ValueError(f"this snapshot's centroids are not in {self.cfg.centroid_bits} bits")
        for k in self.INDEX:
            setattr(self, k, tensors[k].to(device) if k in tensors else None)
        if "centroid_scales" in tensors:
            self.centroids = retrieval.Int8Rows(self.centroids, tensors["centroid_scales"].to(device))
        self.clustered, self.clusterings, self.cluster_s = meta["clustered"], meta["clusterings"], meta["cluster_s"]

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
    read = sum(layer.stats.tokens_read * layer.host.batch * layer.host.kv_heads for layer in layers
               if layer.is_initialized)  # (token, batch row, KV head) reads
    steps = stats["steps"] / max(len(layers), 1)
    return {
        "cluster_s": sum(d["cluster_s"] for d in per_layer.values()),
        "hit_rate": 1 - stats["tokens_copied"] / read if read else 0.0,
        "bytes_recalled_per_step": stats["bytes_recalled"] / steps if steps else 0.0,
        "select_ms_per_step": 1000 * stats["select_s"] / steps if steps else 0.0,
        "layers": per_layer,
    }
