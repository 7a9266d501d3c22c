"""Live video sessions: a ``StreamSession`` fed from a bounded queue of frames, asked at any time.

Every frame a client pushes (or a source yields) is either ingested or counted as dropped: the queue holds at most
``max_queue_frames`` frames and, when a client outruns the model, drops the oldest (the newest are what a live
question is about). A file source is read with back-pressure instead (nothing dropped); a URL is live. Ingestion
runs as engine jobs of one clip each, below answers in priority, and pauses while a question is answered (a question
never waits behind the backlog).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import numpy as np

from livekv.serve.engine import ANSWER, INGEST, Engine
from livekv.stream.session import StreamSession
from livekv.stream.source import VideoError, frames


@dataclass
class Counters:
    """What happened to a stream's frames: ``seen`` = ``ingested`` + ``dropped`` + queued + ``lost``. ``lost``: frames
    the stream was sent after its last snapshot, gone with a server (a Ray replica) that died before it could write
    another; a stream resumed from that snapshot lacks them (``livekv.serve.ray``)."""

    seen: int = 0
    ingested: int = 0
    dropped: int = 0
    lost: int = 0
    snapshot_frames: int = 0  # frames ingested when the last snapshot was written
    questions: int = 0
    last_ttft_ms: float | None = None
    source_error: str | None = None


@dataclass
class Stream:
    """One live video session on the server."""

    id: str
    session: StreamSession
    engine: Engine
    spec: dict
    max_queue: int
    clip_frames: int
    counters: Counters = field(default_factory=Counters)
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    ask_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self):
        self.queue: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.answering = self.scheduled = self.closed = self.source_stopped = self.ingesting = False
        self._memory = self.session.memory()  # the last reading between clips
        self.reader: threading.Thread | None = None
        self.source_done = self.spec["source"]["type"] == "push"

    # --- frames in ------------------------------------------------------------------------------------------------
    def push(self, images: list[np.ndarray], wait: bool = False) -> int:
        """Queue frames (``[H, W, 3]`` uint8); returns how many older ones were dropped for room. ``wait``: block
        for room instead (a file source: nothing dropped)."""
        dropped = 0
        with self.cond:
            for image in images:
                while wait and len(self.queue) >= self.max_queue and not (self.closed or self.source_stopped):
                    self.cond.wait(0.5)
                if self.closed or (wait and self.source_stopped):
                    break
                if len(self.queue) >= self.max_queue:
                    self.queue.popleft()
                    dropped += 1
                self.queue.append(image)
                self.counters.seen += 1
            self.counters.dropped += dropped
            self._schedule()
        self.last_used = time.monotonic()
        return dropped

    def _schedule(self) -> None:
        """(Holding ``cond``.) One ingestion job in flight while frames wait and no answer is being read."""
        if self.queue and not self.scheduled and not self.answering and not self.closed:
            self.scheduled = True
            self.engine.submit(self._ingest, priority=INGEST)

    def _ingest(self) -> None:
        """Engine job: one clip from the queue into the session."""
        with self.cond:
            self.scheduled = False
            if self.answering or self.closed or not self.queue:
                return
            n = min(self.clip_frames, len(self.queue))
            n -= n % self.session.adapter.frame_multiple
            if n == 0:
                return
            clip = np.stack([self.queue.popleft() for _ in range(n)])
            self.ingesting = True
            self.cond.notify_all()
        try:
            self.session.push(clip)
        except ValueError:  # frames the model cannot take: counted, the session intact
            with self.cond:
                self.counters.dropped += n
        else:
            with self.cond:
                self.counters.ingested += n
        finally:
            with self.cond:
                self.ingesting = False
        with self.cond:
            self._schedule()

    def start_reader(self, source: str, fps: float, realtime: bool, skip: int = 0) -> None:
        """Read a file or URL in a thread of its own; a file with back-pressure, from frame ``skip``."""
        live = "://" in source

        def read():
            try:
                for i, frame in enumerate(frames(source, fps=fps, realtime=realtime or live)):
                    if self.closed or self.source_stopped:
                        return
                    if i >= skip:
                        self.push([frame.image], wait=not live)
            except VideoError as e:
                self.counters.source_error = str(e)
            finally:
                self.source_done = True

        self.reader = threading.Thread(target=read, name=f"livekv-source-{self.id}", daemon=True)
        self.reader.start()

    # --- questions --------------------------------------------------------------------------------------------------
    async def ask(self, question: str, max_tokens: int) -> AsyncIterator[str]:
        """The answer as it is decoded (``ValueError`` at once for a question that cannot be answered). Frames keep
        queueing meanwhile; ingestion resumes when the answer ends, also when the reader goes away mid-answer."""
        self.last_used = time.monotonic()
        async with self.ask_lock:
            with self.cond:
                self.answering = True
            answer = None
            try:
                answer = await self.engine.run(self.session.ask, question, max_tokens, priority=ANSWER)
                while (piece := await self.engine.run(next, answer, None, priority=ANSWER)) is not None:
                    yield piece
                self.counters.questions += 1
                self.counters.last_ttft_ms = (self.session.stats.ttft_s or 0.0) * 1e3
            finally:  # no await here: a cancelled request (its client gone) could not run one
                if answer is not None:
                    self.engine.submit(answer.close, priority=ANSWER)  # before the next clip: it frees the session
                with self.cond:
                    self.answering = False
                    self._schedule()
                self.last_used = time.monotonic()

    def account_lost(self, sent: int) -> int:
        """A stream resumed from a snapshot, told it had been sent ``sent`` frames in all: those after the snapshot
        are lost (a file source is not: it reads them again). Returns how many were found lost now."""
        with self.cond:
            missing = sent - self.counters.seen if self.spec["source"]["type"] != "file" else 0
            if missing > 0:
                self.counters.lost += missing
                self.counters.seen += missing
            return max(missing, 0)

    # --- state ------------------------------------------------------------------------------------------------------
    def stop_source(self) -> None:
        """The source stops being read (what it queued is still ingested)."""
        with self.cond:
            self.source_stopped = True
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    async def drained(self, timeout: float = 30.0, source: bool = False) -> bool:
        """Wait (at most ``timeout`` s) until no frame waits and none is being ingested (``source``: and the
        source has ended); whether it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.cond:
                if not self.queue and not self.scheduled and (self.source_done or self.closed or not source):
                    return True
            await asyncio.sleep(0.01)
        return False

    def memory(self) -> dict:
        """The session's memory, never read while a clip is half-way through the model (its tokens in some layers
        only, not yet compressed): then the last reading. While a question is answered it includes the answer's
        context (what the question retrieved into the fast tier)."""
        with self.cond:
            if not self.ingesting:
                self._memory = self.session.memory()
            return self._memory

    def stats(self) -> dict:
        with self.cond:  # one reading: the source's thread and the engine move the counters
            s, c, mem, queued = self.session.stats, replace(self.counters), self.memory(), len(self.queue)
        fps = self.spec.get("fps") or 0.5
        return {
            "id": self.id, "object": "stream", "created": int(self.created), "method": self.session.method.name,
            "source": self.spec["source"], "frames": {"seen": c.seen, "ingested": c.ingested, "dropped": c.dropped,
                                                      "queued": queued, "lost": c.lost,
                                                      "since_snapshot": c.ingested - c.snapshot_frames},
            "stream_time_s": s.frames / fps, "ingest_fps": s.ingest_fps, "questions": c.questions,
            "last_ttft_ms": c.last_ttft_ms, "source_error": c.source_error, "source_done": self.source_done,
            "memory": {"fast": {"used": mem["fast_kv_bytes"], "reserved": mem["fast_kv_reserved_bytes"]},
                       "host": {"used": mem["host_kv_bytes"], "reserved": mem["host_kv_reserved_bytes"]},
                       "tokens": mem["memory_tokens"]},
        }


def new_id() -> str:
    return f"stream-{uuid.uuid4().hex[:16]}"
