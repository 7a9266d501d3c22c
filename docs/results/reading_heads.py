"""Does the answer use the lookup? On held-out training streams (teacher-forced, full memory), per question about
one object: how much the head of the upper layers that attends most to the token showing the object attends
there, whether that head's direct effect on the answer's logits (``livekv.vlm.train.direct_logits``) names the
answer's first word, and whether the model's answer does; then the answers again with that head's output made
``--gain`` times larger at the answer's position (the head picked with the ground truth: a diagnostic, not
shipped code).

    python docs/results/reading_heads.py [WEIGHTS ...] > docs/results/reading_heads.json
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from livekv.vlm import train
from livekv.vlm.model import WEIGHTS, load_default_vlm


@torch.no_grad()
def measure(path, streams: int = 32, batch: int = 8, gain: float = 4.0) -> dict:
    adapter = load_default_vlm(path)
    adapter.model.set_attn_implementation("eager")
    lm = adapter.language_model
    n_layers, n_heads = len(lm.layers), lm.config.num_attention_heads
    dim = lm.config.hidden_size // n_heads
    held = [train.sample(np.random.default_rng(10_000 + i), 130, 65) for i in range(streams)]  # train's held-out set
    tallies: dict[str, list] = {}
    for i in range(0, streams, batch):
        part = held[i : i + batch]
        b = train.encode(adapter, part, train.visual_tokens(adapter, np.concatenate([s.frames for s in part])))
        with train.head_outputs(adapter) as outputs:
            _, right, _, attentions = train.answer_loss(adapter, b, attentions=True)
        about_one = b.evidence[:, 2] >= 0
        kinds = np.array([qa[3] for s in part for qa in s.qas])[about_one.numpy()]
        row, query, reads = train.evidence_reads(attentions, b)
        upper = n_layers - reads.shape[1]
        best = reads.flatten(1).argmax(-1)
        layer, head = best // n_heads, best % n_heads
        logits = train.direct_logits(adapter, outputs, row, query, range(upper, n_layers))
        answer = b.labels[row, query + 1]
        head_right = logits[torch.arange(len(row)), layer, head].argmax(-1) == answer

        def louder(l):  # the reading head's output, ``gain`` times larger at the answer's position
            def hook(_module, args):
                x = args[0].clone()
                for j in (layer + upper == l).nonzero()[:, 0].tolist():
                    x[row[j], query[j], int(head[j]) * dim : (int(head[j]) + 1) * dim] *= gain
                return (x,)
            return hook

        hooks = [lm.layers[l].self_attn.o_proj.register_forward_pre_hook(louder(l)) for l in range(n_layers)]
        _, loud_right, _, _ = train.answer_loss(adapter, b)
        for h in hooks:
            h.remove()
        for j in range(len(row)):
            tallies.setdefault(str(kinds[j]), []).append(
                (float(reads[j].max()), bool(head_right[j]), bool(right[about_one][j]), bool(loud_right[about_one][j])))
    out = {}
    for kind, rows in sorted(tallies.items()):
        att, head_ok, answer_ok, loud_ok = (np.array(x) for x in zip(*rows))
        out[kind] = {"questions": len(rows), "attention_to_object": round(float(att.mean()), 3),
                     "head_names_answer": round(float(head_ok.mean()), 3), "answer_right": round(float(answer_ok.mean()), 3),
                     f"answer_right_head_x{gain:g}": round(float(loud_ok.mean()), 3)}
        print(f"{path}  {kind:13s} {len(rows):4d} questions  attention to the object {att.mean():.2f}  head names the "
              f"answer {head_ok.mean():.2f}  answer right {answer_ok.mean():.2f}  with the head x{gain:g} "
              f"{loud_ok.mean():.2f}", file=sys.stderr)
    return out


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(json.dumps({str(p): measure(p) for p in (sys.argv[1:] or [WEIGHTS])}, indent=1))
