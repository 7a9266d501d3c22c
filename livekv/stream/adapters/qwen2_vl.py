"""Qwen2-VL (ViT with 3-D patches + Qwen2 decoder with 3-D M-RoPE).

A clip is wrapped in text tokens: ``<|vision_start|>``, one token per merged ``merge x merge`` patch of each
temporal patch (``temporal_patch_size`` frames), ``<|vision_end|>``. Positions follow
``Qwen2VLModel.get_rope_index`` (transformers 5.23), relative to the segment start:

- ``<|vision_start|>`` is text: ``(0, 0, 0)``;
- the video token of temporal patch t at merged row h, column w: ``(1 + t, 1 + h, 1 + w)``;
- ``<|vision_end|>`` is text, at the cursor after the video, which moved by ``max(grid_h, grid_w) // merge``
  (not by the temporal extent): ``1 + max(grid_h, grid_w) // merge`` on all three rows;
- the span (where the next segment starts) is one more than that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Qwen2VLForConditionalGeneration

from livekv.attention import ATTN_IMPLEMENTATION
from livekv.stream.adapters.base import ChatML, Segment, VideoLMAdapter, as_frames

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Qwen2VLAdapter(ChatML, VideoLMAdapter):
    """Adapter for ``Qwen2VLForConditionalGeneration``.

    Building it sets the text model's attention implementation to ``"livekv"``; the vision tower keeps its own.
    Frames are resized (bilinear, antialiased) to ``frame_size`` (an int for square frames or ``(height, width)``),
    each side a multiple of ``patch_size * spatial_merge_size``; the default is twice that factor (56 px for the
    released models: 2 x 2 merged tokens per temporal patch, so few tokens that CPU runs stay fast; pass a larger
    size, e.g. 224 or 448, for real use). Then scaled to [0, 1] and normalized with ``image_mean`` / ``image_std``
    (CLIP's by default, as Qwen2-VL's processor does).

    ``tokens_per_frame`` is the tokens of one temporal patch divided by ``temporal_patch_size``: a float when that
    does not divide evenly.
    """

    position_dims = 3

    def __init__(
        self,
        model: Qwen2VLForConditionalGeneration,
        tokenizer=None,
        frame_size: int | tuple[int, int] | None = None,
        image_mean: tuple[float, float, float] = CLIP_MEAN,
        image_std: tuple[float, float, float] = CLIP_STD,
    ):
        vision = model.config.vision_config
        self.patch_size = vision.patch_size
        self.merge = vision.spatial_merge_size
        self.frame_multiple = vision.temporal_patch_size
        factor = self.patch_size * self.merge
        frame_size = 2 * factor if frame_size is None else frame_size
        self.frame_size = (frame_size, frame_size) if isinstance(frame_size, int) else tuple(frame_size)
        if any(side <= 0 or side % factor for side in self.frame_size):
            raise ValueError(f"frame_size {self.frame_size}: each side must be a positive multiple of {factor}")
        model.set_attn_implementation({"text_config": ATTN_IMPLEMENTATION})
        self.model = model
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.tokenizer = tokenizer
        grid_h, grid_w = (side // self.patch_size for side in self.frame_size)
        self.tokens_per_frame = grid_h * grid_w / self.merge**2 / self.frame_multiple
        self.image_mean = torch.tensor(image_mean).view(3, 1, 1)
        self.image_std = torch.tensor(image_std).view(3, 1, 1)

    def pixel_values(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames ``[F, H, W, 3]`` uint8 (F a multiple of ``temporal_patch_size``) -> ``pixel_values_videos``
        ``[grid_t * grid_h * grid_w, 3 * temporal_patch_size * patch * patch]`` and ``video_grid_thw`` ``[1, 3]``,
        laid out exactly as transformers' Qwen2-VL video processor lays them out."""
        frames = as_frames(frames)
        tps, p, m = self.frame_multiple, self.patch_size, self.merge
        if frames.shape[0] % tps:
            raise ValueError(f"a clip needs a multiple of {tps} frames (temporal_patch_size), got {frames.shape[0]}")
        x = frames.to(self.device).permute(0, 3, 1, 2).float()
        if x.shape[-2:] != self.frame_size:
            x = F.interpolate(x, size=self.frame_size, mode="bilinear", antialias=True)
        x = (x / 255 - self.image_mean.to(x.device)) / self.image_std.to(x.device)
        grid_t, grid_h, grid_w = x.shape[0] // tps, self.frame_size[0] // p, self.frame_size[1] // p
        patches = x.reshape(grid_t, tps, 3, grid_h // m, m, p, grid_w // m, m, p)
        # -> (t, h/m, w/m, m, m, C, tps, p, p): the merger's m x m groups are contiguous rows
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        pixels = patches.reshape(grid_t * grid_h * grid_w, 3 * tps * p * p)
        return pixels, torch.tensor([[grid_t, grid_h, grid_w]])

    def video(self, frames: torch.Tensor) -> Segment:
        """The segment of one clip, frames ``[F, H, W, 3]`` uint8: ``<|vision_start|>``, the
        ``F / temporal_patch_size * tokens_per_temporal_patch`` video tokens, ``<|vision_end|>``; positions ``[3, N]``
        as in the module docstring. A video token's frame is the first frame of its temporal patch."""
        pixels, grid_thw = self.pixel_values(frames)
        video = self.model.model.get_video_features(pixels, grid_thw.to(self.device)).pooler_output[0]  # [n, hidden]
        config = self.model.config
        wrap = self.language_model.get_input_embeddings()(
            torch.tensor([config.vision_start_token_id, config.vision_end_token_id], device=self.device)
        )
        embeds = torch.cat([wrap[:1], video.to(wrap.dtype), wrap[1:]])[None]

        grid_t, grid_h, grid_w = grid_thw[0].tolist()
        end = 1 + max(grid_h, grid_w) // self.merge
        positions = torch.cat(
            [
                torch.zeros(3, 1, dtype=torch.long),
                self.model.model.get_vision_position_ids(1, grid_thw[0], 1, self.merge),
                torch.full((3, 1), end, dtype=torch.long),
            ],
            dim=1,
        )
        per_temporal_patch = grid_h * grid_w // self.merge**2
        video_frame = torch.arange(grid_t).repeat_interleave(per_temporal_patch) * self.frame_multiple
        frame = torch.cat([video_frame.new_tensor([-1]), video_frame, video_frame.new_tensor([-1])])
        return Segment(embeds, positions, end + 1, frame)
