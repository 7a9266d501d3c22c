"""``LiveKVCache``: a transformers ``Cache`` whose layers own a tiered KV store.

Pass it as ``past_key_values`` to ``model(...)`` or ``model.generate(...)`` of a model whose attention
implementation is ``"livekv"`` (see ``livekv.attention``). Per layer:

* ``DenseLayer`` keeps the whole KV in the fast tier and attends to all of it (method ``dense``, and the first
  ``dense_layers`` of the sparse methods).
* ``RecallableLayer`` keeps everything in the host tier; a decode step (one new token) reads only the tokens its
  method's selector picks, recalled into the fast tier. Multi-token steps (prefill, possibly chunked) attend
  densely, as in the papers.

Both track the logical sequence length themselves, so position ids stay right whatever the fast tier holds.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from livekv.attention import attend, check_not_pending, set_mask_cache, set_pending
from livekv.store import FastBuffer, ResidentSet, make_host_store

if TYPE_CHECKING:  # the methods build layers of this module
    from livekv.methods.base import MethodConfig, Selector


ONE_SEQUENCE = "A LiveKVCache holds one sequence: call cache.reset() (or make a new cache) before an unrelated prompt"


@dataclass
class LayerStats:
    """Counters of the sparse decode steps of one layer (timings only when the cache is profiled)."""

    steps: int = 0
    tokens_read: int = 0  # per KV head, summed over steps
    tokens_copied: int = 0  # (token, KV head) pairs copied from the host tier; < tokens_read * G when reused
    bytes_recalled: int = 0
    select_s: float = 0.0
    recall_s: float = 0.0
    background_s: float = 0.0  # recall work done off the critical path (speculative methods)
    waited_s: float = 0.0  # of which the critical path waited for

    @property
    def recall_hidden(self) -> float | None:
        """Share of the background recall time the critical path did not wait for (``None``: no background
        recall). It does not say the work was free: on a CPU whose cores all compute, the worker's time lengthens
        the compute instead (measured: docs/results.md, "what background work costs")."""
        return max(0.0, 1 - self.waited_s / self.background_s) if self.background_s else None


class _LiveKVLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def update(self, key_states, value_states, *args, **kwargs):
        """Called by the modeling code right before attention: store, then hand this layer to the attention."""
        self.append(key_states, value_states)
        set_pending(self)
        return key_states, value_states

    def get_max_length(self) -> int:
        return -1

    def check_positions(self, position_ids: torch.Tensor | None) -> None:
        """Without padding, the newest token of every row sits at position ``length - 1``: other positions mean the
        input does not continue the sequence stored here (e.g. a shorter, unrelated prompt given to ``generate``)."""
        if position_ids is None or position_ids.ndim != 2:
            return
        last = self.get_seq_length() - 1
        if not bool((position_ids[:, -1] == last).all()):
            raise ValueError(
                f"the input's positions end at {position_ids[:, -1].tolist()}, but this cache now holds {last + 1} "
                f"tokens: the input does not continue the sequence it holds. {ONE_SEQUENCE}")

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row ``b`` becomes what row ``beam_idx[b]`` was."""
        if self.is_initialized:
            self.select_rows(beam_idx)

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("livekv caches do not support cropping or batch re-indexing (assisted or "
                                  "contrastive decoding); greedy, sampling and beam search work")

    crop = batch_repeat_interleave = batch_select_indices = _unsupported


