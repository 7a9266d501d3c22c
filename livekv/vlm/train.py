"""Training the embedded default VLM from scratch on the synthetic world: ``livekv train-vlm``.

Every sample is a random world streamed at 0.5 fps, framed exactly as a ``StreamSession`` frames it (system prompt,
then one clip per frame: 9 visual tokens + LLaVA-OneVision's newline), followed by its questions with their
answers: ``questions`` per stream, asked after the last frame and after ``ask_frames - 1`` random earlier ones,
their kinds drawn evenly and, within a kind, about the stream's past where it has one (``pick_by_age``: only
where_last's ages vary). Each question sees only the stream up to its frame and itself (a block mask, positions
right after that frame), so one stream trains many answers at little more than the cost of one.

The losses:

* the answers: next-token cross-entropy on the answer words and the end token;
* perception (training only): every visual token of a frame (one per grid cell) is scored against the decoder's
  own word embeddings, and must name its object's colour and shape (softmax over the colour words and over the
  shape words) and its cell (the cell's words, e.g. "top" and "left"); a linear probe, thrown away after
  training, says whether the cell is occupied. This aligns what the tower sees with the words the questions use.
  Without it the answers alone took thousands of steps to teach the tower anything;
* stream state (training only): probes on the middle layer tell, at every frame, what it shows
  (``StreamStateLoss``);
* the attention losses (weights ``saliency``, ``first_saliency``, ``evidence``, 0.3 each; 0 turns one off),
  which shape what attention-scored memory (Vision Sink Bucketing) keeps and how a question reads it:
  saliency: a frame's attention to the earlier frames ranks their object tokens above the background
  (``saliency_loss``; compressed training streams then also come as such a memory looks); first-shown saliency:
  the tokens showing a shape for the first time rank above the other objects (``first_saliency_loss``);
  evidence: a question's last token attends to the token showing the asked object (``evidence_loss``).

A curriculum keeps early steps cheap: streams of at most 30 s for the first third of training (where the skills
are first learnt, at a third of a long step's cost), then the longest grows
to ``max_seconds`` by half-way (streams of a batch are of similar length: little padding). From 30% of training
on, half the streams lose a random 50-95% of the visual tokens of all but their last two frames (positions
closing up, as after compression), so that the model learns to answer from a compressed memory. The training steps
run under bfloat16 autocast where the CPU has native bfloat16 (1.4-1.7x faster there, and the first 400 steps learnt
as in float32); elsewhere in float32 (on an AVX2-only CPU a long bfloat16 step took 9x as long). Deterministic
given the seed and the number of steps.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import pathlib
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from livekv.evals import world
from livekv.vlm.model import (
    FIRST_WORDS, OBJECT_WORDS, QUESTION_TEMPLATE, SYSTEM, WEIGHTS, DefaultVLMAdapter, build_model, build_tokenizer,
    load_default_vlm, object_words,
)

logger = logging.getLogger("livekv")

CELL_WORDS = sorted({w for cell in world.CELLS for w in cell.split()})


def object_index(cells):
    """(colour, shape) ``[..., 2]`` (array or tensor) -> the object's index in ``OBJECT_WORDS`` ``[...]``."""
    return cells[..., 0] * len(world.SHAPES) + cells[..., 1]


def word_ids(adapter: DefaultVLMAdapter, words) -> torch.Tensor:
    """The token ids ``[n]`` of single-token ``words``."""
    return torch.tensor(adapter.tokenizer.convert_tokens_to_ids(list(words)))


class Stream:
    """One training stream: ``frames [F, 48, 48, 3]`` uint8, ``cells [F, 9, 2]`` (colour, shape) per cell (indices
    into ``world.COLOURS`` / ``world.SHAPES``, -1: empty) and ``qas``: (frame asked after, question, answer, kind,
    evidence: the index ``frame * 10 + cell`` of the visual token showing the asked object, -1: none).
    Derived: ``count [F]`` objects per frame; ``first [F, 9]``: the cell's shape is shown for the first time in
    this frame (no earlier frame showed that shape); ``next_seen [F, 9]``: the next frame showing the cell's object
    again (``F``: none)."""

    def __init__(self, frames: np.ndarray, cells: np.ndarray, qas: list[tuple[int, str, str, str, int]]):
        self.frames, self.cells, self.qas = frames, cells, qas
        shapes = cells[..., 1]
        self.count = (shapes >= 0).sum(-1)
        shown = np.stack([(shapes == s).any(-1) for s in range(len(world.SHAPES))], -1)  # [F, shapes]
        before = np.concatenate([np.zeros_like(shown[:1]), np.logical_or.accumulate(shown, 0)[:-1]])
        self.first = (shapes >= 0) & ~np.take_along_axis(before, shapes.clip(min=0), -1)
        objects = np.where(shapes >= 0, object_index(cells), -1)
        self.next_seen, upcoming = np.full(shapes.shape, len(frames)), {}  # upcoming: object -> next frame showing it
        for f in range(len(frames) - 1, -1, -1):
            self.next_seen[f] = [upcoming.get(o, len(frames)) for o in objects[f]]
            upcoming.update({o: f for o in objects[f] if o >= 0})


