"""Weight-only quantization (``livekv.quantize``): each kind's layer against float32 within bounds derived from its
quantization step, tied embeddings kept usable, the embedded model's greedy text under int8, bytes read per token,
and ``--weights`` reaching the loader (issue 30)."""

import copy
import math

import pytest
import torch
from torch import nn

from conftest import tiny_model
from livekv.evals.corpus import filler_token_ids
from livekv.quantize import BF16Linear, Int4Linear, Int8Linear, check_weights, quantize_weights, weight_bytes

SHAPES = [(576, 576), (1536, 576), (576, 1536)]  # SmolLM2-135M's q/o, gate/up and down projections (out, in)


def _layer(out_features: int, in_features: int, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)  # the scale of a trained layer's weights
    return layer


def _x(rows: int, in_features: int) -> torch.Tensor:
    return torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1))


def _int8_error(q: nn.Module, layer: nn.Linear, x: torch.Tensor) -> float:
    """The largest output error in units of its quantization noise: output row ``r`` errs by ``x . e_r`` where the
    weight errors ``e_r`` are uniform in +-step_r/2, step_r = max|w_r| / 127 (computed here from the float weights,
    not read from the layer); so the error's std is ``step_r * |x| / sqrt(12)``, and a correct layer stays within a
    few of those."""
    step = layer.weight.detach().abs().amax(dim=1) / 127  # [out]
    err = (q(x) - layer(x)).abs()  # [rows, out]
    return (err / (step * x.norm(dim=1, keepdim=True) / math.sqrt(12))).max().item()


def _int4_error(q: Int4Linear, layer: nn.Linear, x: torch.Tensor) -> float:
    """As ``_int8_error`` with a step per output row and group of inputs: (max - min) / 15."""
    group = q.group_size
    w = layer.weight.detach().reshape(layer.out_features, -1, group)
    step = (w.amax(-1) - w.amin(-1)) / 15  # [out, groups]
    x_norms = x.reshape(x.shape[0], -1, group).norm(dim=-1)  # [rows, groups]
    noise = ((x_norms ** 2) @ (step ** 2).T).sqrt() / math.sqrt(12)  # [rows, out]
    return ((q(x) - layer(x)).abs() / noise).max().item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 4, 200])  # a decode step, a few, a prefill chunk (int8 dequantizes there)
def test_int8_within_a_few_quantization_steps(shape, rows):
    layer, x = _layer(*shape), _x(rows, shape[1])
    q = Int8Linear(layer)
    assert q.qweight.shape == layer.weight.shape and q.qweight.dtype == torch.int8
    assert _int8_error(q, layer, x) < 6  # measured 2.9 to 4.7 std: the largest of up to 300k outputs
    step = layer.weight.detach().abs().amax(dim=1, keepdim=True) / 127
    assert ((q.dequantized() - layer.weight).abs() <= step * 0.51).all()  # each weight rounded to its nearest step


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_with_a_wrong_scale_fails_the_bound(shape):
    layer, x = _layer(*shape), _x(4, shape[1])
    q = Int8Linear(layer)
    q.scales *= 1.05  # 5% off: the bound above must notice (measured 25 to 29; 2% off: 11 to 14)
    assert _int8_error(q, layer, x) > 6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_within_a_few_quantization_steps(shape, group_size):
    layer, x = _layer(*shape), _x(4, shape[1])
    q = Int4Linear(layer, group_size=group_size)
    assert _int4_error(q, layer, x) < 6  # measured 3.3 to 3.8
    q.scales_and_zeros[..., 0] *= 1.25  # int4's noise is coarse: a 5% error hides in it (4.2), a 25% one shows (11+)
    assert _int4_error(q, layer, x) > 6


