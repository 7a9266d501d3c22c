"""RULER-style synthetic long-context tasks (Hsieh et al., 2024), generated offline, with a dev and a test split.

Tasks (RULER's names; ``expected`` is a list of strings, a case scores the share of them found in the answer):

* ``niah_single``: one needle (a key and its value) in a haystack; the question asks for the value.
* ``niah_multikey``: the needle and 3 distractor needles (other keys, same kind of value).
* ``niah_multivalue``: 4 needles with the same key and 4 values; the question asks for all of them.
* ``niah_multiquery``: 4 needles with 4 keys; the question asks for the values of 2 of them.
* ``vt`` (variable tracking): a chain of 2 hops (``VAR A = 12345.`` ... ``VAR B = VAR A.`` ... ``VAR C = VAR B.``)
  scattered in the haystack; the question asks for the 3 variables that end up holding the value (RULER's default
  is 4 hops; SmolLM2-135M finds the first variable and rarely more).
* ``cwe`` (common words): a numbered list of words where 5 words appear 30 times each and the others 3 times;
  the question asks for the 5 most common.
* ``fwe`` (frequent words): coded words drawn from a Zipf distribution (exponent 2); the question asks for the 3
  most frequent.

``niah_*`` are the retrieval tasks, ``vt``, ``cwe`` and ``fwe`` the others.

The split (fixed here; nothing is ever chosen on test):

==================  =========================================  =================================================
                    dev                                        test
==================  =========================================  =================================================
case seeds          ``10_000 * task + i`` (below 1,000,000)    ``1_000_000 + 10_000 * task + i``
haystacks           KJV Bible (``kjv``), RULER's repeated       Shakespeare's plays and poems (``shakespeare``),
                    noise sentences (``noise``)                 generated essay-like prose (``essay``)
needle values       7-digit numbers, words                      UUID-like strings (8-4-4 hex digits)
needle keys         ``DEV_KEYS``                                ``TEST_KEYS`` (disjoint)
phrasings           RULER's own templates, and a second set     two other sets (``PHRASINGS``; the questions never
                                                                repeat the needle's sentence)
vt                  ``VAR X = 12345.``, 5-digit values, words   ``LET X BE ...``, UUID-like values
cwe words           KJV vocabulary                              Shakespeare's words that the KJV never uses
fwe coded words     random letters                              random syllables
==================  =========================================  =================================================

Case ``i`` of a task cycles through the split's haystacks, then value forms, then phrasings (so that a few cases
cover every combination); depths are drawn from the case's seed. The same seed at another context length gives
the same needles in a longer haystack.

A prompt is the model's chat template (``template="chat"``; ``"raw"``: plain text) around
``intro \\n\\n context \\n\\n question``, with the answer's first words (RULER's answer prefix) after the assistant
turn's start. It is exactly ``context`` tokens long. Two protocols:

* ``prompt``: the whole prompt is prefilled (dense, as in the papers), the answer decoded through the sparse path;
* ``fed``: the context (intro + haystack) is prefilled, then the question and answer prefix are fed one token at a
  time through the sparse path, then the answer decoded.

Within a case every method and protocol continues the same dense prefill of the context (made once, copied into
each method's cache), so a case costs one prefill however many methods it compares.
"""

from __future__ import annotations

import collections
import collections.abc
import functools
import random
import re
import string
import time
from dataclasses import dataclass, field

import torch

from livekv.cache import LiveKVCache
from livekv.generation import feed, prefill
from livekv.progress import above_bars, bar

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
RETRIEVAL = TASKS[:4]
PROTOCOLS = ("prompt", "fed")


@dataclass(frozen=True)
class Split:
    name: str
    seed0: int
    haystacks: tuple[str, ...]
    forms: tuple[str, ...]
    phrasings: tuple[int, ...]  # indexes into each task's phrasings
    keys: str  # "dev" or "test": which word lists


