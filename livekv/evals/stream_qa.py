"""Streaming video QA on the synthetic world: ``livekv eval stream-qa --method M --minutes N``.

A world plays at 0.5 fps into one ``StreamSession`` per method (one frame per clip); questions are asked while it
plays, each right after the last frame before its ask time, and scored by exact match. Reported per method:
accuracy overall, per age bucket of the evidence (recent, middle, start of the stream) and per question kind next
to its chance level; the fast-tier KV bytes (peak over the stream) and the time to the first answer token.

``memory_tokens`` gives every bounded method the same fast-tier memory, in tokens per layer: ``sink_window`` a
window of that many; ``livevlm`` a quarter short-term and three quarters long-term memory, in one bucket (VSB
keeps the best-scored tokens: at a long-term memory of a few frames, the paper's one-token buckets thin it
evenly in time, mostly background, whatever the scores); ``rekv`` half a window and half retrieved frames.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys

from livekv.methods import make_method, parse_spec
from livekv.stream.session import StreamSession
from livekv.vlm import benchmark
from livekv.vlm import world as world_mod


def memory_knobs(spec: str, memory_tokens: int | None, tokens_per_frame: float) -> dict:
    """The knobs of ``spec`` (a method, optionally with knobs: ``"livevlm:offload=true"``), with those its own rule
    gives for about ``memory_tokens`` tokens of fast-tier memory (``None``: the model's default memory, chosen by
    the session)."""
    name, given = parse_spec(spec)
    if memory_tokens is None:
        return given
    default, cfg = make_method(name, context="stream", **given), make_method(name, context="stream", **given)
    cfg.resolve(memory_tokens, tokens_per_frame)
    return {**given, **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                        if getattr(default, f.name) is None and getattr(cfg, f.name) is not None}}


def run_method(adapter, method: str, knobs: dict, world, questions, system: str) -> tuple[list[dict], int, int]:
    """Play ``world`` into a fresh session of ``method`` and ask ``questions`` during playback. Returns the cases,
    the peak fast-tier KV bytes and the memory (tokens per layer) at the end."""
    session = StreamSession(adapter, parse_spec(method)[0], system=system, **knobs)
    pending, cases, peak_fast = list(questions), [], 0
    for t, image in world.frames():
        while pending and pending[0].ask_time < t:
            cases.append(_ask(session, pending.pop(0), world))
        session.push(image[None])
        peak_fast = max(peak_fast, session.memory()["fast_kv_bytes"])
    while pending:
        cases.append(_ask(session, pending.pop(0), world))
    for c in cases:
        c["method"] = method
    return cases, max([peak_fast] + [c["fast_kv_bytes"] for c in cases]), session.memory()["memory_tokens"]


def summarize(method: str, knobs: dict, minutes: float, streams: int, cases: list[dict], kv_bytes: int,
              memory_tokens: int) -> dict:
    """One method's record: accuracy overall, per age bucket and per kind (with chance), memory and median TTFT."""
    host = max((c["host_kv_bytes"] for c in cases), default=0)
    record = {"method": method, **knobs, "minutes": minutes, "streams": streams, "questions": len(cases),
              "accuracy": _mean(cases), "kv_bytes": kv_bytes, "memory_tokens": memory_tokens,
              "host_kv_bytes": host, "host_kv_bytes_per_hour": host * 60 / minutes,
              "ttft_ms": statistics.median(c["ttft_ms"] for c in cases) if cases else None}
    for key in ("bucket", "kind"):
        for value in sorted({c[key] for c in cases}):
            record["acc_" + value] = _mean([c for c in cases if c[key] == value])
    for kind in sorted({c["kind"] for c in cases}):
        record["chance_" + kind] = world_mod.CHANCE[kind]
    return record


def _ask(session: StreamSession, question, world) -> dict:
    answer = session.answer(question.text, max_new_tokens=4).strip()
    mem = session.memory()
    return {"kind": question.kind, "bucket": benchmark.age_bucket(question), "age_s": question.age,
            "ask_time": question.ask_time, "question": question.text, "expected": question.answer, "answer": answer,
            "correct": answer == question.answer, "ttft_ms": (session.stats.ttft_s or 0.0) * 1e3,
            "fast_kv_bytes": mem["fast_kv_bytes"], "host_kv_bytes": mem["host_kv_bytes"],
            "memory_tokens": mem["memory_tokens"]}


def _mean(cases: list[dict]) -> float:
    return sum(c["correct"] for c in cases) / len(cases) if cases else 0.0


