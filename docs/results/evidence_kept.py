"""Is a question's evidence still in livevlm's memory when it is asked, and is the answer right? (A diagnostic.)

    python docs/results/evidence_kept.py [WEIGHTS] > docs/results/evidence_kept.txt

Plays stream-qa's first 8 two-minute worlds into livevlm at stream-qa's 56 tokens of memory (``memory_knobs``)
and, at each where_last and first_colour question, looks for the visual token showing the asked object
(``livekv.vlm.data.evidence_token``) in the memory of the three upper layers (where the lookups read), tagged
as ``vsb_kept.py`` tags tokens. Prints one line per (kind, evidence age, upper layers holding it, right).
"""

from __future__ import annotations

import collections
import sys

import torch

import vsb_kept  # its tagging patches of the memory layer
from livekv.evals.stream_qa import _ask, memory_knobs
from livekv.stream import memory
from livekv.stream.session import StreamSession
from livekv.vlm import benchmark, world
from livekv.vlm.data import evidence_token
from livekv.vlm.model import SYSTEM, WEIGHTS, load_default_vlm


def main(path: str) -> None:
    memory.StreamLayer.attend, memory.StreamLayer.keep = vsb_kept.attend, vsb_kept.keep
    torch.set_num_threads(2)
    adapter = load_default_vlm(path)
    n_system = len(adapter.tokenizer(SYSTEM, add_special_tokens=False)["input_ids"])
    knobs = memory_knobs("livevlm", 56, adapter.tokens_per_frame + 1)
    table = collections.Counter()
    for seed in range(8):
        w, questions = benchmark.stream_qa(seed, 120.0)
        session = StreamSession(adapter, "livevlm", system=SYSTEM, **knobs)

        def ask(q: world.Question) -> None:
            token = evidence_token(w, q) + n_system
            held = sum(token in set(layer.tags[: layer.ctx.length].tolist()) for layer in session.cache.layers[3:])
            right = _ask(session, q, w)["correct"]
            table[(q.kind, "recent" if q.age < 20 else "older", f"in {held}/3 upper layers", right)] += 1

        pending = [q for q in questions if q.kind in ("where_last", "first_colour")]
        for t, image in w.frames():
            while pending and pending[0].ask_time < t:
                ask(pending.pop(0))
            session.push(image[None])
        for q in pending:
            ask(q)
    for key in sorted(table):
        print(*key, table[key])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(WEIGHTS))