SPLITS = {
    "dev": Split("dev", 0, ("kjv", "noise"), ("number", "word"), (0, 1), "dev"),
    "test": Split("test", 1_000_000, ("shakespeare", "essay"), ("uuid",), (2, 3), "test"),
}

DEV_KEYS = """meadow harbor lantern orchard glacier canyon violet compass falcon ember willow pebble thunder saddle
marble cobalt beacon quarry thistle anchor badger cedar dolphin feather garnet hazel island jasmine kettle ladder
mirror nutmeg oyster parrot quill raven sparrow tulip velvet walnut yarrow zephyr acorn bramble cinder dune fern
grove hollow ivory juniper kelp lagoon maple nectar otter pine ripple summit timber valley wren""".split()
TEST_KEYS = """tangerine nebula porcupine saxophone volcano umbrella cathedral avalanche kangaroo telescope bicycle
dinosaur elevator flamingo gondola hurricane igloo jellyfish kaleidoscope lighthouse mosquito noodle octopus
pyramid quicksand rhinoceros submarine trombone unicorn vineyard waterfall xylophone yacht zeppelin asteroid
broccoli cactus dragonfly escalator firework giraffe hammock iceberg jukebox koala lobster mango nightingale
observatory penguin raccoon skyscraper tornado ukulele vulture windmill""".split()
DEV_VALUE_WORDS = """apple river candle forest silver honey stone cloud garden bridge copper needle basket
mountain shadow rabbit pepper winter circle ribbon castle butter lemon tiger ocean window planet rocket
button cotton dragon engine finger guitar helmet insect jacket kitten letter magnet napkin orange pencil
puzzle rubber salmon turtle vessel wagon""".split()

WORD_FORMS = {"number": ("number", "numbers"), "word": ("word", "words"), "uuid": ("code", "codes")}


@dataclass(frozen=True)
class NeedlePhrasing:
    intro: str
    needle: str  # {key} {value} {noun} {nouns}
    question: str  # one value of one key
    answer: str
    question_all: str  # every value of {keys} (one key, or several joined with "and")
    answer_all: str


NIAH_PHRASINGS = (
    NeedlePhrasing(  # 0: RULER's own (dev)
        "Some special magic {nouns} are hidden within the following text. Make sure to memorize it. I will quiz you "
        "about the {nouns} afterwards.",
        "One of the special magic {nouns} for {key} is: {value}.",
        "What is the special magic {noun} for {key} mentioned in the provided text?",
        "The special magic {noun} for {key} mentioned in the provided text is",
        "What are all the special magic {nouns} for {keys} mentioned in the provided text?",
        "The special magic {nouns} for {keys} mentioned in the provided text are"),
    NeedlePhrasing(  # 1 (dev)
        "A few secret {nouns} are written somewhere in the text below. Read it carefully; questions about them follow.",
        "A secret {noun} of the {key} is {value}.",
        "Which {noun} was kept secret for the {key}?",
        "The {noun} kept secret for the {key} is",
        "Which {nouns} were kept secret for the {keys}?",
        "The {nouns} kept secret for the {keys} are"),
    NeedlePhrasing(  # 2 (test)
        "The document below contains records of access {nouns}. Study it; you will be asked about them.",
        "Record: an access {noun} issued to {key} reads {value}.",
        "Which access {noun} does {key} hold?",
        "The access {noun} held by {key} is",
        "List every access {noun} that {keys} hold.",
        "The access {nouns} held by {keys} are"),
    NeedlePhrasing(  # 3 (test)
        "Somewhere in this text, {nouns} that open vaults are mentioned. Remember them.",
        "Remember this: a {noun} that opens the {key} vault is {value}.",
        "Tell me the {noun} that unlocks the {key} vault.",
        "The {noun} that unlocks the {key} vault is",
        "Tell me all the {nouns} that unlock the {keys} vaults.",
        "The {nouns} that unlock the {keys} vaults are"),
)


