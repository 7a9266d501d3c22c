"""FreeKV: exactness (dense, tau = -inf, tau = +inf), background and disk-tier recall bit for bit, diagnostics."""

import threading

import pytest
import torch

from conftest import check_cuda_recall_like_cpu, decode, tiny_model
from livekv import LiveKVCache, make_method
from livekv.methods.freekv import FreeKVLayer
from livekv.methods.freekv_diagnostics import diagnostics
from livekv.recall import RecallEngine, copy_pages
from livekv.slots import PageSlots
from livekv.disk import DiskHostStore
from livekv.store import HostStore

SMALL = dict(budget=48, page_size=8)  # 200 tokens: sparse from the first decode step



def _arch(model):
    return "qwen2" if type(model).__name__.startswith("Qwen2") else "llama"


def test_defaults_follow_the_paper_at_large_budgets_and_quest_at_small_ones():
    big = make_method("freekv")
    assert (big.budget, big.page_size, big.sink, big.window, big.gqa_pool, big.tau) == (2048, 32, 128, 128, "softmax_mean", 0.8)
    small = make_method("freekv", budget=256)
    assert (small.page_size, small.gqa_pool) == (2, "max") == (make_method("quest", budget=256).page_size, "max")
    with pytest.raises(ValueError, match="host"):
        make_method("freekv", host="tape")


@torch.no_grad()
def test_covering_budget_equals_dense(model, ids):
    expected = tiny_model(_arch(model), attn="sdpa")(ids).logits
    cache = LiveKVCache(model.config, "freekv", budget=4096, dense_layers=1)
    torch.testing.assert_close(decode(model, cache, ids, prefill=120), expected, rtol=1e-4, atol=1e-4)
    prompt = ids[:, :100]
    want = model.generate(prompt, max_new_tokens=24, do_sample=False)
    got = model.generate(prompt, past_key_values=LiveKVCache(model.config, "freekv", budget=4096), max_new_tokens=24,
                         do_sample=False)
    assert torch.equal(got, want)


@torch.no_grad()
def test_tau_minus_inf_reads_the_selection_of_the_previous_query(ids):
    model = tiny_model("llama")
    cache = LiveKVCache(model.config, "freekv", tau=float("-inf"), dense_layers=0, **SMALL)
    previous, checked, differs = {}, [], []

    def check(layer, q, token_idx, out):
        T = layer.host.length
        q_used = previous.get(layer.layer_idx, q)  # the first decode step selects exactly, with q(t)
        assert torch.equal(token_idx, layer.select(q_used, T))
        differs.append(not torch.equal(token_idx.sort(-1).values, layer.select(q, T).sort(-1).values))
        previous[layer.layer_idx] = q
        checked.append(T)

    for layer in cache.recallable_layers:
        layer.observers.append(check)
    decode(model, cache, ids, prefill=150)
    assert len(checked) == 50 * model.config.num_hidden_layers
    assert any(differs)  # speculation really used stale queries
    assert diagnostics(cache)["trigger_rate"] == 0.0


@torch.no_grad()
def test_tau_plus_inf_equals_blocking_quest(model, ids):
    quest = LiveKVCache(model.config, "quest", gqa_pool="softmax_mean", **SMALL)
    freekv = LiveKVCache(model.config, "freekv", tau=float("inf"), gqa_pool="softmax_mean", **SMALL)
    torch.testing.assert_close(decode(model, freekv, ids, prefill=120), decode(model, quest, ids, prefill=120), rtol=1e-5, atol=1e-5)
    assert diagnostics(freekv)["trigger_rate"] == 1.0
    assert freekv.stats()["tokens_read"] == quest.stats()["tokens_read"]


@torch.no_grad()
def test_generate_a_batch_with_the_default_tau(ids):
    model = tiny_model("llama")
    batch = torch.stack([ids[0, :90], ids[0, 10:100]])
    cache = LiveKVCache(model.config, "freekv", **SMALL)
    out = model.generate(batch, past_key_values=cache, max_new_tokens=12, do_sample=False)
    assert out.shape == (2, 102) and cache.get_seq_length() == 101
    for row in range(2):  # each row as if alone
        alone = model.generate(batch[row : row + 1], past_key_values=LiveKVCache(model.config, "freekv", **SMALL),
                               max_new_tokens=12, do_sample=False)
        assert torch.equal(out[row : row + 1], alone)


