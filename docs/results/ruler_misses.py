"""Why a sparse method loses a needle that dense reads: per-head recall of the needle's tokens on `livekv eval ruler`
cases.

For each case, dense answers first (greedy); then the sparse method is teacher-forced along dense's answer (and, in
the ``fed`` protocol, the question), and at every sparse decode step of every sparse layer the observer asks, for
each query head: how much of the head's true (dense) attention falls on the needle's value tokens (``mass``), and,
for the value token it attends most, whether the selection read it. A head "reads the needle" at a step when its
mass is at least ``--reading`` (default 0.1). For pages (quest, freekv), a reading head whose token was not read is
put in one of three bins, by the rank of the token's page among the selectable pages (``k`` = pages the budget
selects):

* ``pooled_out``: the head's own min/max bound ranks the page in its top k, the GQA-pooled score does not;
* ``loose_bound``: the head's own bound ranks it below k, the exact max q.k over each page ranks it in the top k;
* ``exact_misses``: even the exact max q.k over pages ranks it below k (pages too coarse, or budget too small).

Also: the step where the sparse path's greedy token first differs from dense's. Usage:

    PYTHONPATH=. python docs/results/ruler_misses.py --spec quest --budget 256 --context 4096 --split dev \\
        --tasks niah_single,niah_multikey --cases 8 --protocol prompt [--only-misses out/ruler_dev.json]
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

from livekv import LiveKVCache, retrieval
from livekv.evals import ruler
from livekv.generation import prefill
from livekv.methods import parse_spec
from livekv.models import load_model


def value_positions(tok, ids: list[int], items: list[str]) -> list[int]:
    """Token positions in ``ids`` that overlap the characters of any of ``items`` (their first occurrence)."""
    ends, n = [], 0
    for t in ids:
        n += len(tok.decode([t]))
        ends.append(n)
    text = tok.decode(ids)
    out = set()
    for item in items:
        at = text.find(item)
        if at < 0:
            continue
        start = 0
        for i, end in enumerate(ends):
            if end > at and start < at + len(item):
                out.add(i)
            start = end
    return sorted(out)


class Probe:
    def __init__(self, needle: list[int], reading: float):
        self.needle = torch.tensor(needle)
        self.reading = reading
        self.phase = "answer"
        self.stats = collections.Counter()
        self.by_layer = collections.defaultdict(collections.Counter)
        self.step_misses: list[list[tuple[int, int]]] = []  # per step: (layer, head) reading heads that missed
        self._current: list[tuple[int, int]] = []

    def new_step(self):
        self._current = []
        self.step_misses.append(self._current)

    def __call__(self, layer, q, token_idx, out):
        keys, _ = layer.host.all_tokens()  # [1, G, T, D]
        B, H, D = q.shape
        G, T = keys.shape[1], keys.shape[2]
        r = H // G
        qg = q.view(B, G, r, D).float()
        logits = qg @ keys.float().transpose(-1, -2) * D**-0.5  # [1, G, r, T]
        probs = logits.softmax(-1)
        needle = self.needle[self.needle < T]
        mass = probs[..., needle].sum(-1)  # [1, G, r]
        selected = torch.zeros(B, G, T, dtype=torch.bool)
        selected.scatter_(-1, token_idx.clamp(max=T - 1), True)
        cfg = getattr(layer.selector, "cfg", None)
        paged = hasattr(layer.host, "digests") and layer.digests and cfg is not None and hasattr(cfg, "page_size")
        if paged:
            p = cfg.page_size
            window_start = max(cfg.sink, (T - cfg.window) // p * p)
            first, last = cfg.sink // p, window_start // p
            k = min(last - first, (cfg.budget - cfg.sink - (T - window_start)) // p)
            bound = retrieval.minmax_bound(q, layer.host.digests()[:, :, first:last])  # [1, G, r, n]
            pooled = layer.selector.score(q, layer.host, first, last)  # [1, G, n]
            exact = logits[..., first * p:last * p].unflatten(-1, (last - first, p)).amax(-1)  # [1, G, r, n]
        for g in range(G):
            for h in range(r):
                if mass[0, g, h] < self.reading:
                    continue
                top = int(needle[probs[0, g, h, needle].argmax()])
                self.stats["reading"] += 1
                self.by_layer[layer.layer_idx]["reading"] += 1
                if bool(selected[0, g, top]):
                    self.stats["read"] += 1
                    continue
                self._current.append((layer.layer_idx, g * r + h))
                self.by_layer[layer.layer_idx]["missed"] += 1
                if not paged:
                    self.stats["missed"] += 1
                    continue
                page = top // p - first
                if not 0 <= page < last - first:
                    self.stats["outside_candidates"] += 1
                    continue

                def rank(s):
                    return int((s > s[page]).sum())

                if rank(bound[0, g, h]) < k and rank(pooled[0, g]) >= k:
                    self.stats["pooled_out"] += 1
                elif rank(bound[0, g, h]) >= k and rank(exact[0, g, h]) < k:
                    self.stats["loose_bound"] += 1
                elif rank(exact[0, g, h]) >= k:
                    self.stats["exact_misses"] += 1
                else:
                    self.stats["other"] += 1  # e.g. freekv: selected with the previous step's query


@torch.no_grad()
def analyse(model, tok, case, spec: str, knobs: dict, protocol: str, reading: float) -> dict:
    prefix = LiveKVCache(model.config, "dense")
    prefill(model, prefix, torch.tensor([case.context_ids]))
    dense = ruler.fork(model, prefix, "dense", {})
    dense_answer = ruler.answer_case(model, tok, dense, case, protocol)
    tokens = tok.encode(" " + dense_answer if not dense_answer.startswith((":", "\n")) else dense_answer,
                        add_special_tokens=False)
    name, own = parse_spec(spec)
    cache = ruler.fork(model, prefix, name, {**knobs, **own})
    probe = Probe(value_positions(tok, case.context_ids, case.expected), reading)
    for layer in cache.recallable_layers:
        layer.observers.append(probe)
    question = torch.tensor([case.question_ids])
    if protocol == "prompt":
        logits = prefill(model, cache, question)
    else:
        probe.phase = "question"
        for t in range(question.shape[1]):
            probe.new_step()
            logits = model(question[:, t:t + 1], past_key_values=cache).logits[:, -1]
    probe.step_misses.clear()
    first_diff = None
    for i, t in enumerate(tokens):
        if first_diff is None and int(logits.argmax(-1)) != t:
            first_diff = i
        probe.new_step()
        logits = model(torch.tensor([[t]]), past_key_values=cache).logits[:, -1]
    at_diff = probe.step_misses[first_diff - 1] if first_diff else []
    return {"task": case.task, "index": case.index, "haystack": case.haystack, "form": case.form,
            "expected": case.expected, "dense": dense_answer, "first_diff": first_diff,
            "dense_correct": ruler.score(dense_answer, case.expected), "stats": dict(probe.stats),
            "missed_heads_at_diff": at_diff,
            "by_layer": {k: dict(v) for k, v in sorted(probe.by_layer.items())}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="quest")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--tasks", default="niah_single,niah_multikey")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--protocol", default="prompt")
    ap.add_argument("--reading", type=float, default=0.1)
    ap.add_argument("--only-misses", default=None, help="a ruler JSON: only the cases this spec missed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    todo = [(t, i) for t in args.tasks.split(",") for i in range(args.cases)]
    if args.only_misses:
        recs = json.load(open(args.only_misses))["cases"]
        todo = [(c["task"], c["index"]) for c in recs if c["method"] == args.spec and c["protocol"] == args.protocol
                and c["budget"] == args.budget and c["context"] == args.context and not c["correct"]
                and c["task"] in args.tasks.split(",")]
    rows, total = [], collections.Counter()
    for task, index in todo:
        case = ruler.make_case(tok, task, args.split, index, args.context)
        row = analyse(model, tok, case, args.spec, {"budget": args.budget}, args.protocol, args.reading)
        rows.append(row)
        total.update(row["stats"])
        s = row["stats"]
        print(f"{task} #{index} {row['haystack']} {row['form']} dense={row['dense']!r} first_diff={row['first_diff']} "
              f"reading={s.get('reading', 0)} read={s.get('read', 0)} "
              + " ".join(f"{k}={v}" for k, v in s.items() if k not in ("reading", "read"))
              + f" missed@diff={row['missed_heads_at_diff'][:12]}", flush=True)
    print("total:", dict(total), f"recall of reading heads {total['read'] / max(total['reading'], 1):.3f}")
    if args.json:
        json.dump({"args": vars(args), "total": dict(total), "cases": rows}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
