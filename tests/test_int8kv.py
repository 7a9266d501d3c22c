"""dense:kv_bits=8: the int8 fast tier stores every token within half a quantization step, its decode kernel path
equals the dequantized reference, and a model decoding over it stays close to float32 dense attention."""

import pytest
import torch

from conftest import decode, tiny_model
from livekv import LiveKVCache
from livekv.attention import attend
from livekv.int8kv import Int8KV
from livekv.methods import make_method


def _filled(dtype=torch.float32, T=300, chunks=(1, 37, 5, 64), B=2, G=3, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, G, T, D, generator=g) * 2, torch.randn(B, G, T, D, generator=g)
    buf, i, c = Int8KV(B, G, D, dtype, torch.device("cpu")), 0, 0
    while i < T:
        n = chunks[c % len(chunks)]
        buf.append(k[:, :, i : i + n].to(dtype), v[:, :, i : i + n].to(dtype))
        i, c = i + n, c + 1
    return buf, k, v


def test_every_token_is_stored_within_half_a_step():
    buf, k, v = _filled()
    keys, values = buf.dequantize()
    assert buf.length == 300 and buf.capacity % 64 == 0 and buf.capacity >= 300
    assert values.is_contiguous()  # SDPA's flash kernel needs it (else: the math path, 3x slower prefill)
    assert torch.all((keys - k).abs() <= buf.keys.scales[:, :, :300, None].float() * 0.5001)
    assert torch.all((values - v).abs() <= buf.value_scales[:, :, :300, None].float() * 0.5001)
    assert buf.used == 2 * 3 * 300 * (64 + 64 + 2 + 2) and buf.nbytes >= buf.used


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 63, 64, 300])
def test_decode_kernel_equals_the_dequantized_reference(dtype, T):
    buf, _, _ = _filled(dtype, T=T)
    q = torch.randn(2, 9, 1, 64, generator=torch.Generator().manual_seed(T)).to(dtype)
    got = buf.attend(q, 0.125)  # n == 1, no mask, CPU: the kernel path
    want = attend(q, *buf.dequantize(), 0.125)
    assert got.dtype == dtype and got.shape == (2, 1, 9, 64)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.02)


def test_state_round_trip_is_exact():
    buf, _, _ = _filled(torch.bfloat16)
    back = Int8KV.from_state(buf.state(), torch.bfloat16)
    q = torch.randn(2, 9, 1, 64, dtype=torch.bfloat16)
    assert back.length == buf.length and torch.equal(back.attend(q, 0.125), buf.attend(q, 0.125))
    back.append(*(torch.ones(2, 3, 1, 64, dtype=torch.bfloat16),) * 2)
    buf.append(*(torch.ones(2, 3, 1, 64, dtype=torch.bfloat16),) * 2)
    assert torch.equal(back.dequantize()[1], buf.dequantize()[1])


@torch.no_grad()
def test_a_model_over_int8_kv_stays_close_to_dense(ids):
    model = tiny_model("llama")
    dense, cache = LiveKVCache(model.config, "dense"), LiveKVCache(model.config, "dense:kv_bits=8")
    expected, got = decode(model, dense, ids, prefill=120), decode(model, cache, ids, prefill=120)
    assert cache.memory()["fast_kv_bytes"] < 0.35 * dense.memory()["fast_kv_bytes"]  # float32 -> int8 + scales
    p, q = expected.float().log_softmax(-1), got.float().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert kl.max() < 0.01 and (expected.argmax(-1) == got.argmax(-1)).float().mean() > 0.95
    assert not torch.equal(got, expected)  # it does read int8: not the float path by accident


def test_kv_bits_is_checked():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="kv_bits"):
        LiveKVCache(model.config, "dense:kv_bits=4")


@torch.no_grad()
@pytest.mark.parametrize("method", ["quest", "freekv", "clusterkv"])
def test_sparse_methods_keep_their_dense_layers_in_int8(ids, method):
    model = tiny_model("llama")
    cache = LiveKVCache(model.config, f"{method}:kv_bits=8", budget=48, ignore_unknown=True)
    plain = LiveKVCache(model.config, method, budget=48, ignore_unknown=True)
    got, want = decode(model, cache, ids[:, :140], prefill=120), decode(model, plain, ids[:, :140], prefill=120)
    assert [isinstance(getattr(layer, "fast", None), Int8KV) for layer in cache.layers] == [True, True, False, False]
    assert torch.allclose(got.softmax(-1), want.softmax(-1), atol=0.02) and not torch.equal(got, want)


def test_streams_refuse_kv_bits():
    for spec in ("full:kv_bits=8", "sink_window:kv_bits=8"):
        cfg = make_method(spec)
        with pytest.raises(ValueError, match="kv_bits=8 is for text caches"):
            cfg.resolve(56, 10.0)
