"""What the embedded model's wrong answers are, with full memory (the cases of docs/results/qa2.json).

For each wrong ``where_last`` answer: is it a cell where an object of the same shape (another colour) was seen,
one of the same colour, one occupied now? For each wrong ``first_colour`` answer: is it the colour of the first
object of any shape, a colour on screen now? (The worlds are rebuilt from the cases' seeds.)

Run: ``python docs/results/qa2_errors.py docs/results/qa2.json``
"""

import json
import re
import sys
from collections import Counter

from livekv.vlm.world import World


def main(path: str, method: str = "full") -> None:
    data = json.load(open(path))
    worlds: dict[int, World] = {}
    tags: Counter = Counter()
    for c in data["cases"]:
        if c["method"] != method or c["kind"] not in ("where_last", "first_colour"):
            continue
        if c["stream"] not in worlds:
            worlds[c["stream"]] = World(c["stream"], data["minutes"] * 60, fps=0.5)
        w = worlds[c["stream"]]
        seen = [it for t in w.frame_times if t <= c["ask_time"] + 1e-6 for it in w.state(t)]  # in time order
        now = w.state(max(t for t in w.frame_times if t <= c["ask_time"] + 1e-6))
        if c["correct"]:
            tags[(c["kind"], "right")] += 1
        elif c["kind"] == "where_last":
            colour, shape = re.match(r"where was the (\w+) (\w+) last seen", c["question"]).groups()
            tag = [name for name, cells in (
                ("where this object was earlier", {it.cell for it in seen if (it.colour, it.shape) == (colour, shape)}),
                ("where a same-shape object was", {it.cell for it in seen if it.shape == shape and it.colour != colour}),
                ("where a same-colour object was", {it.cell for it in seen if it.colour == colour and it.shape != shape}),
                ("occupied now", {it.cell for it in now})) if c["answer"] in cells]
            tags[(c["kind"], " + ".join(tag) or "no object ever there")] += 1
        else:
            shape = re.match(r"what colour was the first (\w+) you saw", c["question"]).group(1)
            tag = [name for name, colours in (
                ("a later object of that shape", {it.colour for it in seen if it.shape == shape}),
                ("the first object of any shape", {seen[0].colour}),
                ("on screen now", {it.colour for it in now})) if c["answer"] in colours]
            tags[(c["kind"], " + ".join(tag) or "none of these")] += 1
    for (kind, tag), n in sorted(tags.items()):
        print(f"{kind:12s} {n:4d}  {tag}")


if __name__ == "__main__":
    main(sys.argv[1])
