"""LLaVA-OneVision (SigLIP tower + projector + Qwen2 decoder, 1-D RoPE).

A clip of F frames becomes ``F * ceil(g/2)^2 + 1`` visual tokens (g = image_size // patch_size): each frame's
g x g patch features, projected and 2x bilinearly pooled, then one ``image_newline`` embedding after the last frame,
exactly what ``LlavaOnevisionModel.get_video_features`` returns. Positions are plain 1-D, one per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import LlavaOnevisionForConditionalGeneration

from livekv.attention import ATTN_IMPLEMENTATION
from livekv.stream.adapters.base import ChatML, Segment, VideoLMAdapter, as_frames


class LlavaOnevisionAdapter(ChatML, VideoLMAdapter):
    """Adapter for ``LlavaOnevisionForConditionalGeneration``.

    Building it sets the text model's attention implementation to ``"livekv"``; the vision tower keeps its own.
    Frames are resized to the tower's square ``image_size`` (bilinear, antialiased; the model's processor uses
    bicubic), scaled to [0, 1] and normalized with ``image_mean`` / ``image_std`` (SigLIP's 0.5 by default, what the
    released LLaVA-OneVision checkpoints use).
    """

    position_dims = 1
    frame_multiple = 1

    def __init__(
        self,
        model: LlavaOnevisionForConditionalGeneration,
        tokenizer=None,
        image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        image_std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    ):
        model.set_attn_implementation({"text_config": ATTN_IMPLEMENTATION})
        self.model = model
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.tokenizer = tokenizer
        vision = model.config.vision_config
        self.image_size = vision.image_size
        self.tokens_per_frame = math.ceil(vision.image_size // vision.patch_size / 2) ** 2
        self.image_mean = torch.tensor(image_mean).view(3, 1, 1)
        self.image_std = torch.tensor(image_std).view(3, 1, 1)

    def pixel_values(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[F, H, W, 3]`` uint8 -> ``pixel_values_videos`` ``[1, F, 3, S, S]`` (S = the tower's image_size)."""
        frames = as_frames(frames)
        x = frames.to(self.device).permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        x = (x / 255 - self.image_mean.to(x.device)) / self.image_std.to(x.device)
        return x[None].to(self.model.dtype)

    def clip_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixel_values_videos`` of C clips ``[C, F, 3, S, S]`` -> their visual tokens ``[C, F * tokens_per_frame
        + 1, hidden]`` (each clip ends with LLaVA-OneVision's newline token)."""
        config = self.model.config
        return self.model.model.get_video_features(
            pixel_values_videos=pixels,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output

    def video(self, frames: torch.Tensor) -> Segment:
        """The segment of one clip, frames ``[F, H, W, 3]`` uint8: ``F * tokens_per_frame + 1`` tokens at positions
        ``0 .. N-1``; the trailing newline token belongs to the last frame."""
        pixels = self.pixel_values(frames)
        embeds = self.clip_features(pixels)  # [1, F * tokens_per_frame + 1, hidden]
        num_frames, n = pixels.shape[1], embeds.shape[1]
        frame = torch.arange(num_frames).repeat_interleave(self.tokens_per_frame)
        frame = torch.cat([frame, frame.new_tensor([num_frames - 1])])
        return Segment(embeds, torch.arange(n)[None], n, frame)
