"""Dense attention: every token kept in the fast tier and read (the reference). In a video stream (``full``):
every frame kept uncompressed and every question answered over all of it, what an offline Video LLM sees."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from livekv.methods.base import StreamMethod, check_kv_bits, knob


@dataclass(kw_only=True)
class DenseConfig(StreamMethod):
    """Dense attention over everything (the reference); in a stream, everything kept (``full``)."""

    name: ClassVar[str] = "dense"
    aliases: ClassVar[tuple[str, ...]] = ("full",)
    contexts: ClassVar[tuple[str, ...]] = ("text", "stream")
    kv_bits: int = knob(16, "the KV in the model's dtype (16) or int8 per token (8: a quarter of float32's bytes, "
                            "attended from the codes on a CPU; text only)")

    def validate(self) -> None:
        check_kv_bits(self)

    def validate_stream(self) -> None:
        if self.short_term is not None:
            raise ValueError("full keeps everything: it has no short_term window")
        super().validate_stream()