@torch.no_grad()
def test_fast_tier_holds_exact_copies_of_what_attention_reads(ids):
    model = tiny_model("qwen2")
    cache = LiveKVCache(model.config, "freekv", dense_layers=0, **SMALL)
    checked = []

    def check(layer, q, token_idx, out):
        slots = layer.slots
        columns = slots.columns
        visible = columns >= 0
        assert sorted(columns[0, 0][visible[0, 0]].tolist()) == sorted(token_idx[0, 0].tolist())
        k, v = layer.host.gather(columns.clamp(min=0))
        assert torch.equal(slots.keys[visible], k[visible]) and torch.equal(slots.values[visible], v[visible])
        checked.append(1)

    for layer in cache.recallable_layers:
        layer.observers.append(check)
    decode(model, cache, ids, prefill=150)
    assert len(checked) == 50 * model.config.num_hidden_layers
    stats = cache.stats()  # tokens_read is per KV head, tokens_copied per (token, KV head)
    assert stats["tokens_copied"] < 0.5 * stats["tokens_read"] * model.config.num_key_value_heads  # pages reused


def _host(cls, T=203, p=4, **kw):
    g = torch.Generator().manual_seed(0)
    store = cls(2, 3, 8, p, torch.float32, torch.device("cpu"), **kw)
    k, v = torch.randn(2, 3, T, 8, generator=g), torch.randn(2, 3, T, 8, generator=g)
    for start, end in ((0, 5), (5, 6), (6, 70), (70, T)):
        store.append(k[:, :, start:end], v[:, :, start:end])
    return store, k, v


def test_double_buffered_stream_equals_blocking_copy():
    store, _, _ = _host(HostStore)
    n = 37  # pages to copy, in groups of 5: eight groups through the two staging buffers
    g = torch.Generator().manual_seed(1)
    b, h = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    page = torch.randint(0, store.num_full_pages, (n,), generator=g)
    slot = torch.randperm(2 * 3 * 40, generator=g)[:n]
    b, h, slot = slot // 120, slot // 40 % 3, slot % 40  # distinct (b, g, slot) targets
    blocking, streamed = (PageSlots(2, 3, 8, 4, torch.float32, torch.device("cpu")) for _ in range(2))
    for s in (blocking, streamed):
        s._grow(40)
    copy_pages(store, blocking, b, h, page, slot)
    RecallEngine(group=5).stream(store, streamed, b, h, page, slot)
    assert torch.equal(blocking.keys, streamed.keys) and torch.equal(blocking.values, streamed.values)
    k, v = store.gather(page.view(1, 1, n).expand(2, 3, n) * 4)  # first token of each page
    assert torch.equal(streamed.keys.view(2, 3, 40, 4, 8)[b, h, slot, 0], k[b, h, torch.arange(n)])


def test_disk_tier_recalls_bit_exactly(tmp_path):
    disk, k, v = _host(DiskHostStore, directory=str(tmp_path))
    ram, _, _ = _host(HostStore)
    idx = torch.randint(0, 203, (2, 3, 50), generator=torch.Generator().manual_seed(2))
    got_k, got_v = disk.gather(idx)
    assert torch.equal(got_k, k.gather(2, idx[..., None].expand(-1, -1, -1, 8)))
    assert torch.equal(got_v, v.gather(2, idx[..., None].expand(-1, -1, -1, 8)))
    assert all(torch.equal(a, b) for a, b in zip(disk.all_tokens(), (k, v)))
    assert torch.equal(disk.digests(), ram.digests())
    assert list(tmp_path.iterdir()) == []  # the file is unlinked: it goes away with the store


@torch.no_grad()
def test_disk_tier_decodes_exactly_like_ram(ids, tmp_path):
    model = tiny_model("llama")
    ram = decode(model, LiveKVCache(model.config, "freekv", **SMALL), ids, prefill=120)
    disk = decode(model, LiveKVCache(model.config, "freekv", host="disk", host_dir=str(tmp_path), **SMALL), ids, prefill=120)
    assert torch.equal(ram, disk)