@dataclass(frozen=True)
class Phrasing:
    intro: str
    question: str
    answer: str
    statement: str = ""  # vt: the first assignment {a} {value}
    hop: str = ""  # vt: the next ones {b} {a}


VT_PHRASINGS = (  # the answer prefix ends with the word that introduces a name, so that the answer starts with one
    Phrasing("Memorize and track the chain(s) of variable assignment hidden in the following text.",
             "Question: Find all variables that are assigned the value {value} in the text above.",
             "Answer: According to the chain(s) of variable assignment in the text above, {n} variables are assigned "
             "the value {value}, they are: VAR", "VAR {a} = {value}.", "VAR {b} = VAR {a}."),
    Phrasing("The text below hides a few assignments of values to variables. Keep track of them.",
             "Which variables end up with the value {value}?",
             "The {n} variables that end up with the value {value} are: VAR", "VAR {a} = {value}.", "VAR {b} = VAR {a}."),
    Phrasing("The text below hides a sequence of assignments between names. Follow them.",
             "Which names end up holding {value}?",
             "The {n} names that end up holding {value} are: LET", "LET {a} BE {value}.", "LET {b} BE {a}."),
    Phrasing("Some names in the following passage are given values, directly or through other names.",
             "List the names whose value is {value}.",
             "The {n} names whose value is {value} are: LET", "LET {a} BE {value}.", "LET {b} BE {a}."),
)
CWE_PHRASINGS = (
    Phrasing("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
             "ones that appear most often.",
             "Question: What are the {n} most common words in the above list?",
             "Answer: The top {n} words that appear most often in the list are: 1."),
    Phrasing("Here is a numbered list of words; a few of them come back again and again.",
             "Which {n} words come back most often in the list?",
             "The {n} words that come back most often are: 1."),
    Phrasing("Here is a long numbered list of words; several of them are repeated many times.",
             "Which {n} words are repeated most in this list?",
             "The {n} words repeated most often are: 1."),
    Phrasing("Read the list of words below and notice which words it repeats.",
             "Name the {n} words this list repeats most.",
             "The {n} words the list repeats most are: 1."),
)
FWE_PHRASINGS = (
    Phrasing("Read the following coded text and track the frequency of each coded word. Find the three most "
             "frequently appeared coded words.",
             "Question: What are the three most frequently appeared words in the above coded text?",
             "Answer: According to the coded text above, the three most frequently appeared words are:"),
    Phrasing("The text below is written in a code of made-up words. Some of them are far more frequent than others.",
             "Which three coded words occur most often?",
             "The three most frequent coded words are:"),
    Phrasing("The passage below is written in a made-up code. Count how often each code word occurs.",
             "Which three code words occur most often?",
             "The three most frequent code words are:"),
    Phrasing("What follows is a stream of invented words, some much more common than the rest.",
             "Tell me the three invented words that appear most.",
             "The three invented words that appear most are:"),
)

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")


# --- haystacks ---------------------------------------------------------------------------------------------------
_ESSAY = dict(
    opener=("", "", "", "In practice, ", "The surprising thing is that ", "What I have noticed is that ", "Perhaps ",
            "Over time, ", "Most of the time, ", "It turns out that ", "For a long while, ", "Oddly enough, ",
            "If you look closely, ", "Sooner or later, ", "In my experience, ", "Of course, "),
    subject=("the typical founder", "a good essay", "the best idea", "a young programmer", "a small company",
             "the person who builds things", "a startup", "an investor", "what we learn in school", "a new technology",
             "the world of work", "every craft", "a great teacher", "the average reader", "a careful writer",
             "a big company", "an ambitious person", "a hard problem", "the first version of anything",
             "a city full of builders", "good taste", "an honest question", "the ordinary user", "a committee"),
    verb=("tends to reward", "rarely depends on", "often begins with", "usually comes from", "quietly changes",
          "is shaped by", "makes room for", "learns more from", "cannot survive without", "ends up ignoring",
          "is measured by", "slowly turns into", "pays attention to", "is easy to confuse with", "grows out of",
          "has little to do with", "depends far more on", "is held back by", "can be ruined by", "looks a lot like"),
    object=("curiosity", "hard work over many years", "the problems nobody wants to solve",
            "a clear sense of what users need", "small experiments", "the habits of its founders", "luck",
            "the fear of looking foolish", "conversations with strangers", "a willingness to be wrong",
            "the details that others skip", "doing things that do not scale", "writing things down",
            "the approval of experts", "patience", "a few loyal friends", "the wish to be taken seriously",
            "a surprising amount of boredom", "simple tools", "an unfashionable idea", "the pressure of deadlines",
            "long walks", "reading widely", "a stubborn refusal to give up"),
    tail=("", "", "", " more than we admit", ", at least at first", " in ways that are easy to miss",
          ", which is why it matters", " without anyone noticing", ", and that is fine", " for better or worse",
          " in the long run", ", as far as I can tell", " once you get used to it"),
)


