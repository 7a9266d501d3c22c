"""StreamingLLM (Xiao et al., 2024): attention reads the sink and the most recent tokens only; nothing is recalled,
so this is the floor the recall methods must beat.

* In a text cache every token stays in the host tier and keeps the position it was written with (keys are stored
  post-RoPE; StreamingLLM re-numbers positions inside its cache instead): a decode step reads the first ``sink``
  tokens and the last ``window``.
* In a video stream the sink is the system prompt; tokens that leave the newest ``short_term`` are dropped and the
  window moves up to right after the sink, so positions stay bounded however long the stream runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from livekv.protocol import Plan
from livekv.methods.base import SparseConfig, StreamMethod, knob

if TYPE_CHECKING:
    from livekv.store import HostStore


@dataclass(kw_only=True)
class SinkWindowConfig(SparseConfig, StreamMethod):
    """StreamingLLM: the sink + the most recent tokens (text: 4 sink tokens, the rest of the budget the window,
    every layer sparse; streams: the system prompt + the newest ``short_term`` tokens)."""

    name: ClassVar[str] = "sink_window"
    contexts: ClassVar[tuple[str, ...]] = ("text", "stream")
    uses_digests: ClassVar[bool] = False
    sink: int | None = knob(4, "the first tokens, always read")
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
            raise ValueError(f"budget {self.budget} is smaller than sink ({self.sink}) + window ({self.window})")

    def make_selector(self, layer_idx: int) -> SinkWindowSelector:
        return SinkWindowSelector(self)

    # --- streams ------------------------------------------------------------------------------------------------
    def resolve(self, memory_tokens: int, tokens_per_frame: float) -> None:
        """The whole memory is the window."""
        if self.short_term is None:
            self.short_term = memory_tokens
        super().resolve(memory_tokens, tokens_per_frame)

    def settle(self, layer, n: int) -> Plan:
        S, N = layer.n_sink, layer.ctx.length
        return Plan(keep=torch.cat([torch.arange(S), torch.arange(S + n, N)]), n_long=0)

    def short_term_start(self, cache) -> int:
        return cache.sink_end


class SinkWindowSelector:
    select_nbytes = 0  # reads no index

    def __init__(self, cfg: SinkWindowConfig):
        self.cfg = cfg

    def select(self, query: torch.Tensor, store: HostStore) -> torch.Tensor:
        """query ``[B, H, D]`` -> token ids ``[B, G, sink + window]`` (all tokens while T <= budget)."""
        B, G, T = query.shape[0], store.kv_heads, store.length
        if T <= self.cfg.budget:
            return torch.arange(T, device=query.device).expand(B, G, -1)
        ids = torch.cat((torch.arange(self.cfg.sink), torch.arange(T - self.cfg.window, T))).to(query.device)
        return ids.expand(B, G, -1)