@torch.no_grad()
def test_diagnostics_are_populated(ids):
    model = tiny_model("llama")
    cache = LiveKVCache(model.config, "freekv", tau=0.5, **SMALL)
    decode(model, cache, ids, prefill=120)
    d = diagnostics(cache)
    assert 0.0 < d["trigger_rate"] < 1.0 and 0.0 <= d["recall_hidden"] <= 1.0
    assert d["bytes_per_step"] > 0 and d["background_s"] > 0
    layer = d["layers"][2]
    assert layer["steps"] == 80 and layer["exact_steps"] == 1
    assert -1.0 <= layer["cosine_quantiles"]["p05"] <= layer["cosine_quantiles"]["p95"] <= 1.0
    assert layer["background_pages_per_step"] > 0
    assert cache.memory()["fast_kv_bytes"] > 0 and cache.memory()["host_kv_bytes"] > 0


@torch.no_grad()
def test_memory_is_read_after_the_background_recall(ids, monkeypatch):
    """A figure read while the speculative recall plans would count a half-rewritten page table."""
    model = tiny_model("llama")
    cache = LiveKVCache(model.config, "freekv", tau=float("-inf"), **SMALL)
    decode(model, cache, ids[:, :130], prefill=120)
    go, job = threading.Event(), FreeKVLayer._speculate_job

    def held(self, *args):  # an error here surfaces at the layer's wait()
        assert go.wait(30)
        job(self, *args)

    monkeypatch.setattr(FreeKVLayer, "_speculate_job", held)
    model(ids[:, 130:131], past_key_values=cache)  # its recalls wait for ``go``
    read = []
    reader = threading.Thread(target=lambda: read.append(cache.memory()))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive()  # the reading waits for the recall in flight
    go.set()
    reader.join()
    cache.wait()
    assert read == [cache.memory()]


def test_background_recall_runs_in_the_callers_inference_mode(ids, tmp_path):
    """Inference mode is per thread: tensors the caller remakes in it (a loaded cache, beam search's reordering)
    could not be updated in place by a recall worker outside it."""
    model = tiny_model("llama")
    with torch.no_grad():
        cache = LiveKVCache(model.config, "freekv", tau=float("-inf"), **SMALL)
        decode(model, cache, ids[:, :130], prefill=120)
        cache.save(tmp_path / "snap", model)
        expected = decode(model, cache, ids[:, 130:140], prefill=0)
    with torch.inference_mode():
        restored = LiveKVCache.load(tmp_path / "snap", model)
        assert torch.equal(decode(model, restored, ids[:, 130:140], prefill=0), expected)
        beams = LiveKVCache(model.config, "freekv", **SMALL)
        model.generate(ids[:, :120], past_key_values=beams, max_new_tokens=6, num_beams=2, do_sample=False,
                       pad_token_id=0)
        beams.wait()


def test_a_forward_in_grad_mode_after_generate_works(ids):
    """Found: scoring the next token without no_grad after generate() failed in freekv's slots ("a leaf Variable
    that requires grad is being used in an in-place operation")."""
    model = tiny_model("llama")
    cache = LiveKVCache(model.config, "freekv", budget=32, dense_layers=3)
    out = model.generate(ids[:, :50], past_key_values=cache, min_new_tokens=30, max_new_tokens=30, do_sample=False)
    with pytest.warns(UserWarning, match="keeps no gradient"):
        logits = model(out[:, -1:], past_key_values=cache).logits
    assert logits.requires_grad and cache.get_seq_length() == out.shape[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@torch.no_grad()
def test_cuda_streams_recall_exactly_and_decode_like_cpu(ids):
    cuda = torch.device("cuda")
    store, _, _ = _host(HostStore)
    pinned = HostStore(2, 3, 8, 4, torch.float32, cuda)
    pinned.append(*store.all_tokens())
    check_cuda_recall_like_cpu(store, pinned, store.num_full_pages)

    model = tiny_model("llama")
    want = decode(model, LiveKVCache(model.config, "freekv", **SMALL), ids, prefill=120)
    model.to(cuda)
    got = decode(model, LiveKVCache(model.config, "freekv", **SMALL), ids.to(cuda), prefill=120)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3)