def essay_sentences(rng: random.Random) -> collections.abc.Iterator[str]:
    """Generated essay-like prose, sentence by sentence, without end (no digits)."""
    e = _ESSAY
    while True:
        s = f"{rng.choice(e['opener'])}{rng.choice(e['subject'])} {rng.choice(e['verb'])} {rng.choice(e['object'])}"
        s += f"{rng.choice(e['tail'])}."
        yield s[0].upper() + s[1:]


def haystack_units(name: str, rng: random.Random) -> collections.abc.Iterator[str]:
    """Sentences (or verses, speeches) of haystack ``name``, from a point drawn from ``rng``, without end."""
    from livekv.evals import corpus

    if name == "noise":
        while True:
            yield from NOISE
    if name == "essay":
        yield from essay_sentences(rng)
    units = {"kjv": corpus.bible_verses, "shakespeare": corpus.shakespeare_speeches}[name]()
    i = rng.randrange(len(units))
    while True:
        yield units[i % len(units)]
        i += 1


# --- word lists ----------------------------------------------------------------------------------------------------
@functools.cache
def _word_counts(source: str) -> collections.Counter:
    from livekv.evals import corpus

    units = corpus.bible_verses() if source == "kjv" else corpus.shakespeare_speeches()
    words = (w for u in units for w in re.findall(r"[A-Za-z]+", u))
    return collections.Counter(w for w in words if len(w) >= 4 and w.islower())  # names and capitals left out


@functools.cache
def cwe_words(split: str) -> tuple[str, ...]:
    """Words for ``cwe``: dev, the 4th to 2000th most frequent words of 4+ letters of the KJV that are not keys or
    values; test, those of Shakespeare that the KJV never uses (the two lists are disjoint)."""
    taken = set(DEV_KEYS) | set(TEST_KEYS) | set(DEV_VALUE_WORDS)
    if split == "dev":
        ranked = [w for w, _ in _word_counts("kjv").most_common()]
    else:
        kjv = _word_counts("kjv")
        ranked = [w for w, _ in _word_counts("shakespeare").most_common() if w not in kjv]
    return tuple(w for w in ranked[3:2003] if w not in taken)


def coded_word(rng: random.Random, split: str) -> str:
    """A made-up word for ``fwe``: dev, 4 to 6 random letters; test, 2 or 3 consonant-vowel syllables."""
    if split == "dev":
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 6)))
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))


def make_value(form: str, rng: random.Random) -> str:
    if form == "number":
        return str(rng.randrange(1_000_000, 10_000_000))
    if form == "word":
        return rng.choice(DEV_VALUE_WORDS)
    if form == "uuid":
        return "-".join("".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (8, 4, 4))
    raise ValueError(f"unknown needle form {form!r}")


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


# --- scoring -----------------------------------------------------------------------------------------------------
def _pattern(item: str) -> re.Pattern:
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(item) + r"(?![A-Za-z0-9])", re.IGNORECASE)


