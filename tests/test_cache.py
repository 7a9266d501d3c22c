"""The cache inside transformers: exactness against dense attention, positions, chunked prefill, generate()."""

import pytest
import torch

from conftest import decode, tiny_model
from livekv import LiveKVCache

FULL = {"dense": {}, "quest": dict(budget=4096), "sink_window": dict(budget=4096),
        "quest:digest_bits=8,coarse_pages=2": dict(budget=4096)}



@torch.no_grad()
@pytest.mark.parametrize("method", list(FULL))
def test_full_budget_equals_dense_attention(model, ids, method):
    reference = tiny_model(type(model).__name__.startswith("Qwen2") and "qwen2" or "llama", attn="sdpa")
    expected = reference(ids).logits
    cache = LiveKVCache(model.config, method, **FULL[method])
    got = decode(model, cache, ids, prefill=120)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == ids.shape[1]
    if method != "dense":
        assert cache.stats()["steps"] == 80 * len(cache.recallable_layers)


@torch.no_grad()
@pytest.mark.parametrize("method", list(FULL))
def test_full_budget_generate_matches_dense_greedy(model, ids, method):
    prompt = ids[:, :100]
    expected = model.generate(prompt, max_new_tokens=24, do_sample=False)  # no livekv cache: plain SDPA path
    cache = LiveKVCache(model.config, method, **FULL[method])
    got = model.generate(prompt, past_key_values=cache, max_new_tokens=24, do_sample=False)
    assert torch.equal(got, expected)


