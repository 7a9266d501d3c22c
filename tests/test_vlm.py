"""The embedded default VLM: its training runs (a few steps here), and the shipped weights answer questions about
a synthetic stream."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest
import torch

from livekv.evals import stream_qa
from livekv.stream.session import StreamSession
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from livekv.vlm import benchmark, world
from livekv.vlm.batch import encode, visual_tokens
from livekv.vlm.checkpoints import add_object_words
from livekv.vlm.data import Stream, evidence_token, pick_by_age, sample
from livekv.vlm.losses import evidence_loss, first_saliency_loss, frame_scores, latest_saliency_loss, saliency_loss
from livekv.vlm.model import (
    SYSTEM, WEIGHTS, DefaultVLMAdapter, build_model, build_tokenizer, load_default_vlm, object_words,
)
from livekv.vlm.train import TrainConfig, train


@pytest.mark.parametrize("bf16", [False, True])
def test_training_runs_and_saves_a_loadable_model(tmp_path, bf16):
    result = train(TrainConfig(out=tmp_path, steps=2, batch=2, max_seconds=12, log_every=1, eval_every=1, held_out=2,
                               saliency=0.5, evidence=0.5, bf16=bf16))
    assert json.loads((tmp_path / "training.json").read_text()) == result and result["step"] == 2  # the last checkpoint
    assert result["held_out_accuracy"] and all(0.0 <= a <= 1.0 for a in result["held_out_accuracy"].values())
    assert result["saliency"] == result["evidence"] == 0.5 and result["bf16"] is bf16
    adapter = load_default_vlm(tmp_path)
    session = StreamSession(adapter, "livevlm", system=SYSTEM, short_term=20, long_term=20, vsb_rows=8)
    w = world.World(seed=1, duration_s=20, fps=0.5)
    for _, image in w.frames():
        session.push(image[None])
    question = "how many objects are there now ?"
    answer = session.answer(question, max_new_tokens=3)
    first = int(session.logits(adapter.question_template.format(question=question)).argmax())
    assert answer.split()[:1] == ([] if first in adapter.eos_ids else [adapter.tokenizer.decode([first])])
    assert set(result["held_out_accuracy"]) <= set(world.CHANCE)


def test_a_resumed_run_ends_with_the_model_of_the_uninterrupted_run(tmp_path, monkeypatch):
    import livekv.vlm.train as training

    args = dict(steps=3, batch=2, max_seconds=12, log_every=1, eval_every=1, held_out=2, bf16=False)
    whole = train(TrainConfig(out=tmp_path / "whole", **args))  # the attention losses on: a resume must keep them

    class Killed(Exception):
        pass

    save_checkpoint = training.save_checkpoint

    def save_then_die_at_step_2(adapter, checkpoint, result, state):
        save_checkpoint(adapter, checkpoint, result, state)
        if result["step"] == 2:
            raise Killed

    monkeypatch.setattr(training, "save_checkpoint", save_then_die_at_step_2)
    with pytest.raises(Killed):
        train(TrainConfig(out=tmp_path / "cut", **args))
    monkeypatch.setattr(training, "save_checkpoint", save_checkpoint)
    with pytest.raises(ValueError, match="lr"):
        train(TrainConfig(out=tmp_path / "cut", **{**args, "resume": True, "lr": 1e-3}))
    resumed = train(TrainConfig(out=tmp_path / "cut", **args, resume=True))
    assert resumed["held_out_accuracy"] == whole["held_out_accuracy"] and resumed["step"] == 3
    a, b = (load_default_vlm(tmp_path / d).model.state_dict() for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / "checkpoint").exists()
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(TrainConfig(out=tmp_path / "cut", **args, resume=True))


REFERENCE = pathlib.Path(__file__).parent / "data" / "make_train_reference.py"


def _integers_only(record: dict) -> dict:
    """``record`` less what floating-point kernels compute (they differ in the last bits between CPUs)."""
    record = json.loads(json.dumps(record))
    for name in ("run", "cpu_capability", "torch", "threads"):
        record.pop(name)
    for seed in record["batches"].values():
        for name in ("visual", "terms", "right", "loss", "loss_right", "grad"):
            seed.pop(name)
        seed["batch"].pop("embeds")
    return record


def test_training_computes_bit_for_bit_what_it_computed_before_the_split():
    spec = importlib.util.spec_from_file_location("make_train_reference", REFERENCE)
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    reference, computed = json.loads(make.REFERENCE.read_text()), json.loads(json.dumps(make.compute()))
    reference.pop("made_with")
    # The options are now made by livekv.options like every other command's: defaults None (what is not given keeps
    # TrainConfig's default), types that parse text, --resume/--no-resume. The same flags must give the same
    # TrainConfig: "resolved" checks it, for no option given and for every option given.
    flags = {name: option["flags"] for name, option in reference["cli"]["options"].items()}
    assert {name: option["flags"] for name, option in computed["cli"]["options"].items()} == {
        **flags, "resume": ["--resume", "--no-resume"]}
    for options in (reference, computed):
        options["cli"].pop("options")
    if any(computed[k] != reference[k] for k in ("cpu_capability", "torch", "threads")):
        reference, computed = _integers_only(reference), _integers_only(computed)
    assert computed["cli"] == reference["cli"]
    assert computed["batches"] == reference["batches"]
    assert computed == reference


def test_a_training_config_refuses_what_cannot_train(capsys):
    from livekv.cli import main

    for bad in ({"steps": 0}, {"lr": 0.0}, {"max_seconds": 5.0}, {"saliency": -0.1}, {"threads": 0},
                {"kind_weights": {"where_next": 2.0}}, {"kind_weights": dict.fromkeys(world.CHANCE, 0.0)}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    assert TrainConfig().out == WEIGHTS and TrainConfig(out="x").out == pathlib.Path("x")
    with pytest.raises(SystemExit):
        main(["train-vlm", "--kind-weights", "where_last=3,nowhere=1"])
    assert "expected KIND=WEIGHT with KIND in" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="steps must be at least 1"):
        main(["train-vlm", "--steps", "0"])


@pytest.mark.skipif(not (WEIGHTS / "model.safetensors").is_file(), reason="the default VLM has not been trained")
def test_the_shipped_default_vlm_answers_a_one_minute_stream():
    torch.set_num_threads(2)
    adapter = load_default_vlm()
    payload = stream_qa.evaluate(adapter, ["full"], minutes=1.0, seed=3, n_questions=20)
    (record,) = payload["results"]
    chance = max(payload["chance"].values())
    assert record["accuracy"] >= 0.6 > chance, record


def test_training_questions_ask_about_the_past_where_the_stream_has_one():
    asked = lambda evidence: world.Question("where_last", "q", "top", 100.0, evidence, list(world.CELLS))  # noqa: E731
    rng = np.random.default_rng(0)
    questions = [asked(100.0), asked(95.0), asked(50.0), asked(10.0)]  # recent, recent, middle, start
    picks = {pick_by_age(rng, questions) for _ in range(100)}
    assert picks == {2, 3}  # the older buckets, both
    assert {pick_by_age(rng, questions[:2]) for _ in range(100)} == {0, 1}  # none older: the recent ones


def test_a_stream_knows_where_each_object_is_seen_next():
    cells = np.full((3, 9, 2), -1)
    cells[0, 0] = cells[2, 0] = (1, 2)  # one object in cell 0 at frames 0 and 2
    cells[0, 1], cells[1, 4] = (0, 0), (0, 1)  # two others, seen once
    stream = Stream(np.zeros((3, 48, 48, 3), dtype=np.uint8), cells, [])
    assert stream.next_seen[0, 0] == 2 and stream.next_seen[2, 0] == 3  # seen again at frame 2, then never
    assert stream.next_seen[0, 1] == 3 and stream.next_seen[1, 4] == 3


def test_saliency_loss_is_low_only_when_frames_attend_to_earlier_objects():
    tokenizer = build_tokenizer()
    adapter = DefaultVLMAdapter(build_model(tokenizer), tokenizer)
    rng = np.random.default_rng(0)
    streams = [sample(rng, 40, 30) for _ in range(2)]
    with torch.no_grad():
        batch = encode(adapter, streams, visual_tokens(adapter, np.concatenate([s.frames for s in streams])))
    assert batch.occupied.any() and (batch.frame_of.max(-1).values > 2).all()
    visible = batch.mask[:, 0].float()  # [B, L, L]
    uniform = visible / visible.sum(-1, keepdim=True)
    on_objects = visible * (1 + 1000 * batch.occupied[:, None, :].float())
    on_objects = on_objects / on_objects.sum(-1, keepdim=True)
    heads = lambda a: frame_scores((torch.stack([a, a], 1),) * 3, batch)  # noqa: E731  3 layers of 2 heads
    assert saliency_loss(heads(uniform), batch) > 1.0  # every object only as high as the background: softplus(1)
    assert saliency_loss(heads(on_objects), batch) < 0.01
    assert first_saliency_loss(heads(on_objects), batch) > 1.0  # first-shown objects no higher than the others
    on_firsts = visible * (1 + 1000 * batch.occupied[:, None, :].float() + 1e6 * (batch.first > 0)[:, None, :].float())
    on_firsts = on_firsts / on_firsts.sum(-1, keepdim=True)
    assert first_saliency_loss(heads(on_firsts), batch) < 0.01 and saliency_loss(heads(on_firsts), batch) < 0.01
    assert (batch.object[batch.occupied] >= 0).all() and (batch.object[~batch.occupied] == -100).all()
    # latest-shown saliency: each frame's attention on where every object was last seen before it
    latest = batch.occupied[:, None, :] & (batch.next_seen[:, None, :] >= batch.frame_of[:, :, None])  # [B, L, L]
    on_latest = visible * (1 + 1000 * batch.occupied[:, None, :].float() + 1e6 * latest.float())
    on_latest = on_latest / on_latest.sum(-1, keepdim=True)
    assert latest_saliency_loss(heads(on_objects), batch) > 1.0  # places left as high as the latest ones
    assert latest_saliency_loss(heads(on_latest), batch) < 0.01 and saliency_loss(heads(on_latest), batch) < 0.01
    # the scores as defined, a mean over the frame's rows of the heads' mean
    attention = torch.softmax(torch.randn(2, 3, *visible.shape[1:]), -1)  # [B, H, L, L]
    (scores,) = frame_scores((attention,), batch)
    for b in range(2):
        for f in range(int(batch.frame_of[b].max()) + 1):
            reference = attention[b].mean(0)[batch.frame_of[b] == f].mean(0)
            torch.testing.assert_close(scores[b, f], reference)


def test_evidence_points_at_the_asked_object_and_its_loss_at_attention_there():
    w = world.World(seed=2, duration_s=60)
    questions = w.candidates(w.frame_times[-1])
    for q in questions:
        index = evidence_token(w, q)
        if q.kind == "count_now":
            assert index == -1
            continue
        frame, cell = divmod(index, len(world.CELLS) + 1)
        assert w.frame_times[frame] == q.evidence_time
        (item,) = [it for it in w.state(q.evidence_time) if it.cell == world.CELLS[cell]]
        assert {item.colour, item.shape, item.cell} >= {q.answer} and item.shape in q.text
    tokenizer = build_tokenizer()
    adapter = DefaultVLMAdapter(build_model(tokenizer), tokenizer)
    streams = [sample(np.random.default_rng(3), 40, 30) for _ in range(2)]
    with torch.no_grad():
        batch = encode(adapter, streams, visual_tokens(adapter, np.concatenate([s.frames for s in streams])))
    row, query, key = batch.evidence[batch.evidence[:, 2] >= 0].T
    assert len(row) and batch.occupied[row, key].all() and (batch.labels[row, query + 1] != -100).all()
    attention = torch.full((2, 2, *batch.mask.shape[-2:]), 1e-3)
    assert evidence_loss((attention,) * 4, batch) > 6
    attention[row, 1, query, key] = 1.0  # one head of the upper layers reads the object
    assert evidence_loss((attention,) * 4, batch) < 1e-6


def test_object_descriptions_are_one_token_and_older_checkpoints_gain_them():
    tokenizer = build_tokenizer()
    assert tokenizer.tokenize("where was the red circle last seen ?")[3] == "red_circle"
    assert "first_cross" in tokenizer.tokenize("what colour was the first cross you saw ?")
    assert tokenizer.decode(tokenizer("top left", add_special_tokens=False)["input_ids"]) == "top left"
    # a checkpoint from before the two-word tokens: its vocabulary is the same minus them
    vocab = {w: i for w, i in tokenizer.get_vocab().items() if w not in object_words()}
    old = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    old.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    old = PreTrainedTokenizerFast(tokenizer_object=old, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    adapter = add_object_words(DefaultVLMAdapter(build_model(old), old), tokenizer)
    embed = adapter.language_model.get_input_embeddings().weight
    assert embed.shape[0] == len(tokenizer) == adapter.model.config.text_config.vocab_size
    assert adapter.lm_head.weight is embed
    red, circle, red_circle = tokenizer.convert_tokens_to_ids(["red", "circle", "red_circle"])
    torch.testing.assert_close(embed[red_circle], (embed[red] + embed[circle]) / 2)


def _stream_into(adapter, method: str = "livevlm", seed: int = 1, seconds: float = 60.0):
    """A session of ``method`` (small budgets, so that it compresses and re-positions) after ``seconds`` of a world,
    and the world's questions (asked after the last frame here)."""
    w, questions = benchmark.stream_qa(seed, seconds, 6)
    session = StreamSession(adapter, method, system=SYSTEM, short_term=20, long_term=20, vsb_rows=8)
    with torch.inference_mode():
        for _, image in w.frames():
            session.push(image[None])
    return session, questions


