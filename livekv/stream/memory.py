"""The memory of a live video stream, one layer at a time: ``StreamLayer`` keeps the stream in the two tiers (the
``Cache`` over the layers: ``livekv.stream.cache``).

Per layer the fast tier holds one contiguous context, in temporal order::

    [ sink (system prompt) | long-term memory | short-term memory (newest tokens, uncompressed) ]

and the host tier holds what a method offloaded (ReKV's frames; what LiveVLM's compression evicted, with
``offload``), with keys stored without their rotary positions, in blocks (a frame, a page) with a mean key each.
Fast-tier keys are stored post-RoPE at the positions they hold *in the memory* (``pos``, ``[P, N]``), not at their
arrival time: when tokens leave, the rest can be re-positioned (keys rotated by the position delta), so positions
stay bounded however long the stream runs.

The protocol (``livekv.layers``; ``StreamCache`` drives it): the session runs each chunk (a clip, text, or a
question's tokens) inside ``cache.chunk(Chunk(...))``; a clip or text is appended to the memory, attending to it; a
question is answered over an *answer context* its layer builds from what the method's ``recall`` says, and leaves
the memory as it was. After a clip, ``settle`` asks the method what the overflow of short-term memory becomes (a
``Plan``) and each layer applies it; the method never changes a layer itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from livekv.attention import attend, set_pending
from livekv.layers import Layer
from livekv.protocol import Memory, Plan, Recall
from livekv.retrieval import received_attention
from livekv.disk import make_host_store, state_layout
from livekv.store import FastBuffer, HostStore
from livekv.summaries import BlockSummaries

if TYPE_CHECKING:
    from livekv.stream.cache import StreamCache

HOST_PAGE = 16  # tokens per page of a stream's host tier (its layout only; blocks are the method's)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., n, D]`` by RoPE angles ``cos, sin [n, D]`` (or ``[1, D]``, broadcast)."""
    return x * cos + rotate_half(x) * sin


@dataclass
class Chunk:
    """What the session hands down with each forward: the tokens' absolute ``positions [P, n]`` and ``frames [n]``
    (-1: text); ``score_rows``: the rows whose queries score the memory (Vision Sink Bucketing), or ``None``;
    ``question``: the tokens of a question or its answer, read over an answer context, never stored."""

    positions: torch.Tensor
    frames: torch.Tensor
    score_rows: torch.Tensor | None = None
    question: bool = False


