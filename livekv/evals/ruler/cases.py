"""RULER cases: a task, a split and an index -> the token ids of the context and of the question, and what the
answer must hold."""

from __future__ import annotations

import collections
import random
import string
from dataclasses import dataclass, field

from livekv.evals.ruler.texts import (CWE_PHRASINGS, DEV_KEYS, FWE_PHRASINGS, NIAH_PHRASINGS, SPLITS, TASKS,
                                      TEST_KEYS, VT_PHRASINGS, WORD_FORMS, Split, coded_word, cwe_words,
                                      haystack_units, make_value)

# --- cases -------------------------------------------------------------------------------------------------------
@dataclass
class RulerCase:
    task: str
    split: str
    index: int
    seed: int
    context: int
    haystack: str
    form: str
    phrasing: int
    expected: list[str]
    context_ids: list[int]  # template head, intro and haystack: prefilled in both protocols
    question_ids: list[int]  # question, end of the user turn, answer prefix: prefilled, or fed token by token
    depths: list[float] = field(default_factory=list)  # where the needles (vt: the assignments) sit, 0..1
    max_new_tokens: int = 16

    def record(self) -> dict:
        return {"task": self.task, "split": self.split, "index": self.index, "seed": self.seed,
                "context": self.context, "haystack": self.haystack, "form": self.form, "phrasing": self.phrasing,
                "depths": [round(d, 3) for d in self.depths], "expected": self.expected}


