"""What freekv's background work costs its critical path on this 2-core CPU (a diagnostic, not a benchmark of a
shipped configuration: it replaces the worker's job, so most variants decode from wrong pages).

One process, SmolLM2 at 32k context (caches filled as in ``livekv bench decode``), budget 2048, 2 compute threads,
``tau = -inf`` for every freekv variant (no correction: a stale selection would trip it), interleaved rounds of 8
steps, median of 4 after a warm-up round. Variants of the job the recall worker runs after each layer's attention:

* ``full``: freekv as shipped (select with q(t), plan, copy the missing pages);
* ``inline``: the same job on the compute thread, right after attention (nothing in the background);
* ``select``: only the selection, no recall (attention reads the slots of the warm-up's last recall);
* ``none``: no job at all (the same stale slots): freekv's critical path alone;
* ``gemm``: one 384x384 matrix product (0.57 ms on one thread, no Python between ops);
* ``tiny``: 150 additions of 64-element vectors (0.13 ms of Python-bound small ops).

Run: ``python docs/results/freekv_bookkeeping.py docs/results/freekv_bookkeeping.json``
"""

import json
import statistics
import sys
import time
import types

import torch

from livekv.bench.decode import fill_cache
from livekv.cache import LiveKVCache
from livekv.evals.corpus import filler_token_ids
from livekv.generation import prefill
from livekv.models import load_model
from livekv.protocol import LayerStats
from livekv.recall import _timed

CONTEXT, BUDGET, STEPS, ROUNDS = 32768, 2048, 8, 4
A, B = torch.randn(384, 384), torch.randn(384, 384)
SMALL = torch.randn(64)


def job_select(layer, q, length):
    layer.spec, layer.spec_length = layer.select(q, length), length


def job_none(layer, q, length):
    layer.spec_length = length


def job_gemm(layer, q, length):
    torch.mm(A, B)
    layer.spec_length = length


def job_tiny(layer, q, length):
    x = SMALL
    for _ in range(150):
        x = x + SMALL
    layer.spec_length = length


def inline(layer, q):
    """Run the shipped job on the compute thread (a finished Future stands in for the worker's)."""
    from concurrent.futures import Future

    layer.q_prev = q
    layer.slots.mark_read()
    layer.pending = Future()
    layer.pending.set_result(_timed(layer._speculate_job, q, layer.host.length + 1))


@torch.no_grad()
def main(out: str) -> None:
    torch.set_num_threads(2)
    model, tok = load_model(None)
    ids = torch.tensor([filler_token_ids(tok, 1024)])
    source = LiveKVCache(model.config, "dense")
    prefill(model, source, ids)
    layer_kv = [layer.fast.view() for layer in source.layers]
    token = ids[:, -1:]
    variants = {"quest": None, "full": None, "inline": None, "select": job_select, "none": job_none,
                "gemm": job_gemm, "tiny": job_tiny}
    caches = {}
    for name in variants:
        knobs = {} if name == "quest" else {"tau": float("-inf")}
        caches[name] = LiveKVCache(model.config, "quest" if name == "quest" else "freekv", budget=BUDGET, **knobs)
        fill_cache(caches[name], layer_kv, CONTEXT)
        if name == "inline":
            for layer in caches[name].recallable_layers:
                layer._speculate = types.MethodType(inline, layer)
    ms = {name: [] for name in variants}
    for r in range(ROUNDS + 1):
        for name, cache in caches.items():
            t0 = time.perf_counter()
            for _ in range(STEPS):
                model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.wait()
            if r:
                ms[name].append((time.perf_counter() - t0) / STEPS * 1000)
                continue
            for layer in cache.recallable_layers:  # after a real warm-up round: the slots hold a real selection
                layer.stats = LayerStats()
                if variants[name] is not None:
                    layer._speculate_job = types.MethodType(variants[name], layer)
    results = []
    for name, cache in caches.items():
        s = cache.stats()
        steps = s["steps"] / max(1, s["recallable_layers"])
        record = {"variant": name, "ms_per_token": statistics.median(ms[name]), "rounds_ms": ms[name],
                  "job_ms_per_step": 1000 * s["background_s"] / steps if steps else 0.0}
        results.append(record)
        print(f"{name:7s} {record['ms_per_token']:6.1f} ms/token  job {record['job_ms_per_step']:5.1f} ms/step "
              f"(on the worker, or inline)", flush=True)
    payload = {"command": "python docs/results/freekv_bookkeeping.py", "context": CONTEXT, "budget": BUDGET,
               "threads": 2, "results": results}
    with open(out, "w") as f:
        json.dump(payload, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
