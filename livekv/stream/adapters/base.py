"""The adapter interface between a video-language model and livekv's streaming session.

A Video LLM is three parts: a vision encoder + projector (frames -> visual token embeddings), the token
embeddings of the language model, and the language model itself. An adapter exposes exactly those, as
``Segment``s the session prefills into its stream cache, plus the model's rotary embedding so the cache can
re-position keys. Positions are given per token as ``[P, N]`` (P = 1 for 1-D RoPE, P = 3 for Qwen2-VL's
temporal/height/width M-RoPE), relative to the segment's start; the session adds its own position cursor,
so appending a clip to a non-empty cache gets the positions the model would compute for the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Segment:
    """A piece of the stream, ready for the language model.

    embeds ``[1, N, hidden]``; positions ``[P, N]`` (long, relative: the segment starts at 0); span: how far the
    position cursor moves past this segment (``positions.max() + 1`` for text, model-specific for video);
    frame ``[N]`` (long): the frame of the clip each token belongs to, -1 for text tokens.
    """

    embeds: torch.Tensor
    positions: torch.Tensor
    span: int
    frame: torch.Tensor

    def __post_init__(self):
        N = self.embeds.shape[1]
        if self.positions.shape[-1] != N or self.frame.shape != (N,):
            raise ValueError(f"segment of {N} tokens has positions {tuple(self.positions.shape)}, frame {tuple(self.frame.shape)}")

    def __len__(self) -> int:
        return self.embeds.shape[1]

    @property
    def visual(self) -> torch.Tensor:
        """``[N]`` bool: which tokens are visual."""
        return self.frame >= 0


def as_frames(frames) -> torch.Tensor:
    """Frames as a ``[F, H, W, 3]`` uint8 tensor, from an array/tensor of that shape (or one ``[H, W, 3]`` frame)
    or a list of such frames. Raises ``ValueError`` with the offending shape otherwise."""
    try:
        if isinstance(frames, (list, tuple)):
            if not frames:
                raise ValueError("no frames given")
            frames = [torch.as_tensor(np.array(f)) for f in frames]
            shapes = {tuple(f.shape) for f in frames}
            if len(shapes) != 1:
                raise ValueError(f"frames of different shapes in one clip: {sorted(shapes)}")
            frames = torch.stack(frames)
        elif not isinstance(frames, torch.Tensor):
            frames = torch.as_tensor(np.array(frames))  # a copy: the caller's array may be read-only
    except TypeError as e:
        raise ValueError(f"frames must be [F, H, W, 3] uint8 RGB arrays, got {type(frames).__name__}") from e
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape) == 0:
        raise ValueError(f"frames must be [F, H, W, 3] (RGB, no side empty), got shape {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 RGB, got {frames.dtype}")
    return frames


PAPER_MEMORY_FRAMES = 84  # LiveVLM's 4096 + 12288 tokens of memory, at LLaVA-OneVision's 196 tokens per frame


class VideoLMAdapter:
    """What the streaming session needs from a video-language model. Subclasses set the attributes and implement
    ``video``; the rest works for any decoder whose rotary embedding is ``language_model.rotary_emb``.

    Attributes:
        model: the whole transformers model (e.g. ``LlavaOnevisionForConditionalGeneration``).
        language_model: its decoder stack: called with ``inputs_embeds``, ``position_ids`` and ``past_key_values``,
            returns ``last_hidden_state``. Its attention implementation is ``"livekv"``.
        lm_head: hidden ``[..., hidden]`` -> logits ``[..., vocab]``.
        tokenizer: a tokenizer, or ``None`` (then text is given as token ids).
        position_dims: P, the rows of a position tensor (1 or 3).
        tokens_per_frame: visual tokens one frame adds (for budgets stated in frames).
        frame_multiple: clips must hold a multiple of this many frames (Qwen2-VL: its temporal patch size).
        system_template, question_template: how a system prompt and a question are put into the stream as text.
    """

    model: torch.nn.Module
    language_model: torch.nn.Module
    lm_head: torch.nn.Module
    tokenizer = None
    position_dims: int = 1
    tokens_per_frame: int
    frame_multiple: int = 1
    system_template = "{system}"
    question_template = "{question}"

    @property
    def eos_ids(self) -> set[int]:
        """Token ids that end an answer."""
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)

    @property
    def context_tokens(self) -> int:
        """The longest context the language model handles (its ``max_position_embeddings``)."""
        return self.language_model.config.max_position_embeddings

    @property
    def default_memory_tokens(self) -> int:
        """The fast-tier memory (tokens per layer) a bounded streaming method holds by default: the paper's 84
        frames at this model's tokens per frame, at most half the context the model handles (the rest is for
        questions, answers and what a question retrieves)."""
        return max(1, int(min(PAPER_MEMORY_FRAMES * self.tokens_per_frame, self.context_tokens // 2)))

    # --- text -------------------------------------------------------------------------------------------------
    def tokenize(self, text: str | list[int] | torch.Tensor) -> torch.Tensor:
        """Token ids ``[N]`` of a string (needs a tokenizer) or of ids given as a list/tensor."""
        if isinstance(text, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: give text as token ids")
            ids = torch.tensor(self._known_ids(text), dtype=torch.long)
        else:
            ids = torch.as_tensor(text, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("empty text")
        vocab = self.language_model.get_input_embeddings().num_embeddings
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}")
        return ids

    def _known_ids(self, text: str) -> list[int]:
        """Token ids of ``text``; ``ValueError`` naming the words that became the unknown token (a word-level
        vocabulary, such as the embedded model's, cannot read them: the answer would be a guess)."""
        unk = self.tokenizer.unk_token_id
        if unk is None or not self.tokenizer.is_fast:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        unknown = [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]
        if unknown:
            shown = ", ".join(repr(w) for w in list(dict.fromkeys(unknown))[:10])
            raise ValueError(f"words this model does not know: {shown} (its vocabulary has {len(self.tokenizer)} "
                             "tokens)")
        return enc["input_ids"]

    def text(self, text: str | list[int] | torch.Tensor) -> Segment:
        ids = self.tokenize(text)
        n = ids.numel()
        embeds = self.language_model.get_input_embeddings()(ids.to(self.device)[None])
        positions = torch.arange(n).expand(self.position_dims, n)
        return Segment(embeds, positions, n, torch.full((n,), -1, dtype=torch.long))

    # --- video ------------------------------------------------------------------------------------------------
    def video(self, frames: torch.Tensor) -> Segment:
        """The segment of one clip: frames ``[F, H, W, 3]`` uint8 (F a multiple of ``frame_multiple``)."""
        raise NotImplementedError

    # --- the language model -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device  # the embedding is never quantized

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """Run the decoder on embeds ``[1, N, hidden]`` at absolute positions ``[P, N]``; returns hidden ``[1, N, hidden]``."""
        position_ids = positions[:, None, :] if self.position_dims > 1 else positions
        out = self.language_model(inputs_embeds=embeds, position_ids=position_ids.to(self.device), past_key_values=cache, use_cache=True)
        return out.last_hidden_state

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[N, head_dim]`` of the language model's rotary embedding at positions ``[P, N]`` (any integers,
        also negative: rotating by them moves a key to another position)."""
        rotary = self.language_model.rotary_emb
        if getattr(rotary, "attention_scaling", 1.0) != 1.0:
            raise NotImplementedError("re-positioning keys needs a rotary embedding without attention scaling")
        position_ids = positions[:, None, :] if self.position_dims > 1 else positions
        probe = torch.empty(0, dtype=dtype, device=self.device)
        cos, sin = rotary(probe, position_ids.to(self.device))
        return cos[0], sin[0]


class ChatML:
    """The chat framing of the Qwen-family models (LLaVA-OneVision, Qwen2-VL): the system turn opens a user turn
    that the video fills; a question closes it and opens the assistant's."""

    system_template = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    question_template = "\n{question}<|im_end|>\n<|im_start|>assistant\n"
