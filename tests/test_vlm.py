"""The embedded default VLM: its training runs (a few steps here), and the shipped weights answer questions about
a synthetic stream."""

import pytest
import torch

from livekv.evals import stream_qa, world
from livekv.stream.session import StreamSession
from livekv.vlm.model import SYSTEM, WEIGHTS, load_default_vlm
from livekv.vlm.train import train


def test_training_runs_and_saves_a_loadable_model(tmp_path):
    result = train(tmp_path, steps=2, batch=2, max_seconds=12, log_every=1, held_out=2)
    assert result["held_out_accuracy"] and all(0.0 <= a <= 1.0 for a in result["held_out_accuracy"].values())
    adapter = load_default_vlm(tmp_path)
    session = StreamSession(adapter, "livevlm", system=SYSTEM, short_term=20, long_term=20, vsb_rows=8)
    w = world.World(seed=1, duration_s=20, fps=0.5)
    for _, image in w.frames():
        session.push(image[None])
    assert isinstance(session.answer("how many objects are there now ?", max_new_tokens=3), str)


@pytest.mark.skipif(not (WEIGHTS / "model.safetensors").is_file(), reason="the default VLM has not been trained")
def test_the_shipped_default_vlm_answers_a_one_minute_stream():
    torch.set_num_threads(2)
    adapter = load_default_vlm()
    payload = stream_qa.evaluate(adapter, ["full"], minutes=1.0, seed=3, n_questions=20)
    (record,) = payload["results"]
    chance = max(payload["chance"].values())
    assert record["accuracy"] >= 0.6 > chance, record
