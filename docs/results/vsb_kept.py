"""What Vision Sink Bucketing keeps: the long-term memory of `livevlm` (56 tokens per layer, stream-qa's rule) at the
end of 2-minute world streams, each kept token sorted by what it shows (a diagnostic, not shipped code).

    python docs/results/vsb_kept.py [WEIGHTS ...] > docs/results/vsb_kept.json

Each token gets its stream index when it enters the memory (the layer's own bookkeeping does not keep the cell a
token came from), so that the world's ground truth can say what it is: an object shown for the first time in
its cell ("new object"), the same object as in the frame before ("same object"), an empty cell or a frame's
newline. Per weights, per bucket size: the shares over 4 streams and all layers, and per layer.
"""

from __future__ import annotations

import collections
import json
import sys

import torch

from livekv.evals.stream_qa import memory_knobs
from livekv.stream import memory
from livekv.stream.session import StreamSession
from livekv.vlm import world
from livekv.vlm.model import SYSTEM, WEIGHTS, load_default_vlm

_attend, _keep = memory.StreamLayer.attend, memory.StreamLayer.keep


def attend(self, query, key_new, value_new, mask, scaling):
    if not self.cache.answering:  # tag the chunk's tokens with their stream index
        start = getattr(self, "tagged", 0)
        n = self.cache.chunk_frames.shape[0]
        self.tags = torch.cat([getattr(self, "tags", torch.empty(0, dtype=torch.long)), torch.arange(start, start + n)])
        self.tagged = start + n
    return _attend(self, query, key_new, value_new, mask, scaling)


def keep(self, idx, n_long):
    _keep(self, idx, n_long)
    self.tags = self.tags[idx]


def kinds(w: world.World, n_system: int) -> list[str]:
    """What each stream token shows, in stream order."""
    out, before = ["system"] * n_system, {}
    for t in w.frame_times:
        now = {item.cell: item for item in w.state(t)}
        for cell in world.CELLS:
            item = now.get(cell)
            out.append("empty" if item is None else "new object" if before.get(cell) != item else "same object")
        out.append("newline")
        before = now
    return out


def main(paths: list[str]) -> dict:
    memory.StreamLayer.attend, memory.StreamLayer.keep = attend, keep
    torch.set_num_threads(2)
    report = {}
    for path in paths:
        adapter = load_default_vlm(path)
        n_system = len(adapter.tokenizer(SYSTEM, add_special_tokens=False)["input_ids"])
        for bucket in ("1", "one bucket"):
            knobs = memory_knobs("livevlm", 56, adapter.tokens_per_frame + 1)
            if bucket == "1":
                knobs["bucket"] = 1
            per_layer = collections.defaultdict(collections.Counter)
            stream = collections.Counter()
            for seed in range(4):
                w = world.World(seed=seed, duration_s=120)
                what = kinds(w, n_system)
                stream.update(what[n_system:])
                session = StreamSession(adapter, "livevlm", system=SYSTEM, **knobs)
                for _, image in w.frames():
                    session.push(image[None])
                for i, layer in enumerate(session.cache.layers):
                    S = layer.n_sink
                    per_layer[i].update(what[j] for j in layer.tags[S : S + layer.n_long].tolist())
            total = sum(per_layer.values(), collections.Counter())
            shares = {k: round(v / sum(total.values()), 3) for k, v in sorted(total.items())}
            report[f"{path}, bucket {bucket}"] = {"kept": shares, "per_layer": {i: dict(c) for i, c in per_layer.items()},
                                                  "streams": {k: round(v / sum(stream.values()), 3) for k, v in sorted(stream.items())}}
            print(f"{path}, bucket {bucket}: kept {shares} (the streams: {report[f'{path}, bucket {bucket}']['streams']})",
                  file=sys.stderr)
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:] or [str(WEIGHTS)]), indent=1))