def sample(rng: np.random.Generator, max_seconds: float, min_seconds: float = 4.0, questions: int = 16,
           ask_frames: int = 2, fps: float = 0.5, kind_weights: dict[str, float] | None = None) -> Stream:
    """A random stream of ``min_seconds`` to ``max_seconds`` with up to ``questions`` questions, spread over the
    last frame and ``ask_frames - 1`` random ones, their kinds drawn evenly (or in proportion to ``kind_weights``,
    1 for a kind it does not name), each kind's question about the stream's past where it has one (``pick_by_age``)."""
    kinds, colours, shapes = list(world.CHANCE), list(world.COLOURS), list(world.SHAPES)
    p = None
    if kind_weights:
        p = np.array([kind_weights.get(k, 1.0) for k in kinds], dtype=float)
        p /= p.sum()
    while True:
        w = world.World(seed=int(rng.integers(2**31)), duration_s=float(rng.uniform(min_seconds, max_seconds)), fps=fps)
        n = len(w.frame_times)
        asks = [n - 1] + [int(k) for k in rng.integers(n, size=ask_frames - 1)]
        qas = []
        for i, k in enumerate(asks):
            by_kind: dict[str, list] = {}
            for q in w.candidates(w.frame_times[k]):
                by_kind.setdefault(q.kind, []).append(q)
            for j in range(questions // ask_frames + (i < questions % ask_frames)):
                kind = kinds[int(rng.integers(len(kinds)) if p is None else rng.choice(len(kinds), p=p))]
                if by_kind.get(kind):
                    q = by_kind[kind].pop(pick_by_age(rng, by_kind[kind]))
                    qas.append((k, q.text, q.answer, q.kind, evidence_token(w, q)))
        if qas:
            break
    cells = np.full((n, len(world.CELLS), 2), -1, dtype=np.int64)
    for i, t in enumerate(w.frame_times):
        for it in w.state(t):
            cells[i, world.CELLS.index(it.cell)] = (colours.index(it.colour), shapes.index(it.shape))
    return Stream(np.stack([image for _, image in w.frames()]), cells, qas)


def pick_by_age(rng: np.random.Generator, questions: list[world.Question]) -> int:
    """The index of a question about the stream's past where ``questions`` has one: drawn evenly over the older age
    buckets present (middle, start), then evenly within its bucket; a recent one only where none is older. Drawn
    evenly over all, where_last (the one kind whose ages vary) asks half the time about the last 20 s, mostly about
    objects on screen now, and an eighth about the start (104-130 s streams), where the past is what memory is for
    and what the benchmark asks about most."""
    buckets = [world.age_bucket(q) for q in questions]
    older = sorted(set(buckets) - {"recent"}) or ["recent"]
    bucket = older[int(rng.integers(len(older)))]
    within = [i for i, b in enumerate(buckets) if b == bucket]
    return within[int(rng.integers(len(within)))]


def evidence_token(w: world.World, q: world.Question) -> int:
    """The stream index (``frame * 10 + cell``) of the visual token showing the object ``q`` asks about, in its
    evidence frame; -1 when it asks about no one object (how many). The object is the one whose colour and shape
    are among the question's and answer's words: visible objects never share both."""
    words = set(q.text.split()) | {q.answer}
    frame = int(np.argmin(np.abs(np.asarray(w.frame_times) - q.evidence_time)))
    for item in w.state(w.frame_times[frame]):
        if item.colour in words and item.shape in words:
            return frame * (len(world.CELLS) + 1) + world.CELLS.index(item.cell)
    return -1


def visual_tokens(adapter: DefaultVLMAdapter, frames: np.ndarray) -> torch.Tensor:
    """Frames ``[N, 48, 48, 3]`` -> each frame's visual tokens as one clip, ``[N, tokens_per_frame + 1, hidden]``
    (the last one is LLaVA-OneVision's newline)."""
    return adapter.clip_features(adapter.pixel_values(torch.from_numpy(frames))[0, :, None])  # one clip per frame


@dataclass
class Batch:
    """A training batch: ``embeds [B, L, hidden]``, ``positions [B, L]``, ``labels [B, L]`` (-100 except answers and
    their end tokens), ``question [B, L]`` (which question a label belongs to, -1: none), ``mask [B, 1, L, L]``
    (bool), and the stream-state targets ``count [B, L]`` (objects in the frame, at each frame's newline token),
    ``first [B, L]`` (at every occupied cell token: 1 + its shape if the shape is shown for the first time, else 0) and
    ``frame [B, L, 9, 2]`` (the frame's (colour, shape) per cell, at its newline token, -1 empty); -100 elsewhere.
    For the saliency loss: ``frame_of [B, L]`` (the stream frame of each token, -1: not a visual token or newline)
    and ``occupied [B, L]`` (the token is a cell with an object). For the evidence loss: ``evidence [Q, 3]``, per
    question its row, the position of its last token (the one that predicts the answer) and that of the visual
    token showing the asked object (-1: none, or compressed away). ``object [B, L]``: at every occupied cell token,
    its object (``colour * len(world.SHAPES) + shape``, the order of ``OBJECT_WORDS``), -100 elsewhere.
    ``next_seen [B, L]``: at every occupied cell token, the next frame of the stream showing its object again (the
    stream's number of frames: none), -100 elsewhere."""

    embeds: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    question: torch.Tensor
    mask: torch.Tensor
    count: torch.Tensor
    first: torch.Tensor
    frame: torch.Tensor
    frame_of: torch.Tensor
    occupied: torch.Tensor
    evidence: torch.Tensor
    object: torch.Tensor
    next_seen: torch.Tensor


def encode(adapter: DefaultVLMAdapter, streams: list[Stream], visual: torch.Tensor, rng: np.random.Generator | None = None,
           salient: bool = False) -> Batch:
    """Batch ``streams`` with their ``visual`` tokens (``[sum F, tokens_per_frame + 1, hidden]``).

    A row is the stream (system prompt, then 9 visual tokens + a newline per frame) followed by its questions with
    their answers; each question attends to the stream up to its frame and to itself only, at the positions right
    after that frame, exactly what a session's answer sees. With ``rng``, half the streams lose a random 50-95% of
    the visual tokens of all but their last two frames (positions closing up, as after compression); with
    ``salient``, half of those instead keep 60-100% of their object tokens and 0-10% of the rest, newlines
    included (what Vision Sink Bucketing keeps of a model trained with the saliency loss)."""
    tokenizer = adapter.tokenizer
    embed = adapter.language_model.get_input_embeddings()
    ids = lambda text: torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    system, eos = ids(SYSTEM), torch.tensor([tokenizer.eos_token_id])
    rows, first, n_questions, evidence_at = [], 0, 0, []
    for stream in streams:
        n = len(stream.frames)
        clip_tokens = visual[first : first + n]
        first += n
        keep = torch.ones(clip_tokens.shape[:2], dtype=torch.bool)
        occupied = torch.zeros(keep.shape, dtype=torch.bool)  # cells with an object (the newline: no)
        occupied[:, :-1] = torch.from_numpy(stream.cells[..., 1] >= 0)
        compress = rng.random() if rng is not None and n > 2 else 1.0
        if compress < (0.25 if salient else 0.5):  # any tokens lost; the newline closes every frame
            keep[: n - 2] = torch.from_numpy(rng.random((n - 2, keep.shape[1])) >= rng.uniform(0.5, 0.95))
            keep[:, -1] = True
        elif compress < 0.5:  # mostly objects kept, newlines not: what an attention-scored memory keeps
            p = np.where(occupied.numpy(), rng.uniform(0.6, 1.0), rng.uniform(0.0, 0.1))[: n - 2]
            keep[: n - 2] = torch.from_numpy(rng.random(p.shape) < p)
        frame_of = torch.cat([torch.full((len(system),), -1), torch.arange(n)[:, None].expand_as(keep)[keep]])
        none = torch.full((len(system),), -100)
        count = torch.full(keep.shape, -100)
        count[:, -1] = torch.from_numpy(stream.count)

        def per_object(values: np.ndarray) -> torch.Tensor:  # [F, 9] -> at the row's occupied cell tokens, -100 elsewhere
            out = torch.full(keep.shape, -100)
            out[:, :-1] = torch.from_numpy(np.where(occupied[:, :-1].numpy(), values, -100))
            return torch.cat([none, out[keep]])

        parts, positions = [embed(system), clip_tokens[keep]], [torch.arange(len(frame_of))]
        S = len(frame_of)
        labels, question, spans = [torch.full((S,), -100)], [torch.full((S,), -1)], []
        summary = torch.full((*keep.shape, *stream.cells.shape[1:]), -100)
        summary[:, -1] = torch.from_numpy(stream.cells)
        # stream-state targets exist on the stream only; the question tokens after it get -100 as padding does
        counts = torch.cat([none, count[keep]])
        firsts, objects = per_object(stream.first * (stream.cells[..., 1] + 1)), per_object(object_index(stream.cells))
        next_seen = per_object(stream.next_seen)
        summaries = torch.cat([torch.full((len(system), *stream.cells.shape[1:]), -100), summary[keep]])
        at = len(system) + keep.view(-1).cumsum(0) - 1  # a kept token's position in the row
        start = S  # where the next question's tokens begin
        for k, text, answer, _, evidence in stream.qas:
            q, a = ids(QUESTION_TEMPLATE.format(question=text)), torch.cat([ids(answer), eos])
            visible = int((frame_of <= k).sum())
            parts.append(embed(torch.cat([q, a])))
            positions.append(visible + torch.arange(len(q) + len(a)))
            labels.append(torch.cat([torch.full((len(q),), -100), a]))
            question.append(torch.full((len(q) + len(a),), n_questions))
            spans.append((visible, len(q) + len(a)))
            seen = evidence >= 0 and bool(keep.view(-1)[evidence])
            evidence_at.append((len(rows), start + len(q) - 1, int(at[evidence]) if seen else -1))
            start += len(q) + len(a)
            n_questions += 1
        rows.append((torch.cat(parts), torch.cat(positions), torch.cat(labels), torch.cat(question),
                     counts, firsts, frame_of, torch.cat([torch.zeros(len(system), dtype=torch.bool), occupied[keep]]),
                     summaries, objects, next_seen, S, spans))
    L = max(len(r[0]) for r in rows)
    mask = torch.eye(L, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding attends to itself (no empty rows)
    for b, (*_, S, spans) in enumerate(rows):
        mask[b, :S, :S] = torch.ones(S, S, dtype=torch.bool).tril()
        start = S
        for visible, length in spans:
            mask[b, start : start + length, :visible] = True
            mask[b, start : start + length, start : start + length] = torch.ones(length, length, dtype=torch.bool).tril()
            start += length
    pad = lambda i, value: torch.stack([F.pad(r[i], (0, L - len(r[i])), value=value) for r in rows])  # noqa: E731
    embeds = torch.stack([F.pad(r[0], (0, 0, 0, L - len(r[0]))) for r in rows])
    frame = torch.stack([F.pad(r[8], (0, 0, 0, 0, 0, L - len(r[8])), value=-100) for r in rows])
    return Batch(embeds, pad(1, 0), pad(2, -100), pad(3, -1), mask[:, None], pad(4, -100), pad(5, -100), frame,
                 pad(6, -1), pad(7, False), torch.tensor(evidence_at, dtype=torch.long).view(-1, 3), pad(9, -100),
                 pad(10, -100))


def answer_loss(adapter: DefaultVLMAdapter, batch: Batch, attentions: bool = False):
    """Next-token cross-entropy on the answers, per question whether every answer token is right ``[Q]``, the
    hidden states (the embeddings, then after each decoder layer, the last one normed; each ``[B, L, hidden]``)
    and, with ``attentions`` (the model must run eager attention), every layer's attention ``[B, H, L, L]``."""
    # additive, as eager attention (which ``attentions`` needs) reads it; sdpa takes it alike. For eager attention
    # under autocast in the autocast dtype, so that adding it does not make a float32 copy of every layer's
    # [B, H, L, L] scores (same results, ~11% faster per step here); sdpa was ~8% slower with it
    eager_autocast = attentions and torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu") if eager_autocast else torch.float32
    mask = torch.zeros(batch.mask.shape, dtype=dtype).masked_fill_(~batch.mask, torch.finfo(dtype).min)
    out = adapter.language_model(inputs_embeds=batch.embeds, position_ids=batch.positions, attention_mask=mask,
                                 output_hidden_states=True, output_attentions=attentions)
    logits = adapter.lm_head(out.last_hidden_state[:, :-1])
    target, which = batch.labels[:, 1:], batch.question[:, 1:]
    loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100)
    answer = target != -100
    wrong = (logits.argmax(-1) != target) & answer
    n = int(batch.question.max()) + 1
    wrong_per_question = torch.zeros(n, dtype=torch.bool).index_put_((which[answer],), wrong[answer], accumulate=True)
    return loss, ~wrong_per_question, out.hidden_states, out.attentions


def frame_scores(attentions: tuple[torch.Tensor, ...], batch: Batch) -> list[torch.Tensor]:
    """Per layer, the attention each frame pays to every token, averaged over the heads and the frame's own rows
    (the score Vision Sink Bucketing keeps memory by): ``[B, F, L]`` per layer, ``attentions`` per layer
    ``[B, H, L, L]``. One matmul per layer over heads and rows together: a mean over the heads would build, and
    differentiate, another ``[B, L, L]`` tensor per layer."""
    frames = torch.arange(int(batch.frame_of.max()) + 1)[None, :, None]
    rows = (batch.frame_of[:, None, :] == frames).float()  # [B, F, L]: the frame's own tokens
    rows = rows / rows.sum(-1, keepdim=True).clamp(min=1)
    heads = attentions[0].shape[1]
    rows = rows.repeat(1, 1, heads) / heads  # [B, F, H * L]
    return [rows @ a.flatten(1, 2) for a in attentions]


def saliency_loss(scores: list[torch.Tensor], batch: Batch, margin: float = 1.0) -> torch.Tensor:
    """Training only: in every layer, the attention a frame's tokens pay to the earlier frames (``frame_scores``)
    must rank each earlier object token above every earlier background token (empty cell, newline) by a factor
    ``e ** margin`` (a hinge on the log scores against the best background token). Without it this small model
    spreads that attention over the background, and an attention-scored memory keeps mostly empty cells."""
    return ranking_loss(scores, batch, batch.occupied, (batch.frame_of >= 0) & ~batch.occupied, margin)


def first_saliency_loss(scores: list[torch.Tensor], batch: Batch, margin: float = 1.0) -> torch.Tensor:
    """Training only: as ``saliency_loss``, each earlier token showing a shape for the first time above every
    other earlier object token, so that an attention-scored memory keeps what first_colour asks for. In every
    layer: a later token tells whether it is the first of its shape from what the lower layers' memory still
    holds."""
    return ranking_loss(scores, batch, batch.first > 0, batch.first == 0, margin)


def latest_saliency_loss(scores: list[torch.Tensor], batch: Batch, margin: float = 1.0) -> torch.Tensor:
    """Training only: as ``saliency_loss``, at each frame every earlier token showing its object for the latest time
    so far above every earlier object token the object has been shown again since (first-shown tokens left out),
    so that an attention-scored memory keeps where each object was last seen, what where_last asks for, over the
    places it has left. In every layer."""
    frames = torch.arange(scores[0].shape[1])[None, :, None]
    shown = batch.occupied[:, None, :]
    left = shown & (batch.next_seen[:, None, :] < frames)  # [B, F, L]: its object was shown again before the frame
    return ranking_loss(scores, batch, shown & ~left, left & (batch.first == 0)[:, None, :], margin)


def ranking_loss(scores: list[torch.Tensor], batch: Batch, high: torch.Tensor, low: torch.Tensor,
                 margin: float) -> torch.Tensor:
    """Per layer, the frame scores ``[B, F, L]`` must put every earlier ``high`` token above the best earlier
    ``low`` one by ``margin`` in log score (a softplus hinge), averaged over the frames that have both. ``high`` and
    ``low``: ``[B, L]``, or ``[B, F, L]`` where they depend on the frame that attends."""
    frames = torch.arange(scores[0].shape[1])[None, :, None]
    own = (batch.frame_of[:, None, :] == frames).any(-1)  # [B, F]: frames of the row's stream
    past = (batch.frame_of[:, None, :] >= 0) & (batch.frame_of[:, None, :] < frames)  # [B, F, L]
    high, low = (past & (m if m.dim() == 3 else m[:, None, :]) for m in (high, low))
    scored = high.any(-1) & low.any(-1) & own  # [B, F]
    loss = 0.0
    for score in scores:
        score = score.clamp(min=1e-9).log()
        best_low = score.masked_fill(~low, float("-inf")).amax(-1, keepdim=True)
        hinge = F.softplus(best_low - score + margin) * high
        loss = loss + (hinge.sum(-1)[scored] / high.sum(-1)[scored]).mean()
    return loss / len(scores)


class StreamStateLoss(torch.nn.Module):
    """Training only: linear probes on the middle layer's hidden states of the stream tokens must tell, at each
    frame's newline token, how many objects the frame shows and the colour and shape in each cell (a summary of
    the frame), and at each occupied cell token its object and whether its shape is shown for the first time:
    scored against the word embeddings of the "{colour} {shape}" and "first {shape}" tokens (and a linear "not
    first"), so that such a token carries the words where_last and first_colour ask by. A dense signal at every
    frame, where the answers give one per question: it teaches the decoder, while it reads the stream, to keep
    what the questions need."""

    def __init__(self, adapter: DefaultVLMAdapter):
        super().__init__()
        cells, hidden = len(world.CELLS), adapter.model.config.text_config.hidden_size
        self.adapter = adapter
        self.first_ids, self.object_ids = word_ids(adapter, FIRST_WORDS), word_ids(adapter, OBJECT_WORDS)
        self.count = torch.nn.Linear(hidden, cells + 1)
        self.not_first = torch.nn.Linear(hidden, 1)
        self.colour = torch.nn.Linear(hidden, cells * (len(world.COLOURS) + 1))  # + empty
        self.shape = torch.nn.Linear(hidden, cells * (len(world.SHAPES) + 1))

    def forward(self, states: torch.Tensor, batch: Batch) -> torch.Tensor:
        loss = F.cross_entropy(self.count(states).transpose(1, 2), batch.count, ignore_index=-100)
        at = batch.count != -100  # the newline tokens
        frame = batch.frame[at]  # [n, 9, 2]
        for probe, target in ((self.colour, frame[..., 0]), (self.shape, frame[..., 1])):
            logits = probe(states[at]).view(*target.shape, -1)
            loss = loss + F.cross_entropy(logits.flatten(0, 1), (target + 1).flatten())  # -1 (empty) -> class 0
        words = self.adapter.lm_head.weight
        objects = states[batch.occupied]
        loss = loss + F.cross_entropy(objects @ words[self.object_ids].T, batch.object[batch.occupied])
        logits = torch.cat([self.not_first(objects), objects @ words[self.first_ids].T], -1)
        return loss + F.cross_entropy(logits, batch.first[batch.occupied])


class PerceptionLoss(torch.nn.Module):
    """The training-only perception loss: a frame's visual tokens ``[N, 9, hidden]`` against the decoder's word
    embeddings (colour, shape, "{colour} {shape}" and cell words) and a linear occupancy probe."""

    def __init__(self, adapter: DefaultVLMAdapter):
        super().__init__()
        self.adapter = adapter
        self.colour_ids, self.shape_ids = word_ids(adapter, world.COLOURS), word_ids(adapter, world.SHAPES)
        self.cell_ids, self.object_ids = word_ids(adapter, CELL_WORDS), word_ids(adapter, OBJECT_WORDS)
        self.cell_words = torch.tensor([[float(w in cell.split()) for w in CELL_WORDS] for cell in world.CELLS])
        self.occupied = torch.nn.Linear(adapter.model.config.text_config.hidden_size, 1)

    def forward(self, tokens: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """tokens ``[N, 9, hidden]``, cells ``[N, 9, 2]`` (colour, shape; -1 empty) -> the loss."""
        words = self.adapter.lm_head.weight
        full = cells[..., 0] >= 0
        loss = F.cross_entropy((tokens @ words[self.colour_ids].T)[full], cells[..., 0][full])
        loss = loss + F.cross_entropy((tokens @ words[self.shape_ids].T)[full], cells[..., 1][full])
        loss = loss + F.cross_entropy((tokens @ words[self.object_ids].T)[full], object_index(cells)[full])
        cell_logits = tokens @ words[self.cell_ids].T
        loss = loss + F.binary_cross_entropy_with_logits(cell_logits, self.cell_words.expand_as(cell_logits))
        return loss + F.binary_cross_entropy_with_logits(self.occupied(tokens)[..., 0], full.float())


def evidence_loss(attentions: tuple[torch.Tensor, ...], batch: Batch) -> torch.Tensor:
    """Training only: for each question about one object, the attention its last token (the one that predicts the
    answer) pays to the visual token showing that object, in the best head of the upper half of the layers, must
    be high (negative log of it). It teaches the lookup the answers need (which object, bound by colour and
    shape) directly, where the answer loss teaches it only through the words. ``attentions``: per layer
    ``[B, H, L, L]``."""
    reads = evidence_attention(attentions, batch)[2]
    if len(reads) == 0:
        return torch.zeros(())
    return -reads.flatten(1).amax(-1).clamp(min=1e-6).log().mean()


def evidence_attention(attentions: tuple[torch.Tensor, ...], batch: Batch) -> tuple[torch.Tensor, ...]:
    """For the questions whose evidence token is in the batch: their row and last-token position ``[Q]`` and the
    attention every head of the upper half of the layers pays from there to the evidence token
    ``[Q, layers, H]``."""
    b, query, key = batch.evidence[batch.evidence[:, 2] >= 0].unbind(-1)
    upper = attentions[len(attentions) // 2 :]
    if len(b) == 0:
        return b, query, torch.zeros(0, len(upper), 0)
    return b, query, torch.stack([a[b, :, query, key] for a in upper], 1)


SALIENCY_TERMS = ("saliency", "first_saliency", "latest_saliency")  # the losses on the frames' attention scores
ATTENTION_TERMS = (*SALIENCY_TERMS, "evidence")  # the losses that need the attention probabilities


def loss_terms(adapter, probes: torch.nn.ModuleDict, streams: list[Stream], rng=None, attention_terms=(),
               salient: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The loss terms of a batch of ``streams``, unweighted (``answer``, ``perception``, ``state`` and those of
    ``attention_terms`` named, in the order of ``ATTENTION_TERMS``), and per question whether it was right ``[Q]``.
    ``rng`` and ``salient``: compression as in ``encode``."""
    visual = visual_tokens(adapter, np.concatenate([s.frames for s in streams]))
    batch = encode(adapter, streams, visual, rng, salient=salient)
    answer, right, states, attentions = answer_loss(adapter, batch, attentions=bool(attention_terms))
    cells = torch.from_numpy(np.concatenate([s.cells for s in streams]))
    middle = states[len(states) // 2]  # after the middle decoder layer
    terms = {"answer": answer, "perception": probes["perception"](visual[:, : cells.shape[1]], cells),
             "state": probes["state"](middle, batch)}
    scores = frame_scores(attentions, batch) if set(SALIENCY_TERMS) & set(attention_terms) else None
    losses = {"saliency": lambda: saliency_loss(scores, batch),
              "first_saliency": lambda: first_saliency_loss(scores, batch),
              "latest_saliency": lambda: latest_saliency_loss(scores, batch),
              "evidence": lambda: evidence_loss(attentions, batch)}
    terms.update({name: losses[name]() for name in ATTENTION_TERMS if name in attention_terms})
    return terms, right


def batch_loss(adapter, probes: torch.nn.ModuleDict, streams: list[Stream], rng=None, saliency: float = 0.0,
               evidence: float = 0.0, first_saliency: float = 0.0, latest_saliency: float = 0.0):
    """(answer + perception + stream-state loss (+ ``saliency`` x the saliency loss + ``first_saliency`` x the
    first-shown saliency loss + ``latest_saliency`` x the latest-shown saliency loss + ``evidence`` x the evidence
    loss), per question right ``[Q]``) of a batch of streams."""
    weights = {"saliency": saliency, "first_saliency": first_saliency, "latest_saliency": latest_saliency,
               "evidence": evidence}
    terms, right = loss_terms(adapter, probes, streams, rng, [n for n, w in weights.items() if w > 0],
                              salient=saliency > 0)
    loss = terms["answer"] + terms["perception"] + terms["state"]
    for name in ATTENTION_TERMS:
        if name in terms:
            loss = loss + weights[name] * terms[name]
    return loss, right


def accuracy_by_kind(streams: list[Stream], right: torch.Tensor) -> dict[str, float]:
    """Share of right answers per question kind (``right [Q]``: the questions of ``streams`` in order)."""
    kinds = np.array([qa[3] for s in streams for qa in s.qas])
    return {kind: float(right[torch.from_numpy(kinds == kind)].float().mean()) for kind in world.CHANCE if (kinds == kind).any()}


SHORT_UNTIL, FULL_FROM = 1 / 3, 1 / 2  # ``curriculum``: short streams only, then growing, then full length


def curriculum(progress: float, max_seconds: float, short: float = 30.0) -> float:
    """The longest stream at ``progress`` (0..1) of training: ``short`` seconds until ``SHORT_UNTIL``, then growing
    linearly to ``max_seconds`` at ``FULL_FROM``."""
    return short + (max_seconds - short) * min(1.0, max(0.0, (progress - SHORT_UNTIL) / (FULL_FROM - SHORT_UNTIL)))


def add_object_words(adapter: DefaultVLMAdapter, tokenizer) -> DefaultVLMAdapter:
    """A checkpoint whose tokenizer predates ``object_words`` (its vocabulary a prefix of ``tokenizer``'s) with the
    new words' embeddings (tied to the output) set to the mean of their two words', behind ``tokenizer``."""
    old = adapter.tokenizer.get_vocab()
    if any(tokenizer.convert_tokens_to_ids(w) != i for w, i in old.items()):
        raise ValueError("the checkpoint's vocabulary is not a prefix of the current tokenizer's")
    model = adapter.model
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        for word, (a, b) in object_words().items():
            weight[tokenizer.convert_tokens_to_ids(word)] = (weight[old[a]] + weight[old[b]]) / 2
    return DefaultVLMAdapter(model, tokenizer)


def keep_freed_memory() -> None:
    """With glibc, serve every allocation from the heap and keep what is freed for the next one. By default glibc
    maps each block over 32 MB (a layer's [B, H, L, L] attention at full length) afresh and unmaps it when freed,
    so every step faults in those pages again: a long float32 step took ~30% less time with this here (the same
    losses and gradients). The process keeps its peak memory (+0.7 GB on a long step); elsewhere it does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def train(out: str | pathlib.Path = WEIGHTS, steps: int = 9000, batch: int = 8, lr: float = 2e-3,
          max_seconds: float = 130.0, seed: int = 0, log_every: int = 100, eval_every: int = 1000, held_out: int = 32,
          init: str | pathlib.Path | None = None, kind_weights: dict[str, float] | None = None,
          saliency: float = 0.3, evidence: float = 0.3, first_saliency: float = 0.3, latest_saliency: float = 0.3,
          bf16: bool | None = None,
          resume: bool = False) -> dict:
    """Train from scratch (or go on from the checkpoint ``init``, with a fresh schedule and no curriculum) and save
    model + tokenizer to ``out`` at the end; at every held-out evaluation before it to ``out/checkpoint``
    (``training.json`` says at which ``step``, ``resume.pt`` holds the optimizer, schedule, probes and random
    states; removed at the end), so that a run cut short keeps its last checkpoint and never leaves a half-trained
    model in ``out`` (by default the shipped weights). ``resume``: go on from ``out/checkpoint`` with the same
    arguments, ending with the model the run would have made uninterrupted. ``kind_weights`` oversamples question
    kinds in training (held-out kinds stay even); ``saliency`` / ``first_saliency`` / ``latest_saliency`` /
    ``evidence`` weigh those losses (0: off), which need eager attention; they apply from the first step (started
    with the long streams instead, the lookups came later: ``docs/results.md``, run 22). ``bf16``: the training
    steps' forward pass under bfloat16 autocast (weights, optimizer and held-out evaluation stay float32; default:
    where the CPU computes bfloat16 natively). Returns the held-out answer accuracy (teacher-forced, per kind) and
    timings."""
    keep_freed_memory()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out = pathlib.Path(out)
    if bf16 is None:
        bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    attention_losses = {"saliency": saliency, "evidence": evidence, "first_saliency": first_saliency,
                        "latest_saliency": latest_saliency}
    settings = {"steps": steps, "batch": batch, "lr": lr, "max_seconds": max_seconds, "seed": seed, "init": str(init),
                "kind_weights": kind_weights, "bf16": bf16, **attention_losses}
    if resume:
        state = resume_state(out / "checkpoint", settings)
        adapter = load_default_vlm(out / "checkpoint")
    elif init is None:
        tokenizer = build_tokenizer()
        adapter = DefaultVLMAdapter(build_model(tokenizer, seed), tokenizer)
    else:
        adapter = load_default_vlm(init)
        tokenizer = build_tokenizer()
        if len(tokenizer) > len(adapter.tokenizer):
            adapter = add_object_words(adapter, tokenizer)
    model = adapter.model.train()
    probes = torch.nn.ModuleDict({"perception": PerceptionLoss(adapter),
                                  "state": StreamStateLoss(adapter)})
    held = [sample(np.random.default_rng(10_000 + i), max_seconds, max_seconds / 2) for i in range(held_out)]
    params = list(model.parameters()) + list(probes.parameters())  # the adapter is no module: only the probes
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    start, t0 = 1, time.perf_counter()
    if resume:
        probes.load_state_dict(state["probes"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = state["numpy_rng"]
        start, t0 = state["step"] + 1, t0 - state["train_s"]
        logger.info("resuming %s at step %d/%d", out / "checkpoint", start, steps)
    if max(attention_losses.values()) > 0:
        model.set_attn_implementation("eager")  # the attention losses need the attention probabilities
    for step in range(start, steps + 1):
        longest = rng.uniform(6, curriculum(step / steps, max_seconds) if init is None else max_seconds)
        streams = [sample(rng, longest, 0.8 * longest, kind_weights=kind_weights) for _ in range(batch)]
        compress = rng if init is not None or step > 0.3 * steps else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, right = batch_loss(adapter, probes, streams, compress, **attention_losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            logger.info("step %d/%d  streams <= %.0f s  loss %.3f  batch answer accuracy %.2f  %.0f s", step, steps,
                        longest, loss.item(), right.float().mean(), time.perf_counter() - t0)
        if step % eval_every == 0 or step == steps:
            held_acc = evaluate_held_out(adapter, probes, held, batch)
            logger.info("step %d: held-out answer accuracy (teacher-forced, streams of %g-%g s) %s", step,
                        max_seconds / 2, max_seconds, {k: round(v, 3) for k, v in held_acc.items()})
            result = {**settings, "step": step, "held_out_accuracy": held_acc, "train_s": time.perf_counter() - t0,
                      "threads": torch.get_num_threads()}
            if step == steps:
                save(adapter, out, result)
            else:
                save_checkpoint(adapter, out / "checkpoint", result, {
                    "step": step, "train_s": result["train_s"], "probes": probes.state_dict(),
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state})
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    logger.info("saved to %s", out)
    return result


def resume_state(checkpoint: pathlib.Path, settings: dict) -> dict:
    """The training state saved with ``checkpoint``, checked against the resumed run's ``settings``."""
    if not (checkpoint / "resume.pt").is_file():
        raise FileNotFoundError(f"nothing to resume: no {checkpoint / 'resume.pt'} (a run saves it at each held-out "
                                "evaluation; pass --init to go on from a finished model with a fresh schedule)")
    saved = json.loads((checkpoint / "training.json").read_text())
    changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    if changed:
        raise ValueError(f"resume with the arguments of the run that saved {checkpoint}; these differ "
                         f"(saved, given): {changed}")
    return torch.load(checkpoint / "resume.pt", weights_only=True)


def save_checkpoint(adapter: DefaultVLMAdapter, checkpoint: pathlib.Path, result: dict, state: dict) -> None:
    """``save`` plus the training ``state`` (``resume.pt``), written beside ``checkpoint`` and moved in whole, so
    that a run killed while saving keeps its previous checkpoint."""
    partial = checkpoint.with_name(checkpoint.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save(adapter, partial, result)
    torch.save(state, partial / "resume.pt")
    shutil.rmtree(checkpoint, ignore_errors=True)
    partial.rename(checkpoint)


def save(adapter: DefaultVLMAdapter, out: pathlib.Path, result: dict) -> None:
    """Model + tokenizer (as ``load_default_vlm`` reads them) and ``training.json`` (``result``) into ``out``; the
    model stays in training mode."""
    model = adapter.model.eval()
    implementation = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    adapter.tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(result, indent=1))
    model.set_attn_implementation(implementation)
    model.train()


@torch.no_grad()
def evaluate_held_out(adapter, probes: torch.nn.ModuleDict, held: list[Stream], batch: int) -> dict[str, float]:
    adapter.model.eval()
    right = torch.cat([batch_loss(adapter, probes, held[i : i + batch])[1] for i in range(0, len(held), batch)])
    adapter.model.train()
    return accuracy_by_kind(held, right)
