"""The cache layer protocol, and the two layers of a text cache (the protocol's types: ``livekv.protocol``).

A layer holds the KV of one attention layer. transformers calls ``update(keys, values)`` right before attention; a
livekv layer stores the new tokens and hands itself to livekv's attention function (``livekv.attention``), which
calls ``attend``. Every layer (``DenseLayer``, ``RecallableLayer`` here, ``StreamLayer`` in ``livekv.stream.memory``)
implements:

    append(keys, values)                        store new post-RoPE keys and values, [B, G, n, D] each
    attend(query, key_new, value_new, mask, scaling) -> [B, n, H, D]
                                                query [B, H, n, D]; the newest n tokens attend
    get_seq_length() -> int                     the logical sequence length, tracked by the layer itself
    memory() -> Memory                          bytes used (what the content needs) and reserved, per tier
    state() -> (tensors, meta)                  what a snapshot saves; load_state(tensors, meta) restores it
    select_rows(rows)                           beam search: row b becomes row rows[b]

B batch, G KV heads, H query heads, n new tokens, D head dim.

* ``DenseLayer`` keeps the whole KV in the fast tier and attends to all of it (method ``dense``, and the first
  ``dense_layers`` of the sparse methods).
* ``RecallableLayer`` keeps everything in the host tier; a decode step (one new token) reads only the tokens its
  method's selector picks, recalled into the fast tier. Multi-token steps (prefill, possibly chunked) attend
  densely, as in the papers.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from livekv.attention import attend, set_pending
from livekv.slots import ResidentSet
from livekv.disk import make_host_store, state_layout
from livekv.int8kv import Int8KV
from livekv.protocol import LayerStats, Memory, Selector
from livekv.store import FastBuffer


class Layer(CacheLayerMixin):
    """Base of every livekv layer: transformers' side of the protocol (see the module docstring)."""

    is_sliding = False

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def update(self, key_states, value_states, *args, **kwargs):
        """Called by the modeling code right before attention: store, then hand this layer to the attention. Stored
        detached: a cache keeps no autograd graph (nor could background recalls write tensors that require grad)."""
        if key_states.requires_grad:
            warnings.warn("a LiveKVCache keeps no gradient: keys and values are stored detached (livekv is for "
                          "inference; run it under torch.no_grad() or inference_mode())", stacklevel=3)
            key_states, value_states = key_states.detach(), value_states.detach()
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
            raise ValueError(f"the input's positions end at {position_ids[:, -1].tolist()}, but this cache now holds "
                             f"{last + 1} tokens: the input does not continue the sequence it holds. {ONE_SEQUENCE}")

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row ``b`` becomes what row ``beam_idx[b]`` was."""
        if self.is_initialized:
            self.select_rows(beam_idx)

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("livekv caches do not support cropping or batch re-indexing (assisted or "
                                  "contrastive decoding); greedy, sampling and beam search work")

    crop = batch_repeat_interleave = batch_select_indices = _unsupported

    def wait(self) -> None:
        """Finish this layer's background work (layers that recall in the background override this)."""

    def settle(self) -> None:
        """Let background work in flight finish before a reading of figures (``wait`` ends a decode step's)."""


ONE_SEQUENCE = "A LiveKVCache holds one sequence: call cache.reset() (or make a new cache) before an unrelated prompt"


class DenseLayer(Layer):
    """The whole KV in the fast tier, ``[B, G, T, D]`` (a growable buffer, not a concat per step); with
    ``kv_bits=8`` in int8 (``livekv.int8kv``), attended from the codes."""

    def __init__(self, layer_idx: int, kv_bits: int = 16):
        super().__init__(layer_idx)
        self.kv_bits = kv_bits

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, G, _, D = key_states.shape
        kind = Int8KV if self.kv_bits == 8 else FastBuffer
        self.fast = kind(B, G, D, key_states.dtype, key_states.device)
        self.is_initialized = True

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.fast.append(key_states, value_states)
        self._expose()

    def _expose(self) -> None:
        """transformers' ``keys``/``values`` attributes: the buffer's valid part (int8 codes are not exposed)."""
        if self.kv_bits == 16:
            self.keys, self.values = self.fast.view()

    def get_seq_length(self) -> int:
        return self.fast.length if self.is_initialized else 0

    def attend(self, query, key_new, value_new, mask, scaling) -> torch.Tensor:
        return self.fast.attend(query, scaling, mask)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.fast.select_rows(rows)
        self._expose()

    def memory(self) -> Memory:
        return Memory(self.fast.used, self.fast.nbytes) if self.is_initialized else Memory()

    def state(self) -> tuple[dict, dict]:
        if not self.is_initialized:
            return {}, {}
        return self.fast.state(), ({"dtype": str(self.fast.dtype).removeprefix("torch.")} if self.kv_bits == 8 else {})

    def load_state(self, tensors: dict, meta: dict, device: torch.device | str = "cpu") -> None:
        if not tensors:
            return
        if ("key_codes" in tensors) != (self.kv_bits == 8):
            raise ValueError(f"this dense layer keeps its KV in {self.kv_bits} bits; the snapshot's layer does not")
        if self.kv_bits == 8:
            self.fast = Int8KV.from_state(tensors, getattr(torch, meta["dtype"]), device)
        else:
            self.fast = FastBuffer.from_state(tensors, device)
        self._expose()
        self.is_initialized = True


