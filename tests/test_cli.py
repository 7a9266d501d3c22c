"""The console script end to end on the embedded model, at small sizes."""

import json

import pytest
import torch

from livekv.cli import main


def test_eval_needle_writes_cases_and_accuracy(tmp_path, capsys):
    out = tmp_path / "needle.json"
    main(["eval", "needle", "--method", "dense,quest", "--budget", "128", "--context", "512", "--depths", "1",
          "--json", str(out)])
    payload = json.loads(out.read_text())
    assert [r["method"] for r in payload["results"]] == ["dense", "quest"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in payload["results"])
    assert len(payload["cases"]) == 2 and {"expected", "answer", "accuracy", "depth"} <= set(payload["cases"][0])
    assert "accuracy=" in capsys.readouterr().out


def test_bench_decode_writes_records_and_plot(tmp_path):
    out = tmp_path / "decode.json"
    main(["bench", "decode", "--methods", "dense,quest", "--budget", "64", "--context", "300", "--steps", "1",
          "--rounds", "1", "--json", str(out)])
    records = json.loads(out.read_text())["results"]
    assert [r["method"] for r in records] == ["dense", "quest"]
    for r in records:
        assert {"method", "context", "budget", "ms_per_token", "traffic_limit_ms", "bytes_per_step"} <= set(r)
        assert r["ms_per_token"] > 0 and r["context"] == 300
    assert (tmp_path / "decode.png").stat().st_size > 1000


def test_bench_decode_refuses_caches_that_do_not_fit(monkeypatch):
    """Every cache of a context is kept (methods interleave): where the next would not fit, a clear error comes
    before it is filled, not the kernel's OOM killer part-way."""
    from livekv.bench import decode

    filled = []
    real_fill = decode.fill_cache
    monkeypatch.setattr(decode, "fill_cache", lambda cache, *a: filled.append(cache) or real_fill(cache, *a))
    monkeypatch.setattr(decode, "available_bytes", lambda: 1 << 20)  # 1 MiB left
    with pytest.raises(SystemExit, match="3 caches at context 300 do not fit: the largest of the 1 made so far takes"):
        main(["bench", "decode", "--methods", "dense,quest", "--budget", "64,128", "--context", "300", "--steps", "1",
              "--rounds", "1"])
    assert len(filled) == 1  # the second was refused before it was made
    monkeypatch.setattr(decode, "available_bytes", lambda: 1 << 40)
    main(["bench", "decode", "--methods", "dense,quest", "--budget", "64,128", "--context", "300", "--steps", "1",
          "--rounds", "1"])
    assert len(filled) == 4


def test_bench_decode_recall_core_leaves_a_core_to_background_recall(tmp_path):
    out = tmp_path / "decode.json"
    threads = torch.get_num_threads()
    main(["bench", "decode", "--methods", "quest,freekv", "--budget", "64", "--context", "300", "--steps", "1",
          "--rounds", "1", "--threads", "2", "--recall-core", "--json", str(out)])
    records = json.loads(out.read_text())["results"]
    assert [(r["method"], r["compute_threads"]) for r in records] == [("quest", 2), ("freekv", 1)]
    assert torch.get_num_threads() == 2  # restored after each method's steps
    torch.set_num_threads(threads)


def test_fidelity_of_full_budget_is_perfect(tmp_path):
    out = tmp_path / "fidelity.json"
    main(["eval", "fidelity", "--method", "quest", "--budget", "4096", "--context", "200", "--target", "8",
          "--json", str(out)])
    (r,) = json.loads(out.read_text())["results"]
    assert r["mass_recall"] == pytest.approx(1.0, abs=1e-5)
    assert r["output_cosine"] == pytest.approx(1.0, abs=1e-4)
    assert r["agreement"] == 1.0 and abs(r["kl"]) < 1e-4 and r["ppl_ratio"] == pytest.approx(1.0, abs=1e-4)


def test_bad_configuration_exits_with_a_clear_message():
    with pytest.raises(SystemExit, match="too small"):
        main(["eval", "needle", "--method", "quest", "--budget", "4", "--context", "512"])


def test_stream_answers_during_and_after_playback(tmp_path, capsys):
    import numpy as np

    from livekv.stream.source import write_video

    video = tmp_path / "v.mp4"
    write_video(video, np.random.default_rng(0).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8), fps=8)
    main(["stream", str(video), "--model", "random", "--fps", "4", "--clip-frames", "2", "--short-term", "40",
          "--long-term", "40", "--ask-at", "1:What colour is the square?", "--ask", "What happened?",
          "--max-new-tokens", "3"])
    out = capsys.readouterr()
    assert out.out.count("\nQ (t=") == 2 and "Q (t=1.2s): What colour is the square?" in out.out
    assert "8 frames" in out.err and "end of video" in out.err


def test_stream_runs_the_embedded_video_model_by_default(tmp_path, capsys):
    from livekv.vlm.world import NUMBERS, World

    world = World(seed=0, duration_s=20)
    video = tmp_path / "world.mp4"
    world.write_video(video, fps=2)  # 40 frames; the stream samples them at the world's 0.5 fps
    main(["stream", str(video), "--method", "full", "--ask", "how many objects are there now ?", "--max-new-tokens", "3"])
    out = capsys.readouterr()
    answer = out.out.split("\nA: ")[1].split("\n")[0].split()
    assert answer[:1] == [NUMBERS[len(world.state(world.frame_times[-1])) - 1]]
    assert "10 frames" in out.err and "end of video" in out.err


