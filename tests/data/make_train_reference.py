"""What the training code computes on fixed seeds, recorded into ``train_reference.json`` beside this file, which
``tests/test_vlm.py`` checks the current code against bit for bit.

    PYTHONPATH=. python tests/data/make_train_reference.py     # rewrite the reference (only on purpose)

Recorded: the streams ``sample`` draws (seeds 0-2, 20 s, one with ``kind_weights``), their visual tokens and
every field of the ``Batch`` that ``encode`` makes of them (each compression branch taken at least once), as
sha256 of the tensors' bytes; the loss terms of ``loss_terms`` (all attention terms) and the loss of
``batch_loss`` (every weight on, each different) as ``float.hex``, the gradient it gives (sha256); a 3-step
``train`` run (the final weights' sha256, its ``training.json`` less the timings); and the ``train-vlm`` options
of the CLI with the arguments they resolve to. All on a fresh ``build_model(build_tokenizer(), seed=0)``, eager
attention, float32, no autocast, ``THREADS`` torch threads (CPU kernels may split sums by thread).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pathlib
import sys
import tempfile

import numpy as np
import torch

from livekv.vlm import WEIGHTS
from livekv.vlm import train as training
from livekv.vlm.model import DefaultVLMAdapter, build_model, build_tokenizer
from livekv.vlm.batch import encode, visual_tokens
from livekv.vlm.data import sample
from livekv.vlm.losses import ATTENTION_TERMS, PerceptionLoss, StreamStateLoss, batch_loss, loss_terms
from livekv.vlm.train import TrainConfig, train

REFERENCE = pathlib.Path(__file__).with_name("train_reference.json")
THREADS = 2
SEEDS = (0, 1, 2)
WEIGHTED = {"saliency": 0.3, "evidence": 0.5, "first_saliency": 0.7, "latest_saliency": 0.9}
CLI_LINES = (["train-vlm"],
             ["train-vlm", "--steps", "7", "--batch", "3", "--max-seconds", "40", "--out", "o", "--init", "i",
              "--resume", "--lr", "0.01", "--threads", "1", "--seed", "5", "--kind-weights", "where_last=3,count_now=2",
              "--saliency", "0.1", "--evidence", "0.2", "--first-saliency", "0", "--latest-saliency", "0.4",
              "--no-bf16"])


def digest(x) -> str:
    """sha256 of an array's or tensor's dtype, shape and bytes."""
    a = x.detach().contiguous().numpy() if isinstance(x, torch.Tensor) else np.ascontiguousarray(x)
    return hashlib.sha256(f"{a.dtype} {a.shape}".encode() + a.tobytes()).hexdigest()


def fresh_model():
    """A freshly built model in training mode with eager attention, and its probes (seeded by ``build_model``)."""
    tokenizer = build_tokenizer()
    adapter = DefaultVLMAdapter(build_model(tokenizer, seed=0), tokenizer)
    adapter.model.train().set_attn_implementation("eager")
    probes = torch.nn.ModuleDict({"perception": PerceptionLoss(adapter), "state": StreamStateLoss(adapter)})
    return adapter, probes


def streams_of(seed: int) -> list:
    rng = np.random.default_rng(seed)
    kind_weights = {"where_last": 3.0, "first_colour": 2.0} if seed == 2 else None
    return [sample(rng, 20.0, 10.0, kind_weights=kind_weights) for _ in range(3)]


def batches_and_losses() -> dict:
    adapter, probes = fresh_model()
    out = {}
    for seed in SEEDS:
        streams, salient = streams_of(seed), seed != 1
        record = {"streams": [{"frames": digest(s.frames), "cells": digest(s.cells), "count": digest(s.count),
                               "first": digest(s.first), "next_seen": digest(s.next_seen),
                               "qas": hashlib.sha256(json.dumps(s.qas).encode()).hexdigest()} for s in streams]}
        with torch.no_grad():
            visual = visual_tokens(adapter, np.concatenate([s.frames for s in streams]))
            batch = encode(adapter, streams, visual, np.random.default_rng(100 + seed), salient=salient)
        record["visual"] = digest(visual)
        record["batch"] = {f.name: digest(getattr(batch, f.name)) for f in dataclasses.fields(batch)}
        record["kept"] = [int((batch.frame_of[b] >= 0).sum()) for b in range(len(streams))]  # compression seen
        terms, right = loss_terms(adapter, probes, streams, np.random.default_rng(100 + seed), ATTENTION_TERMS,
                                  salient=salient)
        record["terms"] = {name: value.item().hex() for name, value in terms.items()}
        record["right"] = right.tolist()
        loss, right = batch_loss(adapter, probes, streams, np.random.default_rng(100 + seed), **WEIGHTED)
        params = list(adapter.model.parameters()) + list(probes.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        record["loss"], record["loss_right"] = loss.item().hex(), right.tolist()
        record["grad"] = hashlib.sha256(b"".join(b"-" if g is None else digest(g).encode() for g in grads)).hexdigest()
        out[str(seed)] = record
    return out


def short_run() -> dict:
    """A 3-step run from scratch (default loss weights, float32): its final weights and ``training.json``."""
    from livekv.vlm.model import load_default_vlm

    with tempfile.TemporaryDirectory() as tmp:
        result = train(TrainConfig(out=tmp, steps=3, batch=2, max_seconds=12, log_every=1, eval_every=3, held_out=2,
                                   bf16=False))
        state = load_default_vlm(tmp).model.state_dict()
        saved = json.loads((pathlib.Path(tmp) / "training.json").read_text())
    assert saved == result
    weights = hashlib.sha256(b"".join(f"{k} {digest(state[k])}".encode() for k in sorted(state))).hexdigest()
    return {"weights": weights, "training": {k: v for k, v in result.items() if k not in ("train_s", "threads")}}


def cli_options() -> dict:
    """The ``train-vlm`` options (flags, destination, default, type, action) and, per command line of
    ``CLI_LINES``, the ``TrainConfig`` that ``cmd_train_vlm`` passes on to ``train`` (the output folder ``WEIGHTS``:
    ``"<WEIGHTS>"``; ``threads`` only where given)."""
    from livekv import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train-vlm"]
    options = {a.dest: {"flags": a.option_strings, "default": a.default, "action": type(a).__name__,
                        "type": getattr(a.type, "__name__", None)} for a in sub._actions if a.dest != "help"}
    resolved = []
    for line in CLI_LINES:
        seen = {}
        real_train = training.train
        training.train = lambda config: seen.update(dataclasses.asdict(config))
        try:
            args = parser.parse_args(line)
            args.func(args)
        finally:
            training.train = real_train
        if seen["threads"] is None:
            del seen["threads"]
        resolved.append({k: "<WEIGHTS>" if str(v) == str(WEIGHTS) else str(v) if isinstance(v, pathlib.Path) else v
                         for k, v in seen.items()})
    return {"options": options, "resolved": resolved}


def compute() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return {"threads": THREADS, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "torch": torch.__version__, "batches": batches_and_losses(), "run": short_run(), "cli": cli_options()}
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    made_with = sys.argv[1] if len(sys.argv) > 1 else None
    REFERENCE.write_text(json.dumps({"made_with": made_with, **compute()}, indent=1) + "\n")
    print(f"wrote {REFERENCE}")
