"""The compiled CPU kernels against their PyTorch references (livekv.kernels)."""

import pytest
import torch

from livekv import kernels, retrieval
from livekv.methods.clusterkv import ClusterKVConfig
from livekv.methods.quest import QuestConfig, StepPages, sink_pages_window, step_pages
from livekv.store import HostStore

needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason="no g++ or no AVX-512 VNNI here: the compiled kernels do not run")


def _store(T, D, B=2, G=3, seed=0):
    """Int8 page digests (pages of 2) of keys with a few outlier channels, as real keys have."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, G, T, D, generator=g) * (1 + 6 * (torch.rand(D, generator=g) < 0.05))
    store = HostStore(B, G, D, 2, torch.float32, torch.device("cpu"), digest_bits=8)
    store.append(keys, torch.randn(B, G, T, D, generator=g))
    return store


def _selector(per):
    return QuestConfig(budget=256, sink=4, window=32, dense_layers=0, digest_bits=8, coarse_pages=per,
                       coarse_keep=2).make_selector(0)


def _reference(sel, q, store):
    return sink_pages_window(store, sel.cfg, sel.pick, q)


def _pages(tokens, step):
    """The picked pages of token ids ``[B, G, k]`` laid out as ``step`` says."""
    return tokens[..., step.sink: step.sink + step.n * step.page_size: step.page_size] // step.page_size


@needs_kernels
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("per", [0, 8])
def test_quest_select_kernel_picks_pages_as_good_as_the_reference(D, per):
    store, q = _store(8000, D), torch.randn(2, 9, D, generator=torch.Generator().manual_seed(1))
    sel = _selector(per)
    step = step_pages(sel.cfg, 8000)  # 110 of 3982 candidate pages; two levels: 498 full runs of 8, 220 kept
    fast, ref = sel.select(q, store), _reference(sel, q, store)
    assert fast.shape == ref.shape == (2, 3, 256)
    assert torch.equal(fast[..., : step.sink], ref[..., : step.sink])  # the sink and the window
    assert torch.equal(fast[..., step.sink + step.n * 2:], ref[..., step.sink + step.n * 2:])
    assert torch.equal(fast[..., step.sink: step.sink + step.n * 2] % 2, torch.arange(2).repeat(step.n).expand(2, 3, -1))
    fast, ref = _pages(fast, step), _pages(ref, step)
    exact = sel.bound(q, store.digests().float())  # [B, G, pages]: the float bound of the stored digests
    tol = 0.01 * float(exact.abs().max())  # the query's 8-bit rounding (the reference rounds it to bfloat16)
    overlap = 0
    for b in range(2):
        for g in range(3):
            f, r = fast[b, g], ref[b, g]
            assert len(set(f.tolist())) == step.n and int(f.min()) >= step.first and int(f.max()) < step.last
            fs, rs = exact[b, g, f].sort().values, exact[b, g, r].sort().values
            if per:  # near-ties among the runs may keep another run: as good on the whole, not page for page
                assert float(fs.sum()) >= float(rs.sum()) - step.n * tol
            else:
                assert torch.allclose(fs, rs, atol=tol), (fs - rs).abs().max()
            overlap += len(set(f.tolist()) & set(r.tolist()))
    assert overlap >= 0.85 * 6 * step.n


@needs_kernels
def test_quest_select_kernel_finds_the_exact_best_pages_of_one_level():
    store, q = _store(4000, 64, seed=2), torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(3))
    sel = _selector(0)
    step = step_pages(sel.cfg, 4000)
    picked = _pages(sel.select(q, store), step)
    exact = sel.bound(q, store.digests().float())
    best = exact[:, :, step.first: step.last].topk(step.n, dim=-1).values
    tol = 0.01 * float(exact.abs().max())
    assert torch.allclose(exact.gather(-1, picked).sort(-1, descending=True).values, best, atol=tol)


@needs_kernels
@pytest.mark.parametrize("per", [0, 8])
def test_quest_select_kernel_breaks_ties_by_the_first_pages(per):
    """Equal keys give every page (and run) the same bound: the first candidates win, in order."""
    B, G, T, D = 1, 3, 3000, 64
    store = HostStore(B, G, D, 2, torch.float32, torch.device("cpu"), digest_bits=8)
    store.append(torch.ones(B, G, T, D), torch.randn(B, G, T, D))
    sel = _selector(per)
    step = step_pages(sel.cfg, T)
    picked = _pages(sel.select(torch.randn(B, 9, D), store), step)
    assert torch.equal(picked, torch.arange(step.first, step.first + step.n).expand(B, G, -1))


@needs_kernels
def test_quest_select_kernel_declines_what_it_does_not_cover():
    store, q = _store(2000, 32), torch.randn(2, 9, 32)  # head dim 32: the reference path
    sel = _selector(0)
    assert kernels.quest_select(q, store.digests(), None, 0, 0, step_pages(sel.cfg, 2000)) is None
    assert torch.equal(sel.select(q, store), _reference(sel, q, store))
    store, q = _store(2000, 64), torch.randn(2, 9, 64)
    few = StepPages(sink=4, page_size=2, first=80, last=90, n=12, window_start=180, length=200)  # 10 candidates
    assert kernels.quest_select(q, store.digests(), None, 0, 0, few) is None


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("LIVEKV_KERNELS", "0")
    kernels._library.cache_clear()
    try:
        assert not kernels.available()
        store, q = _store(8000, 64), torch.randn(2, 9, 64)
        sel = _selector(8)
        assert torch.equal(sel.select(q, store), _reference(sel, q, store))
    finally:
        kernels._library.cache_clear()


def _clusterkv(T=3000, D=64, seed=4):
    """A ClusterKV selector over int8 centroids, its index built by a first selection."""
    store = _store(T, D, seed=seed)
    sel = ClusterKVConfig(budget=256, dense_layers=0, centroid_bits=8).make_selector(0)
    q = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(seed + 1))
    sel.select(q, store)
    return sel, store, q


@needs_kernels
@pytest.mark.parametrize("D", [64, 128])
def test_clusterkv_select_kernel_takes_clusters_as_good_as_the_reference(D):
    sel, store, q = _clusterkv(D=D)
    T, sink = store.length, sel.cfg.sink
    fill = sel.cfg.budget - sink - (T - sel.clustered)
    fast, ref = sel.select(q, store), sel.reference_select(q, T, fill)
    assert fast.shape == ref.shape == (2, 3, 256)
    assert torch.equal(fast[..., :sink], ref[..., :sink]) and torch.equal(fast[..., sink + fill:], ref[..., sink + fill:])
    exact = retrieval.dot(q, sel.centroids.float()).amax(-2)  # [B, G, clusters]: float q . centroid, the group's max
    tol = 0.01 * float(exact.abs().max())
    for b in range(2):
        for g in range(3):
            cluster_of = torch.empty(T, dtype=torch.long)
            cluster_of[sel.members[b, g]] = torch.repeat_interleave(torch.arange(sel.sizes.shape[-1]), sel.sizes[b, g])
            f, r = fast[b, g, sink: sink + fill], ref[b, g, sink: sink + fill]
            assert len(set(f.tolist())) == fill and int(f.min()) >= sink and int(f.max()) < sel.clustered
            taken = cluster_of[f]  # whole clusters in descending score, the last one cut
            counts = torch.bincount(taken, minlength=sel.sizes.shape[-1])
            assert int(((counts > 0) & (counts < sel.sizes[b, g])).sum()) <= 1
            fs, rs = exact[b, g, taken], exact[b, g, cluster_of[r]]
            assert bool((fs[:-1] >= fs[1:] - tol).all())
            assert torch.allclose(fs.sort().values, rs.sort().values, atol=tol)
