"""Needle in a haystack on the real model: one number hidden in natural text, asked for at the end.

Prompt (raw completion form, the one SmolLM2-135M answers with dense attention):

    <Bible text ...> The special magic number for meadow is 7479084. <... Bible text> The special magic number for meadow is

The haystack and needle are prefilled (dense, as in the papers); the question is fed token by token, so it is
decoded through the sparse path, then up to 8 tokens are generated greedily. A case is correct when the
generated text starts with the number.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from livekv.cache import LiveKVCache
from livekv.evals.corpus import filler_token_ids
from livekv.generation import GenerationStats, generate_stream
from livekv.progress import above_bars, bar

WORDS = ["meadow", "harbor", "lantern", "orchard", "glacier", "canyon", "violet", "compass", "falcon", "ember"]
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class NeedleCase:
    context: int
    depth: float
    word: str
    number: str
    prompt_ids: torch.Tensor  # [1, T - len(question)]
    question_ids: torch.Tensor  # [1, len(question)]


def make_case(tokenizer, context: int, depth: float, seed: int) -> NeedleCase:
    """A needle case of exactly ``context`` tokens (haystack + needle + question)."""
    rng = random.Random(seed)
    word, number = rng.choice(WORDS), str(rng.randrange(1_000_000, 10_000_000))
    needle = tokenizer.encode(f" The special magic number for {word} is {number}.", add_special_tokens=False)
    question = tokenizer.encode(f" The special magic number for {word} is", add_special_tokens=False)
    n_filler = context - len(needle) - len(question)
    if n_filler < 16:
        raise ValueError(f"context {context} is too short for a needle case")
    filler = filler_token_ids(tokenizer, n_filler, seed=seed)
    at = int(depth * n_filler)
    prompt = filler[:at] + needle + filler[at:]
    return NeedleCase(context, depth, word, number, torch.tensor([prompt]), torch.tensor([question]))


def run_case(model, tokenizer, case: NeedleCase, cache: LiveKVCache, max_new_tokens: int = 8) -> dict:
    stats = GenerationStats()
    t0 = time.perf_counter()
    tokens = list(
        generate_stream(model, cache, case.prompt_ids, max_new_tokens, question_ids=case.question_ids, stats=stats)
    )
    answer = tokenizer.decode(tokens, skip_special_tokens=True)
    correct = answer.strip().startswith(case.number)
    return {
        "context": case.context,
        "depth": case.depth,
        "expected": case.number,
        "answer": answer.strip(),
        "accuracy": float(correct),
        "seconds": round(time.perf_counter() - t0, 3),
        **cache.memory(),
    }


def evaluate(
    model,
    tokenizer,
    methods: list[tuple[str, dict]],
    contexts: list[int],
    depths=DEFAULT_DEPTHS,
    seed: int = 0,
    log=print,
    progress: bool = False,
) -> dict:
    """Every (method, context, depth) case. ``methods``: ``(name, knobs)`` pairs. Returns
    ``{"results": [one record per method and context], "cases": [one record per case]}``. ``progress``: a bar of
    the cases on stderr."""
    results, cases = [], []
    cases_bar = bar(len(contexts) * len(methods) * len(depths), "needle", "case", enabled=progress)
    log = above_bars(log)
    for context in contexts:
        batch = [make_case(tokenizer, context, d, seed + 1000 * i + context) for i, d in enumerate(depths)]
        for name, knobs in methods:
            rows = []
            for case in batch:
                cache = LiveKVCache(model.config, name, ignore_unknown=True, **knobs)
                row = {"method": name, **_knob_record(cache), **run_case(model, tokenizer, case, cache)}
                rows.append(row)
                cases_bar.update()
                mark = "ok " if row["accuracy"] else "MISS"
                log(f"  {mark} {name:12s} ctx={context:6d} depth={case.depth:.2f} expected={case.number} "
                    f"got={row['answer']!r:12s} KV fast={row['fast_kv_bytes'] / 1e6:.1f} MB "
                    f"host={row['host_kv_bytes'] / 1e6:.1f} MB ({row['seconds']:.1f} s)")
            accuracy = sum(r["accuracy"] for r in rows) / len(rows)
            summary = {"method": name, **_knob_record(cache), "context": context, "cases": len(rows), "accuracy": accuracy}
            log(f"needle {name:12s} budget={summary['budget']!s:6s} context={context:6d} accuracy={accuracy:.2f} "
                f"({int(round(accuracy * len(rows)))}/{len(rows)})")
            results.append(summary)
            cases.extend(rows)
    cases_bar.close()
    return {"results": results, "cases": cases}


def _knob_record(cache: LiveKVCache) -> dict:
    """The method's budget (None for dense) and page size, for records."""
    m = cache.method
    return {"budget": getattr(m, "budget", None), "page_size": getattr(m, "page_size", None)}
