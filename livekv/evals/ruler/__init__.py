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

from livekv.evals.ruler.cases import RulerCase, make_case
from livekv.evals.ruler.run import answer_case, evaluate, fork, score, summarize, table
from livekv.evals.ruler.texts import (DEV_KEYS, NIAH_PHRASINGS, PROTOCOLS, RETRIEVAL, SPLITS, TASKS, TEST_KEYS,
                                      WORD_FORMS, Split, coded_word, cwe_words, haystack_units, make_value)

__all__ = ["DEV_KEYS", "NIAH_PHRASINGS", "PROTOCOLS", "RETRIEVAL", "SPLITS", "TASKS", "TEST_KEYS", "WORD_FORMS",
           "RulerCase", "Split", "answer_case", "coded_word", "cwe_words", "evaluate", "fork", "haystack_units",
           "make_case", "make_value", "score", "summarize", "table"]
