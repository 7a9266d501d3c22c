"""Running the RULER suite: every method continues one dense prefill per case; scores, summaries, a table."""

from __future__ import annotations

import collections
import re
import time

import torch

from livekv.cache import LiveKVCache
from livekv.evals.ruler.cases import RulerCase, make_case
from livekv.evals.ruler.texts import PROTOCOLS, RETRIEVAL, SPLITS, TASKS
from livekv.generation import feed, prefill
from livekv.progress import above_bars, bar

# --- scoring -----------------------------------------------------------------------------------------------------
def _pattern(item: str) -> re.Pattern:
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(item) + r"(?![A-Za-z0-9])", re.IGNORECASE)


def score(answer: str, expected: list[str]) -> float:
    """Share of ``expected`` items found in ``answer`` as whole words (case-insensitive): RULER's string match."""
    return sum(bool(_pattern(x).search(answer)) for x in expected) / len(expected)


def _complete(answer: str, expected: list[str]) -> bool:
    """Every item found and followed by something (so that no longer item can still be meant)."""
    for x in expected:
        m = _pattern(x).search(answer)
        if m is None or m.end() == len(answer):
            return False
    return True


# --- running -----------------------------------------------------------------------------------------------------
def fork(model, prefix: LiveKVCache, method: str, knobs: dict) -> LiveKVCache:
    """A new cache of ``method`` holding what the dense cache ``prefix`` holds (its KV, copied), as if it had
    prefilled the same tokens itself (prefill attends densely in every method)."""
    cache = LiveKVCache(model.config, method, ignore_unknown=True, **knobs)
    for src, dst in zip(prefix.layers, cache.layers):
        keys, values = src.fast.view()
        dst.append(keys, values)
    return cache


@torch.no_grad()
def answer_case(model, tokenizer, cache: LiveKVCache, case: RulerCase, protocol: str) -> str:
    """Continue ``cache`` (holding the case's context) with the question (prefilled or fed), then decode greedily
    until the end of the turn, ``case.max_new_tokens``, or every expected item has been given."""
    question = torch.tensor([case.question_ids])
    if protocol == "prompt":
        logits = prefill(model, cache, question)
    elif protocol == "fed":
        logits = feed(model, cache, question)[:, -1]
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    stop = {tokenizer.eos_token_id}
    tokens: list[int] = []
    for _ in range(case.max_new_tokens):
        token = int(logits.argmax(-1))
        if token in stop:
            break
        tokens.append(token)
        if _complete(tokenizer.decode(tokens), case.expected):
            break
        logits = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[:, -1]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def summarize(cases: list[dict]) -> list[dict]:
    """Mean score per (method, budget, context, protocol, task), and over tasks: ``all``, ``retrieval`` (niah_*) and
    ``other`` (each the mean of its tasks' means)."""
    groups: dict[tuple, list[float]] = collections.defaultdict(list)
    for c in cases:
        groups[(c["method"], c["budget"], c["context"], c["protocol"], c["task"])].append(c["score"])
    rows = [dict(method=m, budget=b, context=ctx, protocol=pr, task=t, cases=len(s), accuracy=sum(s) / len(s))
            for (m, b, ctx, pr, t), s in groups.items()]
    out = list(rows)
    by_cell = collections.defaultdict(list)
    for r in rows:
        by_cell[(r["method"], r["budget"], r["context"], r["protocol"])].append(r)
    for (m, b, ctx, pr), rs in by_cell.items():
        for name, pick in (("retrieval", lambda t: t in RETRIEVAL), ("other", lambda t: t not in RETRIEVAL),
                           ("all", lambda t: True)):
            sel = [r for r in rs if pick(r["task"])]
            if sel:
                out.append(dict(method=m, budget=b, context=ctx, protocol=pr, task=name,
                                cases=sum(r["cases"] for r in sel), accuracy=sum(r["accuracy"] for r in sel) / len(sel)))
    return out


