"""The retrieval primitive's GQA poolings."""

import pytest
import torch

from livekv import retrieval
from livekv.methods import make_method


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


def test_smaller_pages_bound_tighter_and_still_above_every_key():
    """Quest/FreeKV's default pages of 2 at budget 256 (``budget_pages``): the min/max bound of a 2-token half is
    at most that of the 4-token page holding it, and still at least ``q . k`` of each of its keys."""
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 32, 8, generator=g)  # [B, G, N, D]
    q = torch.randn(1, 6, 8, generator=g)  # [B, H, D]

    def bound(p):
        k = keys.view(1, 2, 32 // p, p, 8)
        return retrieval.minmax_bound(q, torch.cat((k.amax(3), k.amin(3)), -1))  # [B, G, r, 32 // p]

    b2, b4 = bound(2), bound(4)
    assert torch.all(b2.view(1, 2, 3, 8, 2).amax(-1) <= b4 + 1e-5)
    assert (b2.view(1, 2, 3, 8, 2).amax(-1) < b4 - 1e-3).any()  # strictly tighter somewhere
    dots = (q.view(1, 2, 3, 1, 8) * keys.view(1, 2, 1, 32, 8)).sum(-1)  # [B, G, r, N]
    assert torch.all(b2 >= dots.view(1, 2, 3, 16, 2).amax(-1) - 1e-5)
    assert make_method("quest", budget=256).page_size == 2 == make_method("freekv", budget=256).page_size


def _digests(B=2, G=3, n=40, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, G, n, 4, D, generator=g) * (1 + 9 * (torch.rand(D, generator=g) < 0.1))  # outlier channels
    q = torch.randn(B, 3 * G, D, generator=g)
    return q, keys, torch.cat((keys.amax(3), keys.amin(3)), dim=-1)  # q [B, H, D], keys [B, G, n, p, D], [B, G, n, 2D]


def test_int8_digests_dequantize_outward_and_bound_every_key():
    q, keys, digests = _digests()
    rows = retrieval.Int8Rows.encode(digests, outward=True)
    assert rows.codes.dtype == torch.int8 and rows.nbytes == digests.nbytes // 4 + rows.scales.nbytes
    D = keys.shape[-1]
    deq = rows.float()
    assert torch.all(deq[..., :D] >= digests[..., :D]) and torch.all(deq[..., D:] <= digests[..., D:])
    step = rows.scales.float()[..., None]
    assert torch.all((deq - digests).abs() <= step * 1.001)  # within one step of its scale
    bound = retrieval.minmax_bound(q, rows)  # the CPU kernel: bfloat16 query and result
    dots = torch.einsum("bgrd,bgnpd->bgrnp", q.view(2, 3, 3, D), keys).amax(-1)
    assert torch.all(bound >= dots - 0.02 * dots.abs() - 0.05)
    exact = retrieval.minmax_bound(q, digests)
    assert (bound - exact).abs().max() <= 0.1 * exact.abs().max()  # looser, by a little


def test_int8_kernel_path_equals_its_dequantized_reference():
    q, _, digests = _digests(seed=1)
    rows = retrieval.Int8Rows.encode(digests, outward=True)
    x = torch.cat((q.view(2, 3, 3, -1).clamp(min=0), q.view(2, 3, 3, -1).clamp(max=0)), dim=-1)
    got = retrieval.rows_matmul(x, rows)
    want = x.bfloat16().float() @ rows.float().transpose(-1, -2)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("int8", [False, True])
def test_gather_runs_equals_gathering_their_pages(int8):
    _, _, digests = _digests(n=48)
    buf = torch.zeros(2, 3, 64, digests.shape[-1])
    buf[:, :, :48] = digests
    s = retrieval.Int8Rows.encode(buf) if int8 else buf
    runs = torch.randint(0, 6, (2, 3, 4))
    got = retrieval.gather_runs(s[:, :, :48], runs, 8)
    want = retrieval.gather_summaries(s[:, :, :48], retrieval.page_tokens(runs, 8))
    if int8:
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    else:
        assert torch.equal(got, want)
