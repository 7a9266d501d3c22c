"""What every method shares: its config, the selector interface and the sink / pages / window layout.

A method is a small dataclass config (its knobs, with the papers' defaults) that says which layers stay dense and
builds the selector of the others. A selector maps the current query to the tokens attention reads:

    select(query [B, H, D], store: HostStore) -> token_idx [B, G, k]

``token_idx`` holds logical token positions (no duplicates) for each KV head; all query heads of a GQA group read
the same tokens. "Budget" counts the tokens attention reads per KV head, sink and window included.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from livekv.store import HostStore


class Selector(Protocol):
    def select(self, query: torch.Tensor, store: "HostStore") -> torch.Tensor: ...


@dataclass(kw_only=True)
class MethodConfig:
    """Base of every method's config. ``name`` is the registry key."""

    name: ClassVar[str]
    uses_digests: ClassVar[bool] = True  # whether the selector reads the host tier's min/max page digests
    reuse_resident: ClassVar[bool] = False  # keep recalled tokens in the fast tier across steps (copy only new ones)

    def __post_init__(self):
        check_knob_types(self)
        self.set_defaults()
        self.validate()

    def set_defaults(self) -> None:
        """Fill the knobs left ``None`` (after their types were checked)."""

    def validate(self) -> None:
        """Raise ``ValueError`` for knobs that do not fit together."""

    def dense_layer(self, layer_idx: int) -> bool:
        """True if layer ``layer_idx`` keeps its whole KV in the fast tier and attends densely."""
        return True

    def make_selector(self, layer_idx: int) -> Selector | None:
        return None

    def make_layer(self, layer_idx: int):
        """The cache layer of ``layer_idx``: dense, or recallable with this method's selector. Methods that need
        their own decode step (e.g. speculative recall) override this."""
        from livekv.cache import DenseLayer, RecallableLayer

        if self.dense_layer(layer_idx):
            return DenseLayer(layer_idx)
        return RecallableLayer(
            layer_idx,
            self.make_selector(layer_idx),
            self.page_size,
            digests=self.uses_digests,
            reuse=self.reuse_resident,
            host=self.host,
            host_dir=self.host_dir,
        )


