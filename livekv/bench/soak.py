"""The soak benchmark: a long synthetic stream into one session of the embedded video model, on the method's
defaults for that model (``livekv bench soak --frames 10000``).

Every ``every`` frames it records the process RSS, the session's memory (fast- and host-tier bytes, tokens held),
the ingest rate over those frames and, for a question asked there, the answer, whether it is right and its time to
the first token. The summary compares the first window with the last: memory must stay flat and ingest steady.
"""

from __future__ import annotations

import dataclasses
import time

from livekv.bench.stream import rss_bytes
from livekv.vlm.world import NUMBERS, World
from livekv.stream.session import StreamSession

QUESTION = "how many objects are there now ?"


def run(adapter, method: str = "livevlm", frames: int = 10_000, every: int = 500, seed: int = 0,
        system: str | None = None, log=print) -> dict:
    """Stream ``frames`` frames of a world (0.5 fps) into ``method`` on its defaults; a record every ``every``."""
    from livekv.vlm.model import SYSTEM

    world = World(seed=seed, duration_s=frames / 0.5)
    session = StreamSession(adapter, method, system=system or SYSTEM)
    records, t0, ingest0 = [], time.perf_counter(), 0.0
    for i, (t, image) in enumerate(world.frames(), 1):
        session.push(image[None])
        if i % every and i != frames:
            continue
        answer = session.answer(QUESTION, max_new_tokens=4).strip()
        mem, stats = session.memory(), session.stats
        window_s = stats.ingest_s - ingest0
        ingest0 = stats.ingest_s
        record = dict(frames=i, stream_s=t, rss_bytes=rss_bytes(), fast_kv_bytes=mem["fast_kv_bytes"],
                      host_kv_bytes=mem["host_kv_bytes"], memory_tokens=mem["memory_tokens"],
                      ingest_fps=(every if i % every == 0 else i % every) / window_s, ttft_ms=stats.ttft_s * 1e3,
                      answer=answer, correct=answer == NUMBERS[len(world.state(t)) - 1],
                      wall_s=time.perf_counter() - t0)
        records.append(record)
        log(f"{i:6d} frames ({t / 60:6.1f} min of video): ingest {record['ingest_fps']:6.1f} frames/s | "
            f"fast KV {record['fast_kv_bytes'] / 1e6:.2f} MB, {record['memory_tokens']} tokens | "
            f"RSS {record['rss_bytes'] / 1e9:.2f} GB | {answer!r} ({'right' if record['correct'] else 'wrong'})")
    first, last = records[0], records[-1]
    summary = dict(method=method, knobs=dataclasses.asdict(session.method), frames=frames,
                   fps_ratio_last_first=last["ingest_fps"] / first["ingest_fps"],
                   fast_kv_first=first["fast_kv_bytes"], fast_kv_last=last["fast_kv_bytes"],
                   rss_first=first["rss_bytes"], rss_last=last["rss_bytes"],
                   accuracy=sum(r["correct"] for r in records) / len(records))
    log(f"first -> last window: ingest {first['ingest_fps']:.1f} -> {last['ingest_fps']:.1f} frames/s "
        f"(x{summary['fps_ratio_last_first']:.2f}), fast KV {first['fast_kv_bytes'] / 1e6:.2f} -> "
        f"{last['fast_kv_bytes'] / 1e6:.2f} MB, RSS {first['rss_bytes'] / 1e9:.2f} -> {last['rss_bytes'] / 1e9:.2f} GB")
    return {"summary": summary, "results": records}


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fast_kv_bytes", "fast-tier KV (MB)", 1e-6), ("rss_bytes", "RSS (GB)", 1e-9),
              ("ingest_fps", "ingest (frames/s)", 1.0), ("ttft_ms", "time to first token (ms)", 1.0)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, label, scale) in zip(axes, panels):
        ax.plot([r["frames"] for r in results], [r[key] * scale for r in results], marker=".")
        ax.set_xlabel("frames streamed")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
