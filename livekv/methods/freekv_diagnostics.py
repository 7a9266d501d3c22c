"""FreeKV's diagnostics: per layer, the counters a ``FreeKVLayer`` keeps (``FreeKVDiagnostics``) and what they
say (``layer_report``: correction trigger rate, adjacent-query cosines, pages and bytes recalled per step, the share
of the background recall the critical path did not wait for); over a cache, ``diagnostics``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from livekv.cache import LiveKVCache
    from livekv.methods.freekv import FreeKVLayer


COSINE_BINS = 200  # histogram of the adjacent-query cosines over [-1, 1]


@dataclass
class FreeKVDiagnostics:
    """One layer's FreeKV counters. Pages are (page, KV head) blocks. ``cosines``: histogram ``[COSINE_BINS]``
    of the adjacent-query cosines of the checked (sequence, KV head) pairs (bounded memory however long the run)."""

    checked_heads: int = 0  # (sequence, KV head) pairs checked for correction
    corrected_heads: int = 0
    exact_steps: int = 0  # blocking exact selections (first decode step after a multi-token step)
    background_pages: int = 0
    blocking_pages: int = 0
    cosines: torch.Tensor = field(default_factory=lambda: torch.zeros(COSINE_BINS))

    def state(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "cosines"}, "cosines": self.cosines.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> FreeKVDiagnostics:
        return cls(**{**state, "cosines": torch.tensor(state["cosines"])})


def layer_report(layer: FreeKVLayer) -> dict:
    """Correction trigger rate, adjacent-query cosines, pages and bytes recalled per step (background and
    blocking), and the share of the background recall time the critical path did not wait for."""
    layer.wait()
    d, s = layer.diag, layer.stats
    hist = d.cosines.cpu()
    centres = torch.linspace(-1, 1, COSINE_BINS + 1)[:-1] + 1 / COSINE_BINS
    cdf = hist.cumsum(0) / hist.sum().clamp(min=1)
    levels = (0.05, 0.25, 0.5, 0.75, 0.95)
    quantiles = centres[torch.searchsorted(cdf, torch.tensor(levels))].tolist() if d.checked_heads else []
    steps = max(s.steps, 1)
    page_bytes = layer.page_size * layer.token_bytes
    return {
        "steps": s.steps,
        "exact_steps": d.exact_steps,
        "trigger_rate": d.corrected_heads / d.checked_heads if d.checked_heads else 0.0,
        "cosine_mean": (hist * centres).sum().item() / d.checked_heads if d.checked_heads else None,
        "cosine_quantiles": dict(zip(("p05", "p25", "p50", "p75", "p95"), quantiles)),  # to 0.01
        "background_pages_per_step": d.background_pages / steps,
        "blocking_pages_per_step": d.blocking_pages / steps,
        "bytes_per_step": (d.background_pages + d.blocking_pages) * page_bytes / steps,
        "background_s": s.background_s,
        "waited_s": s.waited_s,
        "recall_hidden": s.recall_hidden,
    }


def diagnostics(cache: LiveKVCache) -> dict:
    """FreeKV diagnostics of a cache: per layer (``layer_report``) and over all sparse layers."""
    layers = {layer.layer_idx: layer_report(layer) for layer in cache.recallable_layers}
    checked = sum(layer.diag.checked_heads for layer in cache.recallable_layers)
    corrected = sum(layer.diag.corrected_heads for layer in cache.recallable_layers)
    stats = cache.stats()
    return {
        "trigger_rate": corrected / checked if checked else 0.0,
        "recall_hidden": stats["recall_hidden"],
        "background_s": stats["background_s"],
        "waited_s": stats["waited_s"],
        "bytes_per_step": sum(d["bytes_per_step"] for d in layers.values()),
        "layers": layers,
    }
