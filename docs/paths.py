"""Which of livekv's files run on the two paths the README's design section follows, traced, not hand-counted.

    python docs/paths.py > docs/paths.txt

A prompt token to the next token: one decode step of the embedded SmolLM2 after a 2,000-token prompt, quest at
budget 256 (its default float32 page digests, then ``digest_bits=8``, whose selection runs the compiled kernel).
A frame to an answer token: one ``push`` of two frames into the embedded video model's livevlm session after 30
frames, then a one-token answer. Prints each file that ran and the functions of it that were called.
"""

from __future__ import annotations

import pathlib
import sys

import torch

import livekv
from livekv.cache import LiveKVCache
from livekv.models import load_model
from livekv.stream.session import StreamSession
from livekv.vlm.model import SYSTEM, load_default_vlm

ROOT = str(pathlib.Path(livekv.__file__).parent) + "/"


def traced(title: str, step) -> None:
    """Run ``step()`` under a profiler hook and print the livekv files (and functions) it entered."""
    seen: dict[str, set[str]] = {}

    def hook(frame, event, arg):
        path = frame.f_code.co_filename
        if event == "call" and path.startswith(ROOT):
            seen.setdefault(path[len(ROOT):], set()).add(frame.f_code.co_name)

    sys.setprofile(hook)
    try:
        step()
    finally:
        sys.setprofile(None)
    print(f"{title}: {len(seen)} files")
    for path in sorted(seen):
        print(f"  {path:32s} {', '.join(sorted(seen[path]))}")


def token_path(**knobs) -> None:
    model, _ = load_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 2001), generator=torch.Generator().manual_seed(0))
    cache = LiveKVCache(model.config, "quest", budget=256, **knobs)
    model(ids[:, :2000], past_key_values=cache)
    traced(f"a prompt token to the next token (quest, budget 256, {knobs or 'defaults'})",
           lambda: model(ids[:, 2000:], past_key_values=cache))


def frame_path() -> None:
    session = StreamSession(load_default_vlm(), "livevlm", system=SYSTEM)
    frames = torch.randint(0, 256, (32, 48, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for i in range(0, 30, 2):
        session.push(frames[i : i + 2])
    question = "question : where was the red circle last ? answer :"
    traced("a frame pushed (livevlm, defaults)", lambda: session.push(frames[30:32]))
    traced("... and the answer's first token", lambda: session.answer(question, 1))


if __name__ == "__main__":
    torch.set_num_threads(2)
    with torch.inference_mode():
        token_path()
        token_path(digest_bits=8)
        frame_path()
