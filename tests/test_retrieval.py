"""The retrieval primitive's GQA poolings."""

import pytest
import torch

from livekv import retrieval


def test_rank_pooling_keeps_every_query_heads_own_best_blocks():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 3, 40, generator=g)  # [B, G, r, n]
    scores[:, :, 0] *= 50  # one head's scores run far higher: max pooling would give it the whole budget
    k, r = 12, 3
    picked = retrieval.top_blocks(retrieval.pool_group(scores, "rank"), k)  # [B, G, k]
    own = scores.topk(k // r, dim=-1).indices  # [B, G, r, k // r]
    for b in range(2):
        for gi in range(3):
            assert set(own[b, gi].flatten().tolist()) <= set(picked[b, gi].tolist())
    by_max = retrieval.top_blocks(retrieval.pool_group(scores, "max"), k)
    assert any(not set(own[b, gi, 1].tolist()) <= set(by_max[b, gi].tolist()) for b in range(2) for gi in range(3))


def test_softmax_max_measures_each_head_against_its_own_scores():
    scores = torch.tensor([[[10.0, 10.0, 9.0, 9.0], [0.0, 1.0, 0.0, 8.0]]])
    pooled = retrieval.pool_group(scores, "softmax_max")
    assert retrieval.top_blocks(pooled, 1).item() == 3  # max pooling picks 0 or 1 (raw 10 > 8)
    assert retrieval.pool_group(scores, "max").argmax().item() in (0, 1)


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="unknown GQA pooling"):
        retrieval.pool_group(torch.zeros(1, 2, 3), "median")
