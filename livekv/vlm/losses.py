"""The losses that train the embedded default VLM, and their sum (``batch_loss``).

* the answers: next-token cross-entropy on the answer words and the end token (``answer_loss``);
* perception (training only): every visual token of a frame (one per grid cell) is scored against the decoder's
  own word embeddings, and must name its object's colour and shape (softmax over the colour words and over the
  shape words) and its cell (the cell's words, e.g. "top" and "left"); a linear probe, thrown away after
  training, says whether the cell is occupied. This aligns what the tower sees with the words the questions use
  (``PerceptionLoss``; without it the answers alone took thousands of steps to teach the tower anything);
* stream state (training only): probes on the middle layer tell, at every frame, what it shows
  (``StreamStateLoss``);
* the attention losses (``ATTENTION_TERMS``; 0.3 each in training, 0 turns one off), which shape what
  attention-scored memory (Vision Sink Bucketing) keeps and how a question reads it: saliency: a frame's attention
  to the earlier frames ranks their object tokens above the background (``saliency_loss``; compressed training
  streams then also come as such a memory looks); first-shown saliency: the tokens showing a shape for the first
  time rank above the other objects (``first_saliency_loss``); latest-shown saliency: where each object was last
  seen ranks above the places it has left (``latest_saliency_loss``); evidence: a question's last token attends to
  the token showing the asked object (``evidence_loss``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from livekv.vlm import world
from livekv.vlm.batch import Batch, encode, visual_tokens
from livekv.vlm.data import Stream, object_index
from livekv.vlm.model import FIRST_WORDS, OBJECT_WORDS, DefaultVLMAdapter

CELL_WORDS = sorted({w for cell in world.CELLS for w in cell.split()})


def word_ids(adapter: DefaultVLMAdapter, words) -> torch.Tensor:
    """The token ids ``[n]`` of single-token ``words``."""
    return torch.tensor(adapter.tokenizer.convert_tokens_to_ids(list(words)))



def answer_loss(adapter: DefaultVLMAdapter, batch: Batch, attentions: bool = False):
    """Next-token cross-entropy on the answers, per question whether every answer token is right ``[Q]``, the
    hidden states (the embeddings, then after each decoder layer, the last one normed; each ``[B, L, hidden]``)
    and, with ``attentions`` (the model must run eager attention), every layer's attention ``[B, H, L, L]``."""
    # additive, as eager attention (which ``attentions`` needs) reads it; sdpa takes it alike. For eager attention
    # under autocast in the autocast dtype, so that adding it does not make a float32 copy of every layer's
    # [B, H, L, L] scores; sdpa stays float32, faster so (docs/trials.md, run 17)
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
        """states ``[B, L, hidden]`` (the middle layer's, of ``batch``) -> the loss."""
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


def training_probes(adapter: DefaultVLMAdapter) -> torch.nn.ModuleDict:
    """The probes ``loss_terms`` takes (fresh, from torch's random state), trained beside the model and thrown away."""
    return torch.nn.ModuleDict({"perception": PerceptionLoss(adapter), "state": StreamStateLoss(adapter)})


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
