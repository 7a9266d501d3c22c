"""Streaming sessions on the tiny LLaVA-OneVision and Qwen2-VL: a real MP4 streamed end to end, Qwen2-VL's 3-D
positions when clips are appended and when memory is re-positioned, methods that keep everything equal ``full``."""

import numpy as np
import pytest
import torch
from stream_models import VOCAB, tiny_llava_onevision, tiny_qwen2_vl
from transformers import DynamicCache

from livekv.stream.adapters import LlavaOnevisionAdapter, Qwen2VLAdapter
from livekv.stream.session import StreamSession
from livekv.stream.source import clips, frames, write_video


@pytest.fixture(autouse=True)
def no_grad():
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def llava():
    return LlavaOnevisionAdapter(tiny_llava_onevision())


@pytest.fixture(scope="module")
def qwen():
    return Qwen2VLAdapter(tiny_qwen2_vl(), frame_size=(32, 48))


def clip(seed, n=2, size=(32, 48)):
    return torch.randint(0, 256, (n, *size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def question_logits(session, question):
    """Next-token logits after ``question``, through the session's answer path."""
    return session.logits(question)


def test_an_mp4_streams_end_to_end(tmp_path, llava):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (24, 48, 64, 3), dtype=np.uint8)
    path = tmp_path / "stream.mp4"
    write_video(path, video, fps=8)
    session = StreamSession(llava, "livevlm", system=[1, 2, 3], short_term=16, long_term=24, vsb_rows=4, page=4)
    times = []
    for t, frames_ in clips(frames(path, fps=4), 2):
        session.push(frames_)
        times.append(t)
        if len(times) == 3:  # a question during playback: answered from the memory's logits
            assert session.answer([4, 5, 6], 3)[0] == int(question_logits(session, [4, 5, 6]).argmax())
    assert session.stats.frames == 12 and times == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    mem = session.memory()
    assert mem["memory_tokens"] <= 3 + 24 + 16 + 2 * llava.tokens_per_frame + 1
    assert session.cache.layers[0].n_long > 0  # long-term memory was used, and compressed
    answer = session.answer([4, 5, 6], 3)
    assert len(answer) == 3 and answer[0] == int(question_logits(session, [4, 5, 6]).argmax())
    assert session.stats.answer_tokens == 3 and session.stats.questions == 2


def test_qwen2_vl_positions_after_appending_clips(qwen):
    """A session fed text, clip, text, clip equals the same segments through a plain cache, which the adapter tests
    show equals the model's own forward (its get_rope_index) over the whole sequence."""
    texts = [[1, 2, 3], [7, 8], [9, 10, 11]]
    session = StreamSession(qwen, "full", system=texts[0])
    session.push(clip(1))
    session.push_text(texts[1])
    session.push(clip(2, n=4))
    segments = [qwen.text(texts[0]), qwen.video(clip(1)), qwen.text(texts[1]), qwen.video(clip(2, n=4)), qwen.text(texts[2])]
    cache, cursor = DynamicCache(), 0
    for seg in segments:
        hidden = qwen.forward(seg.embeds, seg.positions + cursor, cache)
        cursor += seg.span
    torch.testing.assert_close(question_logits(session, texts[2]), qwen.lm_head(hidden)[:, -1], atol=1e-5, rtol=1e-5)
    assert session.cache.cursor == cursor - segments[-1].span


@pytest.mark.parametrize("method,knobs", [("livevlm", dict(short_term=10_000)), ("rekv", dict(short_term=10_000)),
                                          ("livevlm", dict(short_term=10, long_term=10_000, retrieve=1.0))])
def test_qwen2_vl_methods_that_keep_everything_equal_full(qwen, method, knobs):
    sessions = [StreamSession(qwen, "full", system=[1, 2]), StreamSession(qwen, method, system=[1, 2], **knobs)]
    for s in sessions:
        for i in range(4):
            s.push(clip(i))
    a, b = (question_logits(s, [5, 6]) for s in sessions)
    assert torch.equal(a, b)


def test_qwen2_vl_window_shift_keeps_3d_structure(qwen):
    """sink_window drops the first clip and moves the second right after the sink: layer 0's keys (which depend
    on nothing but the embeddings and positions) equal those of a session that only ever saw the second clip."""
    seg_len = len(qwen.video(clip(0)))
    slid = StreamSession(qwen, "sink_window", system=[1, 2], short_term=seg_len)
    fresh = StreamSession(qwen, "full", system=[1, 2])
    slid.push(clip(0))
    slid.push(clip(1))
    fresh.push(clip(1))
    a, b = slid.cache.layers[0], fresh.cache.layers[0]
    assert torch.equal(a.pos, b.pos) and slid.cache.cursor == fresh.cache.cursor
    torch.testing.assert_close(a.ctx.view()[0], b.ctx.view()[0], atol=1e-5, rtol=1e-5)


def test_qwen2_vl_livevlm_compresses_and_answers(qwen):
    session = StreamSession(qwen, "livevlm", system=[1, 2], short_term=12, long_term=16, vsb_rows=4, page=4)
    for i in range(10):
        session.push(clip(i))
    layer = session.cache.layers[0]
    assert session.cache.long_term_packed and layer.n_long <= 16
    assert int(layer.pos.max()) < session.cache.cursor <= 2 + 16 + 12 + 2 * len(qwen.video(clip(0)))
    answer = session.answer([5, 6], 3)
    assert len(answer) == 3 and answer[0] == int(question_logits(session, [5, 6]).argmax())