def evaluate(adapter, methods: list[str], minutes: float = 2.0, seed: int = 0, n_questions: int = 60,
             memory_tokens: int | None = None, system: str | None = None, fps: float = 0.5, streams: int = 1,
             knobs: dict | None = None) -> dict:
    """Every method on ``streams`` worlds (seeds ``seed, seed + 1, ...``) of ``minutes`` each, ``n_questions``
    per world; a method's record pools the questions of all its streams. ``knobs`` change those the memory rule
    gives (every method's)."""
    from livekv.vlm.model import SYSTEM

    worlds = [benchmark.stream_qa(seed + i, minutes * 60, n_questions, fps) for i in range(streams)]
    results, all_cases = [], []
    for method in methods:
        # + LLaVA's newline per clip
        method_knobs = {**memory_knobs(method, memory_tokens, adapter.tokens_per_frame + 1), **(knobs or {})}
        cases, kv_bytes, tokens = [], 0, 0
        for i, (world, questions) in enumerate(worlds):
            stream_cases, peak, tokens = run_method(adapter, method, method_knobs, world, questions, system or SYSTEM)
            cases += [{**c, "stream": seed + i} for c in stream_cases]
            kv_bytes = max(kv_bytes, peak)
        record = summarize(method, method_knobs, minutes, streams, cases, kv_bytes, tokens)
        buckets = "  ".join(f"{k[4:]} {v:.2f}" for k, v in record.items() if k.startswith("acc_"))
        print(f"{method:12s} accuracy {record['accuracy']:.3f} ({record['questions']} q) | {buckets} | "
              f"KV fast {record['kv_bytes'] / 1e6:.2f} MB | TTFT {record['ttft_ms']:.1f} ms", file=sys.stdout, flush=True)
        results.append(record)
        all_cases += cases
    chance = {kind: world_mod.CHANCE[kind] for kind in sorted({c["kind"] for c in all_cases})}
    return {"minutes": minutes, "seed": seed, "streams": streams, "chance": chance, "results": results,
            "cases": all_cases}


def demo(adapter, method: str = "livevlm", minutes: float = 2.0, seed: int = 7, n_questions: int = 12,
         memory_tokens: int = 56, speed: float = 0.0) -> dict:
    """The main job: a synthetic stream plays into ``method``'s memory, questions are asked during playback, and each
    answer is shown with its correctness and the live memory and latency. ``speed`` > 0 paces playback at that many
    times real time. Returns what was shown: ``{"questions": [one record per question], "right": ..., ...}``."""
    import time

    from livekv.vlm.model import SYSTEM

    world, questions = benchmark.stream_qa(seed, minutes * 60, n_questions, 0.5)
    knobs = memory_knobs(method, memory_tokens, adapter.tokens_per_frame + 1)
    session = StreamSession(adapter, parse_spec(method)[0], system=SYSTEM, **knobs)
    print(f"A {minutes:g}-minute synthetic stream at 0.5 fps ({len(world.frame_times)} frames of {adapter.tokens_per_frame} + 1 "
          f"tokens) plays into `{method}` ({', '.join(f'{k}={v}' for k, v in knobs.items()) or 'no budget'}); questions come "
          f"while it plays.")
    pending, cases, right, start = list(questions), [], 0, time.perf_counter()
    for t, image in list(world.frames()) + [(float("inf"), None)]:
        while pending and pending[0].ask_time < t:
            q = pending.pop(0)
            case = _ask(session, q, world)
            cases.append(case)
            right += case["correct"]
            mark = "right" if case["correct"] else f"wrong, expected {q.answer!r}"
            mem = session.memory()
            print(f"t={q.ask_time:5.0f}s  Q: {q.text}\n          A: {case['answer']!r} ({mark}; evidence {q.age:.0f} s old) "
                  f"| first token {case['ttft_ms']:.0f} ms | KV {mem['fast_kv_bytes'] / 1e3:.0f} kB fast, "
                  f"{mem['memory_tokens']} tokens held, {session.stats.ingest_fps:.0f} frames/s ingest", flush=True)
        if image is None:
            break
        if speed > 0:
            time.sleep(max(0.0, start + t / speed - time.perf_counter()))
        session.push(image[None])
    full_tokens = session.cache.layers[0].n_sink + len(world.frame_times) * (adapter.tokens_per_frame + 1)
    print(f"{right}/{len(questions)} answered right. The memory held {session.memory()['memory_tokens']} tokens per layer at "
          f"the end; keeping every frame (`full`) would hold about {full_tokens}.")
    return {"method": method, "knobs": knobs, "minutes": minutes, "seed": seed, "frames": len(world.frame_times),
            "questions": cases, "right": right, "memory_tokens": session.memory()["memory_tokens"],
            "full_memory_tokens": full_tokens, "ingest_fps": session.stats.ingest_fps}