class RecallableLayer(Layer):
    """Everything in the host tier; decode steps read ``selector``'s tokens, recalled into the fast tier."""

    background = False  # whether the layer recalls on a worker thread, off the critical path

    def __init__(self, layer_idx: int, selector: Selector, page_size: int, digests: bool = True, reuse: bool = False,
                 host: str = "ram", host_dir: str | None = None, host_bits: int = 16, digest_bits: int = 32):
        super().__init__(layer_idx)
        self.selector = selector
        self.page_size = page_size
        self.digests, self.digest_bits = digests, digest_bits  # see store.PageDigests
        self.reuse = reuse  # keep recalled tokens resident across steps, copy only the missing ones
        self.host_kind, self.host_dir, self.host_bits = host, host_dir, host_bits  # see disk.make_host_store
        self.stats = LayerStats()
        self.profile = False
        # Called after each sparse step as observer(layer, query [B,H,D], token_idx [B,G,k], output [B,1,H,D]).
        self.observers: list[Callable] = []

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, G, _, D = key_states.shape
        self._make_tiers(B, G, D, key_states.dtype, key_states.device)

    def _make_tiers(self, B: int, G: int, D: int, dtype: torch.dtype, device: torch.device) -> None:
        self.host = make_host_store(self.host_kind, B, G, D, self.page_size, dtype, device, digests=self.digests,
                                    digest_bits=self.digest_bits, directory=self.host_dir, bits=self.host_bits)
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

    def attend(self, query, key_new, value_new, mask, scaling) -> torch.Tensor:
        n = query.shape[2]
        if n > 1:  # prefill: dense over everything stored
            keys, values = (key_new, value_new) if self.host.length == n else self.host.all_tokens()
            return attend(query, keys, values, scaling, mask)
        t0 = self._clock()
        q = query[:, :, 0]
        token_idx = self.selector.select(q, self.host)  # [B, G, k]
        t1 = self._clock()
        keys, values, columns, copied = self.recall(token_idx)
        t2 = self._clock()
        plain = mask is None and self.resident is None  # every column is a selected token: nothing to mask
        out = attend(query, keys, values, scaling, None if plain else self._step_mask(mask, columns))
        self._count(token_idx, copied, t1 - t0, t2 - t1)
        for observer in self.observers:
            observer(self, q, token_idx, out)
        return out

    def recall(self, token_idx: torch.Tensor):
        """Bring ``token_idx [B, G, k]`` into the fast tier. Returns keys, values ``[B, G, S, D]``, the logical
        token of each of the S columns (-1: a stale slot, not to be read) and the number of tokens copied."""
        if self.resident is None:
            if self.host.device.type == "cpu":  # one memory: copying the gather into the buffer would only cost
                keys, values = self.fast.hold(*self.host.gather(token_idx))
            else:
                keys, values = self.host.gather(token_idx, out=self.fast.reserve(token_idx.shape[-1]))
            return keys, values, token_idx, token_idx.numel()
        keys, values, valid, copied = self.resident.recall(self.host, token_idx)
        columns = self.resident.token if valid is None else self.resident.token.masked_fill(~valid, -1)
        return keys, values, columns, copied

    @staticmethod
    def _step_mask(mask: torch.Tensor | None, columns: torch.Tensor) -> torch.Tensor | None:
        """The decode step's mask ``[B, G, 1, S]`` over the recalled columns: stale slots are masked out (and, with
        a mask over logical positions, what it masks)."""
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
        return self.host.token_bytes

    def _clock(self) -> float:
        if not self.profile:
            return 0.0
        if self.host.device.type == "cuda":
            torch.cuda.synchronize(self.host.device)
        return time.perf_counter()

    def select_rows(self, rows: torch.Tensor) -> None:
        """Row ``b`` of every per-row state becomes row ``rows[b]`` (beam search)."""
        self.wait()
        self.host.select_rows(rows)
        if self.resident is not None:
            self.resident.select_rows(rows)
        if hasattr(self.selector, "select_rows"):
            self.selector.select_rows(rows)

    def memory(self) -> Memory:
        """Fast tier: the recall buffer (and resident slots), page digests, a selector's own index; host: pages."""
        if not self.is_initialized:
            return Memory()
        fast = [self.fast, self.resident, self.host.digest_memory(), getattr(self.selector, "memory", None)]
        used = sum(part.used for part in fast if part is not None)
        reserved = sum(part.nbytes for part in fast if part is not None)
        return Memory(used, reserved, self.host.used, self.host.nbytes)

    def state(self) -> tuple[dict, dict]:
        """Host pages and digests, resident slots, the selector's index and the counters."""
        self.wait()
        if not self.is_initialized:
            return {}, {}
        tensors = {f"host.{k}": v for k, v in self.host.state().items()}
        if self.resident is not None:
            tensors.update({f"resident.{k}": v for k, v in self.resident.state().items()})
        selector_tensors, selector_meta = self.selector.state() if hasattr(self.selector, "state") else ({}, {})
        tensors.update({f"selector.{k}": v for k, v in selector_tensors.items()})
        return tensors, {"host_length": self.host.length, "selector": selector_meta,
                         "stats": dataclasses.asdict(self.stats)}

    def load_state(self, tensors: dict, meta: dict, device: torch.device | str = "cpu") -> None:
        if not tensors:
            return
        part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        self._make_tiers(*state_layout(part("host.")), torch.device(device))
        self.host.load_state(part("host."), meta["host_length"])
        if self.resident is not None:
            self.resident.load_state(part("resident."))  # onto the fast tier's device
        if hasattr(self.selector, "load_state"):
            self.selector.load_state(part("selector."), meta["selector"], device)
        self.stats = LayerStats(**meta["stats"])
