"""Fidelity of a sparse method to dense attention, and perplexity through the sparse decode path.

Natural text of ``context + target`` tokens: the first ``context`` tokens are prefilled, the ``target`` tokens
are then fed one by one (teacher forcing), once with a dense cache and once per sparse method. Reported:

* ``mass_recall``: share of the true (dense) softmax mass that falls on the tokens the method read, per query head,
  averaged over layers, heads and steps;
* ``output_cosine``: cosine between the layer's sparse attention output and the dense output for the same query
  (mean, and the minimum over layers of the per-layer mean);
* ``kl``: KL(dense || sparse) of the next-token distributions; ``agreement``: share of steps where the greedy
  next tokens agree;
* ``ppl`` (sparse) next to ``ppl_dense`` on the target tokens;
* ``prefill_s``, and for ``clusterkv`` ``cluster_s``: the seconds k-means took over the whole run (the prompt's
  clustering, then the incremental ones).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import torch

from livekv.cache import LiveKVCache
from livekv.layers import RecallableLayer
from livekv.evals.corpus import filler_token_ids
from livekv.generation import feed, prefill
from livekv.methods import clusterkv
from livekv.progress import above_bars, bar


class AttentionProbe:
    """Observer of sparse layers: compares each sparse step with dense attention over all stored tokens."""

    def __init__(self):
        self.mass = defaultdict(list)  # layer -> per-step mean mass recall
        self.cosine = defaultdict(list)

    def __call__(self, layer: RecallableLayer, query: torch.Tensor, token_idx: torch.Tensor, out: torch.Tensor):
        keys, values = layer.host.all_tokens()  # [B, G, T, D]
        B, H, D = query.shape
        G = keys.shape[1]
        q = query.view(B, G, H // G, D).float()
        probs = (q @ keys.float().transpose(-1, -2) * D**-0.5).softmax(-1)  # [B, G, r, T]
        picked = probs.gather(-1, token_idx.unsqueeze(2).expand(-1, -1, H // G, -1))
        self.mass[layer.layer_idx].append(picked.sum(-1).mean().item())
        dense_out = (probs @ values.float()).reshape(B, H, D)
        sparse_out = out.reshape(B, H, D).float()
        self.cosine[layer.layer_idx].append(torch.cosine_similarity(dense_out, sparse_out, dim=-1).mean().item())

    def summary(self) -> dict:
        per_layer_cos = [sum(v) / len(v) for v in self.cosine.values()]
        mass = [x for v in self.mass.values() for x in v]
        cos = [x for v in self.cosine.values() for x in v]
        return {
            "mass_recall": sum(mass) / len(mass),
            "output_cosine": sum(cos) / len(cos),
            "output_cosine_min_layer": min(per_layer_cos),
        }


def _teacher_forced_logprobs(model, cache: LiveKVCache, ids: torch.Tensor, context: int,
                             chunk: int) -> tuple[torch.Tensor, float]:
    """Log-probabilities ``[target, V]`` of the next token at each target position, and the prefill's seconds."""
    t0 = time.perf_counter()
    last = prefill(model, cache, ids[:, :context], chunk)
    prefill_s = time.perf_counter() - t0
    rest = feed(model, cache, ids[:, context:-1])
    return torch.cat([last[:, None], rest], dim=1)[0].float().log_softmax(-1), prefill_s


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    methods: list[tuple[str, dict]],
    contexts: list[int],
    target: int = 256,
    seed: int = 0,
    chunk: int = 2048,
    log=print,
    progress: bool = False,
) -> dict:
    """One record per method and context (see the module docstring). ``progress``: a bar of the passes over the
    text (dense, then each method) on stderr."""
    results = []
    passes = bar(len(contexts) * (1 + len(methods)), "fidelity", "pass", enabled=progress)
    log = above_bars(log)
    for context in contexts:
        ids = torch.tensor([filler_token_ids(tokenizer, context + target, seed=seed)])
        targets = ids[0, context:]
        dense, _ = _teacher_forced_logprobs(model, LiveKVCache(model.config, "dense"), ids, context, chunk)
        ppl_dense = math.exp(-dense.gather(-1, targets[:, None]).mean().item())
        passes.update()
        log(f"fidelity dense        context={context:6d} ppl={ppl_dense:.3f}")
        for name, knobs in methods:
            cache = LiveKVCache(model.config, name, ignore_unknown=True, **knobs)
            probe = AttentionProbe()
            for layer in cache.recallable_layers:
                layer.observers.append(probe)
            sparse, prefill_s = _teacher_forced_logprobs(model, cache, ids, context, chunk)
            ppl = math.exp(-sparse.gather(-1, targets[:, None]).mean().item())
            passes.update()
            record = {
                "method": name,
                "budget": getattr(cache.method, "budget", None),
                "context": context,
                "target_tokens": target,
                "ppl": ppl,
                "ppl_dense": ppl_dense,
                "ppl_ratio": ppl / ppl_dense,
                "kl": (dense.exp() * (dense - sparse)).sum(-1).mean().item(),
                "agreement": (dense.argmax(-1) == sparse.argmax(-1)).float().mean().item(),
                **(probe.summary() if probe.mass else {}),
                "prefill_s": prefill_s,
            }
            if isinstance(cache.method, clusterkv.ClusterKVConfig):
                record["cluster_s"] = clusterkv.diagnostics(cache)["cluster_s"]
            results.append(record)
            log(
                f"fidelity {name:12s} budget={record['budget']!s:6s} context={context:6d} ppl={ppl:.3f} "
                f"(x{record['ppl_ratio']:.4f} dense) kl={record['kl']:.4f} agreement={record['agreement']:.3f} "
                f"mass_recall={record.get('mass_recall', 1.0):.3f} cosine={record.get('output_cosine', 1.0):.4f} "
                f"prefill={prefill_s:.1f} s" + (f" k-means={record['cluster_s']:.1f} s" if "cluster_s" in record else "")
            )
    passes.close()
    return {"results": results}
