"""livevlm's knobs at stream-qa's 56 tokens of memory, on the benchmark's questions (a diagnostic).

    python docs/results/livevlm_knobs.py [--seed 0] [--weights DIR] > docs/results/qa2_livevlm_knobs.json

Each variant is stream-qa's livevlm (`memory_knobs("livevlm", 56, 10)`: 14 short-term, 42 long-term tokens in one
bucket) with the knobs it names changed, on 8 worlds of 2 minutes (seeds SEED..SEED+7), 60 questions each.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from livekv.evals import world
from livekv.evals.stream_qa import memory_knobs, run_method, summarize
from livekv.vlm.model import SYSTEM, WEIGHTS, load_default_vlm

VARIANTS = {
    "default": {},
    "paper buckets (B = 1)": {"bucket": 1},
    "all pages retrieved": {"retrieve": 1.0},
    "4-token pages": {"page": 4},
    "1-token pages": {"page": 1},
    "28 short-term + 28 long-term": {"short_term": 28, "long_term": 28, "bucket": 28, "vsb_rows": 28},
    "twice the memory (28 + 84)": {"short_term": 28, "long_term": 84, "bucket": 84, "vsb_rows": 28},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=str(WEIGHTS))
    args = p.parse_args()
    torch.set_num_threads(2)
    adapter = load_default_vlm(args.weights)
    worlds = [world.stream_qa(seed, 120, 60, 0.5) for seed in range(args.seed, args.seed + 8)]
    out = {"command": f"python docs/results/livevlm_knobs.py --seed {args.seed} --weights {args.weights}", "variants": {}}
    for name, changed in VARIANTS.items():
        knobs = {**memory_knobs("livevlm", 56, adapter.tokens_per_frame + 1), **changed}
        cases, peak = [], 0
        for w, questions in worlds:
            stream_cases, stream_peak, tokens = run_method(adapter, "livevlm", knobs, w, questions, SYSTEM)
            cases, peak = cases + stream_cases, max(peak, stream_peak)
        record = summarize("livevlm", knobs, 2, len(worlds), cases, peak, tokens)
        out["variants"][name] = record
        print(f"{name:30s} accuracy {record['accuracy']:.3f}  KV fast {peak / 1e6:.2f} MB", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
