"""ClusterKV: exactness at full budget, the cluster index, prefix-of-score-order selection, incremental
clustering, and reuse of resident tokens."""

import pytest
import torch

from conftest import decode, tiny_model
from livekv import LiveKVCache
from livekv.methods import make_method
from livekv.methods.clusterkv import TWO_LEVEL_FROM, ClusterKVConfig, diagnostics, kmeans, two_level_kmeans
from livekv.store import HostStore


def _store(T, B=2, G=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    store = HostStore(B, G, D, 16, torch.float32, torch.device("cpu"), digests=False)
    store.append(torch.randn(B, G, T, D, generator=g), torch.randn(B, G, T, D, generator=g))
    return store


def _append_one(store, seed):
    g = torch.Generator().manual_seed(seed)
    B, _, G, _, _, D = store.pages.shape
    store.append(torch.randn(B, G, 1, D, generator=g), torch.randn(B, G, 1, D, generator=g))



def _check_index(sel, sink):
    """Every token of ``[sink, clustered)`` is in exactly one cluster; starts are the sizes' exclusive prefix sums."""
    n = sel.clustered - sink
    assert torch.equal(sel.members.sort(-1).values, torch.arange(sink, sel.clustered).expand_as(sel.members))
    assert torch.equal(sel.sizes.sum(-1), torch.full(sel.sizes.shape[:2], n))
    assert torch.equal(sel.starts, sel.sizes.cumsum(-1) - sel.sizes)
    assert sel.centroids.shape[:3] == sel.sizes.shape


@torch.no_grad()
def test_full_budget_equals_dense_attention(model, ids):
    arch = "qwen2" if type(model).__name__.startswith("Qwen2") else "llama"
    expected = tiny_model(arch, attn="sdpa")(ids).logits
    cache = LiveKVCache(model.config, "clusterkv", budget=4096, dense_layers=0)
    torch.testing.assert_close(decode(model, cache, ids, prefill=120), expected, rtol=1e-4, atol=1e-4)
    assert cache.stats()["steps"] == 80 * model.config.num_hidden_layers


@torch.no_grad()
def test_full_budget_generate_matches_dense_greedy(model, ids):
    prompt = ids[:, :100]
    expected = model.generate(prompt, max_new_tokens=24, do_sample=False)
    cache = LiveKVCache(model.config, "clusterkv", budget=4096)
    assert torch.equal(model.generate(prompt, past_key_values=cache, max_new_tokens=24, do_sample=False), expected)


@pytest.mark.parametrize("T", [300, 517])
def test_selection_takes_whole_clusters_in_score_order(T):
    cfg = ClusterKVConfig(budget=128, sink=16, window=24, tokens_per_cluster=20)
    sel, store = cfg.make_selector(2), _store(T)
    q = torch.randn(2, 6, 8)  # 6 query heads over 2 KV heads
    idx = sel.select(q, store)
    assert idx.shape == (2, 2, 128)  # one set per (batch, KV head), the whole budget used
    _check_index(sel, 16)
    assert sel.clustered == T - 1 and sel.sizes.shape[-1] == (T - 17) // 20
    scores = sel.score(q)  # [B, G, C]
    for b in range(2):
        for g in range(2):
            row = idx[b, g].tolist()
            assert len(set(row)) == len(row), "duplicate token ids"
            assert row[:16] == list(range(16)) and row[-1] == T - 1, "sink or recent token missing"
            cluster_of = torch.empty(T, dtype=torch.long)
            for c, (start, size) in enumerate(zip(sel.starts[b, g].tolist(), sel.sizes[b, g].tolist())):
                cluster_of[sel.members[b, g, start : start + size]] = c
            taken = torch.bincount(cluster_of[idx[b, g, 16:-1]], minlength=sel.sizes.shape[-1])
            order = scores[b, g].argsort(descending=True)
            taken, sizes = taken[order], sel.sizes[b, g, order]
            n_full = int((taken == sizes).long().cumprod(0).sum())  # leading clusters taken whole
            assert taken[n_full + 1 :].sum() == 0, "a cluster was taken out of score order"
            assert int(taken.sum()) == 128 - 16 - 1


def test_int8_centroids_score_like_float_ones_in_a_quarter_of_the_bytes():
    store, q = _store(517), torch.randn(2, 6, 8)
    sels = {bits: ClusterKVConfig(budget=128, sink=16, window=24, tokens_per_cluster=4, centroid_bits=bits)
            .make_selector(2) for bits in (32, 8)}
    picked = {bits: sel.select(q, store) for bits, sel in sels.items()}
    exact, quant = sels[32], sels[8]
    assert torch.equal(quant.members, exact.members)  # the same clustering: only the stored centroids differ
    assert quant.centroids.codes.nbytes * 4 == exact.centroids.nbytes
    torch.testing.assert_close(quant.centroids.float(), exact.centroids, atol=exact.centroids.abs().max() / 100, rtol=0)
    s32, s8 = exact.score(q), quant.score(q)
    assert (s8 - s32).abs().max() <= 0.02 * s32.abs().max()
    same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(picked[32].flatten(0, 1), picked[8].flatten(0, 1)))
    assert same >= 0.9 * picked[32].numel()


