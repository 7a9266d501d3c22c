"""The training data of the embedded default VLM: random streams of the synthetic world with their questions.

Every sample is a random world streamed at 0.5 fps with its questions and their answers: ``questions`` per stream,
asked after the last frame and after ``ask_frames - 1`` random earlier ones, their kinds drawn evenly and, within
a kind, about the stream's past where it has one (``pick_by_age``: only where_last's ages vary). ``encode``
(``livekv.vlm.batch``) makes model inputs of them.
"""

from __future__ import annotations

import numpy as np

from livekv.vlm import benchmark, world


def object_index(cells):
    """(colour, shape) ``[..., 2]`` (array or tensor) -> the object's index in ``OBJECT_WORDS`` ``[...]``."""
    return cells[..., 0] * len(world.SHAPES) + cells[..., 1]


class Stream:
    """One training stream: ``frames [F, 48, 48, 3]`` uint8, ``cells [F, 9, 2]`` (colour, shape) per cell (indices
    into ``world.COLOURS`` / ``world.SHAPES``, -1: empty) and ``qas``: (frame asked after, question, answer, kind,
    evidence: the index ``frame * 10 + cell`` of the visual token showing the asked object, -1: none).
    Derived: ``count [F]`` objects per frame; ``first [F, 9]``: the cell's shape is shown for the first time in
    this frame (no earlier frame showed that shape); ``next_seen [F, 9]``: the next frame showing the cell's object
    again (``F``: none)."""

    def __init__(self, frames: np.ndarray, cells: np.ndarray, qas: list[tuple[int, str, str, str, int]]):
        self.frames, self.cells, self.qas = frames, cells, qas
        shapes = cells[..., 1]
        self.count = (shapes >= 0).sum(-1)
        shown = np.stack([(shapes == s).any(-1) for s in range(len(world.SHAPES))], -1)  # [F, shapes]
        before = np.concatenate([np.zeros_like(shown[:1]), np.logical_or.accumulate(shown, 0)[:-1]])
        self.first = (shapes >= 0) & ~np.take_along_axis(before, shapes.clip(min=0), -1)
        objects = np.where(shapes >= 0, object_index(cells), -1)
        self.next_seen, upcoming = np.full(shapes.shape, len(frames)), {}  # upcoming: object -> next frame showing it
        for f in range(len(frames) - 1, -1, -1):
            self.next_seen[f] = [upcoming.get(o, len(frames)) for o in objects[f]]
            upcoming.update({o: f for o in objects[f] if o >= 0})


def sample(rng: np.random.Generator, max_seconds: float, min_seconds: float = 4.0, questions: int = 16,
           ask_frames: int = 2, fps: float = 0.5, kind_weights: dict[str, float] | None = None) -> Stream:
    """A random stream of ``min_seconds`` to ``max_seconds`` with up to ``questions`` questions, spread over the
    last frame and ``ask_frames - 1`` random ones, their kinds drawn evenly (or in proportion to ``kind_weights``,
    1 for a kind it does not name), each kind's question about the stream's past where it has one (``pick_by_age``)."""
    kinds, colours, shapes = list(world.CHANCE), list(world.COLOURS), list(world.SHAPES)
    p = None
    if kind_weights:
        p = np.array([kind_weights.get(k, 1.0) for k in kinds], dtype=float)
        p /= p.sum()
    while True:
        w = world.World(seed=int(rng.integers(2**31)), duration_s=float(rng.uniform(min_seconds, max_seconds)), fps=fps)
        n = len(w.frame_times)
        asks = [n - 1] + [int(k) for k in rng.integers(n, size=ask_frames - 1)]
        qas = []
        for i, k in enumerate(asks):
            by_kind: dict[str, list] = {}
            for q in w.candidates(w.frame_times[k]):
                by_kind.setdefault(q.kind, []).append(q)
            for j in range(questions // ask_frames + (i < questions % ask_frames)):
                kind = kinds[int(rng.integers(len(kinds)) if p is None else rng.choice(len(kinds), p=p))]
                if by_kind.get(kind):
                    q = by_kind[kind].pop(pick_by_age(rng, by_kind[kind]))
                    qas.append((k, q.text, q.answer, q.kind, evidence_token(w, q)))
        if qas:
            break
    cells = np.full((n, len(world.CELLS), 2), -1, dtype=np.int64)
    for i, t in enumerate(w.frame_times):
        for it in w.state(t):
            cells[i, world.CELLS.index(it.cell)] = (colours.index(it.colour), shapes.index(it.shape))
    return Stream(np.stack([image for _, image in w.frames()]), cells, qas)


def pick_by_age(rng: np.random.Generator, questions: list[world.Question]) -> int:
    """The index of a question about the stream's past where ``questions`` has one: drawn evenly over the older age
    buckets present (middle, start), then evenly within its bucket; a recent one only where none is older. Drawn
    evenly over all, where_last (the one kind whose ages vary) asks half the time about the last 20 s, mostly about
    objects on screen now, and an eighth about the start (104-130 s streams), where the past is what memory is for
    and what the benchmark asks about most."""
    buckets = [benchmark.age_bucket(q) for q in questions]
    older = sorted(set(buckets) - {"recent"}) or ["recent"]
    bucket = older[int(rng.integers(len(older)))]
    within = [i for i, b in enumerate(buckets) if b == bucket]
    return within[int(rng.integers(len(within)))]


def evidence_token(w: world.World, q: world.Question) -> int:
    """The stream index (``frame * 10 + cell``) of the visual token showing the object ``q`` asks about, in its
    evidence frame; -1 when it asks about no one object (how many). The object is the one whose colour and shape
    are among the question's and answer's words: visible objects never share both."""
    words = set(q.text.split()) | {q.answer}
    frame = int(np.argmin(np.abs(np.asarray(w.frame_times) - q.evidence_time)))
    for item in w.state(w.frame_times[frame]):
        if item.colour in words and item.shape in words:
            return frame * (len(world.CELLS) + 1) + world.CELLS.index(item.cell)
    return -1
