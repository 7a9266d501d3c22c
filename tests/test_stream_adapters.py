"""The video-LM adapters against the models' own forward: embeddings, positions (1-D and Qwen2-VL's 3-D M-RoPE),
rotary re-positioning, attention routing, input checks."""

import numpy as np
import pytest
import torch
from stream_models import VOCAB, tiny_llava_onevision, tiny_qwen2_vl
from transformers import AttentionInterface, DynamicCache, Qwen2Config
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

from livekv.stream.adapters import LlavaOnevisionAdapter, Qwen2VLAdapter, load_adapter

QWEN_FRAME_SIZE = (32, 48)  # non-square: a 4 x 6 patch grid, 2 x 3 merged tokens, the cursor moves by max(2, 3)


@pytest.fixture(scope="module")
def llava() -> LlavaOnevisionAdapter:
    return load_adapter(tiny_llava_onevision())


@pytest.fixture(scope="module")
def qwen() -> Qwen2VLAdapter:
    return Qwen2VLAdapter(tiny_qwen2_vl(), frame_size=QWEN_FRAME_SIZE)


def frames(n: int, seed: int, size: tuple[int, int] = (40, 52)) -> torch.Tensor:
    """``[n, H, W, 3]`` random uint8 frames (not at the model's size: the adapters resize)."""
    return torch.randint(0, 256, (n, *size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def text_ids(n: int, seed: int, high: int) -> list[int]:
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_segments(adapter, segments) -> torch.Tensor:
    """Logits ``[1, N, vocab]`` of the segments fed one by one through ``adapter.forward`` into one cache."""
    cache, cursor, logits = DynamicCache(), 0, []
    for seg in segments:
        logits.append(adapter.lm_head(adapter.forward(seg.embeds, seg.positions + cursor, cache)))
        cursor += seg.span
    return torch.cat(logits, dim=1)


def absolute_positions(segments) -> torch.Tensor:
    """``[P, N]``: each segment's positions shifted by the spans before it."""
    cursor, out = 0, []
    for seg in segments:
        out.append(seg.positions + cursor)
        cursor += seg.span
    return torch.cat(out, dim=1)


def reference(model, **inputs) -> tuple[torch.Tensor, dict]:
    """The model's own forward over the whole sequence (no cache): logits and the kwargs its decoder got."""
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        hook.remove()
    return logits, seen


@torch.no_grad()
def test_llava_onevision_matches_whole_sequence_forward(llava):
    vision = llava.model.config.vision_config
    assert llava.tokens_per_frame == 4  # 32 px / patch 8 = 4 x 4 patches, pooled to 2 x 2
    pixels = llava.pixel_values(frames(2, 0))
    assert pixels.shape == (1, 2, 3, vision.image_size, vision.image_size)
    same_size = frames(1, 9, (32, 32))
    assert torch.allclose(llava.pixel_values(same_size)[0, 0], same_size[0].permute(2, 0, 1) / 127.5 - 1)

    clips = [frames(2, 1), frames(2, 2)]  # the reference batches videos: same frame count
    texts = [text_ids(5, 3, VOCAB - 2), text_ids(4, 4, VOCAB - 2), text_ids(3, 5, VOCAB - 2)]
    videos = [llava.video(c) for c in clips]
    segments = [llava.text(texts[0]), videos[0], llava.text(texts[1]), videos[1], llava.text(texts[2])]
    for v in videos:
        assert len(v) == 2 * llava.tokens_per_frame + 1 and v.span == len(v)
        assert v.frame.tolist() == [0] * 4 + [1] * 4 + [1]

    video_token = llava.model.config.video_token_id
    ids = texts[0] + [video_token] * len(videos[0]) + texts[1] + [video_token] * len(videos[1]) + texts[2]
    pixels = torch.cat([llava.pixel_values(c) for c in clips])
    want, seen = reference(llava.model, input_ids=torch.tensor([ids]), pixel_values_videos=pixels)

    embeds = torch.cat([s.embeds for s in segments], dim=1)
    assert torch.allclose(embeds, seen["inputs_embeds"], atol=1e-6)
    assert seen["position_ids"] is None  # the decoder numbers the tokens 0..N-1 itself
    assert torch.equal(absolute_positions(segments), torch.arange(len(ids))[None])
    torch.testing.assert_close(run_segments(llava, segments), want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_qwen2_vl_patchify_matches_image_processor(qwen):
    """Two identical frames (one temporal patch) patchify as the image processor patchifies that one image."""
    image = frames(1, 6, QWEN_FRAME_SIZE)
    pixels, grid_thw = qwen.pixel_values(image.expand(2, -1, -1, -1))
    processor = Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64}
    )
    want = processor(images=[image[0].numpy()], return_tensors="pt")
    assert grid_thw.tolist() == want["image_grid_thw"].tolist() == [[1, 4, 6]]
    torch.testing.assert_close(pixels, want["pixel_values"], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_qwen2_vl_patchify_temporal_layout(qwen):
    """Each row is one patch: channels, then its temporal_patch_size frames, then patch rows and columns."""
    clip = frames(4, 7, QWEN_FRAME_SIZE)
    pixels, grid_thw = qwen.pixel_values(clip)
    assert grid_thw.tolist() == [[2, 4, 6]]
    assert pixels.shape == (2 * 4 * 6, 3 * 2 * 8 * 8)
    x = (clip.permute(0, 3, 1, 2) / 255 - qwen.image_mean) / qwen.image_std  # [F, C, H, W]
    # temporal patch 1, merged block (row 1, column 2), inner patch (1, 0): patch row 3, column 4
    row = 1 * 24 + (1 * 3 + 2) * 4 + 1 * 2 + 0
    want = x[2:4, :, 3 * 8 : 4 * 8, 4 * 8 : 5 * 8].transpose(0, 1).reshape(-1)
    torch.testing.assert_close(pixels[row], want)


@torch.no_grad()
def test_qwen2_vl_matches_whole_sequence_forward(qwen):
    assert qwen.tokens_per_frame == 3  # 4 x 6 patches, merged 2 x 3 = 6 tokens per 2 frames
    # 8 frames: 4 temporal positions, more than the cursor's advance of 3 past the video
    clips = [frames(4, 1), frames(8, 2)]
    texts = [text_ids(5, 3, VOCAB - 4), text_ids(4, 4, VOCAB - 4), text_ids(3, 5, VOCAB - 4)]
    videos = [qwen.video(c) for c in clips]
    segments = [qwen.text(texts[0]), videos[0], qwen.text(texts[1]), videos[1], qwen.text(texts[2])]
    for v, clip in zip(videos, clips):
        n = len(clip) // 2 * 6
        assert len(v) == n + 2 and v.span == 1 + 3 + 1
        assert v.frame.tolist() == [-1] + [2 * (i // 6) for i in range(n)] + [-1]
        assert v.positions[:, 0].tolist() == [0, 0, 0] and v.positions[:, -1].tolist() == [4, 4, 4]

    config = qwen.model.config
    ids, kinds = [], []
    for part in [texts[0], videos[0], texts[1], videos[1], texts[2]]:
        if isinstance(part, list):
            ids += part
            kinds += [0] * len(part)
        else:
            n = len(part) - 2
            ids += [config.vision_start_token_id] + [config.video_token_id] * n + [config.vision_end_token_id]
            kinds += [0] + [2] * n + [0]
    pixels, grids = zip(*(qwen.pixel_values(c) for c in clips))
    want, seen = reference(
        qwen.model,
        input_ids=torch.tensor([ids]),
        pixel_values_videos=torch.cat(pixels),
        video_grid_thw=torch.cat(grids),
        mm_token_type_ids=torch.tensor([kinds]),
    )

    embeds = torch.cat([s.embeds for s in segments], dim=1)
    assert torch.allclose(embeds, seen["inputs_embeds"], atol=1e-6)
    assert torch.equal(absolute_positions(segments), seen["position_ids"][:, 0])
    torch.testing.assert_close(run_segments(qwen, segments), want, atol=1e-4, rtol=1e-4)


def rotate(adapter, key: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    cos, sin = adapter.rope(positions, key.dtype)
    return apply_rotary_pos_emb(key, key, cos, sin, unsqueeze_dim=0)[0]


@pytest.mark.parametrize("name", ["llava", "qwen"])
@torch.no_grad()
def test_rope_rotates_keys_as_the_model_does(name, request):
    adapter = request.getfixturevalue(name)
    P, N = adapter.position_dims, 6
    g = torch.Generator().manual_seed(0)
    key = torch.randn(2, N, 16, generator=g)  # [KV heads, N, head_dim]
    a = torch.randint(0, 200, (P, N), generator=g)
    b = torch.randint(-100, 100, (P, N), generator=g)

    # the decoder's own rotary embedding, called as the decoder calls it
    position_ids = a[:, None] if P > 1 else a
    cos, sin = adapter.language_model.rotary_emb(key, position_ids)
    want = apply_rotary_pos_emb(key[None], key[None], cos, sin)[0][0]
    torch.testing.assert_close(rotate(adapter, key, a), want)

    twice = rotate(adapter, rotate(adapter, key, a), b)
    torch.testing.assert_close(twice, rotate(adapter, key, a + b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rotate(adapter, key, torch.zeros(P, N, dtype=torch.long)), key)


def test_rope_3d_rows_act_on_their_mrope_sections(qwen):
    """Moving only the height row changes only the frequencies of M-RoPE's height section (2..4 of 8)."""
    key = torch.randn(1, 1, 16)
    moved = rotate(qwen, key, torch.tensor([[0], [7], [0]]))
    changed = ~torch.isclose(moved, key).view(2, 8).all(0)
    assert changed.nonzero().flatten().tolist() == [2, 3, 4]


def test_text_attention_goes_through_livekv_and_vision_does_not(llava, qwen, monkeypatch):
    calls: dict[str, set[str]] = {"livekv": set(), "sdpa": set()}
    for name in calls:
        impl = AttentionInterface._global_mapping[name]

        def spy(module, *args, _impl=impl, _name=name, **kwargs):
            calls[_name].add(type(module).__name__)
            return _impl(module, *args, **kwargs)

        monkeypatch.setitem(AttentionInterface._global_mapping, name, spy)
    with torch.no_grad():
        for adapter, clip in [(llava, frames(1, 0)), (qwen, frames(2, 0))]:
            segment = adapter.video(clip)
            adapter.forward(segment.embeds, segment.positions, DynamicCache())
    assert calls == {"livekv": {"Qwen2Attention", "Qwen2VLAttention"}, "sdpa": {"SiglipAttention", "VisionAttention"}}


def test_load_adapter_from_a_directory(tmp_path):
    tiny_qwen2_vl().save_pretrained(tmp_path)
    adapter = load_adapter(tmp_path)
    assert isinstance(adapter, Qwen2VLAdapter) and adapter.tokenizer is None
    assert adapter.language_model.config._attn_implementation == "livekv"
    assert adapter.model.model.visual.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("make", [tiny_llava_onevision, tiny_qwen2_vl], ids=["llava_onevision", "qwen2_vl"])
def test_load_adapter_casts_and_quantizes_the_language_model_only(tmp_path, make):
    from livekv.quantize import Int8Linear
    from livekv.stream.session import StreamSession

    make().save_pretrained(tmp_path)
    reference, adapter = load_adapter(tmp_path), load_adapter(tmp_path, dtype=torch.bfloat16, weights="int8")
    assert isinstance(adapter.lm_head, Int8Linear)
    assert not any(isinstance(m, torch.nn.Linear) for m in adapter.language_model.modules())
    tower = adapter.model.model.vision_tower if make is tiny_llava_onevision else adapter.model.model.visual
    assert any(isinstance(m, torch.nn.Linear) for m in tower.modules())  # cast, not quantized
    assert next(tower.parameters()).dtype == torch.bfloat16
    logits, kv = [], []
    for a in (reference, adapter):
        session = StreamSession(a, "full")
        with torch.inference_mode():
            for seed in range(3):
                session.push(frames(2, seed))
            logits.append(session.logits([1, 2, 3]).float())
        assert {layer.ctx.keys.dtype for layer in session.cache.layers} == {a.model.dtype}
        kv.append(session.memory()["fast_kv_bytes"])
    assert kv[1] * 2 == kv[0]
    # measured 0.08 (LLaVA-OneVision) and 0.16 (Qwen2-VL) off logits up to ~5 (this tiny model's weights are large)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0.4)
    with pytest.raises(ValueError, match="one of float32, bfloat16, int8, int4"):
        load_adapter(tmp_path, weights="int2")


def test_load_adapter_rejects_other_models(tmp_path):
    with pytest.raises(ValueError, match="no video adapter"):
        load_adapter(torch.nn.Linear(2, 2))
    Qwen2Config(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no video adapter for model type 'qwen2'"):
        load_adapter(tmp_path)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(2, 32, 32, dtype=torch.uint8),  # gray, no channel axis
        torch.zeros(2, 32, 32, 4, dtype=torch.uint8),  # RGBA
        torch.zeros(2, 32, 32, 3),  # float
        np.zeros((0, 32, 32, 3), dtype=np.uint8),  # no frames
    ],
)
def test_bad_frames_raise(llava, qwen, bad):
    for adapter in (llava, qwen):
        with pytest.raises(ValueError):
            adapter.video(bad)


def test_qwen2_vl_needs_whole_temporal_patches(qwen):
    assert qwen.frame_multiple == 2
    with pytest.raises(ValueError, match="multiple of 2 frames"):
        qwen.video(frames(3, 0))
    with pytest.raises(ValueError, match="frame_size"):
        Qwen2VLAdapter(qwen.model, frame_size=40)