def test_stream_names_a_missing_model_directory(tmp_path):
    with pytest.raises(SystemExit, match="no model at .*nowhere"):
        main(["stream", str(tmp_path / "v.mp4"), "--model", str(tmp_path / "nowhere")])


def test_stream_rejects_a_corrupt_video(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(SystemExit, match="bad.mp4"):
        main(["stream", str(bad), "--model", "random"])


def test_bench_stream_writes_records_and_plot(tmp_path):
    out = tmp_path / "stream.json"
    main(["bench", "stream", "--methods", "full,livevlm,offline", "--frames", "4,8", "--layers", "1", "--json", str(out)])
    records = json.loads(out.read_text())["results"]
    assert [(r["method"], r["frames"]) for r in records] == [
        ("full", 4), ("full", 8), ("livevlm", 4), ("livevlm", 8), ("offline", 4), ("offline", 8)]
    assert records[-1]["memory_tokens"] == records[1]["memory_tokens"] - 1  # one newline for the whole video
    for r in records:
        assert {"method", "frames", "ttft_ms", "ingest_fps", "fast_kv_bytes", "peak_rss_bytes"} <= set(r)
        assert r["ttft_ms"] > 0 and r["fast_kv_bytes"] > 0 and r["peak_rss_bytes"] > 0
    assert (tmp_path / "stream.png").stat().st_size > 1000


def test_stream_interactive_answers_typed_questions(tmp_path, capsys, monkeypatch):
    import io

    import numpy as np

    from livekv.stream.source import write_video

    video = tmp_path / "v.mp4"
    write_video(video, np.random.default_rng(1).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8), fps=8)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is moving?\n\nAnything red?\n"))
    main(["stream", str(video), "--model", "random", "--fps", "4", "--interactive", "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert "What is moving?" in out and "Anything red?" in out and out.count("\nQ (t=") == 2


def test_eval_stream_qa_takes_dtype_and_weights_and_records_them(tmp_path):
    torch.set_num_threads(1)
    runs = {}
    for dtype, weights in (("float32", "float32"), ("bfloat16", "int8")):
        out = tmp_path / f"qa_{dtype}_{weights}.json"
        main(["eval", "stream-qa", "--methods", "livevlm", "--minutes", "0.5", "--questions", "2", "--memory-tokens",
              "56", "--threads", "1", "--dtype", dtype, "--weights", weights, "--json", str(out)])
        runs[dtype] = payload = json.loads(out.read_text())
        assert (payload["dtype"], payload["weights"]) == (dtype, weights)
        assert payload["results"][0]["questions"] == 2
    f32, bf16 = (runs[d]["results"][0] for d in ("float32", "bfloat16"))
    assert f32["memory_tokens"] == bf16["memory_tokens"] and bf16["kv_bytes"] * 2 == f32["kv_bytes"]
    with pytest.raises(SystemExit, match="int4 needs out_features"):  # the embedded VLM's 94-token vocabulary
        main(["eval", "stream-qa", "--minutes", "0.2", "--questions", "1", "--weights", "int4"])
    with pytest.raises(SystemExit):  # argparse: not a kind of --weights
        main(["eval", "stream-qa", "--weights", "int3"])


def test_stream_and_bench_stream_take_dtype_and_weights(tmp_path, capsys):
    import numpy as np

    from livekv.quantize import Int8Linear
    from livekv.stream.cli import random_adapter
    from livekv.stream.source import write_video

    video = tmp_path / "v.mp4"
    write_video(video, np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8), fps=8)
    out = tmp_path / "stream.json"
    main(["stream", str(video), "--model", "random", "--fps", "4", "--dtype", "bfloat16", "--weights", "int8",
          "--ask", "What happened?", "--max-new-tokens", "2", "--threads", "1", "--json", str(out)])
    record = json.loads(out.read_text())
    assert (record["dtype"], record["weights"]) == ("bfloat16", "int8") and len(record["questions"]) == 1
    adapter = random_adapter(torch.bfloat16, "int8")
    assert isinstance(adapter.lm_head, Int8Linear) and adapter.model.dtype == torch.bfloat16
    tokens = record["memory"][-1]["memory_tokens"]
    kv_heads, head_dim, layers = 2, 64, 4  # random_adapter's text model
    assert record["memory"][-1]["fast_kv_bytes"] == tokens * layers * 2 * kv_heads * head_dim * 2  # bfloat16: 2 bytes

    out = tmp_path / "bench.json"
    main(["bench", "stream", "--methods", "full", "--frames", "4", "--layers", "1", "--threads", "1", "--dtype",
          "bfloat16", "--weights", "int8", "--json", str(out)])
    payload = json.loads(out.read_text())
    assert (payload["dtype"], payload["weights"]) == ("bfloat16", "int8") and payload["results"][0]["fast_kv_bytes"] > 0
