"""A LiveKVCache used the ways transformers users use caches: misuse is refused with the fix named, before
anything wrong is produced; beam search works; bad knobs name themselves."""

import pytest
import torch

from conftest import tiny_model
from livekv import LiveKVCache

SPARSE = {"sink_window": dict(budget=4096), "quest": dict(budget=4096), "freekv": dict(budget=4096),
          "clusterkv": dict(budget=4096)}


@torch.no_grad()
@pytest.mark.parametrize("method", ["dense", "quest"])
def test_a_model_not_set_to_livekv_attention_is_refused(ids, method):
    """Found: an SDPA model given a LiveKVCache generated "Paris-----": attention read only the new token."""
    model = tiny_model("llama", attn="sdpa")
    cache = LiveKVCache(model.config, method, budget=64, ignore_unknown=True)
    with pytest.raises(RuntimeError, match="set_attn_implementation\\('livekv'\\)"):
        model.generate(ids[:, :40], past_key_values=cache, max_new_tokens=4, do_sample=False)
    livekv_model = tiny_model("llama")  # the next forward of this thread is not blamed for it
    livekv_model(ids[:, :8], past_key_values=LiveKVCache(livekv_model.config, "dense"))


@torch.no_grad()
@pytest.mark.parametrize("method", ["dense", "quest", "clusterkv"])
def test_reusing_a_cache_for_an_unrelated_prompt_is_refused_and_reset_fixes_it(ids, method):
    """Found: a second, unrelated generate() on the same cache answered with gibberish or the first answer."""
    model = tiny_model("llama")
    cache = LiveKVCache(model.config, method, budget=32, ignore_unknown=True)
    model.generate(ids[:, :60], past_key_values=cache, max_new_tokens=8, do_sample=False)
    other = ids[:, 100:130]
    with pytest.raises(ValueError, match="does not continue .*cache.reset\\(\\)"):
        model.generate(other, past_key_values=cache, max_new_tokens=8, do_sample=False)
    cache.reset()
    got = model.generate(other, past_key_values=cache, max_new_tokens=8, do_sample=False)
    fresh = model.generate(other, past_key_values=LiveKVCache(model.config, method, budget=32, ignore_unknown=True),
                           max_new_tokens=8, do_sample=False)
    assert torch.equal(got, fresh)


@torch.no_grad()
@pytest.mark.parametrize("length", [25, 44])
def test_an_unrelated_prompt_about_as_long_as_the_cache_is_refused(ids, length):
    """Found: a prompt over half the cache's length was taken as a continuation (generate drops an all-ones mask;
    the position check ran only for a forward without a 4-D mask). A longer one cannot be told from a continuation:
    generate feeds only its tokens past the cache's length."""
    model = tiny_model("llama")
    cache = LiveKVCache(model.config, "quest", budget=32)
    model.generate(ids[:, :40], past_key_values=cache, min_new_tokens=5, max_new_tokens=5, do_sample=False)
    assert cache.get_seq_length() == 44
    with pytest.raises(ValueError, match="does not continue"):
        model.generate(ids[:, 100 : 100 + length], past_key_values=cache, max_new_tokens=1, do_sample=False)