def score(answer: str, expected: list[str]) -> float:
    """Share of ``expected`` items found in ``answer`` as whole words (case-insensitive): RULER's string match."""
    return sum(bool(_pattern(x).search(answer)) for x in expected) / len(expected)


def _complete(answer: str, expected: list[str]) -> bool:
    """Every item found and followed by something (so that no longer item can still be meant)."""
    for x in expected:
        m = _pattern(x).search(answer)
        if m is None or m.end() == len(answer):
            return False
    return True


# --- running -----------------------------------------------------------------------------------------------------
def fork(model, prefix: LiveKVCache, method: str, knobs: dict) -> LiveKVCache:
    """A new cache of ``method`` holding what the dense cache ``prefix`` holds (its KV, copied), as if it had
    prefilled the same tokens itself (prefill attends densely in every method)."""
    cache = LiveKVCache(model.config, method, ignore_unknown=True, **knobs)
    for src, dst in zip(prefix.layers, cache.layers):
        keys, values = src.fast.view()
        dst.append(keys, values)
    return cache


@torch.no_grad()
def answer_case(model, tokenizer, cache: LiveKVCache, case: RulerCase, protocol: str) -> str:
    """Continue ``cache`` (holding the case's context) with the question (prefilled or fed), then decode greedily
    until the end of the turn, ``case.max_new_tokens``, or every expected item has been given."""
    question = torch.tensor([case.question_ids])
    if protocol == "prompt":
        logits = prefill(model, cache, question)
    elif protocol == "fed":
        logits = feed(model, cache, question)[:, -1]
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    stop = {tokenizer.eos_token_id}
    tokens: list[int] = []
    for _ in range(case.max_new_tokens):
        token = int(logits.argmax(-1))
        if token in stop:
            break
        tokens.append(token)
        if _complete(tokenizer.decode(tokens), case.expected):
            break
        logits = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[:, -1]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def summarize(cases: list[dict]) -> list[dict]:
    """Mean score per (method, budget, context, protocol, task), and over tasks: ``all``, ``retrieval`` (niah_*) and
    ``other`` (each the mean of its tasks' means)."""
    groups: dict[tuple, list[float]] = collections.defaultdict(list)
    for c in cases:
        groups[(c["method"], c["budget"], c["context"], c["protocol"], c["task"])].append(c["score"])
    rows = [dict(method=m, budget=b, context=ctx, protocol=pr, task=t, cases=len(s), accuracy=sum(s) / len(s))
            for (m, b, ctx, pr, t), s in groups.items()]
    out = list(rows)
    by_cell = collections.defaultdict(list)
    for r in rows:
        by_cell[(r["method"], r["budget"], r["context"], r["protocol"])].append(r)
    for (m, b, ctx, pr), rs in by_cell.items():
        for name, pick in (("retrieval", lambda t: t in RETRIEVAL), ("other", lambda t: t not in RETRIEVAL),
                           ("all", lambda t: True)):
            sel = [r for r in rs if pick(r["task"])]
            if sel:
                out.append(dict(method=m, budget=b, context=ctx, protocol=pr, task=name,
                                cases=sum(r["cases"] for r in sel), accuracy=sum(r["accuracy"] for r in sel) / len(sel)))
    return out