class StreamLayer(Layer):
    """One layer's stream memory. Fast tier: ``ctx`` keys/values ``[1, G, N, D]``, ``pos [P, N]`` their positions,
    ``frame [N]`` the stream frame of each token (-1: text), ``scores [N]`` the attention each token received from
    the last clip's scoring rows; ``n_sink`` and ``n_long`` count the first two regions. Host tier: ``host`` (keys
    without positions) and ``blocks`` (their blocks and mean keys), made when a method first offloads."""

    def __init__(self, layer_idx: int, cache: StreamCache):
        super().__init__(layer_idx)
        self.method, self.rope, self.position_dims = cache.method, cache.rope, cache.position_dims
        self.n_sink = self.n_long = 0
        self.sink_end, self.packed = 0, False  # the first position after the sink; long-term memory was re-packed
        self.scores: torch.Tensor | None = None
        self.host: HostStore | None = None
        self.blocks: BlockSummaries | None = None
        self.answer: FastBuffer | None = None  # the answer context while a question is answered
        self._new: tuple[torch.Tensor, torch.Tensor, Chunk] | None = None
        self._undo = (0, None, 0)  # (length, scores, capacity): what to restore after a failed chunk or an answer
        self._undo_chunk = None  # the chunk that ``_undo`` undoes

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, G, _, D = key_states.shape
        if B != 1:
            raise ValueError(f"a stream memory holds one stream (batch 1), got batch {B}")
        self.ctx = FastBuffer(1, G, D, key_states.dtype, key_states.device)
        self.pos = torch.empty(self.position_dims, 0, dtype=torch.long)
        self.frame = torch.empty(0, dtype=torch.long)
        self.is_initialized = True

    # --- transformers' side -----------------------------------------------------------------------------------
    def update(self, key_states, value_states, chunk: Chunk | None = None, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._new = (key_states, value_states, chunk)
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
        k, v, chunk = self._new
        self._new = None
        if chunk.question:
            if self.answer is None:
                self._undo = (self.ctx.length, self.scores, self.ctx.capacity)
                self.answer = self.answer_context(self.method.recall(self, self.unrotated_queries(query, chunk),
                                                                     scaling))
            self.answer.append(k, v)
            return attend(query, *self.answer.view(), scaling)
        self._undo, self._undo_chunk = (self.ctx.length, self.scores, self.ctx.capacity), chunk
        self.ctx.append(k, v)
        self.pos = torch.cat([self.pos, chunk.positions], dim=1)
        self.frame = torch.cat([self.frame, chunk.frames])
        keys, values = self.ctx.view()
        if chunk.score_rows is not None:
            self.scores = self._received_attention(query, keys, chunk.score_rows, scaling)
        return attend(query, keys, values, scaling)

    @staticmethod
    def _received_attention(query, keys, rows: torch.Tensor, scaling: float) -> torch.Tensor:
        """Mean attention ``[N]`` the keys receive from the query rows ``rows`` of the chunk (softmax per head and
        row, causal, then the mean over heads and rows): Vision Sink Bucketing's token scores."""
        _, H, n, D = query.shape
        G, N = keys.shape[1], keys.shape[2]
        seen = (N - n + rows + 1).repeat(H // G)  # each row sees the keys before it and itself
        return received_attention(query[0, :, rows], keys[0], scaling, seen)

    # --- what methods read --------------------------------------------------------------------------------------
    @property
    def n_short(self) -> int:
        return self.ctx.length - self.n_sink - self.n_long

    def short_start(self, cursor: int | None = None) -> int:
        """The lowest position in short-term memory (if it is empty: ``cursor``, or after the last token)."""
        first = self.n_sink + self.n_long
        if self.ctx.length > first:
            return int(self.pos[:, first:].min())
        return cursor if cursor is not None else int(self.pos.max()) + 1 if self.ctx.length else 0

    def unrotated(self, idx: torch.Tensor | slice) -> torch.Tensor:
        """Keys of ctx tokens ``idx`` without their rotary positions (pre-RoPE), ``[1, G, n, D]``."""
        cos, sin = self.rope(-self.pos[:, idx], self.ctx.keys.dtype)
        return rotate(self.ctx.keys[:, :, : self.ctx.length][:, :, idx], cos, sin)

    def unrotated_queries(self, query: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        """The chunk's queries ``[1, H, m, D]`` without their rotary positions: ``[H, m, D]``."""
        cos, sin = self.rope(-chunk.positions, query.dtype)
        return rotate(query[0], cos, sin)

    # --- applying a method's plans ------------------------------------------------------------------------------
    def apply(self, plan: Plan) -> None:
        """Offload, keep and re-position as the method planned (see ``Plan``)."""
        if plan.offload is not None and len(plan.offload):
            self._offload(plan.offload, plan.blocks)
        if plan.keep is not None:
            if self.scores is not None and self.scores.shape[0] == self.ctx.length:
                self.scores = self.scores[plan.keep]
            self.ctx.compact(plan.keep)
            self.pos, self.frame = self.pos[:, plan.keep], self.frame[plan.keep]
        self.n_long = plan.n_long
        if plan.long_positions is not None:
            self.packed = True
            S = self.n_sink
            self.shift(S, S + plan.n_long, plan.long_positions - self.pos[:, S : S + plan.n_long])

    def _offload(self, idx: torch.Tensor, blocks: torch.Tensor) -> None:
        """Move ctx tokens ``idx`` to the host tier: keys without positions, values, a block key per token."""
        keys = self.unrotated(idx)
        if self.host is None:
            G, D = keys.shape[1], keys.shape[3]
            self.host = self._host_store(G, D, keys.dtype)
            self.blocks = BlockSummaries(G, D, keys.dtype)
        keys, values = keys.cpu(), self.ctx.values[:, :, idx].cpu()
        self.blocks.add(keys[0], blocks)
        self.host.append(keys, values)

    def _host_store(self, kv_heads: int, head_dim: int, dtype: torch.dtype) -> HostStore:
        return make_host_store(self.method.host, 1, kv_heads, head_dim, HOST_PAGE, dtype, torch.device("cpu"),
                               digests=False, directory=self.method.host_dir, bits=self.method.host_bits)

    def shift(self, start: int, stop: int, delta: torch.Tensor) -> None:
        """Move the ctx tokens ``[start, stop)`` by ``delta`` positions, ``[P, stop - start]`` or ``[P, 1]`` (one shift
        for all): their keys are rotated by the delta (only the tokens that move, with the angles of each distinct
        delta computed once)."""
        if stop <= start or not bool(delta.any()):
            return
        if delta.shape[1] == 1:
            keys = self.ctx.keys[:, :, start:stop]
            cos, sin = self.rope(delta, keys.dtype)
            keys.copy_(rotate(keys, cos, sin))
            self.pos[:, start:stop] += delta
            return
        cols = delta.any(dim=0).nonzero()[:, 0]
        distinct, which = torch.unique(delta[:, cols], dim=1, return_inverse=True)
        cos, sin = self.rope(distinct, self.ctx.keys.dtype)
        idx = (start + cols).to(self.ctx.keys.device)
        keys = self.ctx.keys.index_select(2, idx)
        self.ctx.keys.index_copy_(2, idx, rotate(keys, cos[which], sin[which]))
        self.pos[:, start + cols] += delta[:, cols]

    def answer_context(self, recall: Recall | None) -> FastBuffer:
        """The KV a question reads: the memory itself (``None``: read in place, the question's tokens appended and
        dropped afterwards), or a fresh buffer with the sink, the recalled host tokens (rotated to their
        positions), then the rest of what ``recall`` reads."""
        if recall is None:
            return self.ctx
        keys, values = self.ctx.view()
        out = FastBuffer(1, keys.shape[1], keys.shape[3], keys.dtype, keys.device)
        read = recall.read
        sink, rest = read[read < self.n_sink], read[read >= self.n_sink]
        out.append(keys[:, :, sink], values[:, :, sink])
        if recall.host is not None and len(recall.host):
            k, v = self.host.gather(recall.host.expand(1, keys.shape[1], -1))
            cos, sin = self.rope(recall.positions, k.dtype)
            out.append(rotate(k.to(keys.device), cos, sin), v.to(keys.device))
        out.append(keys[:, :, rest], values[:, :, rest])
        return out

    def end_answer(self) -> None:
        """Drop the answer context: the memory is as it was before the question."""
        if self.answer is self.ctx:
            self.ctx.truncate(self._undo[0], self._undo[2])
        self.answer = None

    def rollback(self, chunk) -> None:
        """Undo ``chunk`` (its forward failed part-way) if it reached this layer."""
        length, scores, _ = self._undo
        if self._undo_chunk is chunk and self.ctx.length > length:
            self.ctx.length = length
            self.pos, self.frame = self.pos[:, :length], self.frame[:length]
            self.scores = scores

    # --- accounting and snapshots -------------------------------------------------------------------------------
    def memory(self) -> Memory:
        if not self.is_initialized:
            return Memory()
        answer = self.answer  # once: an answer may end (on the engine thread) while a server reads this
        fast = [self.ctx] + ([answer] if answer is not None and answer is not self.ctx else [])
        host = [self.host, self.blocks] if self.host is not None else []
        return Memory(sum(b.used for b in fast), sum(b.nbytes for b in fast),
                      sum(b.used for b in host), sum(b.nbytes for b in host))

    def state(self) -> tuple[dict, dict]:
        if not self.is_initialized:
            return {}, {}
        tensors = {**{f"ctx.{k}": v for k, v in self.ctx.state().items()}, "pos": self.pos, "frame": self.frame}
        if self.scores is not None:
            tensors["scores"] = self.scores
        meta = {"n_sink": self.n_sink, "n_long": self.n_long, "sink_end": self.sink_end, "packed": self.packed}
        if self.host is not None:
            tensors.update({f"host.{k}": v for k, v in self.host.state().items()})
            blocks, meta["blocks"] = self.blocks.state()
            tensors.update({f"blocks.{k}": v for k, v in blocks.items()})
            meta["host_length"] = self.host.length
        return tensors, meta

    def load_state(self, tensors: dict, meta: dict, device: torch.device | str = "cpu") -> None:
        if not tensors:
            return
        part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        self.ctx = FastBuffer.from_state(part("ctx."), device)
        self.pos, self.frame, self.scores = tensors["pos"], tensors["frame"], tensors.get("scores")
        self.n_sink, self.n_long = meta["n_sink"], meta["n_long"]
        self.sink_end, self.packed = meta["sink_end"], meta["packed"]
        self.is_initialized = True
        if "host_length" in meta:
            _, G, D, dtype = state_layout(part("host."))
            self.host = self._host_store(G, D, dtype)
            self.host.load_state(part("host."), meta["host_length"])
            self.blocks = BlockSummaries.from_state(part("blocks."), meta["blocks"])
