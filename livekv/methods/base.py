"""What every method shares: a config dataclass whose fields are its knobs, checked on construction.

A method runs in a text cache (``LiveKVCache``: it builds each layer, ``make_layer``), in a video stream's memory
(``StreamSession``: it plans what each chunk leaves in memory and what a question reads, ``StreamMethod``), or in
both. Each knob is a dataclass field whose metadata holds its help text; the CLI and the server build their options
from them. "Budget" counts the tokens attention reads per KV head, sink and window included.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from livekv.layers import DenseLayer, RecallableLayer

if TYPE_CHECKING:
    from livekv.protocol import Plan, Recall, Selector


def knob(default, help: str, **kwargs):
    """A method knob: a dataclass field with its help text (shown by ``livekv methods`` and the CLI)."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


@dataclass(kw_only=True)
class MethodConfig:
    """Base of every method's config. ``name`` is the registry key; ``contexts`` says where the method runs:
    ``"text"`` (a ``LiveKVCache``) and/or ``"stream"`` (a ``StreamSession``)."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    contexts: ClassVar[tuple[str, ...]] = ("text",)
    uses_digests: ClassVar[bool] = True  # whether the selector reads the host tier's min/max page digests
    digest_bits: ClassVar[int] = 32  # their width (store.PageDigests); quest's is a knob
    reuse_resident: ClassVar[bool] = False  # keep recalled tokens in the fast tier across steps (copy only new ones)
    kv_bits: ClassVar[int] = 16  # dense layers' fast tier: the KV's dtype (16) or int8 (8); a knob of dense and the sparse methods

    def __post_init__(self):
        check_knob_types(self)
        self.set_defaults()
        self.validate()

    def set_defaults(self) -> None:
        """Fill the knobs left ``None`` that do not depend on a model (after their types were checked)."""

    def validate(self) -> None:
        """Raise ``ValueError`` for knobs that do not fit together."""

    # --- text ---------------------------------------------------------------------------------------------------
    def dense_layer(self, layer_idx: int) -> bool:
        """True if layer ``layer_idx`` keeps its whole KV in the fast tier and attends densely."""
        return True

    def make_selector(self, layer_idx: int) -> Selector | None:
        return None

    def make_layer(self, layer_idx: int):
        """The cache layer of ``layer_idx``: dense, or recallable with this method's selector. Methods that need
        their own decode step (e.g. speculative recall) override this."""
        if self.dense_layer(layer_idx):
            return DenseLayer(layer_idx, self.kv_bits)
        return RecallableLayer(layer_idx, self.make_selector(layer_idx), self.page_size, **self.tier_options())

    def tier_options(self) -> dict:
        """A recallable layer's tier knobs (for ``RecallableLayer``; a method's own layer passes them on too)."""
        return dict(digests=self.uses_digests, digest_bits=self.digest_bits, reuse=self.reuse_resident,
                    host=self.host, host_dir=self.host_dir, host_bits=self.host_bits)


@dataclass(kw_only=True)
class StreamMethod(MethodConfig):
    """A method of a video stream's memory. Per layer the memory is ``[sink | long-term | short-term]``; after each
    chunk, when short-term memory holds more than ``short_term`` tokens, the method plans what the overflow
    becomes (``settle``: dropped, offloaded to the host tier, or kept as long-term memory, compressed); a question
    reads what ``recall`` says. Methods never change a layer: the layer applies their plans.

    Knobs left ``None`` are set by ``resolve`` for the model the session runs: each method owns its rule for a
    fast-tier memory of about ``memory_tokens`` tokens per layer (``StreamSession`` takes it from the model).
    """

    contexts: ClassVar[tuple[str, ...]] = ("stream",)
    vsb_rows: ClassVar[int] = 0  # > 0: the last r visual queries of each clip score the memory (livevlm)
    short_term: int | None = knob(None, "tokens of the newest clips kept uncompressed (default: from the memory)")

    def resolve(self, memory_tokens: int, tokens_per_frame: float) -> None:
        """Fill the knobs left ``None`` for a memory of about ``memory_tokens`` tokens per layer (a frame adds about
        ``tokens_per_frame``), then check the stream knobs fit together (``ValueError``)."""
        self.validate_stream()

    def validate_stream(self) -> None:
        if self.short_term is not None and self.short_term < 1:
            raise ValueError(f"{self.name}: short_term must be >= 1 token, got {self.short_term}")
        if self.kv_bits != 16:
            raise ValueError(f"{self.name}: kv_bits=8 is for text caches; a stream's memory keeps the KV's dtype")

    def settle(self, layer, n: int) -> Plan:
        """What becomes of the ``n`` oldest short-term tokens of ``layer`` (a ``StreamLayer``, read only)."""
        raise NotImplementedError(f"{self.name} keeps everything: nothing overflows")

    def short_term_start(self, cache) -> int | None:
        """The position short-term memory moves to after a chunk (``None``: it stays): keeps positions bounded."""
        return None

    def recall(self, layer, queries, scaling: float) -> Recall | None:
        """What a question reads of ``layer``, given its queries without rotary positions ``[H, m, D]`` (``None``:
        the whole memory, in place)."""
        return None


@dataclass(kw_only=True)
class HostTier:
    """The host tier's knobs, for methods that keep tokens there."""

    host: str = knob("ram", "the host tier: 'ram', or 'disk' (a memory-mapped file kept out of the page cache)")
    host_dir: str | None = knob(None, "directory of the disk host tier (default: the temp dir)")
    host_bits: int = knob(16, "bits per KV element in the host tier: 16 keeps the KV's own dtype (exact); 8 or 4 "
                              "quantize it (keys per channel in groups of 32 tokens, values per token; KIVI)")

    def check_host(self) -> None:
        if self.host not in ("ram", "disk"):
            raise ValueError(f"host must be 'ram' or 'disk', got {self.host!r}")
        if self.host_bits not in (16, 8, 4):
            raise ValueError(f"host_bits must be 16 (exact), 8 or 4, got {self.host_bits}")
        if self.host_dir is not None and not os.path.isdir(self.host_dir):
            raise ValueError(f"host_dir {self.host_dir!r} is not a directory (the disk host tier keeps its file there)")


