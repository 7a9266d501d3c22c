"""The one thread that runs the models: every forward pass of every session is a job on it, one at a time.

So the HTTP server stays responsive (its event loop never runs a model), sessions never run a model concurrently,
and answers go first: jobs are small (one prefill chunk, one decode step, one clip) and taken by priority, so a
question waits at most for the job in progress, never for a backlog of frames.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from concurrent.futures import Future

import torch

ANSWER, PREFILL, INGEST, BACKGROUND = 0, 1, 2, 3  # job priorities: lower first


class Engine:
    """A priority queue of jobs and the thread that runs them (with ``threads`` torch threads, under
    ``torch.inference_mode``)."""

    def __init__(self, threads: int | None = None):
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self.busy_s = 0.0
        self.done = 0
        self._thread = threading.Thread(target=self._work, args=(threads,), name="livekv-engine", daemon=True)
        self._thread.start()

    def submit(self, fn, *args, priority: int = INGEST) -> Future:
        """Run ``fn(*args)`` on the engine's thread; its result (or exception) comes in the future."""
        future: Future = Future()
        self._jobs.put((priority, next(self._order), fn, args, future))
        return future

    async def run(self, fn, *args, priority: int = ANSWER):
        """``submit`` and wait, from the event loop."""
        return await asyncio.wrap_future(self.submit(fn, *args, priority=priority))

    @property
    def pending(self) -> int:
        return self._jobs.qsize()

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the jobs already queued."""
        self._jobs.put((BACKGROUND + 1, next(self._order), None, (), None))
        self._thread.join(timeout)

    def _work(self, threads: int | None) -> None:
        if threads:
            torch.set_num_threads(threads)
        while True:
            _, _, fn, args, future = self._jobs.get()
            if fn is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - the caller gets it
                future.set_exception(e)
            self.busy_s += time.perf_counter() - t0
            self.done += 1
