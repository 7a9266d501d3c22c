"""The synthetic video world: reproducible, consistent, rendered as stated, and every question's answer right."""

import re

import numpy as np
import pytest

from livekv.stream.source import frames
from livekv.vlm import benchmark, world
from livekv.vlm.world import CELLS, COLOURS, SHAPES, World

PALETTE = {**COLOURS, "background": world.BACKGROUND}


def centre_colour(image: np.ndarray, cell: str) -> np.ndarray:
    """Mean colour of the 2 x 2 pixels at the centre of ``cell``."""
    size = image.shape[0]
    row, col = divmod(CELLS.index(cell), 3)
    y, x = (2 * row + 1) * size // 6, (2 * col + 1) * size // 6
    return image[y - 1 : y + 1, x - 1 : x + 1].reshape(-1, 3).mean(0)


def nearest_colour(rgb: np.ndarray) -> str:
    return min(PALETTE, key=lambda name: np.abs(np.array(PALETTE[name]) - rgb).sum())


def test_same_seed_same_world_and_questions_other_seed_differs():
    a, b, c = World(3, 120), World(3, 120), World(4, 120)
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a.frames(), b.frames(), strict=True))
    assert any(not np.array_equal(x, y) for (_, x), (_, y) in zip(a.frames(), c.frames(), strict=True))
    assert a.questions(60, np.random.default_rng(0), n=5) == b.questions(60, np.random.default_rng(0), n=5)
    assert benchmark.stream_qa(3, 120, 20)[1] == benchmark.stream_qa(3, 120, 20)[1]
    assert benchmark.stream_qa(3, 120, 20)[1] != benchmark.stream_qa(4, 120, 20)[1]
    longer = World(3, 300)  # a shorter world is a prefix of a longer one
    assert all(a.state(t) == longer.state(t) for t in range(120))


@pytest.mark.parametrize("size", [48, 96])
def test_render_draws_each_object_in_its_colour_and_cell(size):
    w = World(5, 60, size=size)
    for t, image in w.frames():
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        items = {it.cell: it for it in w.state(t)}
        for cell in CELLS:
            expected = COLOURS[items[cell].colour] if cell in items else world.BACKGROUND
            assert np.array_equal(centre_colour(image, cell), expected), (t, cell)


def test_noise_keeps_colours_recognisable():
    w = World(5, 30, noise=8.0)
    assert not np.array_equal(w.render(0), World(5, 30).render(0))
    for t, image in w.frames():
        items = {it.cell: it.colour for it in w.state(t)}
        for cell in CELLS:
            assert nearest_colour(centre_colour(image, cell)) == items.get(cell, "background")


def test_state_invariants_over_twenty_minutes():
    w = World(11, 1200)
    assert 1 <= len(w.state(0)) <= 2
    assert 150 <= len(w.events) <= 250  # one every 6 s on average
    assert {e.kind for e in w.events} == set(world.EVENT_KINDS)
    previous = w.state(0)
    for event in w.events:
        assert event.time == int(event.time) and 0 < event.time < 1200
        current = w.state(event.time)
        assert w.state(event.time - 0.5) == previous
        cells = [it.cell for it in current]
        assert len(set(cells)) == len(cells)
        assert len({(it.colour, it.shape) for it in current}) == len(current)
        assert len(current) <= w.max_objects
        if not previous:
            assert event.kind == "appear"  # the screen is never empty for more than one event
        assert [it for it in previous if it != event.before] == [it for it in current if it != event.after]
        if event.kind == "move":
            assert event.after.cell in world.neighbours(event.before.cell)
            assert event.after[:2] == event.before[:2]
        if event.kind == "recolour":
            assert event.after.colour != event.before.colour and event.after[1:] == event.before[1:]
        previous = current
    counts = np.array([len(w.state(t)) for t in w.frame_times])
    assert np.mean((counts >= 1) & (counts <= 4)) > 0.9


