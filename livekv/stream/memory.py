"""The stream memory: a transformers ``Cache`` for a live video stream, shaped by a streaming method.

Per layer the fast tier holds one contiguous context, in temporal order::

    [ sink (system prompt) | long-term memory | short-term memory (newest tokens, uncompressed) ]

Keys are stored post-RoPE at the positions they hold *in the memory* (``pos``, ``[P, N]``), not at their
arrival time: when tokens leave, the rest is re-positioned (keys rotated by the position delta), so positions
stay bounded however long the stream runs. The layout of positions:

* the sink keeps its positions ``[0, sink_end)``;
* short-term memory keeps its internal positions (for Qwen2-VL its 3-D grid) and is shifted as a whole when
  the method says so (a uniform shift changes no relative position inside it);
* long-term memory is method-specific (see ``livekv.stream.methods``): dropped (``sink_window``), offloaded to
  the host tier (``rekv``), or kept and compressed, re-packed 1-D right before short-term memory (``livevlm``).

A clip is prefilled attending to the whole context (plus itself, causally). A question is answered over an
*answer context* the method builds from the memory with the question's queries (retrieval), to which the
question and answer tokens are appended; afterwards the memory is exactly as before the question.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from livekv.attention import attend, set_pending
from livekv.cache import _LiveKVLayer
from livekv.store import FastBuffer


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., n, D]`` by RoPE angles ``cos, sin [n, D]`` (or ``[1, D]``, broadcast)."""
    return x * cos + rotate_half(x) * sin