@dataclass(kw_only=True)
class DenseKV:
    """The knob of the KV that dense layers keep in the fast tier (dense's every layer; the sparse methods' first
    ``dense_layers``)."""

    kv_bits: int = knob(16, "dense layers' KV in the model's dtype (16) or int8 per token (8: a quarter of float32's "
                            "bytes, attended from the codes on a CPU; text only)")

    def check_kv_bits(self) -> None:
        if self.kv_bits not in (16, 8):
            raise ValueError(f"{self.name}: kv_bits must be 16 (the KV's dtype) or 8, got {self.kv_bits}")


@dataclass(kw_only=True)
class SparseConfig(DenseKV, HostTier, MethodConfig):
    """Knobs shared by the sparse text methods. ``sink`` and ``window`` left ``None`` scale with the budget:
    ``min(128, page_size * max(1, budget // (16 * page_size)))`` each, so that at small budgets most of the budget
    is left to selection (budget 256: sink 16, window 16). ``page_size`` left ``None`` (``default_page_size``):
    Quest's 16 from budget 1024 up; below, the page shrinks so that the budget still holds 64 pages (``budget //
    64``, at least 4): at budget 256 min/max digests of 16-token pages were too loose to find a needle
    (docs/results.md). Quest and FreeKV shrink it further (their ``budget_pages``)."""

    budget: int = knob(2048, "tokens read per KV head per decode step (sink + selected + window)")
    sink: int | None = knob(None, "the first tokens, always read (default: from the budget)")
    window: int | None = knob(None, "the most recent tokens, always read (default: from the budget)")
    page_size: int | None = knob(None, "tokens per page of the host tier")
    dense_layers: int = knob(2, "the first N layers stay dense")

    def default_page_size(self) -> int:
        """``page_size`` left ``None``: 16 from budget 1024 up, below ``budget // 64`` (a power of 2, at least 4)."""
        return max(4, min(16, 1 << max(0, (self.budget // 64).bit_length() - 1)))

    def set_defaults(self) -> None:
        if self.budget < 1:
            raise ValueError(f"{self.name}: budget must be at least 1 token, got {self.budget}")
        if self.page_size is None:
            self.page_size = self.default_page_size()
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
        self.check_kv_bits()
        self.check_host()

    def validate(self) -> None:
        """Paged methods: the window is extended back to a page boundary, so it may take up to p - 1 more tokens."""
        if self.sink % self.page_size:
            raise ValueError(f"sink ({self.sink}) must be a multiple of page_size ({self.page_size})")
        need = self.sink + self.window + self.page_size
        if self.budget < need:
            raise ValueError(f"budget {self.budget} is too small: it must cover sink ({self.sink}) + window "
                             f"({self.window}) + one page ({self.page_size}) = {need}")

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
