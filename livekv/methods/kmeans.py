"""Batched k-means with cosine assignment, flat and two-level: ClusterKV's clusters of keys."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