def received_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float,
                       seen: torch.Tensor | None = None) -> torch.Tensor:
    """The mean attention ``[N]`` keys ``[G, N, D]`` receive from queries ``[H, r, D]`` (softmax per head and
    query, then the mean over all of them). ``seen [H / G * r]``: how many keys each query of a KV head's group
    sees (the first ones; ``None``: all)."""
    H, r, D = queries.shape
    G, N = keys.shape[0], keys.shape[1]
    logits = (queries.reshape(G, H // G * r, D) @ keys.transpose(1, 2)).float() * scaling  # [G, H/G * r, N]
    if seen is not None:
        logits.masked_fill_(torch.arange(N, device=keys.device) >= seen[:, None], float("-inf"))
    return logits.softmax(-1).mean(dim=(0, 1))


class StreamLayer(_LiveKVLayer):
    """One layer's stream memory. ``ctx`` keys/values ``[1, G, N, D]`` (fast tier), ``pos [P, N]`` their positions,
    ``frame [N]`` the stream frame of each token (-1: text). ``n_sink`` and ``n_long`` count the first two regions
    of ``ctx``; the rest is short-term memory. ``host`` holds what a method offloaded (``rekv``)."""

    def __init__(self, layer_idx: int, cache: StreamCache):
        super().__init__(layer_idx)
        self.cache = cache
        self.n_long = 0
        self.scores: torch.Tensor | None = None  # [N]: attention each token received from the last scoring rows
        self.answer: FastBuffer | None = None  # the answer context while a question is answered
        self.host = None  # what a method offloaded to the host tier (an object with ``nbytes``), e.g. rekv's frames
        self._new: tuple[torch.Tensor, torch.Tensor] | None = None
        self._undo, self._undo_scores = 0, None  # what to restore if the current chunk fails

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, G, _, D = key_states.shape
        if B != 1:
            raise ValueError(f"a stream memory holds one stream (batch 1), got batch {B}")
        self.ctx = FastBuffer(1, G, D, key_states.dtype, key_states.device)
        P = self.cache.position_dims
        self.pos = torch.empty(P, 0, dtype=torch.long)
        self.frame = torch.empty(0, dtype=torch.long)
        self.is_initialized = True

    # --- transformers' side -----------------------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._new = (key_states, value_states)
        set_pending(self)
        return key_states, value_states

    def check_positions(self, position_ids) -> None:
        """Stream positions are the memory's own (``pos``), not the count of tokens held."""

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.answer.length if self.answer is not None else self.ctx.length

    def attend(self, query, key_new, value_new, mask, scaling) -> torch.Tensor:
        """Attention of the newest tokens; ``mask`` is ignored: one stream, no padding, causal by construction."""
        cache = self.cache
        k, v = self._new
        self._new = None
        if cache.answering:
            if self.answer is None:
                built = cache.method.answer_context(self, query, scaling)
                self.answer = self.ctx if built is None else built  # None: read the memory in place
                self._undo, self._undo_capacity = self.ctx.length, self.ctx.capacity
            self.answer.append(k, v)
            keys, values = self.answer.view()
            return attend(query, keys, values, scaling)
        self._undo, self._undo_scores = self.ctx.length, self.scores
        self.ctx.append(k, v)
        self.pos = torch.cat([self.pos, cache.chunk_positions], dim=1)
        self.frame = torch.cat([self.frame, cache.chunk_frames])
        keys, values = self.ctx.view()
        if cache.score_rows is not None:
            self.scores = self._received_attention(query, keys, cache.score_rows, scaling)
        return attend(query, keys, values, scaling)

    @staticmethod
    def _received_attention(query, keys, rows: torch.Tensor, scaling: float) -> torch.Tensor:
        """Mean attention ``[N]`` the keys receive from the query rows ``rows`` of the chunk (softmax per head and
        row, causal, then the mean over heads and rows): Vision Sink Bucketing's token scores."""
        _, H, n, D = query.shape
        G, N = keys.shape[1], keys.shape[2]
        seen = (N - n + rows + 1).repeat(H // G)  # each row sees the keys before it and itself
        return received_attention(query[0, :, rows], keys[0], scaling, seen)

    # --- the stream side: called by the cache -----------------------------------------------------------------
    def rollback(self) -> None:
        """Undo the last chunk (its forward failed part-way)."""
        if self.is_initialized and self.ctx.length > self._undo:
            self.ctx.length = self._undo
            self.pos, self.frame = self.pos[:, : self._undo], self.frame[: self._undo]
            self.scores = self._undo_scores

    @property
    def n_sink(self) -> int:
        return self.cache.n_sink

    @property
    def n_short(self) -> int:
        return self.ctx.length - self.n_sink - self.n_long

    def short_start(self) -> int:
        """The lowest position in short-term memory (the cursor if it is empty)."""
        first = self.n_sink + self.n_long
        return int(self.pos[:, first:].min()) if self.ctx.length > first else self.cache.cursor

    def keep(self, idx: torch.Tensor, n_long: int) -> None:
        """Keep only the ctx tokens ``idx [n]`` (ascending), of which the first ``n_long`` after the sink are long-term."""
        if self.scores is not None and self.scores.shape[0] == self.ctx.length:
            self.scores = self.scores[idx]
        self.ctx.compact(idx)
        self.pos, self.frame = self.pos[:, idx], self.frame[idx]
        self.n_long = n_long

    def shift(self, start: int, stop: int, delta: torch.Tensor) -> None:
        """Move the ctx tokens ``[start, stop)`` by ``delta`` positions, ``[P, stop - start]`` or ``[P, 1]`` (one shift
        for all): their keys are rotated by the delta."""
        if stop <= start or not bool(delta.any()):
            return
        if delta.shape[1] == 1:
            keys = self.ctx.keys[:, :, start:stop]
            cos, sin = self.cache.rope(delta, keys.dtype)
            keys.copy_(rotate(keys, cos, sin))
            self.pos[:, start:stop] += delta
            return
        # per-token deltas: rotate only the tokens that move, with the angles of each distinct delta computed once
        cols = delta.any(dim=0).nonzero()[:, 0]
        distinct, which = torch.unique(delta[:, cols], dim=1, return_inverse=True)
        cos, sin = self.cache.rope(distinct, self.ctx.keys.dtype)
        idx = (start + cols).to(self.ctx.keys.device)
        keys = self.ctx.keys.index_select(2, idx)
        self.ctx.keys.index_copy_(2, idx, rotate(keys, cos[which], sin[which]))
        self.pos[:, start + cols] += delta[:, cols]

    def unrotated(self, start: int, stop: int) -> torch.Tensor:
        """Keys of ctx tokens ``[start, stop)`` without their rotary position (pre-RoPE), ``[1, G, n, D]``."""
        cos, sin = self.cache.rope(-self.pos[:, start:stop], self.ctx.keys.dtype)
        return rotate(self.ctx.keys[:, :, start:stop], cos, sin)

    def nbytes(self) -> tuple[int, int]:
        if not self.is_initialized:
            return 0, 0
        separate = self.answer is not None and self.answer is not self.ctx
        fast = self.ctx.nbytes + (self.answer.nbytes if separate else 0)
        return fast, self.host.nbytes if self.host is not None else 0


class StreamCache(Cache):
    """The stream memory of one video stream, for a ``VideoLMAdapter``'s language model.

    The session drives it: ``begin_chunk`` before each forward (positions, frames, scoring rows), ``settle`` after
    it (the method moves what left short-term memory), ``begin_answer``/``end_answer`` around a question.
    ``cursor`` is the position the next token gets.
    """

    def __init__(self, adapter, method):
        self.adapter, self.method = adapter, method
        self.position_dims = adapter.position_dims
        n_layers = adapter.language_model.config.num_hidden_layers
        super().__init__(layers=[StreamLayer(i, self) for i in range(n_layers)])
        self.cursor = 0
        self.n_sink = 0
        self.sink_end = 0  # first position after the sink
        self.sealed = False  # the sink is fixed once the first clip arrives
        self.long_term_packed = False  # long-term memory was re-packed (positions no longer those of arrival)
        self.answering = False
        self.chunk_positions = self.chunk_frames = self.score_rows = None

    @property
    def stream_layers(self) -> list[StreamLayer]:
        return self.layers

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return self.adapter.rope(positions, dtype)

    def begin_chunk(self, positions: torch.Tensor, frames: torch.Tensor, score_rows: torch.Tensor | None) -> None:
        """Before a forward of ``n`` tokens: their absolute positions ``[P, n]``, frames ``[n]`` and the chunk rows whose
        queries score the memory (``None``: no scoring)."""
        self.chunk_positions, self.chunk_frames, self.score_rows = positions, frames, score_rows

    def seal_sink(self) -> None:
        """Everything in the memory so far is the sink (called when the first clip arrives)."""
        if not self.sealed:
            self.n_sink = self.layers[0].ctx.length if self.layers[0].is_initialized else 0
            self.sink_end = self.cursor
            self.sealed = True

    def settle(self) -> None:
        """After a chunk: what overflows short-term memory goes where the method sends it."""
        limit = self.method.short_term
        layer0 = self.layers[0]
        if not self.sealed or limit is None or layer0.n_short <= limit:
            return
        n = layer0.n_short - limit
        for layer in self.layers:
            self.method.overflow(layer, n)
        target = self.method.short_term_start(self)
        if target is not None:
            delta = target - layer0.short_start()
            if delta:
                shift = torch.full((self.position_dims, 1), delta, dtype=torch.long)
                for layer in self.layers:
                    layer.shift(layer.n_sink + layer.n_long, layer.ctx.length, shift)
                self.cursor += delta

    def rollback(self) -> None:
        for layer in self.layers:
            layer.rollback()

    def begin_answer(self) -> None:
        self.answering = True

    def end_answer(self) -> None:
        """Drop the answer contexts: the memory is as it was before the question."""
        self.answering = False
        for layer in self.layers:
            if layer.answer is layer.ctx:
                layer.ctx.truncate(layer._undo, layer._undo_capacity)
            layer.answer = None

    def memory(self) -> dict[str, int]:
        """KV bytes in the fast tier (memory + any answer context) and in the host tier, and tokens held."""
        fast = host = 0
        for layer in self.layers:
            f, h = layer.nbytes()
            fast, host = fast + f, host + h
        layer0 = self.layers[0]
        tokens = 0
        if layer0.is_initialized:  # the memory's own tokens, not a question being answered in place
            tokens = layer0._undo if layer0.answer is layer0.ctx else layer0.ctx.length
        return {"fast_kv_bytes": fast, "host_kv_bytes": host, "memory_tokens": tokens}
