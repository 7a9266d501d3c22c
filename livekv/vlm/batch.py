"""Training batches of the embedded default VLM: streams (``livekv.vlm.data``) as the model reads them.

A row is a stream framed exactly as a ``StreamSession`` frames it (system prompt, then one clip per frame: 9 visual
tokens + LLaVA-OneVision's newline), followed by its questions with their answers. Each question sees only the
stream up to its frame and itself (a block mask, positions right after that frame), so one stream trains many
answers at little more than the cost of one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from livekv.vlm.data import Stream, object_index
from livekv.vlm.model import QUESTION_TEMPLATE, SYSTEM, DefaultVLMAdapter


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


# what ``encode`` pads a row's per-token fields with (``embeds``: zeros)
PAD = {"positions": 0, "labels": -100, "question": -1, "count": -100, "first": -100, "frame": -100, "frame_of": -1,
       "occupied": False, "object": -100, "next_seen": -100}
GROWING = ("embeds", "positions", "labels", "question")  # the fields a row's questions go on (lists until batched)


def encode(adapter: DefaultVLMAdapter, streams: list[Stream], visual: torch.Tensor, rng: np.random.Generator | None = None,
           salient: bool = False) -> Batch:
    """Batch ``streams`` with their ``visual`` tokens (``[sum F, tokens_per_frame + 1, hidden]``).

    A row is the stream (system prompt, then 9 visual tokens + a newline per frame) followed by its questions with
    their answers; each question attends to the stream up to its frame and to itself only, at the positions right
    after that frame, exactly what a session's answer sees. With ``rng``, streams lose visual tokens as
    ``kept_tokens`` draws (``salient``: its second kind of loss too)."""
    tokenizer, embed = adapter.tokenizer, adapter.language_model.get_input_embeddings()
    system = token_ids(tokenizer, SYSTEM)
    rows, evidence, first = [], [], 0
    for stream in streams:
        clips = visual[first : first + len(stream.frames)]
        first += len(stream.frames)
        keep, occupied = kept_tokens(stream, clips.shape[:2], rng, salient)
        row = {"embeds": [embed(system), clips[keep]], **stream_row(stream, keep, occupied, len(system))}
        ends = add_questions(row, embed, tokenizer, stream.qas, len(evidence))
        at = len(system) + keep.view(-1).cumsum(0) - 1  # a kept token's position in the row
        for end, (*_, token) in zip(ends, stream.qas):
            seen = token >= 0 and bool(keep.view(-1)[token])
            evidence.append((len(rows), end, int(at[token]) if seen else -1))
        rows.append(row)
    return collate(rows, evidence)


def token_ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def kept_tokens(stream: Stream, shape: torch.Size, rng: np.random.Generator | None,
                salient: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the stream's visual tokens (``shape``: ``[F, tokens_per_frame + 1]``) its row keeps, and which are
    cells with an object (bool, both ``shape``). With ``rng``, half the streams lose a random 50-95% of the visual
    tokens of all but their last two frames (positions closing up, as after compression); with ``salient``, half of
    those instead keep 60-100% of their object tokens and 0-10% of the rest, newlines included (what Vision Sink
    Bucketing keeps of a model trained with the saliency loss)."""
    n = shape[0]
    keep = torch.ones(shape, dtype=torch.bool)
    occupied = torch.zeros(shape, dtype=torch.bool)  # the newline: no
    occupied[:, :-1] = torch.from_numpy(stream.cells[..., 1] >= 0)
    compress = rng.random() if rng is not None and n > 2 else 1.0
    if compress < (0.25 if salient else 0.5):  # any tokens lost; the newline closes every frame
        keep[: n - 2] = torch.from_numpy(rng.random((n - 2, shape[1])) >= rng.uniform(0.5, 0.95))
        keep[:, -1] = True
    elif compress < 0.5:  # mostly objects kept, newlines not: what an attention-scored memory keeps
        p = np.where(occupied.numpy(), rng.uniform(0.6, 1.0), rng.uniform(0.0, 0.1))[: n - 2]
        keep[: n - 2] = torch.from_numpy(rng.random(p.shape) < p)
    return keep, occupied