@dataclass(kw_only=True)
class SparseConfig(MethodConfig):
    """Knobs shared by the sparse methods.

    budget: tokens read per KV head per decode step (sink + selected + window).
    sink, window: the first and the most recent tokens, always read. ``None`` scales them with the budget:
        ``min(128, page_size * max(1, budget // (16 * page_size)))`` each, so that at small budgets most of the
        budget is left to selection (budget 256: sink 16, window 16).
    page_size: tokens per page. ``None``: Quest's 16 from budget 1024 up; below, the page shrinks so that the
        budget still holds 64 pages (``budget // 64``, at least 4): budget 256 -> 4, 512 -> 8. Measured on
        SmolLM2-135M (needle, 2k/4k, budget 256): min/max digests of 16-token pages are too loose to find the
        needle (2/10); 4-token pages find it (10/10). See docs/results.md.
    dense_layers: the first layers stay dense (Quest, FreeKV, ClusterKV keep the first ones dense).
    host: the host tier: ``"ram"`` or ``"disk"`` (a memory-mapped file in ``host_dir``, default the temp dir,
        kept out of the page cache: a cold tier where recall costs I/O; see ``store.DiskHostStore``).
    """

    budget: int = 2048
    sink: int | None = None
    window: int | None = None
    page_size: int | None = None
    dense_layers: int = 2
    host: str = "ram"
    host_dir: str | None = None

    def set_defaults(self) -> None:
        if self.budget < 1:
            raise ValueError(f"{self.name}: budget must be at least 1 token, got {self.budget}")
        if self.page_size is None:
            self.page_size = max(4, min(16, 1 << max(0, (self.budget // 64).bit_length() - 1)))
        p = self.page_size
        if p < 1:
            raise ValueError(f"page_size must be >= 1, got {p}")
        auto = min(128, p * max(1, self.budget // (16 * p)))
        self.sink = auto if self.sink is None else self.sink
        self.window = auto if self.window is None else self.window
        if self.sink < 0 or self.window < 1:
            raise ValueError(f"need sink >= 0 and window >= 1, got sink={self.sink}, window={self.window}")
        if self.dense_layers < 0:
            raise ValueError(f"dense_layers must be >= 0, got {self.dense_layers}")
        if self.host not in ("ram", "disk"):
            raise ValueError(f"host must be 'ram' or 'disk', got {self.host!r}")
        if self.host_dir is not None and not os.path.isdir(self.host_dir):
            raise ValueError(f"host_dir {self.host_dir!r} is not a directory (the disk host tier keeps its file there)")

    def validate(self) -> None:
        """Paged methods: the window is extended back to a page boundary, so it may take up to p - 1 more tokens."""
        if self.sink % self.page_size:
            raise ValueError(f"sink ({self.sink}) must be a multiple of page_size ({self.page_size})")
        need = self.sink + self.window + self.page_size
        if self.budget < need:
            raise ValueError(
                f"budget {self.budget} is too small: it must cover sink ({self.sink}) + window ({self.window}) "
                f"+ one page ({self.page_size}) = {need}"
            )

    def dense_layer(self, layer_idx: int) -> bool:
        return layer_idx < self.dense_layers


def check_knob_types(cfg) -> None:
    """Raise ``ValueError`` naming the knob if a field of the dataclass ``cfg`` does not hold its annotated type
    (``int``, ``float``, ``str``, ``bool``, ``Literal``, unions with ``None``); other integers (numpy's) become
    ``int``."""
    hints = typing.get_type_hints(type(cfg))
    for field in dataclasses.fields(cfg):
        value, hint = getattr(cfg, field.name), hints[field.name]
        if not _conforms(value, hint):
            raise ValueError(f"{cfg.name}: knob {field.name} must be {_type_name(hint)}, got {value!r}")
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            setattr(cfg, field.name, int(value))


def _conforms(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint in (int, float):
        kind = numbers.Integral if hint is int else numbers.Real
        return isinstance(value, kind) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return " or ".join(repr(arg) for arg in typing.get_args(hint))
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def all_tokens(store: "HostStore", batch: int, kv_heads: int, device: torch.device) -> torch.Tensor:
    """Every stored token, ``[B, G, T]``."""
    return torch.arange(store.length, device=device).expand(batch, kv_heads, -1)


def sink_pages_window(
    store: "HostStore", cfg: SparseConfig, page_scores: "PageScorer", query: torch.Tensor, length: int | None = None
) -> torch.Tensor:
    """Sink + the best-scoring full pages between sink and window + the window, as token ids ``[B, G, k]``.

    The window starts at the page boundary at or before ``T - window`` so that no token falls between the last
    candidate page and the window; with ``T <= budget`` every token is read (exactness). ``length``: select for
    a sequence of that many tokens instead of ``store.length`` (speculative selection for the next step: its
    candidate pages are all full already).
    """
    B, H, _ = query.shape
    G = store.key_max.shape[1]
    T, p = (store.length if length is None else length), cfg.page_size
    if T <= cfg.budget:
        return torch.arange(T, device=query.device).expand(B, G, -1)
    window_start = max(cfg.sink, (T - cfg.window) // p * p)
    first, last = cfg.sink // p, window_start // p
    n_select = min(last - first, (cfg.budget - cfg.sink - (T - window_start)) // p)
    device = query.device
    parts = [torch.arange(cfg.sink, device=device).expand(B, G, -1)]
    if n_select > 0:
        scores = page_scores(query, store, first, last)  # [B, G, last - first]
        pages = scores.topk(n_select, dim=-1, sorted=False).indices + first  # [B, G, n]
        offsets = torch.arange(p, device=device)
        parts.append((pages.unsqueeze(-1) * p + offsets).flatten(2))
    parts.append(torch.arange(window_start, T, device=device).expand(B, G, -1))
    return torch.cat(parts, dim=-1)


class PageScorer(Protocol):
    def __call__(self, query: torch.Tensor, store: "HostStore", first: int, last: int) -> torch.Tensor: ...
