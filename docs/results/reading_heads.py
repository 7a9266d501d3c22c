"""Does the answer use the lookup? On held-out training streams (teacher-forced, full memory), per question about
one object: how much the head of the upper layers that attends most to the token showing the object attends
there, whether that head's direct effect on the answer's logits names the answer's first word, and whether the
model's answer does; then the answers again with that head's output made ``gain`` times larger at the answer's
position (the head picked with the ground truth: a diagnostic, not shipped code). In the answers whose first
word is wrong: by how many logits the reading head, the other heads and the rest of the model favour that word
over the right one.

A head's direct effect: its output alone through its slice of the output projection, the final norm's weight
and the word head, scaled as the final norm scales the whole residual stream there.

    python docs/results/reading_heads.py [WEIGHTS ...] > docs/results/reading_heads.json
"""

from __future__ import annotations

import contextlib
import json
import sys

import numpy as np
import torch

from livekv.vlm.batch import encode, visual_tokens
from livekv.vlm.data import sample
from livekv.vlm.losses import answer_loss, evidence_attention
from livekv.vlm.model import WEIGHTS, load_default_vlm


@contextlib.contextmanager
def inputs_of(modules):
    """While open, the list holds each module's input of the last forward pass."""
    seen = [None] * len(modules)
    keep = lambda i: lambda _module, args: seen.__setitem__(i, args[0])  # noqa: E731
    handles = [m.register_forward_pre_hook(keep(i)) for i, m in enumerate(modules)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def direct_logits(lm, word_head, head_in, residual, layer, head) -> torch.Tensor:
    """The direct effect on the word logits ``[vocab]`` of head ``head`` of ``layer``, from its output ``head_in``
    (the output projection's input, ``[heads * head_dim]``) and the residual stream entering the final norm."""
    dim = lm.config.hidden_size // lm.config.num_attention_heads
    alone = torch.zeros_like(head_in)
    alone[head * dim : (head + 1) * dim] = head_in[head * dim : (head + 1) * dim]
    scale = torch.rsqrt(residual.pow(2).mean() + lm.norm.variance_epsilon)
    return word_head(lm.norm.weight * lm.layers[layer].self_attn.o_proj(alone) * scale)


@torch.no_grad()
def measure(path, streams: int = 32, batch: int = 8, gain: float = 4.0) -> dict:
    adapter = load_default_vlm(path)
    adapter.model.set_attn_implementation("eager")
    lm = adapter.language_model
    n_layers, n_heads = len(lm.layers), lm.config.num_attention_heads
    dim = lm.config.hidden_size // n_heads
    held = [sample(np.random.default_rng(10_000 + i), 130, 65) for i in range(streams)]  # train's held-out set
    tallies: dict[str, list] = {}
    for i in range(0, streams, batch):
        part = held[i : i + batch]
        b = encode(adapter, part, visual_tokens(adapter, np.concatenate([s.frames for s in part])))
        with inputs_of([layer.self_attn.o_proj for layer in lm.layers] + [lm.norm]) as outputs:
            _, right, _, attentions = answer_loss(adapter, b, attentions=True)
        about_one = b.evidence[:, 2] >= 0
        kinds = np.array([qa[3] for s in part for qa in s.qas])[about_one.numpy()]
        row, query, reads = evidence_attention(attentions, b)  # reads [Q, upper layers, heads]
        upper = n_layers - reads.shape[1]
        best = reads.flatten(1).argmax(-1)
        layer, head = best // n_heads, best % n_heads
        answer = b.labels[row, query + 1]
        per_head = torch.stack([  # [Q, layers, heads, vocab]
            torch.stack([torch.stack([direct_logits(lm, adapter.lm_head, outputs[l][r, q], outputs[-1][r, q], l, h)
                                      for h in range(n_heads)]) for l in range(n_layers)])
            for r, q in zip(row, query)
        ])
        reader = per_head[torch.arange(len(row)), upper + layer, head]  # [Q, vocab]
        head_right = reader.argmax(-1) == answer
        final = adapter.lm_head(lm.norm(outputs[-1][row, query]))  # the model's own logits, the sum of all parts
        said = final.argmax(-1)
        margin = lambda logits: logits.gather(-1, said[:, None])[:, 0] - logits.gather(-1, answer[:, None])[:, 0]  # noqa: E731
        reader_margin, heads_margin = margin(reader), margin(per_head.sum((1, 2))) - margin(reader)
        rest_margin = margin(final) - margin(reader)  # the other heads, the MLPs and the input embedding

        def louder(l):  # the reading head's output, ``gain`` times larger at the answer's position
            def hook(_module, args):
                x = args[0].clone()
                for j in (layer + upper == l).nonzero()[:, 0].tolist():
                    x[row[j], query[j], int(head[j]) * dim : (int(head[j]) + 1) * dim] *= gain
                return (x,)
            return hook

        hooks = [lm.layers[l].self_attn.o_proj.register_forward_pre_hook(louder(l)) for l in range(n_layers)]
        _, loud_right, _, _ = answer_loss(adapter, b)
        for h in hooks:
            h.remove()
        for j in range(len(row)):
            tallies.setdefault(str(kinds[j]), []).append(
                (float(reads[j].max()), bool(head_right[j]), bool(right[about_one][j]), bool(loud_right[about_one][j]),
                 bool(said[j] != answer[j]), float(reader_margin[j]), float(rest_margin[j]), float(heads_margin[j])))
    out = {}
    for kind, rows in sorted(tallies.items()):
        att, head_ok, answer_ok, loud_ok, wrong, reader_m, rest_m, heads_m = (np.array(x) for x in zip(*rows))
        out[kind] = {"questions": len(rows), "attention_to_object": round(float(att.mean()), 3),
                     "head_names_answer": round(float(head_ok.mean()), 3), "answer_right": round(float(answer_ok.mean()), 3),
                     f"answer_right_head_x{gain:g}": round(float(loud_ok.mean()), 3),
                     # where the first word said is wrong: how far the reading head / the rest / the other heads favour it
                     "wrong_reader_margin": round(float(reader_m[wrong].mean()), 2) if wrong.any() else None,
                     "wrong_rest_margin": round(float(rest_m[wrong].mean()), 2) if wrong.any() else None,
                     "wrong_other_heads_margin": round(float(heads_m[wrong].mean()), 2) if wrong.any() else None}
        print(f"{path}  {kind:13s} {len(rows):4d} questions  attention to the object {att.mean():.2f}  head names the "
              f"answer {head_ok.mean():.2f}  answer right {answer_ok.mean():.2f}  with the head x{gain:g} "
              f"{loud_ok.mean():.2f}  where the first word said is wrong, the head / the rest favour it by "
              f"{out[kind]['wrong_reader_margin']} / {out[kind]['wrong_rest_margin']} logits (other heads "
              f"{out[kind]['wrong_other_heads_margin']})", file=sys.stderr)
    return out


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(json.dumps({str(p): measure(p) for p in (sys.argv[1:] or [WEIGHTS])}, indent=1))