@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_within_its_rounding(shape):
    """Weights and activations rounded to bfloat16 (relative error 2^-9 each), the output too: the error of row r
    stays within a few ``2^-9 * |x * w_r|`` (the rounding noise of the products) plus ``2^-9 * |y_r|``."""
    layer, x = _layer(*shape), _x(4, shape[1])
    ref = layer(x)
    err = (BF16Linear(layer)(x) - ref).abs()
    noise = 2**-9 * ((x**2) @ (layer.weight.detach() ** 2).T).sqrt() + 2**-9 * ref.abs()
    assert (err / noise).max() < 6


@torch.no_grad()
def test_bias_is_added_and_shapes_kept():
    layer = _layer(192, 576, bias=True)  # Qwen2's k/v projections carry a bias
    layer.bias.normal_(0, 1.0)
    plain = copy.deepcopy(layer)
    plain.bias = None
    x = _x(6, 576).reshape(2, 3, 576)
    for kind in (Int8Linear, Int4Linear, BF16Linear):
        y, y0 = kind(layer)(x), kind(plain)(x)
        assert y.shape == (2, 3, 192) and y.dtype == torch.float32
        torch.testing.assert_close(y - y0, layer.bias.expand_as(y), rtol=0, atol=0.02 if kind is BF16Linear else 1e-6)


def test_int4_refuses_inputs_not_a_multiple_of_the_group():
    with pytest.raises(ValueError, match="multiple of the group size"):
        Int4Linear(_layer(64, 100))


@pytest.mark.parametrize("kind, tolerance", [("bfloat16", 0.01), ("int8", 0.02), ("int4", 0.25)])
def test_tied_embedding_stays_usable(kind, tolerance):
    """SmolLM2 ties lm_head to embed_tokens: lm_head gets a quantized copy, the lookup keeps the float table."""
    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    table = model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
        quantize_weights(model, kind)
        out = model(ids).logits
        assert type(model.lm_head).__name__ != "Linear" and isinstance(model.model.embed_tokens, nn.Embedding)
        assert torch.equal(model.model.embed_tokens.weight, table) and table.dtype == torch.float32
        assert not any(isinstance(m, nn.Linear) for m in model.modules())
        # measured: 0.3%, 0.7%, 11% of the largest logit (int4 on this tiny model: one group of 16 levels per row)
        assert (out - ref).abs().max() < tolerance * ref.abs().max()
        model.tie_weights()  # re-tying (transformers does it on some calls) adds a float weight, never used
        assert torch.equal(model(ids).logits, out)


def test_unknown_kind_and_missing_kernel_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="one of float32, bfloat16, int8, int4"):
        check_weights("int3")
    monkeypatch.setitem(__import__("livekv.quantize").quantize.KERNELS, "int8", ("_no_such_kernel",))
    with pytest.raises(ValueError, match="_no_such_kernel.*lacks"):
        quantize_weights(tiny_model(), "int8")


# --- the embedded model ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from livekv.models import load_model

    return load_model()


@torch.no_grad()
def _greedy(model, ids: list[int], n: int) -> list[int]:
    from livekv import LiveKVCache
    from livekv.generation import generate_stream

    cache = LiveKVCache(model.config, "dense")
    return list(generate_stream(model, cache, torch.tensor([ids]), n, stop_ids=set()))


def test_embedded_model_with_int8_weights(smollm2):
    model, tok = smollm2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        int8 = quantize_weights(copy.deepcopy(model), "int8")
        f32_bytes, int8_bytes = weight_bytes(model), weight_bytes(int8)
        assert 3.9 < f32_bytes / int8_bytes < 4.0  # 1 byte a weight + a bfloat16 scale per row, for 4
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True)
        prompt = list(prompt["input_ids"] if not isinstance(prompt, list) else prompt)
        assert _greedy(int8, prompt, 12) == _greedy(model, prompt, 12)  # measured: the first 19 of 32 agree
        text = torch.tensor([filler_token_ids(tok, 100, seed=3)])  # < PREFILL_ROWS: the int8 kernel's path
        with torch.no_grad():
            agree = (int8(text).logits.argmax(-1) == model(text).logits.argmax(-1)).float().mean().item()
        assert agree >= 0.9  # measured 0.96 (0.94 to 0.96 on other seeds)
    finally:
        torch.set_num_threads(threads)


