"""The one block-retrieval primitive every method stands on: blocks of tokens, scored against queries through a
summary of each block, pooled over a GQA group, picked under a token budget, expanded back to token ids.

A block is a set of tokens with one summary per KV head: a page of the text cache (its min/max key digest: Quest,
FreeKV), a k-means cluster of keys (its centroid: ClusterKV), a frame of an offloaded video (its mean key: ReKV), a
page of a stream's long-term memory (the attention the question pays its tokens: LiveVLM's PaR). The steps:

1. score: ``[B, G, r, n]`` per query head of each group (or, for per-layer retrieval, one score per block);
2. pool the group (``pool_group``): ``max`` (Quest), ``softmax_mean`` (FreeKV), ``mean``, ``softmax_max``,
   ``rank`` (heads measured against their own scores);
3. pick (``top_blocks`` for blocks of one size, ``ranked_prefix`` for blocks of many sizes); a two-level
   selection picks coarse blocks first and scores only the fine blocks inside them (``gather_runs``);
4. expand to token ids (``page_tokens``; a method with its own block table, e.g. clusters, maps them itself).

B batch, G KV heads, r = H / G query heads per group, n blocks, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from livekv.tensors import grow

Pool = Literal["max", "softmax_mean", "mean", "softmax_max", "rank"]


@dataclass
class Int8Rows:
    """Block summaries ``[B, G, n, C]`` in int8 with a bfloat16 scale per row (``codes [B, G, n, C]``, ``scales
    [B, G, n]``): a quarter of float32's bytes, multiplied by torch's int8 weight-only CPU kernel (the one int8
    weights use, ``livekv.quantize``). Indexes over its first three dims, selects rows and dequantizes (``float``)
    as a tensor does."""

    codes: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def encode(cls, rows: torch.Tensor, outward: bool = False) -> Int8Rows:
        """float ``rows [B, G, n, C]`` -> codes and scales. ``outward``: the first half of each row rounded up, the
        second half down, so that a packed max | min digest dequantizes to a max at least and a min at most the
        true ones."""
        scale = rows.abs().amax(dim=-1).clamp(min=1e-30) / 127
        scale = (scale * (1 + 2**-7)).bfloat16()  # rounded to bfloat16 without falling below max|x| / 127
        q = rows / scale.float()[..., None]
        if outward:
            half = rows.shape[-1] // 2
            q = torch.cat((q[..., :half].ceil(), q[..., half:].floor()), dim=-1)
        return cls(q.round().clamp(-127, 127).to(torch.int8), scale)

    def float(self) -> torch.Tensor:
        return self.codes.float() * self.scales.float()[..., None]

    def grow(self, capacity: int) -> Int8Rows:
        """These rows with room for ``capacity`` along dim 2 (``tensors.grow``; the new rows are zeros)."""
        return Int8Rows(grow(self.codes, 2, capacity), grow(self.scales, 2, capacity))

    def __getitem__(self, index) -> Int8Rows:
        return Int8Rows(self.codes[index], self.scales[index])

    def index_select(self, dim: int, index: torch.Tensor) -> Int8Rows:
        return Int8Rows(self.codes.index_select(dim, index), self.scales.index_select(dim, index))

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    @property
    def device(self) -> torch.device:
        return self.codes.device


def cat_rows(a: torch.Tensor | Int8Rows, b: torch.Tensor | Int8Rows) -> torch.Tensor | Int8Rows:
    """Rows of ``a`` then ``b`` (``[B, G, n, C]``, both float or both ``Int8Rows``)."""
    if isinstance(a, Int8Rows):
        return Int8Rows(torch.cat((a.codes, b.codes), dim=2), torch.cat((a.scales, b.scales), dim=2))
    return torch.cat((a, b), dim=2)


def rows_matmul(x: torch.Tensor, rows: torch.Tensor | Int8Rows) -> torch.Tensor:
    """``x @ rows^T`` in float32: ``x [B, G, r, C]``, rows ``[B, G, n, C]`` -> ``[B, G, r, n]``. Int8 rows on a
    CPU go through ``_weight_int8pack_mm`` per (batch, KV head), in bfloat16 (about 3 significant digits);
    elsewhere, and for rows whose length is not a multiple of 16 (the kernel crashes on them), they are
    dequantized (the reference the kernel is tested against)."""
    if not isinstance(rows, Int8Rows):
        return x.to(rows.dtype) @ rows.transpose(-1, -2)
    if rows.device.type != "cpu" or rows.shape[-1] % 16:
        return x.float() @ rows.float().transpose(-1, -2)
    B, G = rows.shape[:2]
    x = x.bfloat16()
    out = [torch.ops.aten._weight_int8pack_mm(x[b, g].contiguous(), rows.codes[b, g].contiguous(), rows.scales[b, g])
           for b in range(B) for g in range(G)]
    return torch.stack(out).view(B, G, *out[0].shape).float()


# --- 1. scores ---------------------------------------------------------------------------------------------------
def minmax_bound(query: torch.Tensor, digests: torch.Tensor | Int8Rows) -> torch.Tensor:
    """Quest's upper bound of ``q . k`` over a block: query ``[B, H, D]``, digests ``[B, G, n, 2D]`` (each block's
    key max, then its key min; float or ``Int8Rows`` rounded outward) -> ``[B, G, r, n]``.

    ``sum_d max(q_d * max_d, q_d * min_d) = relu(q) . max + min(q, 0) . min`` because ``max >= min``: one matmul of
    ``[relu(q), min(q, 0)]`` with the packed digests instead of a ``[.., n, D]`` temporary."""
    B, H, D = query.shape
    q = query.view(B, digests.shape[1], -1, D).float()  # [B, G, r, D]
    return rows_matmul(torch.cat((q.clamp(min=0), q.clamp(max=0)), dim=-1), digests)


def dot(query: torch.Tensor, summaries: torch.Tensor | Int8Rows) -> torch.Tensor:
    """``q . s`` in float32: query ``[B, H, D]``, summaries ``[B, G, n, D]`` (e.g. centroids; float or
    ``Int8Rows``) -> ``[B, G, r, n]``."""
    B, H, D = query.shape
    G = summaries.shape[1]
    return rows_matmul(query.view(B, G, H // G, D).float(), summaries)


def cosine(query: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
    """Cosine of each query head with each block summary: query ``[H, D]``, summaries ``[G, n, D]`` ->
    ``[G, r, n]`` (ReKV's frame retrieval, with the question's mean query and each frame's mean key)."""
    G, D = summaries.shape[0], summaries.shape[2]
    return F.cosine_similarity(query.to(summaries.dtype).view(G, -1, 1, D), summaries[:, None], dim=-1)


def received_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float,
                       seen: torch.Tensor | None = None) -> torch.Tensor:
    """The mean attention ``[N]`` keys ``[G, N, D]`` receive from queries ``[H, m, D]`` (softmax per head and query,
    then the mean over all of them: one score per token for the whole layer). ``seen [H / G * m]``: how many keys
    each query of a KV head's group sees (the first ones; ``None``: all). Vision Sink Bucketing scores tokens by it,
    LiveVLM's retrieval scores pages by its sums."""
    H, m, D = queries.shape
    G, N = keys.shape[0], keys.shape[1]
    logits = (queries.reshape(G, H // G * m, D) @ keys.transpose(1, 2)).float() * scaling  # [G, H/G * m, N]
    if seen is not None:
        logits.masked_fill_(torch.arange(N, device=keys.device) >= seen[:, None], float("-inf"))
    return logits.softmax(-1).mean(dim=(0, 1))


def block_sums(token_scores: torch.Tensor, block_size: int) -> torch.Tensor:
    """Scores of blocks of ``block_size`` consecutive tokens (the last may be short): ``[N]`` -> ``[ceil(N / size)]``."""
    N = token_scores.shape[0]
    block_of = torch.arange(N, device=token_scores.device) // block_size
    return torch.zeros(-(-N // block_size), device=token_scores.device).index_add_(0, block_of, token_scores)


# --- 2. pooling over a GQA group ----------------------------------------------------------------------------------
def pool_group(scores: torch.Tensor, how: Pool, scale: float = 1.0) -> torch.Tensor:
    """Pool per-query-head block scores ``[..., r, n]`` over the GQA group -> ``[..., n]``, so that all query
    heads of a group read the same blocks. ``max``: Quest. ``softmax_mean``: FreeKV's best, a softmax over blocks
    per query head, then the group mean. ``mean``: the group mean of the raw scores. ``softmax_max``: a softmax
    over blocks per query head (of ``scale`` times the scores: the attention's scaling makes it an estimate of the
    attention each head pays a block), then the group max: each head's scores are measured against its own, so
    that a head whose scores run high does not take the budget from the others. ``rank``: the group's best rank
    (each head ranks the blocks by its own scores; ties by ``softmax_max``): the top k blocks hold every head's
    own top ``k // r`` at least."""
    if how == "max":
        return scores.amax(dim=-2)
    if how == "softmax_mean":
        return scores.float().softmax(dim=-1).mean(dim=-2)
    if how == "mean":
        return scores.mean(dim=-2)
    if how in ("softmax_max", "rank"):
        log_p = (scores.float() * scale).log_softmax(dim=-1)
        if how == "softmax_max":
            return log_p.amax(dim=-2)
        rank = log_p.argsort(dim=-1, descending=True).argsort(dim=-1)  # [..., r, n]: 0 = the head's best
        return -rank.amin(dim=-2).float() + log_p.amax(dim=-2).exp() * 0.5  # ties broken by softmax_max (in [0, 0.5])
    raise ValueError(f"unknown GQA pooling {how!r}; expected 'max', 'softmax_mean', 'mean', 'softmax_max' or 'rank'")


# --- 3. picking under a budget -----------------------------------------------------------------------------------
def top_blocks(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best blocks of one size, ``[..., n]`` -> ids ``[..., k]`` (in no particular order)."""
    return scores.topk(k, dim=-1, sorted=False).indices


def ranked_prefix(scores: torch.Tensor, sizes: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of many sizes, best first, as far as ``budget`` tokens reach: ``scores, sizes [..., n]`` ->
    ``order [..., m]`` (block ids, descending score, empty blocks last) and ``ends [..., m]`` (the running token
    count after each). ``m = min(n, budget)``: enough blocks to fill the budget, since each non-empty one gives at
    least a token. Blocks with ``ends <= budget`` fit whole; the first beyond is the one to cut (ClusterKV) or to
    stop at (ReKV)."""
    scores = scores.masked_fill(sizes == 0, float("-inf"))
    order = scores.topk(min(budget, scores.shape[-1]), dim=-1).indices
    return order, sizes.gather(-1, order).cumsum(-1)


def gather_summaries(summaries: torch.Tensor | Int8Rows, ids: torch.Tensor) -> torch.Tensor | Int8Rows:
    """Summaries ``[B, G, n, D]`` of the blocks ``ids [B, G, k]`` -> ``[B, G, k, D]``.

    Whole rows of ``D`` are copied (``index_select`` on the rows of the summaries' storage, which may be a slice of
    a larger buffer): about 4x faster here than ``gather``, which copies element by element."""
    if isinstance(summaries, Int8Rows):
        return Int8Rows(gather_summaries(summaries.codes, ids), summaries.scales.gather(-1, ids))
    B, G, n, D = summaries.shape
    if summaries.stride(3) != 1 or summaries.stride(2) != D:
        summaries = summaries.contiguous()
    s0, s1 = summaries.stride(0) // D, summaries.stride(1) // D
    rows = summaries.as_strided(((B - 1) * s0 + (G - 1) * s1 + n, D), (D, 1))
    base = torch.arange(B, device=ids.device).view(B, 1, 1) * s0 + torch.arange(G, device=ids.device).view(1, G, 1) * s1
    return rows.index_select(0, (ids + base).flatten()).view(*ids.shape, D)


def gather_runs(summaries: torch.Tensor | Int8Rows, runs: torch.Tensor, per: int) -> torch.Tensor | Int8Rows:
    """The summaries of runs of ``per`` consecutive blocks: summaries ``[B, G, n, C]`` (``n`` and the row stride
    multiples of ``per``), runs ``[B, G, k]`` -> ``[B, G, k * per, C]``, each run copied as one row of ``per * C``
    (fewer, longer copies than one per block)."""
    if isinstance(summaries, Int8Rows):
        scales = gather_runs(summaries.scales[..., None], runs, per)[..., 0]
        return Int8Rows(gather_runs(summaries.codes, runs, per), scales)
    B, G, n, C = summaries.shape
    return gather_summaries(summaries.reshape(B, G, n // per, per * C), runs).view(B, G, -1, C)


# --- 4. token ids --------------------------------------------------------------------------------------------------
def page_tokens(pages: torch.Tensor, page_size: int) -> torch.Tensor:
    """Token ids of pages: ``[..., k]`` -> ``[..., k * page_size]``, each page's tokens in order."""
    offsets = torch.arange(page_size, device=pages.device)
    return (pages.unsqueeze(-1) * page_size + offsets).flatten(-2)