@torch.no_grad()
def test_chunked_prefill_equals_one_shot(model, ids):
    expected = decode(model, LiveKVCache(model.config, "dense"), ids, prefill=160)
    for method in ("dense", "quest"):
        cache = LiveKVCache(model.config, method, budget=64, page_size=8, ignore_unknown=True)
        got = decode(model, cache, ids, prefill=160, chunk=48)
        if method == "dense":
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        else:  # the prefill part is dense in every method
            torch.testing.assert_close(got[:, :160], expected[:, :160], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_positions_stay_right_after_eviction(model, ids):
    """sink_window reads only sink + window at decode; the result must equal dense attention under the same
    mask with the original positions (i.e. positions are logical, not slots in the fast tier)."""
    prefill, sink, window = 120, 4, 20
    cache = LiveKVCache(model.config, "sink_window", budget=sink + window, sink=sink, window=window)
    got = decode(model, cache, ids, prefill=prefill)

    T = ids.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for t in range(prefill, T):
        mask[t, sink : max(sink, t - window + 1)] = False
    reference = tiny_model(type(model).__name__.startswith("Qwen2") and "qwen2" or "llama", attn="sdpa")
    expected = reference(ids, attention_mask=mask[None, None]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and it really evicted: without the mask the logits differ
    assert not torch.allclose(got[:, prefill:], reference(ids).logits[:, prefill:], atol=1e-3)


@torch.no_grad()
def test_batch_with_left_padding_matches_dense(ids):
    model = tiny_model("llama")
    reference = tiny_model("llama", attn="sdpa")
    batch = torch.stack([ids[0, :90], ids[0, 10:100]])
    attention_mask = torch.ones_like(batch)
    attention_mask[1, :15] = 0  # left padding in the second row
    expected = reference.generate(batch, attention_mask=attention_mask, max_new_tokens=12, do_sample=False)
    cache = LiveKVCache(model.config, "dense")
    got = model.generate(batch, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected)


@torch.no_grad()
@pytest.mark.parametrize("method", ["sink_window", "quest", "freekv", "clusterkv"])
def test_sparse_methods_refuse_padded_batches_before_storing_anything(ids, method):
    """Sparse methods select tokens by position: padding would take the places of the sink and of pages (found:
    sink_window's padded row answered "111111111"). They refuse such a batch clearly, before any layer stores it."""
    model = tiny_model("llama")
    batch = torch.stack([ids[0, :90], ids[0, 10:100]])
    attention_mask = torch.ones_like(batch)
    attention_mask[1, :15] = 0
    cache = LiveKVCache(model.config, method, budget=64)
    with pytest.raises(ValueError, match="padded batches are not supported by .*one at a time"):
        model.generate(batch, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert cache.get_seq_length() == 0
    got = model.generate(batch, past_key_values=cache, max_new_tokens=4, do_sample=False)  # no padding: fine
    assert got.shape == (2, 94)


@torch.no_grad()
def test_small_budget_reads_at_most_budget_and_reports_tiers(model, ids):
    cache = LiveKVCache(model.config, "quest", budget=48, page_size=8, dense_layers=1)
    decode(model, cache, ids, prefill=150)
    stats = cache.stats()
    assert stats["recallable_layers"] == model.config.num_hidden_layers - 1
    assert stats["tokens_read"] <= 48 * stats["steps"]
    assert stats["tokens_read"] >= 40 * stats["steps"]  # the budget is used, not wasted
    mem = cache.memory()
    dense_mem = LiveKVCache(model.config, "dense")
    decode(model, dense_mem, ids, prefill=150)
    assert mem["host_kv_bytes"] > 0 and dense_mem.memory()["host_kv_bytes"] == 0
    assert mem["fast_kv_bytes"] < dense_mem.memory()["fast_kv_bytes"]


def test_model_without_livekv_cache_is_plain_sdpa(ids):
    model, reference = tiny_model("llama"), tiny_model("llama", attn="sdpa")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_unsupported_cache_operations_say_so(model, ids):
    cache = LiveKVCache(model.config, "quest", budget=64, page_size=8)
    with torch.no_grad():
        model(ids[:, :20], past_key_values=cache)
    with pytest.raises(NotImplementedError, match="cropping"):
        cache.crop(4)


@torch.no_grad()
def test_sparse_step_is_attention_over_exactly_the_selected_tokens(model, ids):
    """Each query head attends over its KV head's selected tokens, nothing else (checked against eager math)."""
    cache = LiveKVCache(model.config, "quest", budget=48, page_size=8, dense_layers=0)
    checked = []

    def check(layer, q, token_idx, out):
        k, v = layer.host.gather(token_idx)  # [B, G, k, D]
        B, H, D = q.shape
        r = H // k.shape[1]
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        probs = (q[:, :, None] @ k.transpose(-1, -2) * D**-0.5).softmax(-1)  # [B, H, 1, k]
        torch.testing.assert_close(out[:, 0], (probs @ v)[:, :, 0], rtol=1e-5, atol=1e-5)
        checked.append(token_idx.shape[-1])

    for layer in cache.recallable_layers:
        layer.observers.append(check)
    decode(model, cache, ids, prefill=150)
    assert len(checked) == 50 * model.config.num_hidden_layers and max(checked) <= 48


@torch.no_grad()
def test_reusing_resident_tokens_changes_nothing_but_the_bytes_copied(ids):
    from dataclasses import dataclass
    from typing import ClassVar

    from livekv.methods.quest import QuestConfig

    @dataclass
    class QuestReuse(QuestConfig):
        reuse_resident: ClassVar[bool] = True

    model = tiny_model("llama")
    batch = torch.stack([ids[0, :190], ids[0, 10:200]])
    runs = {}
    for name, cfg in (("plain", QuestConfig(budget=48, page_size=8)), ("reuse", QuestReuse(budget=48, page_size=8))):
        cache = LiveKVCache(model.config, cfg)
        out = model.generate(batch[:, :120], past_key_values=cache, max_new_tokens=30, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        runs[name] = (torch.stack(out.logits, 1), cache.stats())
    torch.testing.assert_close(runs["reuse"][0], runs["plain"][0], rtol=1e-4, atol=1e-4)
    assert runs["reuse"][1]["tokens_read"] == runs["plain"][1]["tokens_read"]
    assert runs["reuse"][1]["bytes_recalled"] < 0.5 * runs["plain"][1]["bytes_recalled"]
