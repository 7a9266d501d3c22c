"""Dense attention: the whole KV stays in the fast tier and every token is read. The reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from livekv.methods.base import MethodConfig


@dataclass
class DenseConfig(MethodConfig):
    name: ClassVar[str] = "dense"
