"""The embedded SmolLM2-135M-Instruct: loads offline and answers a short needle through the sparse path."""

import pytest
import torch

from livekv import LiveKVCache
from livekv.evals import needle
from livekv.models import load_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model()


def test_default_model_loads_with_livekv_attention(smollm2):
    model, tokenizer = smollm2
    assert model.config._attn_implementation == "livekv"
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    text = "The capital of France is Paris."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text and len(ids) == 7  # a working tokenizer, the model's vocabulary
    assert len(tokenizer) == model.config.vocab_size == 49152
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n") and text in chat


@torch.no_grad()
def test_quest_at_small_budget_answers_a_short_needle(smollm2):
    model, tokenizer = smollm2
    case = needle.make_case(tokenizer, context=1024, depth=0.3, seed=7)
    cache = LiveKVCache(model.config, "quest", budget=128)
    row = needle.run_case(model, tokenizer, case, cache)
    assert row["accuracy"] == 1.0, row
    assert cache.stats()["steps"] > 0  # the question really went through sparse decode steps
    assert row["fast_kv_bytes"] < row["host_kv_bytes"]


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_model("some-org/not-a-local-model")
