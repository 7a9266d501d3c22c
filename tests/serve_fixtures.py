"""A live ``livekv serve`` for the tests: uvicorn on 127.0.0.1 in a thread of the test process (the models loaded
once), or a real ``livekv serve`` process (for kill and restart)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(config, models):
    """``create_app(config, models)`` served on ``config.port`` until the block ends; yields its base URL."""
    import uvicorn

    from livekv.serve import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(config, models), host="127.0.0.1", port=config.port,
                                           log_level="warning", ws="auto"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def serve_process(*args: str, port: int):
    """``livekv serve --port PORT ARGS`` as a process of its own; yields it once ``/health`` answers."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe nobody reads would block the server
    proc = subprocess.Popen([sys.executable, "-m", "livekv.cli", "serve", "--port", str(port), "--threads", "1", *args],
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_healthy(url: str, proc=None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            proc.log.seek(0)
            raise RuntimeError(f"livekv serve exited with {proc.returncode}: {proc.log.read()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("livekv serve did not become healthy")


def wait_ingested(client: httpx.Client, sid: str, source: bool = True, timeout: float = 120.0,
                  count: int | None = None) -> dict:
    """The stream's record once its source ended (``source``) and every frame seen (at least ``count``) was
    ingested or dropped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.get(f"/v1/streams/{sid}").json()
        f = info["frames"]
        settled = f["queued"] == 0 and f["seen"] == f["ingested"] + f["dropped"] >= (count or 0)
        if (info["source_done"] or not source) and settled:
            return info
        time.sleep(0.05)
    raise TimeoutError(f"stream {sid} did not finish ingesting: {info}")


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
