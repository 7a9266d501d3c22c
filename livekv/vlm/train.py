"""Training the embedded default VLM from scratch on the synthetic world: ``livekv train-vlm``.

``train`` runs AdamW over the model and the probes of its losses (``livekv.vlm.losses``) on batches of random
streams (``livekv.vlm.data``, ``livekv.vlm.batch``) as a ``TrainConfig`` says, checkpointing at every held-out
evaluation (``livekv.vlm.checkpoints``).

A curriculum keeps early steps cheap: streams of at most 30 s for the first third of training (where the skills
are first learnt, at a third of a long step's cost), then the longest grows to ``max_seconds`` by half-way (streams
of a batch are of similar length: little padding). From 30% of training on, half the streams lose a random 50-95%
of the visual tokens of all but their last two frames (positions closing up, as after compression), so that the
model learns to answer from a compressed memory. The training steps run under bfloat16 autocast where the CPU has
native bfloat16, elsewhere in float32, where emulated bfloat16 is far slower (``docs/trials.md``, runs 15 and 18).
Deterministic given the seed and the number of steps.
"""

from __future__ import annotations

import ctypes
import logging
import math
import pathlib
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from livekv.vlm import world
from livekv.vlm.checkpoints import resume_state, save, save_checkpoint, starting_model
from livekv.vlm.data import Stream, sample
from livekv.vlm.losses import batch_loss, training_probes
from livekv.vlm.model import WEIGHTS, DefaultVLMAdapter

logger = logging.getLogger("livekv")


def parse_kind_weights(text: str) -> dict[str, float] | None:
    """``"where_last=3,first_colour=3"`` -> ``{"where_last": 3.0, "first_colour": 3.0}``."""
    if not text:
        return None
    weights = {}
    for item in text.split(","):
        kind, _, value = item.partition("=")
        if kind not in world.CHANCE or not value:
            raise ValueError(f"expected KIND=WEIGHT with KIND in {sorted(world.CHANCE)}, got {item!r}")
        weights[kind] = float(value)
    return weights


def knob(default, help: str, **cli):
    """A ``TrainConfig`` field that is an option of ``livekv train-vlm``: ``help``, and where its text is not its
    value, ``parse`` (text -> value) and ``metavar``."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    """A training run, as ``train`` takes it. The fields with a help text are ``livekv train-vlm``'s options
    (``--max-seconds`` for ``max_seconds``). ``kind_weights`` oversamples question kinds in training only (the
    held-out ones stay even); ``bf16`` puts the training steps' forward pass under bfloat16 autocast (weights,
    optimizer and held-out evaluation stay float32); ``resume`` goes on from ``out/checkpoint`` with the settings
    of the run that saved it."""

    steps: int = knob(9000, "training steps")
    batch: int = knob(8, "streams per step")
    max_seconds: float = knob(130.0, "longest training stream")
    out: str | pathlib.Path | None = knob(None, "where to save (default: the package's weights folder)")
    init: str | pathlib.Path | None = knob(
        None, "go on training this checkpoint (fresh schedule, full-length streams)")
    resume: bool = knob(False, "go on from OUT/checkpoint, a run cut short (give the same arguments as that run)")
    lr: float = knob(2e-3, "peak learning rate (AdamW; warmup, then cosine to 0)")
    threads: int | None = knob(None, "torch CPU threads (default: torch's choice)")
    seed: int = knob(0, "seed of the model, the training streams and their compression")
    kind_weights: dict[str, float] | None = knob(
        None, "oversample question kinds in training, e.g. where_last=3,first_colour=3 (others 1)",
        parse=parse_kind_weights, metavar="KIND=W,...")
    saliency: float = knob(
        0.3, "weight of the saliency loss (a frame's attention ranks earlier objects above background)")
    evidence: float = knob(
        0.3, "weight of the evidence loss (a question attends to the token showing its object)")
    first_saliency: float = knob(
        0.3, "weight of the first-shown saliency loss (a frame's attention ranks first-of-a-shape tokens above other "
        "objects)")
    latest_saliency: float = knob(
        0.3, "weight of the latest-shown saliency loss (a frame's attention ranks where each object was last seen "
        "above places it left)")
    bf16: bool | None = knob(None, "bfloat16 autocast in the training steps (default: where the CPU has native "
                             "bfloat16)")
    log_every: int = 100  # steps
    eval_every: int = 1000  # steps between held-out evaluations (and checkpoints)
    held_out: int = 32  # held-out streams

    def __post_init__(self):
        self.out = pathlib.Path(WEIGHTS if self.out is None else self.out)
        for name in ("steps", "batch", "log_every", "eval_every", "held_out"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.max_seconds >= 6:
            raise ValueError(f"max_seconds must be at least 6 (the shortest training stream), got {self.max_seconds}")
        if any(not w >= 0 for w in self.loss_weights.values()):
            raise ValueError(f"the loss weights must be at least 0 (0: off), got {self.loss_weights}")
        if self.kind_weights is not None:
            if not set(self.kind_weights) <= set(world.CHANCE):
                raise ValueError(f"kind_weights: kinds are {sorted(world.CHANCE)}, got {sorted(self.kind_weights)}")
            weights = [self.kind_weights.get(k, 1.0) for k in world.CHANCE]
            if any(not w >= 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"kind_weights must be at least 0, some kind's above, got {self.kind_weights}")

    @property
    def loss_weights(self) -> dict[str, float]:
        """The attention losses' weights, as ``batch_loss`` takes them."""
        return {"saliency": self.saliency, "evidence": self.evidence, "first_saliency": self.first_saliency,
                "latest_saliency": self.latest_saliency}

    def settings(self, bf16: bool) -> dict:
        """What ``training.json`` records and a resumed run must share with the run it goes on from (``bf16``:
        whether the steps run under bfloat16 autocast, the default resolved)."""
        return {"steps": self.steps, "batch": self.batch, "lr": self.lr, "max_seconds": self.max_seconds,
                "seed": self.seed, "init": str(self.init), "kind_weights": self.kind_weights, "bf16": bf16,
                **self.loss_weights}