@torch.no_grad()
def test_a_continued_conversation_is_accepted(ids):
    model = tiny_model("llama")
    cache = LiveKVCache(model.config, "quest", budget=32)
    first = model.generate(ids[:, :60], past_key_values=cache, max_new_tokens=8, do_sample=False)
    turn = torch.cat([first, ids[:, 150:160]], dim=1)
    got = model.generate(turn, past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert torch.equal(got[:, : turn.shape[1]], turn)


@torch.no_grad()
@pytest.mark.parametrize("method", ["dense", *SPARSE])
def test_beam_search_with_a_covering_budget_equals_dense(ids, method):
    """Found: num_beams=2 was refused only after the whole prefill. Beam search reorders every per-row state."""
    model, reference = tiny_model("llama"), tiny_model("llama", attn="sdpa")
    prompt = ids[:, :80]
    expected = reference.generate(prompt, num_beams=3, max_new_tokens=12, do_sample=False)
    cache = LiveKVCache(model.config, method, **SPARSE.get(method, {}))
    got = model.generate(prompt, num_beams=3, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert torch.equal(got, expected)


@torch.no_grad()
@pytest.mark.parametrize("method", ["quest", "freekv", "clusterkv"])
def test_beam_search_at_a_small_budget_keeps_each_beam_its_own_selection(ids, method):
    """A beam reordered onto another row must read what that row reads: one beam at num_beams=1 is greedy."""
    model = tiny_model("llama")
    prompt = ids[:, :150]
    greedy = model.generate(prompt, max_new_tokens=10, do_sample=False,
                            past_key_values=LiveKVCache(model.config, method, budget=48))
    one_beam = model.generate(prompt, num_beams=1, max_new_tokens=10, do_sample=False,
                              past_key_values=LiveKVCache(model.config, method, budget=48))
    assert torch.equal(one_beam, greedy)
    beams = LiveKVCache(model.config, method, budget=48)
    out = model.generate(prompt, num_beams=2, max_new_tokens=10, do_sample=False, past_key_values=beams)
    assert out.shape == (1, 160) and beams.stats()["steps"] > 0


@pytest.mark.parametrize("knobs, message", [
    (dict(method="quest", budget="256"), "quest: knob budget must be int, got '256'"),
    (dict(method="sink_window", budget=0), "budget 0 must exceed sink \\(4\\)"),
    (dict(method="quest", budget=0), "budget must be at least 1"),
    (dict(method="freekv", tau="high"), "knob tau must be float"),
    (dict(method="clusterkv", gqa_pool="min"), "gqa_pool must be 'max' or 'softmax_mean'"),
    (dict(method="quest", dense_layers=True), "dense_layers must be int"),
])
def test_bad_knobs_name_themselves(knobs, message):
    model = tiny_model("llama")
    method = knobs.pop("method")
    with pytest.raises(ValueError, match=message):
        LiveKVCache(model.config, method, **knobs)


def test_a_disk_host_dir_that_is_a_file_is_refused(tmp_path):
    """Found: a 106-line traceback from deep in the disk tier."""
    model = tiny_model("llama")
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ValueError, match="host_dir .* is not a directory"):
        LiveKVCache(model.config, "quest", budget=64, host="disk", host_dir=str(afile))


def test_numpy_integers_are_integers():
    import numpy as np

    cache = LiveKVCache(tiny_model("llama").config, "quest", budget=np.int64(256))
    assert cache.method.budget == 256


@torch.no_grad()
def test_attention_variants_livekv_does_not_compute_are_refused():
    """Found: Gemma 2's logit soft-capping (and gpt-oss's attention sinks) were dropped without a word."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_logit_softcapping=50.0,
                          layer_types=["full_attention"] * 2, attn_implementation="livekv")
    model = Gemma2ForCausalLM(config).eval()
    with pytest.raises(NotImplementedError, match="'softcap'"):
        model(torch.arange(10)[None], past_key_values=LiveKVCache(model.config, "dense"))


@torch.no_grad()
def test_a_cache_made_for_a_model_with_fewer_layers_is_refused(ids):
    model = tiny_model("llama")
    config = model.config.__class__(**{**model.config.to_dict(), "num_hidden_layers": 1})
    with pytest.raises(ValueError, match="cache has 1 layers .* this model's config"):
        model(ids[:, :8], past_key_values=LiveKVCache(config, "dense"))


@torch.no_grad()
def test_a_padded_batch_given_as_a_4d_mask_is_not_judged_by_an_earlier_forward(ids):
    """Found in review: a user's 4-D mask skips the mask function, and the position check read the earlier
    forward's "not padded"."""
    model = tiny_model("llama")
    model(ids[:, :8], past_key_values=LiveKVCache(model.config, "dense"))
    L, rows = 20, ids[:, :20].repeat(2, 1)
    keep = torch.ones(2, L, dtype=torch.bool)
    keep[0, :3] = False  # row 0 left-padded by 3
    mask = (torch.ones(L, L, dtype=torch.bool).tril()[None] & keep[:, None, :] | torch.eye(L, dtype=torch.bool))[:, None]
    positions = (keep.long().cumsum(-1) - 1).clamp(min=0)
    model(rows, attention_mask=mask, position_ids=positions, past_key_values=LiveKVCache(model.config, "dense"))
