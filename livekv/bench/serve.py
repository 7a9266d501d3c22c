"""Load on a live server (``livekv bench serve``): N stream sessions, each fed a World video at ``fps`` frames per
second (PNG frames pushed over HTTP, paced by the wall clock) and asked a question every ``ask_every`` seconds (its
time to the first answer token measured from the request, over SSE).

Per number of sessions it reports the time to first token (p50, p95), the frames each session ingested per second,
the frames dropped, the fast-tier memory per session, and whether every session kept up in real time (no drops, and
all frames ingested within a second of the end); the round trip of a light request (a stream's record) on the idle
server and of a frame push under the load, p50 and p95 (what a proxy in front of the server, such as Ray Serve's,
adds shows there); and the resident memory of the server, or of each of its replicas (``/health``), at the end of
the level. The server runs in a process of its own (``livekv serve``) unless ``url`` names one (``livekv serve
--ray``, say); the load generator shares the machine with it.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
from PIL import Image

from livekv.vlm.world import NUMBERS, World

QUESTION = "how many objects are there now ?"
IDLE_REQUESTS = 40  # light requests timed on the idle server, per level


def run(sessions: list[int], duration: float = 30.0, fps: float = 2.0, ask_every: float = 10.0,
        method: str = "livevlm", url: str | None = None, threads: int = 2, headers: dict | None = None,
        log=print) -> dict:
    """Every load level in turn against one server (started here unless ``url`` is given)."""
    frames = _frames(int(duration * fps) + 1)
    with _server(url, threads) as base:
        results = [asyncio.run(_level(base, n, frames, duration, fps, ask_every, method, headers or {}, log))
                   for n in sessions]
    return {"method": method, "duration_s": duration, "fps": fps, "ask_every_s": ask_every, "results": results,
            "most_real_time": max([r["sessions"] for r in results if r["real_time"]], default=0)}


async def _level(base: str, n: int, frames: list[bytes], duration: float, fps: float, ask_every: float,
                 method: str, headers: dict, log) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=120, headers=headers) as client:
        ids = [(await client.post("/v1/streams", json={"method": method, "fps": fps})).json()["id"] for _ in range(n)]
        idle = []
        for k in range(IDLE_REQUESTS):  # the round trip of a light request, nothing else running
            start = time.perf_counter()
            (await client.get(f"/v1/streams/{ids[k % n]}")).raise_for_status()
            idle.append((time.perf_counter() - start) * 1e3)
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(_session(client, sid, frames, t0, duration, fps, ask_every) for sid in ids))
        late = await _wait_ingested(client, ids, timeout=30.0)
        infos = [(await client.get(f"/v1/streams/{sid}")).json() for sid in ids]
        health = (await client.get("/health")).json()
        for sid in ids:
            await client.delete(f"/v1/streams/{sid}")
    ttfts, pushes = [t for r in runs for t in r["ttft_ms"]], [t for r in runs for t in r["push_ms"]]
    dropped = sum(i["frames"]["dropped"] for i in infos)
    rss = [r.get("rss_bytes") for r in health.get("replicas", [health])]  # livekv serve --ray: one per replica
    record = dict(sessions=n, ttft_p50_ms=_pct(ttfts, 50), ttft_p95_ms=_pct(ttfts, 95), questions=len(ttfts),
                  right=sum(r["right"] for r in runs), frames_sent=sum(r["sent"] for r in runs), dropped=dropped,
                  ingest_fps_per_session=statistics.mean(i["frames"]["ingested"] / duration for i in infos),
                  fast_kv_bytes_per_session=statistics.mean(i["memory"]["fast"]["used"] for i in infos),
                  request_p50_ms=_pct(idle, 50), request_p95_ms=_pct(idle, 95), push_p50_ms=_pct(pushes, 50),
                  push_p95_ms=_pct(pushes, 95), rss_bytes_per_replica=rss,
                  catch_up_s=late, real_time=dropped == 0 and late <= 1.0)
    mb = "/".join(f"{b / 2**20:.0f}" if b else "?" for b in rss)
    log(f"{n} sessions: TTFT p50 {record['ttft_p50_ms']:.0f} ms, p95 {record['ttft_p95_ms']:.0f} ms | ingest "
        f"{record['ingest_fps_per_session']:.2f} frames/s per session | dropped {dropped} | caught up "
        f"{late:.1f} s after the end | fast KV {record['fast_kv_bytes_per_session'] / 1e6:.2f} MB per session | "
        f"request {record['request_p50_ms']:.1f} ms idle, push {record['push_p50_ms']:.1f} ms p50 | RSS {mb} MiB | "
        f"{'real time' if record['real_time'] else 'NOT real time'}")
    return record


async def _session(client: httpx.AsyncClient, sid: str, frames: list[bytes], t0: float, duration: float,
                   fps: float, ask_every: float) -> dict:
    pushed = []

    async def push():
        for k, data in enumerate(frames[: int(duration * fps)]):
            await asyncio.sleep(max(0.0, t0 + k / fps - time.perf_counter()))
            start = time.perf_counter()
            await client.post(f"/v1/streams/{sid}/frames", content=data, headers={"content-type": "image/png"})
            pushed.append((time.perf_counter() - start) * 1e3)

    async def ask():
        out = []
        for k in range(1, int(duration / ask_every) + 1):
            await asyncio.sleep(max(0.0, t0 + k * ask_every - time.perf_counter()))
            start = time.perf_counter()
            async with client.stream("POST", f"/v1/streams/{sid}/ask", json={"question": QUESTION}) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and "delta" in line:
                        out.append(((time.perf_counter() - start) * 1e3, line))
                        break
        return out

    _, asked = await asyncio.gather(push(), ask())
    return {"sent": int(duration * fps), "ttft_ms": [t for t, _ in asked], "push_ms": pushed,
            "right": sum(any(f'"{w}"' in line for w in NUMBERS) for _, line in asked)}


async def _wait_ingested(client: httpx.AsyncClient, ids: list[str], timeout: float) -> float:
    """Seconds until every session ingested what it was sent (``timeout`` if never)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        infos = [(await client.get(f"/v1/streams/{sid}")).json()["frames"] for sid in ids]
        if all(f["queued"] == 0 and f["seen"] == f["ingested"] + f["dropped"] for f in infos):
            return time.perf_counter() - t0
        await asyncio.sleep(0.05)
    return timeout