def test_incremental_clustering_appends_clusters_every_window_tokens():
    cfg = ClusterKVConfig(budget=200, sink=16, window=40, new_clusters=4, tokens_per_cluster=80)
    sel, store = cfg.make_selector(2), _store(600)
    q = torch.randn(2, 4, 8)
    sel.select(q, store)
    assert (sel.clustered, sel.sizes.shape[-1], sel.clusterings) == (599, 583 // 80, 1)
    old_members = sel.members.clone()
    for t in range(600, 640):
        _append_one(store, t)
        idx = sel.select(q, store)
        recent = idx[..., -(t + 1 - sel.clustered) :]
        assert torch.equal(recent, torch.arange(sel.clustered, t + 1).expand_as(recent))
        assert idx.shape[-1] == 200 and t + 1 - sel.clustered <= 40
    assert (sel.clustered, sel.sizes.shape[-1], sel.clusterings) == (639, 583 // 80 + 4, 2)
    assert torch.equal(sel.members[..., :583], old_members)  # old clusters untouched, new ones appended
    assert torch.equal(sel.members[..., 583:].sort(-1).values, torch.arange(599, 639).expand(2, 2, -1))
    _check_index(sel, 16)


def test_kmeans_invariants():
    x = torch.randn(3, 500, 16, generator=torch.Generator().manual_seed(0)) + 1
    assign, centroids = kmeans(x, 7, iters=100)
    assert assign.shape == (3, 500) and centroids.shape == (3, 7, 16)
    for r in range(3):
        for c in assign[r].unique():  # a centroid is the mean of its members
            torch.testing.assert_close(centroids[r, c], x[r, assign[r] == c].mean(0))
    cos = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(centroids, dim=-1).mT
    assert torch.equal(assign, cos.argmax(-1))  # converged: every key sits with its most similar centroid
    assert torch.equal(kmeans(x, 7, iters=100)[0], assign)  # seeded: reproducible


def test_two_level_kmeans_invariants():
    x = torch.randn(2, 900, 16, generator=torch.Generator().manual_seed(1)) + 0.5
    assign, centroids = two_level_kmeans(x, 100, iters=100)
    assert assign.shape == (2, 900) and centroids.shape == (2, 100, 16)  # 10 coarse clusters of 10
    for r in range(2):
        for c in assign[r].unique():
            torch.testing.assert_close(centroids[r, c], x[r, assign[r] == c].mean(0))
    # converged within its coarse cluster: every key sits with the most similar of its coarse cluster's 10
    cos = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(centroids, dim=-1).mT
    siblings = (assign // 10)[..., None] * 10 + torch.arange(10)
    assert torch.equal(assign, siblings.gather(-1, cos.gather(-1, siblings).argmax(-1, keepdim=True))[..., 0])
    assert torch.equal(two_level_kmeans(x, 100, iters=100)[0], assign)
    assert two_level_kmeans(x, 95)[1].shape[1] == 100  # rounded up to whole coarse clusters


def test_selection_with_many_clusters_uses_the_two_level_index():
    cfg = ClusterKVConfig(budget=128, sink=16, window=24, tokens_per_cluster=2)
    sel, store = cfg.make_selector(2), _store(400)
    idx = sel.select(torch.randn(2, 6, 8), store)
    assert sel.sizes.shape[-1] >= (400 - 17) // 2 > TWO_LEVEL_FROM
    _check_index(sel, 16)
    assert idx.shape == (2, 2, 128) and all(len(set(row)) == 128 for row in idx.flatten(0, 1).tolist())


@torch.no_grad()
def test_sparse_steps_attend_exactly_the_selection_and_reuse_resident_tokens():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 260), generator=torch.Generator().manual_seed(2))
    cache = LiveKVCache(model.config, "clusterkv", budget=64, sink=4, window=16, tokens_per_cluster=10, dense_layers=0)
    checked = []

    def check(layer, q, token_idx, out):  # attention over exactly the selected tokens (eager math)
        k, v = layer.host.gather(token_idx)
        B, H, D = q.shape
        r = H // k.shape[1]
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        probs = (q[:, :, None] @ k.transpose(-1, -2) * D**-0.5).softmax(-1)
        torch.testing.assert_close(out[:, 0], (probs @ v)[:, :, 0], rtol=1e-5, atol=1e-5)
        checked.append(token_idx.shape[-1])

    for layer in cache.recallable_layers:
        layer.observers.append(check)
    decode(model, cache, ids, prefill=200)
    assert len(checked) == 60 * 4 and set(checked) == {64}
    diag = diagnostics(cache)
    assert 0.3 < diag["hit_rate"] < 1  # consecutive queries share most of their clusters
    assert all(d["clusterings"] == 4 for d in diag["layers"].values())  # prefill + 3 x 16 decoded tokens
    per_step = (1 - diag["hit_rate"]) * 64 * 4 * 2 * (2 * 16 * 4)  # tokens x layers x KV heads x (K+V bytes)
    assert diag["bytes_recalled_per_step"] == pytest.approx(per_step)


def test_defaults_and_bad_configurations():
    cfg = make_method("clusterkv")
    assert (cfg.budget, cfg.sink, cfg.window, cfg.page_size, cfg.dense_layers) == (1024, 16, 320, 16, 2)
    assert (cfg.tokens_per_cluster, cfg.new_clusters, cfg.kmeans_iters) == (80, 8, 20)
    small = make_method("clusterkv", budget=256)
    assert (small.window, small.tokens_per_cluster) == (80, 3)  # clusters shrink so that the budget holds ~80
    with pytest.raises(ValueError, match="too small"):
        make_method("clusterkv", budget=100, window=84)
    with pytest.raises(ValueError, match="new_clusters"):
        make_method("clusterkv", new_clusters=0)