@dataclass
class Run:
    """A run's training state: the model (behind its adapter), the probes of its losses, the parameters of both,
    the optimizer and its schedule, and the generator of the training streams (torch's random state is global)."""

    adapter: DefaultVLMAdapter
    probes: torch.nn.ModuleDict
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    rng: np.random.Generator

    def state(self, step: int, train_s: float) -> dict:
        """What a resumed run needs beside the model (``resume.pt``), after ``step`` and ``train_s`` seconds."""
        return {"step": step, "train_s": train_s, "probes": self.probes.state_dict(),
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "torch_rng": torch.get_rng_state(), "numpy_rng": self.rng.bit_generator.state}

    def restore(self, state: dict) -> None:
        """Back to ``state``, as ``Run.state`` made it."""
        self.probes.load_state_dict(state["probes"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        self.rng.bit_generator.state = state["numpy_rng"]


def train(config: TrainConfig) -> dict:
    """Train from scratch (or go on from the checkpoint ``config.init``, with a fresh schedule and no curriculum)
    and save model + tokenizer to ``config.out`` at the end; at every held-out evaluation before it to
    ``out/checkpoint`` (``training.json`` says at which ``step``, ``resume.pt`` holds ``Run.state``; removed at the
    end), so that a run cut short keeps its last checkpoint and never leaves a half-trained model in ``out`` (by
    default the shipped weights). With ``config.resume``, go on from ``out/checkpoint``, ending with the model the
    run would have made uninterrupted. The attention losses need eager attention; they apply from the first step
    (started with the long streams instead, the lookups came later: ``docs/trials.md``, run 22). Returns what ``training.json`` holds: the settings, the held-out answer accuracy
    (teacher-forced, per kind) and timings."""
    keep_freed_memory()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    bf16 = native_bf16() if config.bf16 is None else config.bf16
    settings, checkpoint = config.settings(bf16), config.out / "checkpoint"
    saved = resume_state(checkpoint, settings) if config.resume else None
    run = start(config, rng, checkpoint if config.resume else None)
    held = [sample(np.random.default_rng(10_000 + i), config.max_seconds, config.max_seconds / 2)
            for i in range(config.held_out)]
    first, t0 = 1, time.perf_counter()
    if saved is not None:
        run.restore(saved)
        first, t0 = saved["step"] + 1, t0 - saved["train_s"]
        logger.info("resuming %s at step %d/%d", checkpoint, first, config.steps)
    if max(config.loss_weights.values()) > 0:
        run.adapter.model.set_attn_implementation("eager")  # the attention losses need the attention probabilities
    for step in range(first, config.steps + 1):
        longest, loss, right = train_step(run, config, step, bf16)
        last = step == config.steps
        if step % config.log_every == 0 or last:
            logger.info("step %d/%d  streams <= %.0f s  loss %.3f  batch answer accuracy %.2f  %.0f s", step,
                        config.steps, longest, loss.item(), right.float().mean(), time.perf_counter() - t0)
        if step % config.eval_every == 0 or last:
            accuracy = evaluate_held_out(run.adapter, run.probes, held, config.batch)
            logger.info("step %d: held-out answer accuracy (teacher-forced, streams of %g-%g s) %s", step,
                        config.max_seconds / 2, config.max_seconds, {k: round(v, 3) for k, v in accuracy.items()})
            result = {**settings, "step": step, "held_out_accuracy": accuracy, "train_s": time.perf_counter() - t0,
                      "threads": torch.get_num_threads()}
            if last:
                save(run.adapter, config.out, result)
            else:
                save_checkpoint(run.adapter, checkpoint, result, run.state(step, result["train_s"]))
    shutil.rmtree(checkpoint, ignore_errors=True)
    logger.info("saved to %s", config.out)
    return result


def start(config: TrainConfig, rng: np.random.Generator, checkpoint: pathlib.Path | None) -> Run:
    """A run's starting state (``starting_model``, fresh probes, AdamW with a warmup and a cosine schedule), in
    training mode."""
    adapter = starting_model(config.seed, config.init, checkpoint)
    model = adapter.model.train()
    probes = training_probes(adapter)
    params = list(model.parameters()) + list(probes.parameters())  # the adapter is no module: only the probes
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    warmup, steps = max(1, config.steps // 20), config.steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    return Run(adapter, probes, params, optimizer, schedule, rng)


def train_step(run: Run, config: TrainConfig, step: int, bf16: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One optimizer step on a fresh batch: streams up to ``curriculum``'s longest, compressed from 30% of
    training on (from the start of a run from ``init``). Returns the longest stream allowed, the loss and per
    question whether it was right ``[Q]``."""
    fresh = config.init is None
    longest = run.rng.uniform(6, curriculum(step / config.steps, config.max_seconds) if fresh else config.max_seconds)
    streams = [sample(run.rng, longest, 0.8 * longest, kind_weights=config.kind_weights) for _ in range(config.batch)]
    compress = run.rng if not fresh or step > 0.3 * config.steps else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, right = batch_loss(run.adapter, run.probes, streams, compress, **config.loss_weights)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.params, 1.0)
    run.optimizer.step()
    run.schedule.step()
    return longest, loss, right


SHORT_UNTIL, FULL_FROM = 1 / 3, 1 / 2  # ``curriculum``: short streams only, then growing, then full length


def curriculum(progress: float, max_seconds: float, short: float = 30.0) -> float:
    """The longest stream at ``progress`` (0..1) of training: ``short`` seconds until ``SHORT_UNTIL``, then growing
    linearly to ``max_seconds`` at ``FULL_FROM``."""
    return short + (max_seconds - short) * min(1.0, max(0.0, (progress - SHORT_UNTIL) / (FULL_FROM - SHORT_UNTIL)))


@torch.no_grad()
def evaluate_held_out(adapter, probes: torch.nn.ModuleDict, held: list[Stream], batch: int) -> dict[str, float]:
    """The share of right answers (teacher-forced) per question kind on the ``held`` streams, ``batch`` at a time."""
    adapter.model.eval()
    right = torch.cat([batch_loss(adapter, probes, held[i : i + batch])[1] for i in range(0, len(held), batch)])
    adapter.model.train()
    return accuracy_by_kind(held, right)


def accuracy_by_kind(streams: list[Stream], right: torch.Tensor) -> dict[str, float]:
    """Share of right answers per question kind (``right [Q]``: the questions of ``streams`` in order)."""
    kinds = np.array([qa[3] for s in streams for qa in s.qas])
    return {kind: float(right[torch.from_numpy(kinds == kind)].float().mean())
            for kind in world.CHANCE if (kinds == kind).any()}


def native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX-512 bf16 or AMX): ``train``'s default for ``bf16``."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def keep_freed_memory() -> None:
    """With glibc, serve every allocation from the heap and keep what is freed for the next one. By default glibc
    maps each block over 32 MB (a layer's [B, H, L, L] attention at full length) afresh and unmaps it when freed,
    so every step faults in those pages again (``docs/trials.md``, run 18: ~30% of a long float32 step). The
    process keeps its peak memory; elsewhere it does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
