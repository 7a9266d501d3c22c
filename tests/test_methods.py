import pytest
import torch

from conftest import decode, tiny_model
from livekv import LiveKVCache
from livekv.methods import METHODS, knob_options, make_method
from livekv.methods.quest import QuestConfig
from livekv.retrieval import minmax_bound
from livekv.store import HostStore


def _store(T, page_size=4, B=2, G=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    store = HostStore(B, G, D, page_size, torch.float32, torch.device("cpu"))
    store.append(torch.randn(B, G, T, D, generator=g), torch.randn(B, G, T, D, generator=g))
    return store


@pytest.mark.parametrize("method", ["quest", "sink_window", "quest:coarse_pages=2", "quest:coarse_pages=4,digest_bits=8",
                                    "quest:coarse_pages=3"])
@pytest.mark.parametrize("T", [37, 64, 203])
def test_selection_invariants(method, T):
    cfg = make_method(method, budget=32, sink=4, window=8, page_size=4)
    store = _store(T)
    q = torch.randn(2, 6, 8)  # 6 query heads over 2 KV heads
    idx = cfg.make_selector(0).select(q, store)
    assert idx.shape[:2] == (2, 2)  # one set of tokens per (batch, KV head): every query head of a group reads it
    assert idx.shape[-1] <= max(32, 0) or T <= 32
    for row in idx.reshape(-1, idx.shape[-1]):
        ids = set(row.tolist())
        assert len(ids) == len(row), "duplicate token ids"
        assert set(range(4)) <= ids, "sink missing"
        assert set(range(T - 8, T)) <= ids, "window missing"
        assert max(ids) < T and min(ids) >= 0


def test_full_budget_selects_everything():
    store = _store(50)
    for method in ("quest", "sink_window"):
        idx = make_method(method, budget=64, page_size=4).make_selector(0).select(torch.randn(2, 4, 8), store)
        assert torch.equal(idx.sort(-1).values, torch.arange(50).expand(2, 2, -1))


def test_quest_picks_the_page_holding_the_key_that_matches_the_query():
    store = _store(256, page_size=8, B=1, G=1)
    q = torch.randn(1, 1, 8)
    keys, values = store.all_tokens()
    keys = keys.clone()
    keys[0, 0, 133] = 50 * q[0, 0]  # token 133 (page 16) dominates the attention
    store = HostStore(1, 1, 8, 8, torch.float32, torch.device("cpu"))
    store.append(keys, values)
    idx = QuestConfig(budget=48, sink=8, window=8, page_size=8, dense_layers=0).make_selector(0).select(q, store)
    assert 133 in idx.tolist()[0][0]


def _two_level(per, budget=64):
    return QuestConfig(budget=budget, sink=8, window=8, page_size=4, dense_layers=0, coarse_pages=per)


def test_two_level_selection_scores_the_pages_of_the_best_runs_only():
    store = _store(1024, B=2, G=2)
    q = torch.randn(2, 6, 8)
    sel = _two_level(8).make_selector(0)
    first, last, n = 2, 254, 12  # candidate pages [2, 254): full runs 0..30 (0 holds sink pages), pages 248..253 past them
    picked = sel.pick(q, store, first, last, n)
    kmax, kmin = store.digests().chunk(2, dim=-1)
    for b in range(2):
        for g in range(2):
            head = (slice(b, b + 1), slice(3 * g, 3 * g + 3))
            run_digests = torch.stack([torch.cat((kmax[b, g, 8 * r:8 * r + 8].amax(0), kmin[b, g, 8 * r:8 * r + 8].amin(0)))
                                       for r in range(31)])
            runs = minmax_bound(q[head], run_digests[None, None]).amax(-2).flatten().topk(n).indices
            cand = torch.cat([torch.arange(max(8 * r, first), 8 * r + 8) for r in runs.tolist()] + [torch.arange(248, last)])
            pages = minmax_bound(q[head], store.digests()[b:b + 1, g:g + 1, cand])
            best = cand[pages.amax(-2).flatten().topk(n).indices]
            assert sorted(picked[b, g].tolist()) == sorted(best.tolist())


def test_two_level_selection_finds_keys_planted_in_distinct_runs():
    store = _store(2048, B=1, G=1)
    q = torch.randn(1, 3, 8)
    keys, values = store.all_tokens()
    keys = keys.clone()
    planted = [77, 403, 1190, 1601, 1999]  # pages 19, 100, 297, 400, 499: five runs of 16 pages
    keys[0, 0, planted] = 30 * q[0, 0]
    store = HostStore(1, 1, 8, 4, torch.float32, torch.device("cpu"))
    store.append(keys, values)
    one = QuestConfig(budget=64, sink=8, window=8, page_size=4, dense_layers=0, coarse_pages=0).make_selector(0)
    two = QuestConfig(budget=64, sink=8, window=8, page_size=4, dense_layers=0, coarse_pages=16).make_selector(0)
    for sel in (one, two):
        idx = set(sel.select(q, store)[0, 0].tolist())
        assert set(planted) <= idx


def test_page_scores_bound_every_key_in_the_page():
    store = _store(64, page_size=8, B=1, G=1)
    q = torch.randn(1, 3, 8)  # 3 query heads in the group
    bounds = minmax_bound(q, store.digests())  # [1, 1, 3, 8]
    keys, _ = store.all_tokens()
    dots = (q[0, :, None, :] * keys[0, 0][None]).sum(-1).view(3, 8, 8).amax(-1)  # [heads, pages]
    assert torch.all(bounds[0, 0] >= dots - 1e-5)


def test_registry_and_defaults():
    assert {"dense", "sink_window", "quest"} <= set(METHODS)
    q = make_method("quest", budget=256)
    assert (q.sink, q.window, q.page_size, q.dense_layers) == (16, 16, 2, 2)
    assert q.budget - q.sink - q.window >= 0.8 * q.budget  # most of a small budget goes to selection
    big = make_method("quest", budget=2048)
    assert (big.sink, big.window, big.page_size) == (128, 128, 16)  # Quest's page at large budgets
    assert make_method("quest", budget=512).page_size == 4  # budget // budget_pages (128)
    assert make_method("quest", budget=256, budget_pages=64).page_size == 4
    sw = make_method("sink_window", budget=512)
    assert (sw.sink, sw.window, sw.dense_layers) == (4, 508, 0)



def test_options_show_a_default_only_where_every_method_shares_it():
    options = {o.name: o.default for o in knob_options("text")}
    assert options["sink"] == options["dense_layers"] == "each method's own (`livekv methods`)"  # 4 / None, 0 / 2
    assert options["budget_pages"] == 128 and options["host"] == "ram"  # quest and freekv agree; every method's

@pytest.mark.parametrize(
    "method, knobs, match",
    [
        ("quest", dict(budget=64, sink=32, window=32), "too small"),
        ("quest", dict(budget=256, sink=9), "multiple of page_size"),
        ("quest", dict(budget=256, page_size=0), "page_size"),
        ("quest", dict(budget=256, dense_layers=-1), "dense_layers"),
        ("sink_window", dict(budget=100, sink=4, window=200), "smaller than sink"),
        ("quest", dict(bugdet=10), "no knob"),
        ("nope", {}, "unknown text method .nope.; choose one of dense"),
        ("livevlm", {}, "unknown text method .livevlm."),
    ],
)
def test_bad_configurations_raise_clear_errors(method, knobs, match):
    with pytest.raises(ValueError, match=match):
        make_method(method, **knobs)


def test_a_spec_names_a_method_with_knobs_that_win_over_the_shared_ones():
    cfg = make_method("quest:coarse_pages=0,page_size=8", budget=256, page_size=4)
    assert (cfg.name, cfg.coarse_pages, cfg.page_size, cfg.budget) == ("quest", 0, 8, 256)
    with pytest.raises(ValueError, match="coarse_pages"):
        make_method("quest:coarse_pages=1", budget=256)


@pytest.mark.parametrize("shape", [(2, 3, 50, 8), (1, 2, 7, 4)])
def test_gather_summaries_equals_indexing_also_on_slices_of_a_larger_buffer(shape):
    from livekv.retrieval import gather_summaries

    B, G, n, D = shape
    buf = torch.randn(B, G, n + 9, D)
    ids = torch.randint(0, n, (B, G, 11))
    for s in (buf[:, :, :n], buf[:, :, :n].transpose(0, 1).contiguous().transpose(0, 1), buf[:, :, :n, :].clone()):
        want = torch.stack([torch.stack([s[b, g, ids[b, g]] for g in range(G)]) for b in range(B)])
        assert torch.equal(gather_summaries(s, ids), want)


@pytest.mark.parametrize("method", ["quest", "freekv", "clusterkv"])
def test_summary_bits_reach_every_sparse_layer(method, ids):
    model = tiny_model("llama")
    knob = "centroid_bits" if method == "clusterkv" else "digest_bits"
    cache = LiveKVCache(model.config, method, budget=48, **{knob: 8})
    decode(model, cache, ids[:, :100], prefill=80)
    for layer in cache.recallable_layers:
        if method == "clusterkv":
            assert layer.selector.centroids.codes.dtype == torch.int8
        else:
            assert layer.host.page_digests.bits == 8 and layer.host.digests().codes.dtype == torch.int8