def _frames(n: int) -> list[bytes]:
    """``n`` frames of a World, PNG-encoded once (the load generator's own work stays small)."""
    out = []
    for _, image in World(seed=21, duration_s=n / 0.5 + 2).frames():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        out.append(buffer.getvalue())
        if len(out) == n:
            return out
    return out


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


class _server:
    """``livekv serve`` in a process of its own on a free port (or the server at ``url``)."""

    def __init__(self, url: str | None, threads: int):
        self.url, self.threads, self.proc = url, threads, None

    def __enter__(self) -> str:
        if self.url:
            return self.url
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "livekv.cli", "serve", "--port", str(port), "--threads",
                                      str(self.threads), "--max-sessions", "64", "--model", "none"],
                                     stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ})
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("livekv serve did not start")

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["sessions"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(n, [r["ttft_p50_ms"] for r in results], marker="o", label="p50")
    axes[0].plot(n, [r["ttft_p95_ms"] for r in results], marker="o", label="p95")
    axes[0].set_ylabel("time to first token (ms)")
    axes[0].legend()
    axes[1].plot(n, [r["ingest_fps_per_session"] for r in results], marker="o")
    axes[1].set_ylabel("ingested frames/s per session")
    axes[2].bar([str(x) for x in n], [r["dropped"] for r in results])
    axes[2].set_ylabel("frames dropped")
    for ax in axes:
        ax.set_xlabel("sessions")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