def table(results: list[dict]) -> str:
    """A markdown table per context and protocol: a row per method (and budget), a column per task and for the
    retrieval / other / all means, in percent; under each sparse method's row its difference to dense."""
    out = []
    tasks = [t for t in (*TASKS, "retrieval", "other", "all") if any(r["task"] == t for r in results)]
    for context in sorted({r["context"] for r in results}):
        for protocol in [p for p in PROTOCOLS if any(r["protocol"] == p for r in results)]:
            mine = {(r["method"], r["budget"], r["task"]): r for r in results
                    if r["context"] == context and r["protocol"] == protocol}
            rows = list(dict.fromkeys((m, b) for m, b, _ in mine))
            n = {t: next(r["cases"] for (m, b, tt), r in mine.items() if tt == t) for t in tasks[:-3] if
                 any(tt == t for _, _, tt in mine)}
            out.append(f"\ncontext {context}, protocol {protocol} (cases per task: "
                       + ", ".join(f"{t} {c}" for t, c in n.items()) + ")\n")
            out.append("| method | budget | " + " | ".join(tasks) + " |")
            out.append("|---|---|" + "---|" * len(tasks))
            dense = next(((m, b) for m, b in rows if b is None), None)
            for m, b in rows:
                cells = [mine.get((m, b, t)) for t in tasks]
                out.append(f"| {m} | {b or 'all'} | " + " | ".join(
                    "-" if c is None else f"{100 * c['accuracy']:.1f}" for c in cells) + " |")
                if dense and (m, b) != dense:
                    deltas = []
                    for t, c in zip(tasks, cells):
                        d = mine.get((*dense, t))
                        deltas.append("-" if c is None or d is None else f"{100 * (c['accuracy'] - d['accuracy']):+.1f}")
                    out.append("| (vs dense) | | " + " | ".join(deltas) + " |")
    return "\n".join(out)


def evaluate(model, tokenizer, methods: list[tuple[str, dict]], contexts: list[int], split: str = "dev",
             tasks=TASKS, cases: int = 10, protocols=PROTOCOLS, first: int = 0, template: str = "chat",
             chunk: int = 2048, log=print, progress: bool = False) -> dict:
    """Every (context, task, case, protocol, method). ``methods``: ``(name, knobs)`` pairs (a name may be a spec
    such as ``quest:gqa_pool=rank``, whose knobs are in ``knobs`` too: it labels the records). Cases ``first ..
    first + cases - 1`` of each task. Returns ``{"split", "results": summarize(cases), "cases": [one record per
    case, method and protocol]}``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected 'dev' or 'test'")
    records = []
    total = len(contexts) * len(tasks) * cases * len(protocols) * len(methods)
    runs = bar(total, f"ruler {split}", "answer", enabled=progress)
    log = above_bars(log)
    for context in contexts:
        for task in tasks:
            for index in range(first, first + cases):
                case = make_case(tokenizer, task, split, index, context, template)
                prefix = LiveKVCache(model.config, "dense")
                t0 = time.perf_counter()
                prefill(model, prefix, torch.tensor([case.context_ids]), chunk)
                prefill_s = time.perf_counter() - t0
                for protocol in protocols:
                    for name, knobs in methods:
                        t0 = time.perf_counter()
                        cache = fork(model, prefix, name.partition(":")[0], knobs)
                        answer = answer_case(model, tokenizer, cache, case, protocol)
                        s = score(answer, case.expected)
                        m = cache.method
                        rec = {"method": name, "budget": getattr(m, "budget", None),
                               "page_size": getattr(m, "page_size", None), "protocol": protocol, **case.record(),
                               "answer": answer, "score": s, "correct": s == 1.0,
                               "seconds": round(time.perf_counter() - t0, 2), "prefill_s": round(prefill_s, 2)}
                        records.append(rec)
                        runs.update()
                        mark = "ok  " if s == 1 else ("part" if s else "MISS")
                        log(f"  {mark} {task:15s} #{index:<3d} {protocol:6s} {name:11s} b={rec['budget']!s:5s} "
                            f"ctx={context} {case.haystack:11s} {case.form:6s} expected={','.join(case.expected)} "
                            f"got={answer[:80]!r} ({rec['seconds']:.1f} s)")
                del prefix
    runs.close()
    results = summarize(records)
    for r in results:
        if r["task"] in ("retrieval", "other", "all"):
            log(f"ruler {split} {r['method']:11s} budget={r['budget']!s:5s} context={r['context']} "
                f"{r['protocol']:6s} {r['task']:9s} {100 * r['accuracy']:5.1f} ({r['cases']} cases)")
    log(table(results))
    return {"split": split, "template": template, "results": results, "cases": records}