class DenseLayer(_LiveKVLayer):
    """The whole KV in the fast tier, ``[B, G, T, D]`` (a growable buffer, not a concat per step)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, G, _, D = key_states.shape
        self.fast = FastBuffer(B, G, D, key_states.dtype, key_states.device)
        self.is_initialized = True

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store ``[B, G, n, D]`` keys (post-RoPE) and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.fast.append(key_states, value_states)
        self.keys, self.values = self.fast.view()

    def get_seq_length(self) -> int:
        return self.fast.length if self.is_initialized else 0

    def attend(self, query, key_new, value_new, mask, scaling) -> torch.Tensor:
        keys, values = self.fast.view()
        return attend(query, keys, values, scaling, mask)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.fast.select_rows(rows)
        self.keys, self.values = self.fast.view()

    def nbytes(self) -> tuple[int, int]:
        """(fast-tier bytes, host-tier bytes)."""
        return (self.fast.nbytes if self.is_initialized else 0), 0


class RecallableLayer(_LiveKVLayer):
    """Everything in the host tier; decode steps read ``selector``'s tokens, recalled into the fast tier."""

    background = False  # whether the layer recalls on a worker thread, off the critical path

    def __init__(
        self,
        layer_idx: int,
        selector: Selector,
        page_size: int,
        digests: bool = True,
        reuse: bool = False,
        host: str = "ram",
        host_dir: str | None = None,
    ):
        super().__init__(layer_idx)
        self.selector = selector
        self.page_size = page_size
        self.digests = digests
        self.reuse = reuse  # keep recalled tokens resident across steps, copy only the missing ones
        self.host_kind, self.host_dir = host, host_dir  # see store.make_host_store
        self.stats = LayerStats()
        self.profile = False
        # Called after each sparse step as observer(layer, query [B,H,D], token_idx [B,G,k], output [B,1,H,D]).
        self.observers: list[Callable] = []

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, G, _, D = key_states.shape
        dtype, device = key_states.dtype, key_states.device
        self.host = make_host_store(
            self.host_kind, B, G, D, self.page_size, dtype, device, digests=self.digests, directory=self.host_dir
        )
        self.fast = FastBuffer(B, G, D, dtype, device)
        self.resident = ResidentSet(B, G, D, dtype, device) if self.reuse else None
        self.is_initialized = True

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store ``[B, G, n, D]`` keys (post-RoPE) and values in the host tier."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.host.append(key_states, value_states)

    def get_seq_length(self) -> int:
        return self.host.length if self.is_initialized else 0

    def wait(self) -> None:
        """Finish this layer's background work (methods that recall in the background override this)."""

    def attend(self, query, key_new, value_new, mask, scaling) -> torch.Tensor:
        n = query.shape[2]
        if n > 1:  # prefill: dense over everything stored
            if self.host.length == n:
                keys, values = key_new, value_new
            else:
                keys, values = self.host.all_tokens()
            return attend(query, keys, values, scaling, mask)

        t0 = self._clock()
        q = query[:, :, 0]
        token_idx = self.selector.select(q, self.host)  # [B, G, k]
        t1 = self._clock()
        keys, values, columns, copied = self.recall(token_idx)
        t2 = self._clock()
        out = attend(query, keys, values, scaling, self._step_mask(mask, columns))
        self._count(token_idx, copied, t1 - t0, t2 - t1)
        for observer in self.observers:
            observer(self, q, token_idx, out)
        return out

    def recall(self, token_idx: torch.Tensor):
        """Bring ``token_idx [B, G, k]`` into the fast tier. Returns keys, values ``[B, G, S, D]``, the logical
        token of each of the S columns (-1: a stale slot, not to be read) and the number of tokens copied."""
        if self.resident is None:
            keys, values = self.host.gather(token_idx, out=self.fast.reserve(token_idx.shape[-1]))
            return keys, values, token_idx, token_idx.numel()
        keys, values, valid, copied = self.resident.recall(self.host, token_idx)
        columns = self.resident.token if valid is None else self.resident.token.masked_fill(~valid, -1)
        return keys, values, columns, copied

    @staticmethod
    def _step_mask(mask: torch.Tensor | None, columns: torch.Tensor) -> torch.Tensor | None:
        """The decode step's mask ``[B, G, 1, S]`` over the recalled columns: stale slots and, with padding,
        padded positions (transformers' mask is over logical positions) are masked out."""
        stale = columns < 0
        if mask is None and not bool(stale.any()):
            return None
        B, G, S = columns.shape
        visible = ~stale
        if mask is not None:
            visible &= mask[:, :, -1:].expand(B, G, 1, -1).gather(-1, columns.clamp(min=0).unsqueeze(2))[:, :, 0]
        return visible.unsqueeze(2)

    def _count(self, token_idx: torch.Tensor, copied: int, select_s: float, recall_s: float) -> None:
        s = self.stats
        s.steps += 1
        s.tokens_read += token_idx.shape[-1]
        s.tokens_copied += copied
        s.bytes_recalled += copied * self.token_bytes
        s.select_s += select_s
        s.recall_s += recall_s

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's key and value (one KV head)."""
        return 2 * self.host.pages.shape[-1] * self.host.pages.element_size()

    def select_rows(self, rows: torch.Tensor) -> None:
        """Row ``b`` of every per-row state becomes row ``rows[b]`` (beam search)."""
        self.wait()
        self.host.select_rows(rows)
        if self.resident is not None:
            self.resident.select_rows(rows)
        if hasattr(self.selector, "select_rows"):
            self.selector.select_rows(rows)

    def _clock(self) -> float:
        if not self.profile:
            return 0.0
        if self.host.device.type == "cuda":
            torch.cuda.synchronize(self.host.device)
        return time.perf_counter()

    def nbytes(self) -> tuple[int, int]:
        if not self.is_initialized:
            return 0, 0
        resident = self.resident.nbytes if self.resident is not None else 0
        index = getattr(self.selector, "nbytes", 0)  # a selector's own fast-tier state (e.g. a cluster index)
        return self.fast.nbytes + resident + self.host.digest_nbytes + index, self.host.nbytes


