"""``full``: every token kept uncompressed, every question answered over all of it (what an offline Video LLM
sees). The reference the other methods are measured against."""

from __future__ import annotations

from dataclasses import dataclass

from livekv.stream.methods.base import StreamMethod


@dataclass(kw_only=True)
class Full(StreamMethod):
    """Everything kept uncompressed; questions read all of it (the reference)."""

    name = "full"

    def validate(self) -> None:
        if self.short_term is not None:
            raise ValueError("full keeps everything: it has no short_term window")
