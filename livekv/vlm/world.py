"""A procedurally generated video world with exact ground truth, for training and scoring streaming video QA: the
embedded default VLM's domain (its tokenizer's vocabulary is this world's, ``vocabulary``).

Coloured shapes live on a 3 x 3 grid of cells (one object per cell at most, ``max_objects`` on screen at most,
never two visible objects with the same colour and shape). At integer seconds, one every ``event_every`` seconds
on average, an object appears, disappears, moves to a free adjacent cell or changes colour. The world is sampled
at ``fps`` (instants ``k / fps`` before ``duration_s``), as a streaming model sees it::

    w = World(seed=0, duration_s=120)
    for t, image in w.frames(): ...                      # image [48, 48, 3] uint8
    w.questions(ask_time=60, rng=np.random.default_rng(0), n=4)

Questions are defined only by what the sampled frames up to the ask time show (``QUESTION_KINDS``):

* ``where_last``: "where was the red circle last seen ?" -> its cell in the last frame that showed it;
* ``colour_at``: "what colour is the square at the top left ?" -> about an object in the last frame;
* ``first_colour``: "what colour was the first triangle you saw ?" -> the colour of that shape in the first
  frame that showed one (not asked when that frame showed several);
* ``count_now``: "how many objects are there now ?" -> "one" ... (not asked when the last frame is empty).

Each ``Question`` carries its evidence time (the frame the answer comes from) and its age (ask time minus
evidence time). ``livekv.vlm.benchmark`` draws the deterministic benchmark ``livekv eval stream-qa`` asks: a world
and questions spread over it, balanced across kinds and age buckets.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from livekv.vlm.draw import draw_shape

CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 200, 60),
    "blue": (45, 85, 235),
    "yellow": (240, 230, 40),
    "white": (245, 245, 245),
    "purple": (155, 55, 205),
    "orange": (250, 125, 15),
    "cyan": (40, 215, 225),
}
SHAPES = ("circle", "square", "triangle", "cross")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BACKGROUND = (40, 40, 40)
EVENT_KINDS = ("appear", "disappear", "move", "recolour")
TEMPLATES = {
    "where_last": "where was the {colour} {shape} last seen ?",
    "colour_at": "what colour is the {shape} at the {cell} ?",
    "first_colour": "what colour was the first {shape} you saw ?",
    "count_now": "how many objects are there now ?",
}
QUESTION_KINDS = tuple(TEMPLATES)
# Chance level per kind (1 / number of possible answers) for the default max_objects = 4; a question's own chance
# level is 1 / len(question.choices).
CHANCE = {
    "where_last": 1 / len(CELLS), "colour_at": 1 / len(COLOURS), "first_colour": 1 / len(COLOURS), "count_now": 1 / 4
}

# Relative weight of "disappear" when one object is left (the others weigh 1): keeps the screen rarely empty.
_DISAPPEAR_LAST_WEIGHT = 0.5
# Slack for comparing float times with the sampling instants.
_EPS = 1e-6


class Item(NamedTuple):
    """One visible object."""

    colour: str
    shape: str
    cell: str


class Event(NamedTuple):
    """A change at integer second ``time``: ``before`` is ``None`` for an appearance, ``after`` for a disappearance."""

    time: int
    kind: str
    before: Item | None
    after: Item | None


@dataclass
class Question:
    """A question asked at ``ask_time`` whose answer is shown by the sampled frame at ``evidence_time``."""

    kind: str
    text: str
    answer: str
    ask_time: float
    evidence_time: float
    choices: list[str]
    age: float = field(init=False)

    def __post_init__(self) -> None:
        self.age = self.ask_time - self.evidence_time


def neighbours(cell: str) -> list[str]:
    """The cells next to ``cell`` (up, down, left, right)."""
    row, col = divmod(CELLS.index(cell), 3)
    steps = ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1))
    return [CELLS[3 * r + c] for r, c in steps if 0 <= r < 3 and 0 <= c < 3]


def vocabulary() -> list[str]:
    """Every word that can appear in a question or an answer, sorted ("?" is a word of its own)."""
    words = {w for template in TEMPLATES.values() for w in template.split() if not w.startswith("{")}
    words |= {w for cell in CELLS for w in cell.split()}
    return sorted(words | set(COLOURS) | set(SHAPES) | set(NUMBERS))


class World:
    """A world of ``duration_s`` seconds from ``seed``, sampled at ``fps``, rendered ``size`` px square.

    The same seed gives the same world whatever the duration (a shorter one is a prefix of a longer one).
    ``noise`` is the standard deviation of per-pixel Gaussian noise added to every frame (0: none).
    """

    def __init__(
        self,
        seed: int,
        duration_s: float,
        fps: float = 0.5,
        size: int = 48,
        max_objects: int = 4,
        event_every: float = 6.0,
        noise: float = 0.0,
    ):
        if duration_s <= 0 or fps <= 0:
            raise ValueError(f"duration_s and fps must be positive, got {duration_s} and {fps}")
        if not 1 <= max_objects <= len(CELLS):
            raise ValueError(f"max_objects must be in 1..{len(CELLS)}, got {max_objects}")
        if event_every < 1:
            raise ValueError(f"event_every must be >= 1 (events come at integer seconds), got {event_every}")
        if size < 3:
            raise ValueError(f"size must be >= 3, got {size}")
        self.seed, self.duration_s, self.fps, self.size = seed, duration_s, fps, size
        self.max_objects, self.event_every, self.noise = max_objects, event_every, noise
        self.frame_times: list[float] = [k / fps for k in range(math.ceil(duration_s * fps - _EPS))]
        self.events: list[Event] = []
        self._change_times: list[float] = [0.0]
        self._states: list[tuple[Item, ...]] = []
        self._simulate(np.random.default_rng(seed))
        self._frame_states = [self.state(t) for t in self.frame_times]

    # --- the world -------------------------------------------------------------------------------------------

    def _simulate(self, rng: np.random.Generator) -> None:
        items: dict[str, Item] = {}
        for _ in range(int(rng.integers(1, min(2, self.max_objects) + 1))):
            self._appear(items, rng)
        self._states.append(_frozen(items))
        for second in range(1, math.ceil(self.duration_s)):
            if rng.random() >= 1 / self.event_every:
                continue
            kind = self._event_kind(items, rng)
            before, after = getattr(self, "_" + kind)(items, rng)
            self.events.append(Event(second, kind, before, after))
            self._change_times.append(float(second))
            self._states.append(_frozen(items))

    def _event_kind(self, items: dict[str, Item], rng: np.random.Generator) -> str:
        n = len(items)
        weights = np.array([
            float(n < self.max_objects),
            _DISAPPEAR_LAST_WEIGHT if n == 1 else float(n > 1),
            float(any(_free_neighbours(items, cell) for cell in items)),
            float(n > 0),
        ])
        return EVENT_KINDS[int(rng.choice(len(EVENT_KINDS), p=weights / weights.sum()))]

    def _appear(self, items: dict[str, Item], rng: np.random.Generator) -> tuple[None, Item]:
        free = [cell for cell in CELLS if cell not in items]
        visible = {(it.colour, it.shape) for it in items.values()}
        pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in visible]
        cell = free[int(rng.integers(len(free)))]
        colour, shape = pairs[int(rng.integers(len(pairs)))]
        items[cell] = Item(colour, shape, cell)
        return None, items[cell]

    def _disappear(self, items: dict[str, Item], rng: np.random.Generator) -> tuple[Item, None]:
        cells = [cell for cell in CELLS if cell in items]
        return items.pop(cells[int(rng.integers(len(cells)))]), None

    def _move(self, items: dict[str, Item], rng: np.random.Generator) -> tuple[Item, Item]:
        movable = [cell for cell in CELLS if cell in items and _free_neighbours(items, cell)]
        old = items.pop(movable[int(rng.integers(len(movable)))])
        targets = _free_neighbours(items, old.cell)
        new = old._replace(cell=targets[int(rng.integers(len(targets)))])
        items[new.cell] = new
        return old, new

    def _recolour(self, items: dict[str, Item], rng: np.random.Generator) -> tuple[Item, Item]:
        cells = [cell for cell in CELLS if cell in items]
        old = items[cells[int(rng.integers(len(cells)))]]
        visible = {(it.colour, it.shape) for it in items.values()}
        colours = [c for c in COLOURS if (c, old.shape) not in visible]
        items[old.cell] = old._replace(colour=colours[int(rng.integers(len(colours)))])
        return old, items[old.cell]

    def state(self, t: float) -> list[Item]:
        """The objects on screen at time ``t`` (after the events at ``t``), in cell order."""
        return list(self._states[max(0, bisect.bisect_right(self._change_times, t + _EPS) - 1)])

    # --- frames ----------------------------------------------------------------------------------------------

    def render(self, t: float) -> np.ndarray:
        """The frame at time ``t``: ``[size, size, 3]`` uint8 RGB."""
        image = Image.new("RGB", (self.size, self.size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for item in self.state(t):
            draw_shape(draw, CELLS.index(item.cell), item.shape, COLOURS[item.colour], self.size)
        pixels = np.asarray(image)
        if self.noise > 0:
            rng = np.random.default_rng([self.seed, round(t * 1000)])
            noisy = pixels + rng.normal(0.0, self.noise, pixels.shape)
            pixels = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        return pixels

    def frames(self) -> Iterator[tuple[float, np.ndarray]]:
        """``(time, frame)`` at every sampling instant, in time order."""
        for t in self.frame_times:
            yield t, self.render(t)

    def write_video(self, path: str | os.PathLike, fps: float | None = None, codec: str = "mpeg4") -> None:
        """Encode the world to a video file at ``fps`` frames per second (default: the sampling rate; a multiple
        of it keeps the sampling instants among the video's frames)."""
        from livekv.stream.source import write_video

        fps = fps or self.fps
        times = [k / fps for k in range(math.ceil(self.duration_s * fps - _EPS))]
        write_video(path, np.stack([self.render(t) for t in times]), fps=fps, codec=codec)

    # --- questions -------------------------------------------------------------------------------------------

    def questions(
        self, ask_time: float, rng: np.random.Generator, n: int = 1, kinds: Sequence[str] | None = None
    ) -> list[Question]:
        """Up to ``n`` distinct questions of ``kinds`` (default: all) answerable from the frames sampled up to
        ``ask_time``, drawn uniformly from all such questions."""
        candidates = [q for q in self.candidates(ask_time) if kinds is None or q.kind in kinds]
        picks = rng.choice(len(candidates), size=min(n, len(candidates)), replace=False)
        return [candidates[int(i)] for i in picks]

    def candidates(self, ask_time: float) -> list[Question]:
        """Every question answerable from the frames sampled up to ``ask_time``, in a fixed order."""
        last = bisect.bisect_right(self.frame_times, ask_time + _EPS) - 1
        if last < 0:
            return []
        found: list[Question] = []

        def ask(kind: str, answer: str, evidence_time: float, choices: Sequence[str], **slots: str) -> None:
            text = TEMPLATES[kind].format(**slots)
            found.append(Question(kind, text, answer, ask_time, evidence_time, list(choices)))

        last_seen: dict[tuple[str, str], tuple[float, str]] = {}
        for i in range(last, -1, -1):
            for it in self._frame_states[i]:
                last_seen.setdefault((it.colour, it.shape), (self.frame_times[i], it.cell))
        for (colour, shape), (t, cell) in sorted(last_seen.items()):
            ask("where_last", cell, t, CELLS, colour=colour, shape=shape)
        now = self._frame_states[last]
        for it in now:
            ask("colour_at", it.colour, self.frame_times[last], COLOURS, shape=it.shape, cell=it.cell)
        first: dict[str, tuple[float, list[Item]]] = {}
        for i in range(last + 1):
            for shape, group in _by_shape(self._frame_states[i]).items():
                first.setdefault(shape, (self.frame_times[i], group))
        for shape in SHAPES:
            if shape in first and len(first[shape][1]) == 1:
                ask("first_colour", first[shape][1][0].colour, first[shape][0], COLOURS, shape=shape)
        if now:
            ask("count_now", NUMBERS[len(now) - 1], self.frame_times[last], NUMBERS[: self.max_objects])
        return found


def _frozen(items: dict[str, Item]) -> tuple[Item, ...]:
    return tuple(items[cell] for cell in CELLS if cell in items)


def _free_neighbours(items: dict[str, Item], cell: str) -> list[str]:
    return [c for c in neighbours(cell) if c not in items]


def _by_shape(items: Sequence[Item]) -> dict[str, list[Item]]:
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(it.shape, []).append(it)
    return groups
