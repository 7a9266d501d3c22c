"""Tiny random video-language models for the stream tests: built from configs in code, seeded, float32, eval mode.

Both share the text model of ``conftest.TINY``'s scale (2 layers, hidden 64, 4 heads, 2 KV heads, head_dim 16,
vocab 200, large random weights); the placeholder and wrapper token ids are the top ids of the vocabulary.
"""

from __future__ import annotations

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

VOCAB = 200
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    initializer_range=0.2,  # 10x the default: sharper attention, so that wrong positions change the logits visibly
    bos_token_id=None,
    eos_token_id=None,
)


def tiny_llava_onevision(seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    """SigLIP tower on 32 px images, patch 8: a 4 x 4 patch grid pooled to 2 x 2 = 4 tokens per frame."""
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **TEXT),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            vision_use_head=False,
        ),
        image_token_index=VOCAB - 2,
        video_token_index=VOCAB - 1,
        # SigLIP has no CLS token to drop; "full" is also what the released checkpoints use
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
    )
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(config).float().eval()


def tiny_qwen2_vl(seed: int = 0) -> Qwen2VLForConditionalGeneration:
    """Qwen2-VL with patch 8, merge 2, temporal patch 2 (factor 16 px); M-RoPE sections (2, 3, 3) = head_dim / 2."""
    config = Qwen2VLConfig(
        text_config=dict(
            **TEXT, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
        ),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=TEXT["hidden_size"],
            num_heads=2,
            mlp_ratio=2,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=VOCAB - 4,
        video_token_id=VOCAB - 3,
        vision_start_token_id=VOCAB - 2,
        vision_end_token_id=VOCAB - 1,
    )
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).float().eval()