# --- wiring --------------------------------------------------------------------------------------------------------
class _Loaded(Exception):
    pass


@pytest.mark.parametrize("argv", [["generate", "--prompt", "hi"], ["eval", "needle", "--context", "512"],
                                  ["bench", "decode", "--context", "512"]])
def test_weights_flag_reaches_the_loader(monkeypatch, argv):
    from livekv.cli import main

    seen = {}

    def load(*args, **kwargs):
        seen.update(kwargs)
        raise _Loaded

    monkeypatch.setattr("livekv.models.load_model", load)
    with pytest.raises(_Loaded):
        main([*argv, "--weights", "int8"])
    assert seen["weights"] == "int8"


def test_bench_decode_loads_each_form_of_weights(monkeypatch):
    from livekv.cli import main

    loaded, ran = [], {}

    def load(*args, weights, **kwargs):
        loaded.append(weights)
        return quantize_weights(tiny_model(), weights), "tokenizer"

    monkeypatch.setattr("livekv.models.load_model", load)
    monkeypatch.setattr("livekv.bench.decode.run", lambda forms, tok, *a, **k: ran.update(forms) or {"results": []})
    main(["bench", "decode", "--context", "512", "--weights", "float32,int8"])
    assert loaded == ["float32", "int8"] and list(ran) == ["float32", "int8"]
    assert isinstance(ran["int8"].lm_head, Int8Linear) and isinstance(ran["float32"].lm_head, nn.Linear)


@pytest.mark.parametrize("argv", [["generate", "--prompt", "hi", "--weights", "int3"],
                                  ["bench", "decode", "--weights", "float32,int3"],
                                  ["bench", "decode", "--weights", "int8,int8"]])
def test_unknown_weights_flag_is_refused(capsys, argv):
    from livekv.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "--weights" in capsys.readouterr().err


def test_bench_decode_interleaves_forms_of_weights(monkeypatch):
    """``bench.decode.run`` with ``{weights: model}``: every form decodes every method; records say which."""
    from livekv.bench import decode

    monkeypatch.setattr("livekv.evals.corpus.filler_token_ids", lambda tok, n, **k: list(range(2, 2 + n)))
    monkeypatch.setattr(decode, "memory_bandwidth", lambda: 1e10)
    forms = {kind: quantize_weights(tiny_model(), kind) for kind in ("float32", "int8")}
    payload = decode.run(forms, None, [("dense", {}), ("quest", {"budget": 32})], [256], steps=1, rounds=1,
                         fill_tokens=64, log=lambda *a: None)
    rows = [(r["weights"], r["method"]) for r in payload["results"]]
    assert rows == [("float32", "dense"), ("float32", "quest"), ("int8", "dense"), ("int8", "quest")]
    step_bytes = {r["weights"]: r["bytes_per_step"] for r in payload["results"] if r["method"] == "dense"}
    assert step_bytes["int8"] < step_bytes["float32"]  # the weights counted as stored


def test_serve_config_takes_weights():
    from livekv.serve.config import ServeConfig

    assert ServeConfig().weights == "float32" and ServeConfig(weights="int4").weights == "int4"
    with pytest.raises(ValueError, match="--weights"):
        ServeConfig(weights="fp8")
    with pytest.raises(ValueError, match="--weights"):
        ServeConfig(vlm_weights="fp8")


def test_serve_loads_its_video_model_with_vlm_weights():
    from livekv.serve.config import ServeConfig
    from livekv.serve.server import load_models
    from livekv.vlm import WEIGHTS

    if not (WEIGHTS / "model.safetensors").is_file():
        pytest.skip("the default VLM has not been trained")
    models = load_models(ServeConfig(model="none", vlm_weights="int8"))
    assert models.text is None and isinstance(models.vlm.lm_head, Int8Linear)
    assert not any(isinstance(m, nn.Linear) for m in models.vlm.language_model.modules())
