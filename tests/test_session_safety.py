"""A StreamSession used the ways a live application uses it: pushes while an answer is read, two threads, long
and empty questions, unknown words, and the defaults on the embedded model (found by trying livekv as a new user)."""

import threading

import pytest
import torch

from livekv.vlm.world import NUMBERS, World
from livekv.stream import StreamSession
from livekv.vlm import load_default_vlm
from livekv.vlm.model import SYSTEM

COUNT = "how many objects are there now ?"


@pytest.fixture(scope="module")
def vlm():
    torch.set_num_threads(2)
    return load_default_vlm()


@pytest.fixture(scope="module")
def frames():
    return [image[None] for _, image in World(seed=3, duration_s=400).frames()]  # 200 frames


def state(session):
    """What the memory holds, exactly: every layer's keys, values and positions, and the counters."""
    layers = [(layer.ctx.view(), layer.pos.clone()) for layer in session.cache.layers]
    return layers, session.stats.frames, session.memory()["memory_tokens"]


def assert_same_state(a, b):
    (la, fa, ta), (lb, fb, tb) = a, b
    assert (fa, ta) == (fb, tb)
    for ((ka, va), pa), ((kb, vb), pb) in zip(la, lb):
        assert torch.equal(ka, kb) and torch.equal(va, vb) and torch.equal(pa, pb)


def test_a_push_while_an_answer_is_read_is_refused_not_dropped(vlm, frames):
    """Found: the push went into the answer's context and was lost, yet counted (21 frames, 206 tokens held)."""
    session = StreamSession(vlm, "full", system=SYSTEM)
    for f in frames[:20]:
        session.push(f)
    answer = session.ask(COUNT)
    next(answer)
    with pytest.raises(RuntimeError, match="still being read"):
        session.push(frames[20])
    with pytest.raises(RuntimeError, match="still being read"):
        session.answer(COUNT)
    list(answer)
    session.push(frames[20])
    plain = StreamSession(vlm, "full", system=SYSTEM)
    for f in frames[:21]:
        plain.push(f)
    assert_same_state(state(session), state(plain))
    assert session.memory()["memory_tokens"] == plain.memory()["memory_tokens"] == 6 + 21 * 10


def test_an_answer_closed_early_releases_the_session(vlm, frames):
    session = StreamSession(vlm, "livevlm", system=SYSTEM, memory_tokens=56)
    for f in frames[:30]:
        session.push(f)
    before = state(session)
    answer = session.ask(COUNT)
    next(answer)
    # between pieces the caller's code runs in its own autograd mode, not in the session's inference mode
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and not torch.ones(1).is_inference()
    answer.close()
    assert_same_state(state(session), before)
    session.push(frames[30])


@pytest.mark.parametrize("method", ["full", "livevlm"])
def test_one_session_pushed_and_asked_from_two_threads(vlm, frames, method):
    """Found: 200 frames pushed from one thread while another asked: 106 tokens kept where 2006 were expected,
    11 RuntimeErrors. The memory must be exactly what the frames alone make, and every answer well formed."""
    session = StreamSession(vlm, method, system=SYSTEM, memory_tokens=56)
    errors, answers, done = [], [], threading.Event()

    def pusher():
        try:
            for f in frames:
                session.push(f)
        except Exception as e:  # noqa: BLE001 - the test reports it
            errors.append(e)
        finally:
            done.set()

    def asker():
        try:
            while not done.is_set():
                answers.append(session.answer(COUNT, max_new_tokens=4).strip())
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=pusher), threading.Thread(target=asker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    alone = StreamSession(vlm, method, system=SYSTEM, memory_tokens=56)
    for f in frames:
        alone.push(f)
    assert_same_state(state(session), state(alone))
    assert len(answers) > 0 and all(len(a.split()) == 1 for a in answers)  # each a whole one-word answer
    assert session.stats.questions == len(answers)


def test_a_long_question_leaves_no_memory_behind_and_a_too_long_one_says_why(vlm, frames):
    """Found: a 50,000-character question answered "" and grew the fast tier from 1.6 to 60 MB for good."""
    session = StreamSession(vlm, "full", system=SYSTEM)
    for f in frames[:20]:
        session.push(f)
    before = session.memory()
    session.answer("how many objects are there now " * 150 + "?")  # 901 tokens: answered (nonsense or not)
    assert session.memory() == before
    with pytest.raises(ValueError, match="6004 tokens long; this session takes at most 1024"):
        session.ask("how many " * 3000)
    assert session.memory() == before


@pytest.mark.parametrize("question, message", [("", "empty question"), ("   ", "empty question"),
                                               ("how many zebras are here ?", "does not know: 'zebras'")])
def test_a_question_that_cannot_be_answered_says_why(vlm, frames, question, message):
    """Found: ask("") answered "" silently; an out-of-vocabulary question answered an empty line."""
    session = StreamSession(vlm, "livevlm", system=SYSTEM)
    session.push(frames[0])
    with pytest.raises(ValueError, match=message):
        session.ask(question)


def test_time_to_first_token_is_this_questions_even_for_a_blank_answer(vlm, frames):
    """Found: after a blank answer the reported TTFT was the previous question's."""
    session = StreamSession(vlm, "full", system=SYSTEM)
    session.push(frames[0])
    session.answer(COUNT)
    first = session.stats.ttft_s
    assert session.answer(COUNT, max_new_tokens=0) == "" and session.stats.ttft_s is None
    eos = session.adapter.tokenizer.eos_token_id
    session.answer([eos, eos])  # token ids, no template: whatever comes, the clock is this question's
    assert session.stats.ttft_s is not None and session.stats.ttft_s != first


def test_defaults_fit_the_embedded_model_on_a_long_stream(vlm, tmp_path):
    """Found: on a 1000 s stream livevlm's paper budgets (16k tokens, 25 times what the embedded model was trained
    on) answered "" from ~400 frames. The defaults scale with the model: its memory stays within its trained
    context, flat, and it still counts right at the end of the stream."""
    world = World(seed=0, duration_s=1000)
    session = StreamSession(vlm, "livevlm", system=SYSTEM)
    assert session.method.short_term + session.method.long_term <= vlm.context_tokens // 2
    tokens, right = [], 0
    for i, (t, image) in enumerate(world.frames()):
        session.push(image[None])
        tokens.append(session.memory()["memory_tokens"])
        if i % 50 == 49:
            right += session.answer(COUNT, max_new_tokens=4).strip() == NUMBERS[len(world.state(t)) - 1]
    assert max(tokens[100:]) == min(tokens[100:]) <= vlm.context_tokens // 2 + 10
    assert right >= 8  # of 10 questions (chance: 1 in 4)
