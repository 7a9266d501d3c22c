"""Fuzzing what a client may send: random frames (shapes, dtypes, values), text, questions and their interleavings
into a StreamSession, and random LiveKVCache constructions. After every step the session must still answer, and its
memory must be exactly what the accepted inputs alone produce (a reference session fed only those)."""

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stream_models import VOCAB, tiny_llava_onevision

from conftest import tiny_model
from livekv import METHODS, LiveKVCache
from livekv.stream.adapters import LlavaOnevisionAdapter
from livekv.stream.session import StreamSession

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def adapter():
    return LlavaOnevisionAdapter(tiny_llava_onevision())


@st.composite
def frame_inputs(draw):
    """Frames a client might send, well formed or not: ``(value, accepted)``."""
    n, h, w = draw(st.integers(0, 2)), draw(st.sampled_from([0, 1, 8, 33])), draw(st.sampled_from([0, 8, 32]))
    channels = draw(st.sampled_from([3, 3, 3, 1, 4]))
    dtype = draw(st.sampled_from([np.uint8, np.uint8, np.uint8, np.float32, np.int64, np.bool_]))
    shape = draw(st.sampled_from([(n, h, w, channels), (h, w, channels), (h, w), (1, n, h, w, channels)]))
    array = np.random.default_rng(draw(st.integers(0, 9))).integers(0, 256, shape).astype(dtype)
    accepted = (dtype is np.uint8 and array.ndim in (3, 4) and array.shape[-1] == 3 and min(array.shape) >= 1)
    form = draw(st.sampled_from(["numpy", "torch", "list", "junk"]))
    if form == "torch":
        return torch.from_numpy(array), accepted
    if form == "list":
        return (list(array) if array.ndim == 4 else [array]), accepted
    if form == "junk":
        return draw(st.sampled_from([None, "frames", 3, [[1, 2], [3]], {"a": 1}])), False
    return array, accepted


token_lists = st.lists(st.integers(-3, VOCAB + 3), max_size=5)
ops = st.one_of(
    st.tuples(st.just("push"), frame_inputs()),
    st.tuples(st.just("text"), token_lists),
    st.tuples(st.just("ask"), st.one_of(token_lists, st.text(max_size=5)), st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.just("push while answering")),
)


def state(session):
    layers = [(layer.ctx.view(), layer.pos.clone(), layer.frame.clone(), layer.n_long) if layer.is_initialized
              else None for layer in session.cache.layers]
    return layers, session.cache.cursor, session.stats.frames, session.memory()["memory_tokens"]


def same(a, b) -> bool:
    (la, *ra), (lb, *rb) = a, b
    if ra != rb:
        return False
    for x, y in zip(la, lb):
        if (x is None) != (y is None):
            return False
        if x is not None:
            ((ka, va), pa, fa, na), ((kb, vb), pb, fb, nb) = x, y
            if not (torch.equal(ka, kb) and torch.equal(va, vb) and torch.equal(pa, pb) and torch.equal(fa, fb)
                    and na == nb):
                return False
    return True


def valid_ids(ids) -> bool:
    return len(ids) > 0 and all(0 <= i < VOCAB for i in ids)


@pytest.mark.parametrize("method", ["livevlm", "rekv", "full"])
@SETTINGS
@given(steps=st.lists(ops, max_size=10))
def test_a_session_takes_whatever_a_client_sends_and_keeps_only_what_it_accepted(method, steps):
    knobs = dict(memory_tokens=12) if method != "full" else {}
    fuzzed = StreamSession(adapter(), method, system=[1, 2], **knobs)
    reference = StreamSession(adapter(), method, system=[1, 2], **knobs)
    for op in steps:
        if op[0] == "push":
            frames, accepted = op[1]
            if accepted:
                fuzzed.push(frames)
                reference.push(frames)
            else:
                with pytest.raises(ValueError):
                    fuzzed.push(frames)
        elif op[0] == "text":
            if valid_ids(op[1]):
                fuzzed.push_text(op[1])
                reference.push_text(op[1])
            else:
                with pytest.raises(ValueError):
                    fuzzed.push_text(op[1])
        elif op[0] == "ask":
            question, max_new, read = op[1:]
            if isinstance(question, list) and valid_ids(question):
                answer = fuzzed.ask(question, max_new)
                pieces = [piece for _, piece in zip(range(read), answer)]
                answer.close()
                assert len(pieces) <= max_new and all(0 <= p < VOCAB for p in pieces)
            else:  # text: this model has no tokenizer
                with pytest.raises(ValueError):
                    fuzzed.ask(question, max_new)
        else:
            answer = fuzzed.ask([3, 4], 2)
            next(answer, None)
            with pytest.raises(RuntimeError, match="still being read"):
                fuzzed.push(np.zeros((1, 32, 32, 3), np.uint8))
            answer.close()
        assert same(state(fuzzed), state(reference))
        assert len(fuzzed.answer([5], 2)) <= 2  # still answers
        assert same(state(fuzzed), state(reference))
    assert fuzzed.answer([5, 6], 3) == reference.answer([5, 6], 3)


KNOB_NAMES = ["budget", "sink", "window", "page_size", "dense_layers", "tau", "host", "host_dir", "gqa_pool",
              "tokens_per_cluster", "new_clusters", "kmeans_iters", "bogus"]
knob_values = st.one_of(st.integers(-4, 300), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
                        st.none(), st.booleans(), st.sampled_from(["ram", "disk", "max", "softmax_mean", "/tmp"]))


@SETTINGS
@given(method=st.sampled_from([*METHODS, "nope"]), knobs=st.dictionaries(st.sampled_from(KNOB_NAMES), knob_values))
def test_a_cache_is_built_and_works_or_refused_with_a_value_error(method, knobs):
    model = tiny_model("llama")
    try:
        cache = LiveKVCache(model.config, method, **knobs)
    except ValueError:
        return
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 51) and cache.get_seq_length() == 50
