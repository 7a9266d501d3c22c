"""Dense attention: the whole KV stays in the fast tier and every token is read. The reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from livekv.methods.base import MethodConfig


@dataclass(kw_only=True)
class DenseConfig(MethodConfig):
    """Dense attention over the whole KV (the reference); no knobs."""

    name: ClassVar[str] = "dense"
