"""Training the embedded default VLM from scratch on the synthetic world: ``livekv train-vlm``.

Every sample is a random world streamed at 0.5 fps for 10 s to ``max_seconds`` (a batch holds streams of similar
length, and the longest allowed grows over the first 40% of training), framed exactly as a ``StreamSession``
frames it (system prompt, then one clip per frame: 9 visual tokens + LLaVA-OneVision's newline), followed by up to
8 questions, half asked after the last frame and half after a random one, their kinds drawn evenly. Each question
sees only the stream up to its frame and itself (a block mask, positions right after that frame), so one stream
trains 8 answers at little more than the cost of one. The loss is on the answer words and the end token. Half of
the streams lose a random 50-95% of the visual tokens of all but their last two frames (positions closing up, as
after compression), so the model learns to answer from a compressed memory. Deterministic given the seed and the
number of steps.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from livekv.evals import world
from livekv.vlm.model import (
    QUESTION_TEMPLATE, SYSTEM, WEIGHTS, DefaultVLMAdapter, build_model, build_tokenizer, load_default_vlm,
)

logger = logging.getLogger("livekv")


def sample(rng: np.random.Generator, max_seconds: float, min_seconds: float = 10.0, questions: int = 8, fps: float = 0.5):
    """One training stream of ``min_seconds`` to ``max_seconds``: frames ``[F, 48, 48, 3]`` uint8 and up to
    ``questions`` (frame index asked after, question, answer), half asked after the last frame, half after a random
    one, their kinds drawn evenly."""
    kinds = list(world.CHANCE)
    while True:
        w = world.World(seed=int(rng.integers(2**31)), duration_s=float(rng.uniform(min_seconds, max_seconds)), fps=fps)
        n = len(w.frame_times)
        qas = []
        for j in range(questions):
            k = n - 1 if j % 2 == 0 else int(rng.integers(n))
            found = w.questions(w.frame_times[k], rng, n=1, kinds=[kinds[int(rng.integers(len(kinds)))]])
            qas += [(k, q.text, q.answer) for q in found]
        if qas:
            return np.stack([image for _, image in w.frames()]), qas


def encode(adapter: DefaultVLMAdapter, samples, rng: np.random.Generator | None = None):
    """Batch ``samples`` (streams with their questions) into ``inputs_embeds [B, L, hidden]``, ``position_ids
    [B, L]``, ``labels [B, L]`` (-100 except answers and their end tokens), ``question [B, L]`` (which question a
    label belongs to, -1: none) and a boolean attention mask ``[B, 1, L, L]``.

    A row is the stream (system prompt, then 9 visual tokens + a newline per frame) followed by its questions with
    their answers; each question attends to the stream up to its frame and to itself only, at the positions right
    after that frame, exactly what a session's answer sees. With ``rng``, half the streams lose a random 50-95% of
    the visual tokens of all but their last two frames (positions closing up, as after compression)."""
    model, tokenizer = adapter.model, adapter.tokenizer
    embed = adapter.language_model.get_input_embeddings()
    frames = torch.from_numpy(np.concatenate([f for f, _ in samples]))
    pixels = adapter.pixel_values(frames)[0, :, None]  # one clip per frame: [N, 1, 3, S, S]
    config = model.config
    visual = model.model.get_video_features(
        pixel_values_videos=pixels, vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    ).pooler_output  # [N, tokens_per_frame + 1, hidden]
    ids = lambda text: torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    system, eos = ids(SYSTEM), torch.tensor([tokenizer.eos_token_id])
    rows, first, n_questions = [], 0, 0
    for frames_, qas in samples:
        n = len(frames_)
        clip_tokens = visual[first : first + n]
        first += n
        keep = torch.ones(clip_tokens.shape[:2], dtype=torch.bool)
        if rng is not None and n > 2 and rng.random() < 0.5:
            keep[: n - 2] = torch.from_numpy(rng.random((n - 2, keep.shape[1])) >= rng.uniform(0.5, 0.95))
        frame_of = torch.cat([torch.full((len(system),), -1), torch.arange(n)[:, None].expand_as(keep)[keep]])
        parts, positions, labels, question = [embed(system), clip_tokens[keep]], [torch.arange(len(frame_of))], [], []
        S = len(frame_of)
        labels.append(torch.full((S,), -100))
        question.append(torch.full((S,), -1))
        spans = []
        for k, text, answer in qas:
            q, a = ids(QUESTION_TEMPLATE.format(question=text)), torch.cat([ids(answer), eos])
            visible = int((frame_of <= k).sum())
            parts.append(embed(torch.cat([q, a])))
            positions.append(visible + torch.arange(len(q) + len(a)))
            labels.append(torch.cat([torch.full((len(q),), -100), a]))
            question.append(torch.full((len(q) + len(a),), n_questions))
            spans.append((visible, len(q) + len(a)))
            n_questions += 1
        rows.append((torch.cat(parts), torch.cat(positions), torch.cat(labels), torch.cat(question), S, spans))
    L = max(len(r[0]) for r in rows)
    mask = torch.eye(L, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding attends to itself (no empty rows)
    for b, (_, _, _, _, S, spans) in enumerate(rows):
        mask[b, :S, :S] = torch.ones(S, S, dtype=torch.bool).tril()
        start = S
        for visible, length in spans:
            mask[b, start : start + length, :visible] = True
            mask[b, start : start + length, start : start + length] = torch.ones(length, length, dtype=torch.bool).tril()
            start += length
    pad = lambda x, value: F.pad(x, (0, L - len(x)), value=value)  # noqa: E731
    embeds = torch.stack([F.pad(r[0], (0, 0, 0, L - len(r[0]))) for r in rows])
    positions = torch.stack([pad(r[1], 0) for r in rows])
    labels = torch.stack([pad(r[2], -100) for r in rows])
    question = torch.stack([pad(r[3], -1) for r in rows])
    return embeds, positions, labels, question, mask[:, None]


def loss_and_accuracy(adapter: DefaultVLMAdapter, embeds, positions, labels, question, mask) -> tuple[torch.Tensor, float]:
    """Next-token cross-entropy on the answers, and the share of questions whose every answer token is right."""
    hidden = adapter.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask).last_hidden_state
    logits = adapter.lm_head(hidden[:, :-1])
    target, which = labels[:, 1:], question[:, 1:]
    loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100)
    answer = target != -100
    wrong = (logits.argmax(-1) != target) & answer
    n = int(question.max()) + 1
    wrong_per_question = torch.zeros(n, dtype=torch.bool).index_put_((which[answer],), wrong[answer], accumulate=True)
    return loss, 1.0 - wrong_per_question.float().mean().item()


def train(out: str | pathlib.Path = WEIGHTS, steps: int = 3000, batch: int = 16, lr: float = 2e-3,
          max_seconds: float = 130.0, seed: int = 0, log_every: int = 50, held_out: int = 64,
          init: str | pathlib.Path | None = None) -> dict:
    """Train from scratch (or go on from the checkpoint ``init``, with a fresh schedule and no curriculum) and save
    model + tokenizer to ``out``. Returns the final held-out accuracy and timings."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if init is None:
        tokenizer = build_tokenizer()
        adapter = DefaultVLMAdapter(build_model(tokenizer, seed), tokenizer)
    else:
        adapter = load_default_vlm(init)
    model = adapter.model.train()
    held_out = [sample(np.random.default_rng(10_000 + i), max_seconds) for i in range(held_out)]  # ~8 questions each
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        # streams of similar length in a batch (little padding); the longest allowed grows over the first 40% of
        # training (a curriculum: perception on short streams first, cheap steps)
        grown = 1.0 if init is not None else min(1.0, step / (0.4 * steps))
        longest = rng.uniform(12, 12 + (max_seconds - 12) * grown)
        batch_ = encode(adapter, [sample(rng, longest, 0.8 * longest) for _ in range(batch)], rng)
        loss, acc = loss_and_accuracy(adapter, *batch_)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            logger.info("step %d/%d  loss %.3f  batch answer accuracy %.2f  %.0f s", step, steps, loss.item(), acc,
                        time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        held_acc = loss_and_accuracy(adapter, *encode(adapter, held_out))[1]
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    result = {"steps": steps, "batch": batch, "lr": lr, "max_seconds": max_seconds, "seed": seed, "init": str(init),
              "held_out_accuracy": held_acc, "train_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}
    (out / "training.json").write_text(json.dumps(result, indent=1))
    logger.info("held-out answer accuracy (teacher-forced, whole stream) %.3f; saved to %s", held_acc, out)
    return result
