"""The RULER suite's texts: the two splits, needle keys and values, phrasings, haystacks and word lists."""

from __future__ import annotations

import collections
import collections.abc
import functools
import random
import re
import string
from dataclasses import dataclass

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
