"""livevlm's knobs at stream-qa's 56 tokens of memory, on the benchmark's questions (a diagnostic).

    python docs/results/livevlm_knobs.py [--seed 0] [--weights DIR] --json docs/results/qa2_livevlm_knobs.json

Each variant is stream-qa's livevlm (`memory_knobs("livevlm", 56, 10)`: 14 short-term, 42 long-term tokens in one
bucket) with the knobs it names changed, on 8 worlds of 2 minutes (seeds SEED..SEED+7), 60 questions each.
"""

from __future__ import annotations

import argparse
import json

import torch

from livekv.evals.stream_qa import evaluate
from livekv.vlm.model import WEIGHTS, load_default_vlm

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
    p.add_argument("--json", required=True)
    args = p.parse_args()
    torch.set_num_threads(2)
    adapter = load_default_vlm(args.weights)
    out = {"command": f"python docs/results/livevlm_knobs.py --seed {args.seed} --weights {args.weights}", "variants": {}}
    for name, changed in VARIANTS.items():
        print(f"{name}:", flush=True)
        payload = evaluate(adapter, ["livevlm"], minutes=2, seed=args.seed, n_questions=60, memory_tokens=56, streams=8,
                           knobs=changed)
        out["variants"][name] = payload["results"][0]
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
