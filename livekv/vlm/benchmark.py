"""The streaming video QA benchmark drawn from a ``World``: questions asked at instants spread over the stream,
balanced across question kinds and the age of their evidence (``age_bucket``: recent, start, middle). Deterministic
for a seed; ``livekv eval stream-qa`` asks it, and training draws its buckets the same way."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from livekv.vlm.world import Question, World


def age_bucket(question: Question, recent_s: float = 20.0, start_s: float = 20.0) -> str:
    """``"recent"`` (age < ``recent_s``), ``"start"`` (evidence in the first ``start_s`` seconds) or ``"middle"``."""
    if question.age < recent_s:
        return "recent"
    return "start" if question.evidence_time < start_s else "middle"


def stream_qa(seed: int, duration_s: float, n_questions: int = 60, fps: float = 0.5) -> tuple[World, list[Question]]:
    """A deterministic benchmark: ``World(seed, duration_s, fps)`` and up to ``n_questions`` questions, sorted by
    ask time. Questions are asked at sampling instants spread evenly over the stream (the last one at the last
    frame), about two per instant. Each pick is from the (kind, age bucket) group with the fewest questions so far
    of its kind, plus of its bucket, plus of itself (ties broken at random), so kinds, buckets and the buckets of each
    kind are balanced as far as the world allows."""
    world = World(seed, duration_s, fps=fps)
    rng = np.random.default_rng([seed, 1])
    n_frames = len(world.frame_times)
    n_asks = min(n_frames, max(1, math.ceil(n_questions / 2)))
    ask_times = sorted({world.frame_times[round((i + 1) * (n_frames - 1) / n_asks)] for i in range(n_asks)})
    groups: dict[tuple[str, str], list[Question]] = {}
    for t in ask_times:
        for q in world.candidates(t):
            groups.setdefault((q.kind, age_bucket(q)), []).append(q)
    cap = math.ceil(n_questions / len(ask_times))
    chosen: list[Question] = []
    per_kind, per_bucket, per_ask, per_group = Counter(), Counter(), Counter(), Counter()
    while len(chosen) < n_questions and any(groups.values()):
        open_groups = {key: [q for q in qs if per_ask[q.ask_time] < cap] for key, qs in groups.items()}
        open_groups = {key: qs for key, qs in open_groups.items() if qs}
        if not open_groups:
            cap += 1
            continue
        score = {key: per_kind[key[0]] + per_bucket[key[1]] + per_group[key] for key in open_groups}
        best = sorted(key for key in open_groups if score[key] == min(score.values()))
        key = best[int(rng.integers(len(best)))]
        q = open_groups[key][int(rng.integers(len(open_groups[key])))]
        groups[key].remove(q)
        chosen.append(q)
        per_kind[key[0]] += 1
        per_bucket[key[1]] += 1
        per_ask[q.ask_time] += 1
        per_group[key] += 1
    return world, sorted(chosen, key=lambda q: q.ask_time)
