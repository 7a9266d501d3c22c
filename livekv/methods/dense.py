"""Dense attention: every token kept in the fast tier and read (the reference). In a video stream (``full``):
every frame kept uncompressed and every question answered over all of it, what an offline Video LLM sees."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from livekv.methods.base import StreamMethod, knob


@dataclass(kw_only=True)
class DenseConfig(StreamMethod):
    """Dense attention over everything (the reference); in a stream, everything kept (``full``)."""

    name: ClassVar[str] = "dense"
    aliases: ClassVar[tuple[str, ...]] = ("full",)
    contexts: ClassVar[tuple[str, ...]] = ("text", "stream")
    kv_bits: int = knob(16, "the KV in the model's dtype (16) or int8 per token (8: a quarter of float32's bytes, "
                            "attended from the codes on a CPU; text only)")

    def validate(self) -> None:
        if self.kv_bits not in (16, 8):
            raise ValueError(f"dense: kv_bits must be 16 (the KV's dtype) or 8, got {self.kv_bits}")

    def validate_stream(self) -> None:
        if self.short_term is not None:
            raise ValueError("full keeps everything: it has no short_term window")
        if self.kv_bits != 16:
            raise ValueError("full: kv_bits=8 is for text caches; a stream's memory keeps the KV's dtype")