def table(results: list[dict]) -> str:
    """A markdown table per context and protocol: a row per method (and budget), a column per task and for the
    retrieval / other / all means, in percent; under each sparse method's row its difference to dense."""
    out = []
    tasks = [t for t in (*TASKS, "retrieval", "other", "all") if any(r["task"] == t for r in results)]
    for context in sorted({r["context"] for r in results}):
        for protocol in [p for p in PROTOCOLS if any(r["protocol"] == p for r in results)]:
            mine = {(r["method"], r["budget"], r["task"]): r for r in results
                    if r["context"] == context and r["protocol"] == protocol}
            rows = list(dict.fromkeys((m, b) for m, b, _ in mine))
            n = {t: next(r["cases"] for (m, b, tt), r in mine.items() if tt == t) for t in tasks if t in TASKS and
                 any(tt == t for _, _, tt in mine)}
            out.append(f"\ncontext {context}, protocol {protocol} (cases per task: "
                       + ", ".join(f"{t} {c}" for t, c in n.items()) + ")\n")
            out.append("| method | budget | " + " | ".join(tasks) + " |")
            out.append("|---|---|" + "---|" * len(tasks))
            dense = next(((m, b) for m, b in rows if b is None), None)
            for m, b in rows:
                cells = [mine.get((m, b, t)) for t in tasks]
                out.append(f"| {m} | {b or 'all'} | " + " | ".join(
                    "-" if c is None else f"{100 * c['accuracy']:.1f}" for c in cells) + " |")
                if dense and (m, b) != dense:
                    deltas = []
                    for t, c in zip(tasks, cells):
                        d = mine.get((*dense, t))
                        deltas.append("-" if c is None or d is None else f"{100 * (c['accuracy'] - d['accuracy']):+.1f}")
                    out.append("| (vs dense) | | " + " | ".join(deltas) + " |")
    return "\n".join(out)


def evaluate(model, tokenizer, methods: list[tuple[str, dict]], contexts: list[int], split: str = "dev",
             tasks=TASKS, cases: int = 10, protocols=PROTOCOLS, first: int = 0, template: str = "chat",
             chunk: int = 2048, log=print, progress: bool = False) -> dict:
    """Every (context, task, case, protocol, method). ``methods``: ``(name, knobs)`` pairs (a name may be a spec
    such as ``quest:gqa_pool=rank``, whose knobs are in ``knobs`` too: it labels the records). Cases ``first ..
    first + cases - 1`` of each task. Returns ``{"split", "results": summarize(cases), "cases": [one record per
    case, method and protocol]}``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected 'dev' or 'test'")
    records = []
    total = len(contexts) * len(tasks) * cases * len(protocols) * len(methods)
    runs = bar(total, f"ruler {split}", "answer", enabled=progress)
    log = above_bars(log)
    for context in contexts:
        for task in tasks:
            for index in range(first, first + cases):
                case = make_case(tokenizer, task, split, index, context, template)
                prefix = LiveKVCache(model.config, "dense")
                t0 = time.perf_counter()
                prefill(model, prefix, torch.tensor([case.context_ids]), chunk)
                prefill_s = time.perf_counter() - t0
                for protocol in protocols:
                    for name, knobs in methods:
                        t0 = time.perf_counter()
                        cache = fork(model, prefix, name.partition(":")[0], knobs)
                        answer = answer_case(model, tokenizer, cache, case, protocol)
                        s = score(answer, case.expected)
                        m = cache.method
                        rec = {"method": name, "budget": getattr(m, "budget", None),
                               "page_size": getattr(m, "page_size", None), "protocol": protocol, **case.record(),
                               "answer": answer, "score": s, "correct": s == 1.0,
                               "seconds": round(time.perf_counter() - t0, 2), "prefill_s": round(prefill_s, 2)}
                        records.append(rec)
                        runs.update()
                        mark = "ok  " if s == 1 else ("part" if s else "MISS")
                        log(f"  {mark} {task:15s} #{index:<3d} {protocol:6s} {name:11s} b={rec['budget']!s:5s} "
                            f"ctx={context} {case.haystack:11s} {case.form:6s} expected={','.join(case.expected)} "
                            f"got={answer[:80]!r} ({rec['seconds']:.1f} s)")
                del prefix
    runs.close()
    results = summarize(records)
    for r in results:
        if r["task"] in ("retrieval", "other", "all"):
            log(f"ruler {split} {r['method']:11s} budget={r['budget']!s:5s} context={r['context']} "
                f"{r['protocol']:6s} {r['task']:9s} {100 * r['accuracy']:5.1f} ({r['cases']} cases)")
    log(table(results))
    return {"split": split, "template": template, "results": results, "cases": records}
