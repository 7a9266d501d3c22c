"""Does the vision tower read colours? Each occupied cell's visual token scored against the decoder's colour-word
embeddings (as the perception loss scores it), on 16 held-out streams of 65-130 s, for the shipped weights and any
checkpoints given: ``python docs/results/colour_read.py /work/run13 > docs/results/colour_read.txt``."""

import collections
import sys

import numpy as np
import torch

from livekv.evals import world
from livekv.vlm import train as T
from livekv.vlm.model import WEIGHTS, load_default_vlm

torch.set_num_threads(2)
colours = list(world.COLOURS)
streams = [T.sample(np.random.default_rng(50_000 + i), 130, 65) for i in range(16)]
for path in [WEIGHTS, *sys.argv[1:]]:
    adapter = load_default_vlm(path)
    ids = T.word_ids(adapter, colours)
    right, total, confused = collections.Counter(), collections.Counter(), collections.Counter()
    with torch.no_grad():
        for s in streams:
            tokens = T.visual_tokens(adapter, s.frames)[:, : len(world.CELLS)]
            read = (tokens @ adapter.lm_head.weight[ids].T).argmax(-1).numpy()
            shown = s.cells[..., 0]
            for r, c in zip(read[shown >= 0], shown[shown >= 0]):
                total[colours[c]] += 1
                right[colours[c]] += int(r == c)
                if r != c:
                    confused[(colours[c], colours[r])] += 1
    print(f"{path}: colour read from the visual token {sum(right.values()) / sum(total.values()):.3f} "
          f"({sum(total.values())} object tokens); per colour", {c: round(right[c] / total[c], 3) for c in colours},
          "confusions", confused.most_common(4))
