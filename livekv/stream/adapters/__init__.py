"""Video-language model adapters for the streaming session, and ``load_adapter`` to pick one."""

from __future__ import annotations

import os
import pathlib

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlavaOnevisionForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

import livekv.attention  # noqa: F401  (registers the "livekv" attention the adapters switch the text model to)
from livekv.quantize import check_weights, quantize_weights
from livekv.stream.adapters.base import Segment, VideoLMAdapter
from livekv.stream.adapters.llava_onevision import LlavaOnevisionAdapter
from livekv.stream.adapters.qwen2_vl import Qwen2VLAdapter

__all__ = ["Segment", "VideoLMAdapter", "LlavaOnevisionAdapter", "Qwen2VLAdapter", "load_adapter", "cast_and_quantize"]

# config.model_type -> (model class, adapter class)
ADAPTERS: dict[str, tuple[type, type[VideoLMAdapter]]] = {
    "llava_onevision": (LlavaOnevisionForConditionalGeneration, LlavaOnevisionAdapter),
    "qwen2_vl": (Qwen2VLForConditionalGeneration, Qwen2VLAdapter),
}


def cast_and_quantize(model: nn.Module, dtype: torch.dtype = torch.float32, weights: str = "float32") -> nn.Module:
    """A video-language model (one with ``model.model.language_model`` and ``model.lm_head``, as every adapter's)
    cast to ``dtype``, then its language model's ``nn.Linear`` layers and ``lm_head`` stored as ``weights``
    (``livekv.quantize``: float32 leaves them in ``dtype``; bfloat16, int8, int4), in place; returns ``model``.

    The vision tower and the projector are cast but not quantized: weight-only quantization saves the bytes a decode
    step reads, and a decode step reads only the language model; the tower runs once per frame over all its patches
    at once (a prefill, where int8 dequantizes to multiply anyway), so quantizing it would cost accuracy and save
    nothing. ``ValueError`` for an unknown ``weights`` or one whose kernels this torch lacks, before any change, and
    (from ``quantize_weights``) for int8/int4 on a model not on the CPU."""
    check_weights(weights)
    model.to(dtype=dtype)
    if weights != "float32":
        parts = nn.Module()  # what is quantized, in one call (all or nothing); lm_head needs a parent to be replaced in
        parts.language_model, parts.lm_head = model.model.language_model, model.lm_head
        model.lm_head = quantize_weights(parts, weights).lm_head
    return model


def load_adapter(model_or_path, tokenizer=None, dtype: torch.dtype = torch.float32,
                 weights: str = "float32") -> VideoLMAdapter:
    """The adapter of a loaded model, or of the model saved in a local directory (loaded with
    ``local_files_only=True``, with the tokenizer saved beside it if there is one and none is given). A model loaded
    here is cast to ``dtype`` and its language model's weights stored as ``weights`` (``cast_and_quantize``); a
    model given is used as it is. The model is put in eval mode and its text model's attention implementation set
    to ``"livekv"`` (the vision tower keeps its own). Raises ``ValueError`` for a model type without an adapter."""
    if isinstance(model_or_path, (str, os.PathLike)):
        path = pathlib.Path(model_or_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no model at {path}: expected a local checkpoint directory with a config.json "
                                    "(livekv never downloads a model)")
        model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
        if model_type not in ADAPTERS:
            raise ValueError(f"no video adapter for model type {model_type!r}; supported: {sorted(ADAPTERS)}")
        check_weights(weights)  # before the load, which may take long
        model = ADAPTERS[model_type][0].from_pretrained(path, local_files_only=True, dtype=dtype)
        cast_and_quantize(model, dtype, weights)
        if tokenizer is None and (path / "tokenizer_config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    else:
        model = model_or_path
    for model_class, adapter_class in ADAPTERS.values():
        if isinstance(model, model_class):
            return adapter_class(model.eval(), tokenizer)
    raise ValueError(
        f"no video adapter for {type(model).__name__}; supported: {', '.join(c.__name__ for c, _ in ADAPTERS.values())}"
    )
