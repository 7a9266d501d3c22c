"""Dense attention: every token kept in the fast tier and read (the reference). In a video stream (``full``):
every frame kept uncompressed and every question answered over all of it, what an offline Video LLM sees."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from livekv.methods.base import DenseKV, StreamMethod


@dataclass(kw_only=True)
class DenseConfig(DenseKV, StreamMethod):
    """Dense attention over everything (the reference); in a stream, everything kept (``full``)."""

    name: ClassVar[str] = "dense"
    aliases: ClassVar[tuple[str, ...]] = ("full",)
    contexts: ClassVar[tuple[str, ...]] = ("text", "stream")

    def validate(self) -> None:
        self.check_kv_bits()

    def validate_stream(self) -> None:
        if self.short_term is not None:
            raise ValueError("full keeps everything: it has no short_term window")
        super().validate_stream()
