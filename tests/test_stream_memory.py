"""The stream memory and its methods, on a tiny text model with a stand-in vision encoder (fast, no vision tower):
exactness against ``full``, bounded memory, positions after re-positioning, VSB, retrieval, rollback."""

import pytest
import torch

from conftest import tiny_model
from livekv.stream.adapters.base import Segment, VideoLMAdapter
from livekv.methods.livevlm import vision_sink_buckets
from livekv.retrieval import block_sums, received_attention
from livekv.stream.memory import Chunk, rotate
from livekv.stream.session import StreamSession

TOKENS_PER_FRAME = 4


class PixelAdapter(VideoLMAdapter):
    """A tiny Qwen2/Llama LM that 'sees' a frame as 4 tokens: its quadrants' mean colours, linearly projected."""

    tokens_per_frame = TOKENS_PER_FRAME

    def __init__(self, arch="qwen2", **overrides):
        self.model = tiny_model(arch, **overrides)
        self.language_model, self.lm_head = self.model.model, self.model.lm_head
        self.projector = torch.nn.Linear(3, self.model.config.hidden_size)

    def video(self, frames):
        F_, H, W, _ = frames.shape
        x = frames.float().div(255).view(F_, 2, H // 2, 2, W // 2, 3).mean(dim=(2, 4)).reshape(1, F_ * 4, 3)
        n = F_ * 4
        return Segment(self.projector(x), torch.arange(n)[None], n, torch.arange(F_).repeat_interleave(4))


def clip(seed, frames=2):
    return torch.randint(0, 256, (frames, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def run(session, clips=6, question=(5, 6, 7), max_new_tokens=6):
    for i in range(clips):
        session.push(clip(i))
        session.push_text([10 + i])  # a timestamp between clips
    return session.answer(list(question), max_new_tokens)


def logits_after(session, question=(5, 6, 7)):
    """Next-token logits of the question, read through the session's answer path (one step)."""
    return session.logits(list(question))


@pytest.fixture(autouse=True)
def no_grad():
    with torch.inference_mode():
        yield


@pytest.fixture(params=["qwen2", "llama"])
def adapter(request):
    torch.manual_seed(0)
    return PixelAdapter(request.param)


def test_full_equals_one_forward_of_the_whole_stream(adapter):
    """full, clip by clip through the stream memory == the model over the whole sequence at once."""
    session = StreamSession(adapter, "full", system=[1, 2, 3])
    segs = [adapter.text([1, 2, 3])]
    for i in range(3):
        session.push(clip(i))
        segs.append(adapter.video(clip(i)))
    with torch.inference_mode():
        embeds = torch.cat([s.embeds for s in segs + [adapter.text([5, 6, 7])]], dim=1)
        ref = adapter.lm_head(adapter.language_model(inputs_embeds=embeds).last_hidden_state[:, -1])
    torch.testing.assert_close(logits_after(session), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,knobs", [
    ("livevlm", dict(short_term=10_000)),  # nothing leaves short-term memory
    ("livevlm", dict(short_term=8, long_term=10_000, retrieve=1.0)),  # long-term memory kept whole, all retrieved
    ("rekv", dict(short_term=10_000)),
    ("sink_window", dict(short_term=10_000)),
])
def test_methods_that_keep_everything_answer_like_full(adapter, method, knobs):
    full = StreamSession(adapter, "full", system=[1, 2, 3])
    other = StreamSession(adapter, method, system=[1, 2, 3], **knobs)
    assert run(full) == run(other)
    torch.testing.assert_close(logits_after(full), logits_after(other), atol=0, rtol=0)


@pytest.mark.parametrize("method,knobs,bound", [
    ("livevlm", dict(short_term=16, long_term=24, vsb_rows=4), 3 + 24 + 16 + 9),
    ("sink_window", dict(short_term=16), 3 + 16 + 9),
    ("rekv", dict(short_term=16, top_frames=2), 3 + 16 + 9),
])
def test_memory_and_positions_stay_bounded(adapter, method, knobs, bound):
    session = StreamSession(adapter, method, system=[1, 2, 3], **knobs)
    peak_tokens = peak_position = 0
    for i in range(40):
        session.push(clip(i))
        session.push_text([10])
        peak_tokens = max(peak_tokens, session.memory()["memory_tokens"])
        peak_position = max(peak_position, session.cache.cursor)
    assert peak_tokens <= bound
    assert peak_position <= bound + (2 * TOKENS_PER_FRAME if method == "rekv" else 0)
    layer = session.cache.layers[0]
    for layer in session.cache.layers:  # temporal order kept, every token at its own position, the newest last
        assert bool((layer.pos[0].diff() > 0).all()) and int(layer.pos[0, -1]) == session.cache.cursor - 1
        frames = layer.frame[layer.frame >= 0]
        assert bool((frames.diff() >= 0).all()) and int(frames[-1]) == 79
    answer = session.answer([5, 6], 3)  # the answer's first token is what the memory's logits say
    assert len(answer) == 3 and answer[0] == int(session.logits([5, 6]).argmax())
    if method == "rekv":
        assert session.memory()["host_kv_bytes"] > 0


def test_repositioned_keys_equal_keys_computed_at_the_new_positions(adapter):
    """After sink_window drops tokens and shifts the window, every stored key equals the key the model computes
    for the same token at its new position (RoPE rotation by the position delta is exact up to float error)."""
    session = StreamSession(adapter, "sink_window", system=[1, 2, 3], short_term=12)
    for i in range(5):
        session.push(clip(i))
    layer = session.cache.layers[0]
    attn = adapter.language_model.layers[0]
    # recompute layer 0's keys of the kept video tokens from their embeddings
    segs = [adapter.video(clip(i)).embeds for i in range(5)]
    hidden = torch.cat([adapter.text([1, 2, 3]).embeds] + segs, dim=1)
    with torch.inference_mode():
        x = attn.input_layernorm(hidden)
        k = attn.self_attn.k_proj(x).view(1, -1, 2, 16).transpose(1, 2)
    tokens = torch.cat([torch.arange(3), torch.arange(hidden.shape[1] - 12, hidden.shape[1])])
    cos, sin = session.cache.rope(layer.pos, k.dtype)
    expected = rotate(k[:, :, tokens], cos, sin)
    torch.testing.assert_close(layer.ctx.view()[0], expected, atol=1e-5, rtol=1e-5)
    assert layer.pos[0].tolist() == list(range(3 + 12))


def test_vision_sink_buckets():
    scores = torch.tensor([9.0, 8.0, 0.1, 0.2, 7.0, 0.3, 0.4, 0.5])
    # budget 4 = 4 buckets of 1 over 8 tokens: [0,1] [2,3] [4,5] [6,7]; R=1 sink: token 0
    kept = vision_sink_buckets(scores, budget=4, sinks=1, bucket=1)
    assert kept.tolist() == [0, 3, 4, 7]
    # two sinks in one bucket overflow it; the budget still holds
    kept = vision_sink_buckets(scores, budget=4, sinks=2, bucket=1)
    assert kept.tolist() == [0, 1, 4, 7]
    assert vision_sink_buckets(scores, budget=8, sinks=2, bucket=1).tolist() == list(range(8))
    assert vision_sink_buckets(torch.rand(1000), 100, 25, 1).shape == (100,)


def test_page_scores_are_the_attention_the_question_pays_to_each_page():
    torch.manual_seed(0)
    keys = torch.randn(2, 10, 8) * 0.1  # 2 KV heads, 10 tokens, pages of 4: 3 pages, the last of 2 tokens
    direction = torch.nn.functional.normalize(torch.randn(8), dim=0)
    queries = torch.randn(4, 3, 8) * 0.1 + direction  # 4 query heads (2 per KV head), 3 question tokens
    keys[:, 9] = 10 * direction  # token 9 answers the question in every head
    scores = block_sums(received_attention(queries, keys, scaling=1.0), 4)
    assert scores.shape == (3,) and scores.argmax() == 2
    assert torch.allclose(scores.sum(), torch.tensor(1.0))  # the attention mass, split by page
    mass = torch.einsum("gkmd,gnd->gkmn", queries.view(2, 2, 3, 8), keys).softmax(-1).mean(dim=(0, 1, 2))
    assert torch.allclose(scores, torch.stack([mass[:4].sum(), mass[4:8].sum(), mass[8:].sum()]))


def test_livevlm_retrieval_reads_the_top_pages(adapter):
    session = StreamSession(adapter, "livevlm", system=[1, 2, 3], short_term=8, long_term=48, page=4, retrieve=0.25, vsb_rows=4)
    for i in range(8):
        session.push(clip(i))
    cache = session.cache
    n_long = cache.layers[0].n_long
    logits_after(session)  # builds the answer contexts, then drops them
    assert all(layer.answer is None for layer in cache.layers)
    seg = adapter.text([5, 6, 7])
    with cache.answering(), cache.chunk(Chunk(seg.positions + cache.cursor, seg.frame, question=True)):
        with torch.inference_mode():
            adapter.forward(seg.embeds, seg.positions + cache.cursor, cache)
        pages = -(-n_long // 4)
        for layer in cache.layers:
            read = layer.answer.length - 3 - len(seg)
            assert read - layer.n_short <= -(-pages // 4) * 4


@pytest.mark.parametrize("method, knobs", [("livevlm", dict(short_term=8, long_term=16, vsb_rows=4)), ("full", {})])
def test_bad_input_leaves_the_memory_intact(adapter, method, knobs):
    session, untouched = (StreamSession(adapter, method, system=[1, 2, 3], **knobs) for _ in range(2))
    for s in (session, untouched):
        s.push(clip(0))
        s.push(clip(2))  # no question since: the last chunk's undo is this push's

    def state(s):
        layer = s.cache.layers[-1]
        return s.memory()["memory_tokens"], s.cache.cursor, layer.pos.tolist(), s.answer([5, 6], 4)

    for bad in (torch.zeros(2, 8, 8), torch.zeros(2, 8, 8, 3), torch.zeros(0, 8, 8, 3, dtype=torch.uint8), "not frames"):
        with pytest.raises(ValueError):
            session.push(bad)
    attn = adapter.language_model.layers[1].self_attn
    attn.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))  # fail half-way through a forward
    with pytest.raises(RuntimeError):  # layer 0 holds the clip then, layer 1 never saw it
        session.push(clip(1))
    del attn.forward
    assert [layer.ctx.length for layer in session.cache.layers] == [layer.ctx.length for layer in untouched.cache.layers]
    assert state(session) == state(untouched)


def test_bad_configurations_raise_clear_errors(adapter):
    for method, knobs in [("livevlm", dict(long_term=8, vision_sinks=9)), ("livevlm", dict(retrieve=0)),
                          ("sink_window", dict(short_term=0)), ("rekv", dict(top_frames=0)), ("full", dict(short_term=5)),
                          ("livevlm", dict(budget=5)), ("nope", {})]:
        with pytest.raises(ValueError):
            StreamSession(adapter, method, **knobs)


def test_rekv_blocks_are_frames_even_across_offloads():
    from livekv.summaries import BlockSummaries

    keys = torch.randn(2, 7, 4)
    frame = torch.tensor([0, 0, 1, 1, 1, -1, 2])
    blocks = BlockSummaries(2, 4, keys.dtype)
    blocks.add(keys[:, :3], frame[:3])
    blocks.add(keys[:, 3:], frame[3:])
    assert blocks.sizes.tolist() == [2, 3, 1, 1] and blocks.block.tolist() == [0, 0, 1, 1, 1, 2, 3]
    torch.testing.assert_close(blocks.sums[:, 1], keys[:, 2:5].sum(1))
