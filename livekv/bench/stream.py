"""Streaming benchmark: frames ingested per second, time from a question to its first answer token, and memory
(fast-tier KV bytes, process RSS) against the number of frames streamed, for several methods in one run.

The model is a random-weight LLaVA-OneVision: the language model has the shape of the 0.5B checkpoint's Qwen2
(24 layers, hidden 896, 14 query / 2 KV heads of 64, MLP 4864, vocab 151,646); the vision tower is a small
SigLIP (2 layers, hidden 256, patch 8) whose image size sets the visual tokens per frame (196 as in the real
model at 224 px; fewer where the CPU needs it). Weights are random, so answers are meaningless: this measures
speed and memory only. Each method streams the same clips; at every checkpoint the same question is asked.
``offline`` is not a streaming method but the baseline an offline Video LLM sets: it gets the video with the
question, so its first answer token waits for the whole video to be encoded and prefilled in one pass.

Budgets are stated in frames and scaled with the tokens per frame, in the papers' proportions (at 196 tokens per
frame): livevlm long-term memory 12k tokens (~61 frames) and short-term memory ~20 frames; rekv a 15k-token
window (~77 frames) and 64 retrieved frames; sink_window the same window as rekv.
"""

from __future__ import annotations

import gc
import math
import pathlib
import statistics
import tempfile
import time

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from livekv.quantize import check_weights
from livekv.stream.adapters import LlavaOnevisionAdapter, cast_and_quantize
from livekv.stream.session import StreamSession
from livekv.sysmem import rss_bytes

QWEN2_05B = dict(
    model_type="qwen2", vocab_size=151_646, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32_768,
    rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0), tie_word_embeddings=True,
)

# frames of memory per method, at the papers' 196 tokens per frame
BUDGET_FRAMES = {"livevlm": dict(long_term=61, short_term=20), "rekv": dict(short_term=77), "sink_window": dict(short_term=77)}


def random_llava_onevision(image_size: int = 64, layers: int | None = None, dtype: torch.dtype = torch.float32,
                           weights: str = "float32") -> LlavaOnevisionAdapter:
    """The benchmark model: ``(image_size / 8 / 2)^2`` visual tokens per frame (64 px: 16; 224 px: 196), in
    ``dtype``, its language model's weights stored as ``weights`` (``cast_and_quantize``; int4 is refused: the
    vocabulary, 151,646 rows of lm_head, is not a multiple of 16)."""
    check_weights(weights)
    text = dict(QWEN2_05B, **({"num_hidden_layers": layers} if layers else {}))
    config = LlavaOnevisionConfig(
        text_config=text,
        vision_config=dict(model_type="siglip_vision_model", hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image_size, patch_size=8, vision_use_head=False),
        image_token_index=151_646 - 2, video_token_index=151_646 - 1,
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=[[image_size, image_size]],
    )
    torch.manual_seed(0)
    model = cast_and_quantize(LlavaOnevisionForConditionalGeneration(config), dtype, weights)
    return LlavaOnevisionAdapter(model.eval())


def method_knobs(name: str, tokens_per_frame: int) -> dict:
    return {k: v * tokens_per_frame for k, v in BUDGET_FRAMES.get(name, {}).items()}


def _time_questions(session: StreamSession, question: list[int], answer_tokens: int,
                    repeats: int) -> tuple[float, dict, int]:
    """The median seconds to the first answer token over ``repeats`` asks, the memory while answering (the answer
    context resident too) and the largest RSS seen then."""
    ttfts, peak_rss = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        answer = session.ask(question, max_new_tokens=answer_tokens)
        next(answer)
        ttfts.append(time.perf_counter() - t0)
        mem = session.memory()
        peak_rss = max(peak_rss, rss_bytes() or 0)
        for _ in answer:
            pass
    return statistics.median(ttfts), mem, peak_rss


def _line(r: dict) -> str:
    return (f"{r['method']:12s} frames {r['frames']:4d}: ingest {r['ingest_fps']:6.2f} frames/s | TTFT "
            f"{r['ttft_ms']:8.1f} ms | fast KV {r['fast_kv_bytes'] / 1e6:7.1f} MB, host KV {r['host_kv_bytes'] / 1e6:7.1f}"
            f" MB | RSS peak {r['peak_rss_bytes'] / 1e9:.2f} GB | snapshot {r['snapshot_bytes'] / 1e6:.1f} MB, save "
            f"{r['save_ms']:.0f} ms, load {r['load_ms']:.0f} ms")


