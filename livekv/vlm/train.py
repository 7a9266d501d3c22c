"""Training the embedded default VLM from scratch on the synthetic world: ``livekv train-vlm``.

Every sample is a random world streamed at 0.5 fps for 10 s to ``max_seconds`` (a batch holds streams of similar
length, and the longest allowed grows over the first 40% of training), framed exactly as a
``StreamSession`` frames it (system prompt, then one clip per frame: 9 visual tokens + LLaVA-OneVision's newline,
then the question), with the loss on the answer words and the end token. Questions are asked at the last frame and
drawn evenly over the question kinds. Half of the samples lose a random 50-95% of the visual tokens of all but
their last two frames (positions closing up, as after compression), so the model learns to answer from a
compressed memory. Deterministic given the seed and the number of steps.
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
from livekv.vlm.model import QUESTION_TEMPLATE, SYSTEM, WEIGHTS, DefaultVLMAdapter, build_model, build_tokenizer

logger = logging.getLogger("livekv")


def sample(rng: np.random.Generator, max_seconds: float, min_seconds: float = 10.0, fps: float = 0.5):
    """One training example, a stream of ``min_seconds`` to ``max_seconds``: frames ``[F, 48, 48, 3]`` uint8, the
    question text and its answer."""
    kinds = list(world.CHANCE)
    while True:
        w = world.World(seed=int(rng.integers(2**31)), duration_s=float(rng.uniform(min_seconds, max_seconds)), fps=fps)
        ask = w.frame_times[-1]
        questions = w.questions(ask, rng, n=1, kinds=[kinds[int(rng.integers(len(kinds)))]])
        if questions:
            frames = np.stack([image for _, image in w.frames()])
            return frames, questions[0].text, questions[0].answer


def encode(adapter: DefaultVLMAdapter, samples, rng: np.random.Generator | None = None):
    """Batch ``samples`` into ``inputs_embeds [B, L, hidden]``, ``labels [B, L]`` (-100 except the answer and end
    token) and ``attention_mask [B, L]`` (right padding). With ``rng``, drop old visual tokens from half the samples."""
    model, tokenizer = adapter.model, adapter.tokenizer
    embed = adapter.language_model.get_input_embeddings()
    frames = torch.from_numpy(np.concatenate([f for f, _, _ in samples]))
    pixels = adapter.pixel_values(frames)[0, :, None]  # one clip per frame: [N, 1, 3, S, S]
    config = model.config
    visual = model.model.get_video_features(
        pixel_values_videos=pixels, vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    ).pooler_output  # [N, tokens_per_frame + 1, hidden]
    ids = lambda text: torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    system = ids(SYSTEM)
    rows, labels, first = [], [], 0
    for frames_, question, answer in samples:
        n = len(frames_)
        clip_tokens = visual[first : first + n]
        first += n
        keep = torch.ones(clip_tokens.shape[:2], dtype=torch.bool)
        if rng is not None and n > 2 and rng.random() < 0.5:
            keep[: n - 2] = torch.from_numpy(rng.random((n - 2, keep.shape[1])) >= rng.uniform(0.5, 0.95))
        q, a = ids(QUESTION_TEMPLATE.format(question=question)), torch.cat([ids(answer), torch.tensor([tokenizer.eos_token_id])])
        rows.append(torch.cat([embed(system), clip_tokens[keep], embed(q), embed(a)]))
        labels.append(torch.cat([torch.full((len(rows[-1]) - len(a),), -100), a]))
    length = max(len(r) for r in rows)
    embeds = torch.stack([F.pad(r, (0, 0, 0, length - len(r))) for r in rows])
    label = torch.stack([F.pad(l, (0, length - len(l)), value=-100) for l in labels])
    mask = torch.stack([torch.arange(length) < len(r) for r in rows]).long()
    return embeds, label, mask


def loss_and_accuracy(adapter: DefaultVLMAdapter, embeds, labels, mask) -> tuple[torch.Tensor, float]:
    """Next-token cross-entropy on the answers, and the share of answers whose every token is predicted right."""
    hidden = adapter.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    logits = adapter.lm_head(hidden[:, :-1])
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100)
    answer = target != -100
    right = ((logits.argmax(-1) == target) | ~answer).all(dim=1)
    return loss, right.float().mean().item()


def train(out: str | pathlib.Path = WEIGHTS, steps: int = 3000, batch: int = 16, lr: float = 2e-3,
          max_seconds: float = 130.0, seed: int = 0, log_every: int = 50, held_out: int = 64) -> dict:
    """Train from scratch and save model + tokenizer to ``out``. Returns the final held-out accuracy and timings."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = build_tokenizer()
    adapter = DefaultVLMAdapter(build_model(tokenizer, seed), tokenizer)
    model = adapter.model.train()
    held_out = [sample(np.random.default_rng(10_000 + i), max_seconds) for i in range(held_out)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        # streams of similar length in a batch (little padding); the longest allowed grows over the first 40% of
        # training (a curriculum: perception on short streams first, cheap steps)
        longest = rng.uniform(12, 12 + (max_seconds - 12) * min(1.0, step / (0.4 * steps)))
        embeds, labels, mask = encode(adapter, [sample(rng, longest, 0.8 * longest) for _ in range(batch)], rng)
        loss, acc = loss_and_accuracy(adapter, embeds, labels, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            logger.info("step %d/%d  loss %.3f  batch accuracy %.2f  %.0f s", step, steps, loss.item(), acc,
                        time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        held_acc = loss_and_accuracy(adapter, *encode(adapter, held_out))[1]
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    result = {"steps": steps, "batch": batch, "lr": lr, "max_seconds": max_seconds, "seed": seed,
              "held_out_accuracy": held_acc, "train_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}
    (out / "training.json").write_text(json.dumps(result, indent=1))
    logger.info("held-out answer accuracy (teacher-forced, full context) %.3f; saved to %s", held_acc, out)
    return result
