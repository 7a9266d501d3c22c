"""``StreamCache``: the transformers ``Cache`` of a live video stream over its ``StreamLayer``s
(``livekv.stream.memory``): the chunk each forward belongs to, the sink sealed at the first clip, and the settling of
short-term memory after each clip by the method's plan.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import Cache

from livekv.protocol import Memory
from livekv.stream.memory import Chunk, StreamLayer


class StreamCache(Cache):
    """The memory of one video stream, for a ``VideoLMAdapter``'s language model and a ``StreamMethod``.

    ``cursor`` is the position the next token gets; ``sink_end`` the first position after the sink, fixed (sealed)
    when the first clip arrives; ``long_term_packed``: long-term memory was re-packed (positions no longer those of
    arrival; every layer knows it as ``packed``)."""

    def __init__(self, adapter, method):
        self.adapter, self.method = adapter, method
        self.position_dims = adapter.position_dims
        n_layers = adapter.language_model.config.num_hidden_layers
        super().__init__(layers=[StreamLayer(i, self) for i in range(n_layers)])
        self.cursor = 0
        self.sink_end = 0
        self.sealed = False
        self._chunk: Chunk | None = None

    @property
    def long_term_packed(self) -> bool:
        return self.layers[0].packed

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return self.adapter.rope(positions, dtype)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states, self._chunk)

    @contextlib.contextmanager
    def chunk(self, chunk: Chunk):
        """Run one forward of ``chunk``'s tokens; a forward that fails leaves the memory as it was."""
        self._chunk = chunk
        try:
            yield
        except BaseException:
            if not chunk.question:
                for layer in self.layers:
                    layer.rollback(chunk)
            raise
        finally:
            self._chunk = None

    @contextlib.contextmanager
    def answering(self):
        """Questions and their answers inside: afterwards every layer drops its answer context."""
        try:
            yield
        finally:
            with torch.inference_mode():
                for layer in self.layers:
                    layer.end_answer()

    def seal_sink(self) -> None:
        """Everything in the memory so far is the sink (called when the first clip arrives)."""
        if not self.sealed:
            n_sink = self.layers[0].ctx.length if self.layers[0].is_initialized else 0
            self.sink_end = self.cursor
            for layer in self.layers:
                layer.n_sink, layer.sink_end = n_sink, self.sink_end
            self.sealed = True

    def settle(self) -> None:
        """After a clip or text: what overflows short-term memory goes where the method's plan sends it, then
        short-term memory moves to where the method says (one shift for all layers)."""
        limit, layer0 = self.method.short_term, self.layers[0]
        if not self.sealed or limit is None or layer0.n_short <= limit:
            return
        n = layer0.n_short - limit
        for layer in self.layers:
            layer.apply(self.method.settle(layer, n))
        target = self.method.short_term_start(self)
        if target is not None:
            delta = target - layer0.short_start(self.cursor)
            if delta:
                shift = torch.full((self.position_dims, 1), delta, dtype=torch.long)
                for layer in self.layers:
                    layer.shift(layer.n_sink + layer.n_long, layer.ctx.length, shift)
                self.cursor += delta

    def memory(self) -> dict[str, int]:
        """KV bytes used and reserved per tier (the fast tier with any answer context), and the tokens held."""
        total = sum((layer.memory() for layer in self.layers), Memory())
        layer0 = self.layers[0]
        tokens = 0
        if layer0.is_initialized:  # the memory's own tokens, not a question being answered in place
            tokens = layer0._undo[0] if layer0.answer is layer0.ctx else layer0.ctx.length
        return {"fast_kv_bytes": total.fast_used, "host_kv_bytes": total.host_used,
                "fast_kv_reserved_bytes": total.fast_reserved, "host_kv_reserved_bytes": total.host_reserved,
                "memory_tokens": tokens}

    def state(self) -> dict:
        return {"cursor": self.cursor, "sink_end": self.sink_end, "sealed": self.sealed}

    def load_state(self, meta: dict) -> None:
        self.cursor, self.sink_end, self.sealed = meta["cursor"], meta["sink_end"], meta["sealed"]