def run(adapter, methods: list[str], checkpoints: list[int], clip_frames: int = 4, question_tokens: int = 16,
        answer_tokens: int = 4, repeats: int = 3) -> dict:
    """Stream ``max(checkpoints)`` frames through each method; at each checkpoint ask the same question ``repeats``
    times (the memory is unchanged by a question) and report the median time to its first answer token."""
    tpf = adapter.tokens_per_frame
    g = torch.Generator().manual_seed(0)
    size = adapter.image_size
    clips = [torch.randint(0, 256, (clip_frames, size, size, 3), dtype=torch.uint8, generator=g) for _ in range(8)]
    vocab = adapter.model.config.text_config.vocab_size
    system = torch.randint(0, vocab - 8, (32,), generator=g).tolist()
    question = torch.randint(0, vocab - 8, (question_tokens,), generator=g).tolist()
    n_frames = max(checkpoints)
    results = []
    for name in methods:
        if name == "offline":
            results += [offline(adapter, clips, n, system, question) for n in checkpoints]
            continue
        knobs = method_knobs(name, tpf)
        gc.collect()
        rss0 = rss_bytes() or 0
        session = StreamSession(adapter, name, system=system, **knobs)
        peak_rss, segment_s, segment_frames, ingest_s = rss0, 0.0, 0, 0.0
        for i in range(math.ceil(n_frames / clip_frames)):
            t0 = time.perf_counter()
            session.push(clips[i % len(clips)])
            dt = time.perf_counter() - t0
            segment_s, segment_frames, ingest_s = segment_s + dt, segment_frames + clip_frames, ingest_s + dt
            peak_rss = max(peak_rss, rss_bytes() or 0)
            frames = (i + 1) * clip_frames
            if frames not in checkpoints:
                continue
            ttft, mem, rss = _time_questions(session, question, answer_tokens, repeats)
            peak_rss = max(peak_rss, rss)
            record = dict(
                method=name, frames=frames, tokens_per_frame=tpf, ttft_ms=ttft * 1e3,
                ingest_fps=segment_frames / segment_s, fast_kv_bytes=mem["fast_kv_bytes"],
                host_kv_bytes=mem["host_kv_bytes"], memory_tokens=mem["memory_tokens"], peak_rss_bytes=peak_rss,
                rss_before_bytes=rss0, **snapshot_cost(session, frames), **knobs,
            )
            print(_line(record), flush=True)
            results.append(record)
            segment_s, segment_frames = 0.0, 0
        del session
    lm = adapter.model.config.text_config
    shape = dict(text_layers=lm.num_hidden_layers, hidden=lm.hidden_size, heads=lm.num_attention_heads,
                 kv_heads=lm.num_key_value_heads, vocab=lm.vocab_size, image_size=adapter.image_size,
                 tokens_per_frame=tpf, clip_frames=clip_frames, question_tokens=question_tokens, ttft_repeats=repeats,
                 threads=torch.get_num_threads())
    return {"shape": shape, "results": results}


def snapshot_cost(session: StreamSession, frames: int, fps: float = 0.5) -> dict:
    """Size of the session's snapshot and the time to save and to load it, also per minute of video (at ``fps``)."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        session.save(f"{tmp}/snap")
        t1 = time.perf_counter()
        StreamSession.load(f"{tmp}/snap", session.adapter)
        t2 = time.perf_counter()
        size = sum(p.stat().st_size for p in pathlib.Path(tmp, "snap").iterdir())
    minutes = frames / fps / 60
    return dict(snapshot_bytes=size, save_ms=(t1 - t0) * 1e3, load_ms=(t2 - t1) * 1e3,
                snapshot_bytes_per_minute=size / minutes, save_ms_per_minute=(t1 - t0) * 1e3 / minutes,
                load_ms_per_minute=(t2 - t1) * 1e3 / minutes)


def offline(adapter, clips: list[torch.Tensor], n_frames: int, system, question) -> dict:
    """What an offline Video LLM does: the question comes with the video, so the first answer token waits for the
    whole video to be encoded and prefilled (in one pass) before the question."""
    frames = torch.cat([clips[i % len(clips)] for i in range(math.ceil(n_frames / len(clips[0])))])[:n_frames]
    gc.collect()
    rss0 = rss_bytes() or 0
    t0 = time.perf_counter()
    session = StreamSession(adapter, "full", system=system)
    session.push(frames)
    next(session.ask(question, max_new_tokens=1))
    ttft = time.perf_counter() - t0
    mem = session.memory()
    record = dict(method="offline", frames=n_frames, tokens_per_frame=adapter.tokens_per_frame, ttft_ms=ttft * 1e3,
                  ingest_fps=None, fast_kv_bytes=mem["fast_kv_bytes"], host_kv_bytes=0,
                  memory_tokens=mem["memory_tokens"], peak_rss_bytes=max(rss0, rss_bytes() or 0), rss_before_bytes=rss0)
    print(f"{'offline':12s} frames {n_frames:4d}: the whole video + question in one pass | TTFT {ttft * 1e3:8.1f} ms"
          f" | fast KV {mem['fast_kv_bytes'] / 1e6:7.1f} MB", flush=True)
    return record


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fast_kv_bytes", "fast-tier KV (MB)", 1e-6), ("peak_rss_bytes", "peak RSS (GB)", 1e-9),
              ("ttft_ms", "time to first token (ms)", 1.0), ("ingest_fps", "ingest (frames/s)", 1.0)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, label, scale) in zip(axes, panels):
        for method in dict.fromkeys(r["method"] for r in results):
            rows = [r for r in results if r["method"] == method]
            rows = [r for r in rows if r[key] is not None]
            ax.plot([r["frames"] for r in rows], [r[key] * scale for r in rows], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("frames streamed")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