class _Prompt:
    """Token ids of ``head`` + body + ``tail`` where the template puts the user's text around the body."""

    def __init__(self, tokenizer, template: str, intro: str, question: str, answer: str):
        if template == "chat" and getattr(tokenizer, "chat_template", None):
            marker = "\x00BODY\x00"
            text = tokenizer.apply_chat_template([{"role": "user", "content": f"{intro}\n\n{marker}\n\n{question}"}],
                                                 tokenize=False, add_generation_prompt=True)
            head, tail = text.split(marker)
            tail += answer
        elif template in ("chat", "raw"):
            head, tail = f"{intro}\n\n", f"\n\n{question}\n{answer}"
        else:
            raise ValueError(f"unknown prompt template {template!r}; expected 'chat' or 'raw'")
        self.tok = tokenizer
        self.head = self._ids(head)
        self.tail = self._ids(tail)

    def _ids(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def pieces(self, texts: list[str]) -> list[list[int]]:
        """Each text with a leading space, as token ids (tokenized one by one: they are joined as ids)."""
        return [list(ids) for ids in self.tok([" " + t for t in texts], add_special_tokens=False)["input_ids"]]


def _fill(prompt: _Prompt, units, n: int, inserts: list[list[int]], depths: list[float]) -> list[int]:
    """``n`` body tokens: haystack units, with ``inserts`` placed at unit boundaries nearest ``depths`` (in order)."""
    room = n - sum(len(x) for x in inserts)
    if room < 16:
        raise ValueError(f"the context is too short for this task ({n} body tokens, {n - room} needed by its needles)")
    hay, bounds = [], [0]
    while len(hay) < room:
        batch = prompt.pieces([next(units) for _ in range(32)])
        for ids in batch:
            hay.extend(ids)
            bounds.append(len(hay))
    hay = hay[:room]
    bounds = [b for b in bounds if b <= room]
    at = [min(bounds, key=lambda b: abs(b - d * room)) for d in depths]
    out, last = [], 0
    for pos, ids in sorted(zip(at, inserts), key=lambda x: x[0]):
        out += hay[last:pos] + ids
        last = pos
    return out + hay[last:]


def _keys(split: Split) -> list[str]:
    return DEV_KEYS if split.keys == "dev" else TEST_KEYS


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def make_case(tokenizer, task: str, split: str, index: int, context: int, template: str = "chat") -> RulerCase:
    """Case ``index`` of ``task`` in ``split`` (``"dev"``/``"test"``), exactly ``context`` tokens long."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
    sp = SPLITS[split]
    seed = sp.seed0 + 10_000 * TASKS.index(task) + index
    rng = random.Random(seed)
    nh, nf = len(sp.haystacks), len(sp.forms)
    haystack = sp.haystacks[index % nh]
    form = sp.forms[(index // nh) % nf]
    phrasing = sp.phrasings[(index // (nh * nf)) % len(sp.phrasings)]
    case = dict(task=task, split=split, index=index, seed=seed, context=context, haystack=haystack, form=form,
                phrasing=phrasing)
    if task.startswith("niah"):
        return _niah(tokenizer, template, rng, sp, case)
    if task == "vt":
        return _vt(tokenizer, template, rng, sp, case)
    return _words(tokenizer, template, rng, sp, case)


def _finish(prompt: _Prompt, case: dict, body: list[int], expected: list[str], depths=()) -> RulerCase:
    n_tokens = len(prompt.tok.encode(" " + ", ".join(expected), add_special_tokens=False))
    return RulerCase(**case, expected=expected, context_ids=prompt.head + body, question_ids=prompt.tail,
                     depths=list(depths), max_new_tokens=n_tokens + 3 * len(expected) + 4)


def _body_tokens(prompt: _Prompt, context: int) -> int:
    return context - len(prompt.head) - len(prompt.tail)


def _niah(tokenizer, template, rng, sp, case) -> RulerCase:
    task, form = case["task"], case["form"]
    p = NIAH_PHRASINGS[case["phrasing"]]
    noun, nouns = WORD_FORMS[form]
    n_needles = 1 if task == "niah_single" else 4
    keys = rng.sample(_keys(sp), 1 if task == "niah_multivalue" else n_needles)
    values = []
    while len(values) < n_needles:  # distinct values
        v = make_value(form, rng)
        if v not in values:
            values.append(v)
    if task == "niah_multivalue":
        pairs, asked = [(keys[0], v) for v in values], keys
    else:
        pairs = list(zip(keys, values))
        asked = keys[:2] if task == "niah_multiquery" else keys[:1]
    expected = [v for k, v in pairs if k in asked]
    fmt = dict(noun=noun, nouns=nouns)
    if len(expected) == 1:
        question, answer = p.question.format(key=asked[0], **fmt), p.answer.format(key=asked[0], **fmt)
    else:
        question, answer = (t.format(keys=_join(asked), **fmt) for t in (p.question_all, p.answer_all))
    prompt = _Prompt(tokenizer, template, p.intro.format(**fmt), question, answer)
    needles = prompt.pieces([p.needle.format(key=k, value=v, **fmt) for k, v in pairs])
    depths = [rng.uniform(0.05, 0.95) for _ in pairs]
    body = _fill(prompt, haystack_units(case["haystack"], rng), _body_tokens(prompt, case["context"]), needles, depths)
    return _finish(prompt, case, body, expected, depths)


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def _vt(tokenizer, template, rng, sp, case, hops: int = 2) -> RulerCase:
    p = VT_PHRASINGS[case["phrasing"]]
    value = str(rng.randrange(10_000, 100_000)) if case["form"] == "number" else make_value(case["form"], rng)
    names = []
    while len(names) < hops + 1:
        name = _var_name(rng)
        if name not in names:
            names.append(name)
    statements = [p.statement.format(a=names[0], value=value)]
    statements += [p.hop.format(a=a, b=b) for a, b in zip(names, names[1:])]
    fmt = dict(value=value, n=len(names))
    prompt = _Prompt(tokenizer, template, p.intro, p.question.format(**fmt), p.answer.format(**fmt))
    depths = sorted(rng.uniform(0.05, 0.95) for _ in statements)  # the chain in order
    body = _fill(prompt, haystack_units(case["haystack"], rng), _body_tokens(prompt, case["context"]),
                 prompt.pieces(statements), depths)
    return _finish(prompt, case, body, names, depths)


def _words(tokenizer, template, rng, sp, case) -> RulerCase:
    """``cwe`` and ``fwe``: the whole context is the list (no haystack, no value form)."""
    task = case["task"]
    case = {**case, "haystack": "words" if task == "cwe" else "coded", "form": "-"}
    p = (CWE_PHRASINGS if task == "cwe" else FWE_PHRASINGS)[case["phrasing"]]
    n_top = 5 if task == "cwe" else 3
    fmt = dict(n=n_top)
    prompt = _Prompt(tokenizer, template, p.intro, p.question.format(**fmt), p.answer.format(**fmt))
    room = _body_tokens(prompt, case["context"])
    if task == "cwe":
        pool = list(cwe_words(sp.name))
        rng.shuffle(pool)
        common, rare = pool[:n_top], pool[n_top:]
        # entries cost 4 to 6 tokens ("123. word"): 30 of each common word, 3 of as many rare words as fit (the
        # list is cut to the context: the common words keep over 20 each)
        n_rare = max(1, (room // 4 - 30 * n_top) // 3)
        words = common * 30 + [w for w in rare[:n_rare] for _ in range(3)]
        rng.shuffle(words)
        texts = [f"{i + 1}. {w}" for i, w in enumerate(words)]
        expected = common
    else:
        vocab = []
        while len(vocab) < 2000:
            w = coded_word(rng, sp.name)
            if w not in vocab:
                vocab.append(w)
        zipf = [1 / (r + 1) ** 2 for r in range(len(vocab))]
        texts = rng.choices(vocab, weights=zipf, k=room)
        counts = collections.Counter(texts)
        expected = [w for w, _ in counts.most_common(n_top)]
    ids = [t for piece in prompt.pieces(texts) for t in piece]
    if len(ids) < room:
        raise ValueError(f"the context ({case['context']}) is too long for {task}'s list")
    body = ids[:room]
    if task == "fwe":  # the answer is what the cut list holds
        kept = prompt.tok.decode(body).split()
        expected = [w for w, _ in collections.Counter(kept).most_common(n_top)]
    return _finish(prompt, case, body, expected)