class LiveKVCache(Cache):
    """A KV cache whose sparse layers recall a query-dependent subset of the KV for each decode step.

    Args:
        config: the model's config (its text config is used).
        method: a registered method name (``dense``, ``sink_window``, ``quest``, ...) or a ``MethodConfig``.
        **knobs: the method's knobs (``budget``, ``sink``, ``window``, ``page_size``, ``dense_layers``, ...).

    Example::

        cache = LiveKVCache(model.config, "quest", budget=256)
        model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
    """

    def __init__(self, config, method: str | MethodConfig = "quest", **knobs):
        from livekv.methods import make_method  # the registry imports methods that build on this module

        self.method = make_method(method, **knobs)
        n_layers = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[self.method.make_layer(i) for i in range(n_layers)])

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """Asked once per forward, before any layer runs: the place to check the previous forward ended well and
        to let the mask function check this forward's attention mask against the cache."""
        check_not_pending()
        if query_length < 1:
            raise ValueError(
                f"no new tokens for a cache that holds {self.get_seq_length()}: the input does not continue the "
                f"sequence it holds. {ONE_SEQUENCE}")
        set_mask_cache(self)
        return super().get_mask_sizes(query_length, layer_idx)

    def check_attention_mask(self, attention_mask: torch.Tensor, kv_length: int) -> None:
        """The 2-D ``attention_mask [B, L]`` of a forward that makes the sequence ``kv_length`` tokens long must
        cover exactly those tokens; sparse methods take no padding (they select tokens by position)."""
        cached = self.get_seq_length()
        if attention_mask.shape[-1] != kv_length:
            raise ValueError(
                f"the attention mask covers {attention_mask.shape[-1]} tokens, but the cache holds {cached} and the "
                f"input adds {kv_length - cached}: the input does not continue the sequence this cache holds. {ONE_SEQUENCE}")
        if self.method.name != "dense" and not bool(attention_mask.all()):
            raise ValueError(
                f"padded batches are not supported by {self.method.name!r}: sparse methods select tokens by "
                "position, and padding would take their places. Run the prompts one at a time (or in batches of "
                "equal length), or use method 'dense'")

    def reset(self) -> None:
        """Forget everything stored (same method and knobs): the cache can take an unrelated sequence."""
        self.wait()
        self.layers = [self.method.make_layer(i) for i in range(len(self.layers))]

    @property
    def recallable_layers(self) -> list[RecallableLayer]:
        return [layer for layer in self.layers if isinstance(layer, RecallableLayer)]

    def wait(self) -> None:
        """Finish every layer's background work (e.g. before stopping a clock)."""
        for layer in self.recallable_layers:
            layer.wait()

    def set_profile(self, on: bool = True) -> None:
        """Time selection and recall of every sparse step (synchronising the GPU; slows decoding slightly)."""
        for layer in self.recallable_layers:
            layer.profile = on

    def memory(self) -> dict[str, int]:
        """KV bytes resident in the fast tier (incl. digests) and in the host tier."""
        fast = host = 0
        for layer in self.layers:
            f, h = layer.nbytes()
            fast, host = fast + f, host + h
        return {"fast_kv_bytes": fast, "host_kv_bytes": host}

    def stats(self) -> dict[str, float]:
        """Totals of the sparse decode steps over all recallable layers."""
        layers = self.recallable_layers
        total = LayerStats()
        for layer in layers:
            for field in dataclasses.fields(LayerStats):
                setattr(total, field.name, getattr(total, field.name) + getattr(layer.stats, field.name))
        return {**total.__dict__, "recall_hidden": total.recall_hidden, "recallable_layers": len(layers)}