@pytest.mark.skipif(not (WEIGHTS / "model.safetensors").is_file(), reason="the default VLM has not been trained")
def test_a_bfloat16_default_vlm_holds_bfloat16_kv_in_half_the_bytes():
    torch.set_num_threads(1)
    f32, _ = _stream_into(load_default_vlm())
    bf16, _ = _stream_into(load_default_vlm(dtype=torch.bfloat16))
    assert all(layer.ctx.keys.dtype == layer.ctx.values.dtype == torch.float32 for layer in f32.cache.layers)
    assert all(layer.ctx.keys.dtype == layer.ctx.values.dtype == torch.bfloat16 for layer in bf16.cache.layers)
    a, b = f32.memory(), bf16.memory()
    assert a["memory_tokens"] == b["memory_tokens"] == 20 + 20 + 6  # compressed: short + long term + the 6-word system
    assert b["fast_kv_bytes"] * 2 == a["fast_kv_bytes"] > 0  # the same tokens in half the bytes


@pytest.mark.skipif(not (WEIGHTS / "model.safetensors").is_file(), reason="the default VLM has not been trained")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_weights_quantize_the_language_model_and_answer_as_float32_does(dtype):
    from livekv.quantize import Int8Linear

    torch.set_num_threads(1)
    reference, quantized = load_default_vlm(), load_default_vlm(dtype=dtype, weights="int8")
    linears = lambda module, kind: sum(isinstance(m, kind) for m in module.modules())  # noqa: E731
    assert linears(quantized.language_model, torch.nn.Linear) == 0 and isinstance(quantized.lm_head, Int8Linear)
    assert linears(quantized.language_model, Int8Linear) == linears(reference.language_model, torch.nn.Linear) == 6 * 7
    tower = quantized.model.model.vision_tower  # cast to dtype, not quantized
    assert linears(tower, Int8Linear) == 0
    assert linears(tower, torch.nn.Linear) == linears(reference.model.model.vision_tower, torch.nn.Linear) > 0
    assert next(tower.parameters()).dtype == dtype
    a, questions = _stream_into(reference)
    b, _ = _stream_into(quantized)
    for q in questions:
        prompt = reference.question_template.format(question=q.text)
        want, got = a.logits(prompt).float(), b.logits(prompt).float()
        # measured on a 40 s stream: at most 0.04 (float32 activations) and 0.10 (bfloat16) off logits up to ~14
        torch.testing.assert_close(got, want, rtol=0, atol=0.3)
        assert int(got.argmax()) == int(want.argmax())
        assert b.answer(q.text, max_new_tokens=4) == a.answer(q.text, max_new_tokens=4)


def test_the_video_loaders_refuse_weights_they_cannot_store(tmp_path):
    with pytest.raises(ValueError, match="one of float32, bfloat16, int8, int4"):
        load_default_vlm(weights="fp8")
    if (WEIGHTS / "model.safetensors").is_file():  # int4 packs rows 16 at a time; the vocabulary is 94 tokens
        with pytest.raises(ValueError, match=r"lm_head: int4 needs out_features \(94\) to be a multiple of 16"):
            load_default_vlm(weights="int4")
