"""StreamingLLM: attention reads only the first ``sink`` tokens and the most recent ones.

Tokens keep the positions they were written with (keys are stored post-RoPE); StreamingLLM instead re-numbers
positions inside the cache. Nothing is ever recalled, so this is the floor the recall methods must beat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from livekv.methods.base import SparseConfig, all_tokens

if TYPE_CHECKING:
    from livekv.store import HostStore


@dataclass(kw_only=True)
class SinkWindowConfig(SparseConfig):
    """StreamingLLM (Xiao et al., 2024): 4 sink tokens, the rest of the budget is the window; every layer sparse.

    ``window`` defaults to ``budget - sink``.
    """

    name: ClassVar[str] = "sink_window"
    uses_digests: ClassVar[bool] = False
    sink: int | None = 4
    dense_layers: int = 0

    def set_defaults(self) -> None:
        if self.sink is not None and self.window is None:
            if self.budget <= self.sink:
                raise ValueError(f"sink_window: budget {self.budget} must exceed sink ({self.sink}): the rest of it "
                                 "is the window of recent tokens")
            self.window = self.budget - self.sink
        super().set_defaults()

    def validate(self) -> None:
        if self.budget < self.sink + self.window:
            raise ValueError(
                f"budget {self.budget} is smaller than sink ({self.sink}) + window ({self.window})"
            )

    def make_selector(self, layer_idx: int) -> "SinkWindowSelector":
        return SinkWindowSelector(self)


class SinkWindowSelector:
    def __init__(self, cfg: SinkWindowConfig):
        self.cfg = cfg

    def select(self, query: torch.Tensor, store: "HostStore") -> torch.Tensor:
        """query ``[B, H, D]`` -> token ids ``[B, G, sink + window]`` (all tokens while T <= budget)."""
        B, G, T = query.shape[0], store.key_max.shape[1], store.length
        if T <= self.cfg.budget:
            return all_tokens(store, B, G, query.device)
        ids = torch.cat((torch.arange(self.cfg.sink), torch.arange(T - self.cfg.window, T))).to(query.device)
        return ids.expand(B, G, -1)