def expected_answer(w: World, q: world.Question) -> tuple[str, float]:
    """The answer and evidence time of ``q``, recomputed from the world's states and rendered frames."""
    times = [t for t in w.frame_times if t <= q.ask_time]
    if q.kind == "where_last":
        colour, shape = re.fullmatch(r"where was the (\w+) (\w+) last seen \?", q.text).groups()
        for t in reversed(times):
            for it in w.state(t):
                if (it.colour, it.shape) == (colour, shape):
                    return it.cell, t
        raise AssertionError(f"never seen: {q.text}")
    if q.kind == "colour_at":
        shape, cell = re.fullmatch(r"what colour is the (\w+) at the ([\w ]+) \?", q.text).groups()
        assert shape in [it.shape for it in w.state(times[-1]) if it.cell == cell]
        return nearest_colour(centre_colour(w.render(times[-1]), cell)), times[-1]
    if q.kind == "first_colour":
        (shape,) = re.fullmatch(r"what colour was the first (\w+) you saw \?", q.text).groups()
        for t in times:
            colours = [it.colour for it in w.state(t) if it.shape == shape]
            if colours:
                assert len(colours) == 1
                return colours[0], t
        raise AssertionError(f"never seen: {q.text}")
    assert q.kind == "count_now" and q.text == "how many objects are there now ?"
    return ["one", "two", "three", "four"][len(w.state(times[-1])) - 1], times[-1]


def test_every_question_answer_is_right():
    w, drawn = benchmark.stream_qa(2, 600, 40)
    rng = np.random.default_rng(0)
    asked = [q for t in range(0, 600, 7) for q in w.questions(t, rng, n=3)] + drawn
    assert {q.kind for q in asked} == set(world.QUESTION_KINDS)
    for q in asked:
        assert (q.answer, q.evidence_time) == expected_answer(w, q), q
        assert q.answer in q.choices and q.age == q.ask_time - q.evidence_time >= 0
        assert world.CHANCE[q.kind] == 1 / len(q.choices)
    # where_last is offered about every pair seen so far, first_colour about every shape first seen alone
    seen = {(it.colour, it.shape) for t in w.frame_times if t <= 300 for it in w.state(t)}
    where = [q for q in w.candidates(300) if q.kind == "where_last"]
    assert len(where) == len(seen) == len({q.text for q in where})


def test_stream_qa_spreads_and_balances_questions():
    w, questions = benchmark.stream_qa(0, 1200, 60)
    assert len(questions) == 60
    assert [q.ask_time for q in questions] == sorted(q.ask_time for q in questions)
    assert questions[-1].ask_time == w.frame_times[-1] and questions[0].ask_time < 60
    kinds = {k: sum(q.kind == k for q in questions) for k in world.QUESTION_KINDS}
    buckets = {b: sum(benchmark.age_bucket(q) == b for q in questions) for b in ("recent", "start", "middle")}
    assert min(kinds.values()) >= 8 and min(buckets.values()) >= 12, (kinds, buckets)


def test_age_buckets():
    q = lambda ask, evidence: world.Question("count_now", "", "one", ask, evidence, [])  # noqa: E731
    assert [benchmark.age_bucket(q(100, e)) for e in (90, 10, 50)] == ["recent", "start", "middle"]
    assert benchmark.age_bucket(q(100, 50), recent_s=60) == "recent"
    assert benchmark.age_bucket(q(100, 50), start_s=60) == "start"


def test_written_video_reads_back_with_the_right_colours(tmp_path):
    w = World(7, 20)
    path = tmp_path / "world.mp4"
    w.write_video(path)
    got = list(frames(path, fps=w.fps))
    assert [f.time for f in got] == pytest.approx(w.frame_times)
    for frame, t in zip(got, w.frame_times, strict=True):
        items = {it.cell: it.colour for it in w.state(t)}
        for cell in CELLS:
            assert nearest_colour(centre_colour(frame.image, cell)) == items.get(cell, "background"), (t, cell)


def test_vocabulary_covers_questions_and_answers():
    vocabulary = set(world.vocabulary())
    _, questions = benchmark.stream_qa(1, 300, 40)
    for q in questions:
        assert re.fullmatch(r"[a-z]+( [a-z]+)* \?", q.text), q.text
        assert set(q.text.split()) | set(q.answer.split()) <= vocabulary
    choices = {c for q in questions for c in q.choices}
    assert {w for c in choices for w in c.split()} | set(SHAPES) <= vocabulary
