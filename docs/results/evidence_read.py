"""Where a checkpoint's answers go wrong: at the object tokens, is the colour still readable from each decoder
layer's state (scored against the colour words; the last layer's state is the normed one the answers are read
from), and does a question's last token attend to the token showing its object (the best head of the upper half
of the layers, as the evidence loss scores it)? Teacher-forced, on 8 held-out streams of 65-130 s, for the
shipped weights and any checkpoints given:
``python docs/results/evidence_read.py /work/run13 > docs/results/evidence_read.txt``."""

import sys

import numpy as np
import torch

from livekv.vlm import world
from livekv.vlm.batch import encode, visual_tokens
from livekv.vlm.data import sample
from livekv.vlm.losses import answer_loss, evidence_attention, word_ids
from livekv.vlm.model import WEIGHTS, load_default_vlm

torch.set_num_threads(2)
streams = [sample(np.random.default_rng(50_000 + i), 130, 65) for i in range(8)]
kinds = np.array([qa[3] for s in streams for qa in s.qas])
for path in [WEIGHTS, *sys.argv[1:]]:
    adapter = load_default_vlm(path)
    adapter.model.set_attn_implementation("eager")
    ids = word_ids(adapter, world.COLOURS)
    layer_right, objects, reads, rights, has_evidence = 0, 0, [], [], []
    with torch.no_grad():
        for i in range(0, len(streams), 4):
            chunk = streams[i : i + 4]
            batch = encode(adapter, chunk, visual_tokens(adapter, np.concatenate([s.frames for s in chunk])))
            _, right, states, attentions = answer_loss(adapter, batch, attentions=True)
            colour = torch.div(batch.object[batch.occupied], len(world.SHAPES), rounding_mode="floor")
            read = [h[batch.occupied] @ adapter.lm_head.weight[ids].T for h in states]
            layer_right = layer_right + torch.stack([(r.argmax(-1) == colour).sum() for r in read])
            objects += len(colour)
            has = batch.evidence[:, 2] >= 0
            reads.append(evidence_attention(attentions, batch)[2].flatten(1).amax(-1))
            rights.append(right[has])
            has_evidence.append(has)
    reads, rights, has = torch.cat(reads), torch.cat(rights), torch.cat(has_evidence).numpy()
    print(f"{path}: colour read at the object tokens, per layer (0: input): "
          f"{[round(float(x), 3) for x in layer_right / objects]} ({objects} tokens)")
    for kind in ("colour_at", "first_colour", "where_last"):
        m = torch.from_numpy(kinds[has] == kind)
        median = lambda sel: round(float(reads[sel].median()), 3) if sel.any() else None  # noqa: E731
        print(f"  {kind}: {int(m.sum())} questions, right {float(rights[m].float().mean()):.2f}; best head's attention "
              f"to the evidence token, median: right answers {median(m & rights)}, wrong {median(m & ~rights)}")
