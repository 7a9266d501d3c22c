"""The console script when things go wrong: bad flags and paths refused before any work, streams that stop early,
questions that cannot be answered, and what every command measured, kept (issue 25)."""

import pytest

from livekv.cli import main


def _fail(*args, **kwargs):
    raise AssertionError("work started before the arguments were checked")


@pytest.fixture
def no_work(monkeypatch):
    """Every model load and workload of the CLI fails the test: what must be refused is refused before them."""
    for target in ("livekv.models.load_model", "livekv.vlm.load_default_vlm", "livekv.stream.cli.random_adapter",
                   "livekv.bench.stream.random_llava_onevision", "livekv.evals.needle.evaluate",
                   "livekv.evals.fidelity.evaluate", "livekv.bench.decode.run"):
        monkeypatch.setattr(target, _fail)


# --- comma-separated integer flags -------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["eval", "needle", "--budget", "abc"], "--budget"),
    (["eval", "fidelity", "--context", "2048,x"], "--context"),
    (["bench", "decode", "--context", "4k"], "--context"),
    (["bench", "stream", "--frames", "16,sixty"], "--frames"),
    (["eval", "needle", "--context", "0"], "--context"),
])
def test_integer_list_flags_name_the_flag(no_work, capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2  # argparse's usage error
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and argv[-1] in err


# --- --json paths ------------------------------------------------------------------------------------------------
JSON_COMMANDS = [
    ["eval", "needle", "--context", "512"],
    ["eval", "fidelity", "--context", "512"],
    ["eval", "stream-qa"],
    ["bench", "decode", "--context", "512"],
    ["bench", "stream", "--frames", "4"],
]


@pytest.mark.parametrize("argv", JSON_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_json_path_that_is_a_directory_is_refused_before_work(no_work, tmp_path, argv):
    with pytest.raises(SystemExit, match=rf"--json {tmp_path}: is a directory"):
        main(argv + ["--json", str(tmp_path)])


@pytest.mark.parametrize("argv", JSON_COMMANDS[:2], ids=lambda a: " ".join(a[:2]))
def test_json_path_under_a_file_is_refused_before_work(no_work, tmp_path, argv):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    path = tmp_path / "notes.txt" / "out" / "r.json"
    with pytest.raises(SystemExit, match=rf"--json {path}: .*notes.txt is not a directory"):
        main(argv + ["--json", str(path)])
