"""Video-language model adapters for the streaming session, and ``load_adapter`` to pick one."""

from __future__ import annotations

import os
import pathlib

from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlavaOnevisionForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

import livekv.attention  # noqa: F401  (registers the "livekv" attention the adapters switch the text model to)
from livekv.stream.adapters.base import Segment, VideoLMAdapter
from livekv.stream.adapters.llava_onevision import LlavaOnevisionAdapter
from livekv.stream.adapters.qwen2_vl import Qwen2VLAdapter

__all__ = ["Segment", "VideoLMAdapter", "LlavaOnevisionAdapter", "Qwen2VLAdapter", "load_adapter"]

# config.model_type -> (model class, adapter class)
ADAPTERS: dict[str, tuple[type, type[VideoLMAdapter]]] = {
    "llava_onevision": (LlavaOnevisionForConditionalGeneration, LlavaOnevisionAdapter),
    "qwen2_vl": (Qwen2VLForConditionalGeneration, Qwen2VLAdapter),
}


def load_adapter(model_or_path, tokenizer=None) -> VideoLMAdapter:
    """The adapter of a loaded model, or of the model saved in a local directory (loaded with
    ``local_files_only=True``, with the tokenizer saved beside it if there is one and none is given). The model is
    put in eval mode and its text model's attention implementation set to ``"livekv"`` (the vision tower keeps its
    own). Raises ``ValueError`` for a model type without an adapter."""
    if isinstance(model_or_path, (str, os.PathLike)):
        path = pathlib.Path(model_or_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no model at {path}: expected a local checkpoint directory with a config.json "
                                    "(livekv never downloads a model)")
        model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
        if model_type not in ADAPTERS:
            raise ValueError(f"no video adapter for model type {model_type!r}; supported: {sorted(ADAPTERS)}")
        model = ADAPTERS[model_type][0].from_pretrained(path, local_files_only=True)
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