def stream_row(stream: Stream, keep: torch.Tensor, occupied: torch.Tensor, n_system: int) -> dict:
    """The start of a row: its per-token fields of ``Batch`` but ``embeds`` over the stream (the system prompt,
    ``n_system`` tokens, then the ``keep`` visual tokens ``[F, tokens_per_frame + 1]``) and its question ``spans``
    (none yet). ``positions``, ``labels`` and ``question`` are lists, for the questions to go on; the stream-state
    targets exist on the stream only (the questions get the padding)."""

    def on_system(value, *shape) -> torch.Tensor:
        return torch.full((n_system, *shape), value)

    def at_newlines(values: np.ndarray) -> torch.Tensor:  # [F, ...] -> at the row's newline tokens, -100 elsewhere
        out = torch.full((*keep.shape, *values.shape[1:]), -100)
        out[:, -1] = torch.from_numpy(values)
        return torch.cat([on_system(-100, *values.shape[1:]), out[keep]])

    def per_object(values: np.ndarray) -> torch.Tensor:  # [F, 9] -> at the row's occupied cell tokens, -100 elsewhere
        out = torch.full(keep.shape, -100)
        out[:, :-1] = torch.from_numpy(np.where(occupied[:, :-1].numpy(), values, -100))
        return torch.cat([on_system(-100), out[keep]])

    frame_of = torch.cat([on_system(-1), torch.arange(len(keep))[:, None].expand_as(keep)[keep]])
    S = len(frame_of)
    return {"positions": [torch.arange(S)], "labels": [torch.full((S,), -100)], "question": [torch.full((S,), -1)],
            "frame_of": frame_of, "occupied": torch.cat([torch.zeros(n_system, dtype=torch.bool), occupied[keep]]),
            "count": at_newlines(stream.count), "frame": at_newlines(stream.cells),
            "first": per_object(stream.first * (stream.cells[..., 1] + 1)),
            "object": per_object(object_index(stream.cells)), "next_seen": per_object(stream.next_seen), "spans": []}


def add_questions(row: dict, embed, tokenizer, qas: list, asked: int) -> list[int]:
    """Append ``qas`` with their answers to ``row``, each at the positions right after the frame it is asked after
    (its span: the tokens it sees, its length), numbered from ``asked``. Returns each one's last token position."""
    eos = torch.tensor([tokenizer.eos_token_id])
    start, ends = len(row["frame_of"]), []  # where the next question's tokens begin
    for i, (k, text, answer, _, _) in enumerate(qas):
        q = token_ids(tokenizer, QUESTION_TEMPLATE.format(question=text))
        a = torch.cat([token_ids(tokenizer, answer), eos])
        visible = int((row["frame_of"] <= k).sum())
        row["embeds"].append(embed(torch.cat([q, a])))
        row["positions"].append(visible + torch.arange(len(q) + len(a)))
        row["labels"].append(torch.cat([torch.full((len(q),), -100), a]))
        row["question"].append(torch.full((len(q) + len(a),), asked + i))
        row["spans"].append((visible, len(q) + len(a)))
        ends.append(start + len(q) - 1)
        start += len(q) + len(a)
    return ends


def collate(rows: list[dict], evidence: list[tuple[int, int, int]]) -> Batch:
    """The ``Batch`` of ``rows`` (as ``encode`` builds them), padded to the longest, with its block mask."""
    fields = [{**r, **{k: torch.cat(r[k]) for k in GROWING}} for r in rows]
    L = max(len(r["embeds"]) for r in fields)

    def pad(name: str, value) -> torch.Tensor:
        return torch.stack([F.pad(t, (0, 0) * (t.dim() - 1) + (0, L - len(t)), value=value)
                            for t in (r[name] for r in fields)])

    return Batch(embeds=pad("embeds", 0), mask=block_mask(fields, L), **{k: pad(k, v) for k, v in PAD.items()},
                 evidence=torch.tensor(evidence, dtype=torch.long).view(-1, 3))


def block_mask(rows: list[dict], L: int) -> torch.Tensor:
    """The attention mask ``[B, 1, L, L]`` (bool) of ``rows``: the stream causal, each question its span of the
    stream and itself causal; padding attends to itself (no empty rows)."""
    mask = torch.eye(L, dtype=torch.bool).repeat(len(rows), 1, 1)
    for b, row in enumerate(rows):
        S = start = len(row["frame_of"])
        mask[b, :S, :S] = torch.ones(S, S, dtype=torch.bool).tril()
        for visible, length in row["spans"]:
            mask[b, start : start + length, :visible] = True
            mask[b, start : start + length, start : start + length] = torch.ones(length, length,
                                                                                  dtype=torch.bool).tril()
            start += length
    return mask[:, None]
