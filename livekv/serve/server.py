"""What ``livekv serve`` holds: the models, the engine, the chat sessions and the live streams, and what it does to
them over time (snapshots to the state directory, idle sessions expiring)."""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import time
from dataclasses import dataclass

from livekv import LiveKVCache
from livekv.methods import make_method
from livekv.serve import state
from livekv.serve.chat import ChatSession, Chats, SessionLimit
from livekv.serve.config import ServeConfig
from livekv.serve.engine import ANSWER, Engine
from livekv.serve.schemas import StreamCreate, StreamRecord
from livekv.serve.streams import Counters, Stream, new_id
from livekv.stream.session import MAX_QUESTION_TOKENS, StreamSession

logger = logging.getLogger("livekv.serve")


@dataclass
class Models:
    """The text model (with its tokenizer) and the video model's adapter; either may be absent."""

    text: tuple | None
    vlm: object | None
    text_id: str = "smollm2-135m-instruct"
    vlm_id: str = "livekv-world-vlm"
    system: str | None = None  # the video model's own system prompt


def load_models(config: ServeConfig) -> Models:
    """The models the config names (the embedded ones by default); never downloads."""
    from livekv.models import load_model

    text = None if config.model == "none" else load_model(config.model, weights=config.weights)
    vlm, system, vlm_id = None, None, "livekv-world-vlm"
    if config.vlm is None:
        from livekv.vlm.model import SYSTEM, load_default_vlm

        vlm, system = load_default_vlm(weights=config.vlm_weights), SYSTEM
    elif config.vlm != "none":
        from livekv.stream.adapters import load_adapter

        vlm, vlm_id = load_adapter(config.vlm, weights=config.vlm_weights), pathlib.Path(config.vlm).name
    text_id = "smollm2-135m-instruct" if config.model is None else pathlib.Path(str(config.model)).name
    return Models(text, vlm, text_id, vlm_id, system)


class Server:
    """Sessions and their lifecycle; the HTTP layer (``livekv.serve.app``) calls into it."""

    def __init__(self, config: ServeConfig, models: Models):
        self.config, self.models = config, models
        self.engine = Engine(config.threads)
        self.chats = Chats(*models.text, self.engine, config) if models.text else None
        self.streams: dict[str, Stream] = {}
        self.on_end = None  # called with ("stream" | "chat", id) when a session ends (deleted, expired)

    @property
    def sessions(self) -> int:
        return len(self.streams) + (len(self.chats.sessions) if self.chats else 0)

    def check_room(self) -> None:
        """``SessionLimit`` (429) when the server holds ``--max-sessions`` sessions."""
        if self.sessions >= self.config.max_sessions:
            raise SessionLimit(f"the server holds its maximum of {self.config.max_sessions} sessions")

    # --- streams ----------------------------------------------------------------------------------------------------
    def create_stream(self, spec: StreamCreate, sid: str | None = None, session: StreamSession | None = None) -> Stream:
        """A new stream (``session`` None: counted against ``--max-sessions``), or one resumed from ``session``; its
        id is ``sid`` if given (chosen by a router: ``livekv.serve.ray``), else a new one."""
        if self.models.vlm is None:
            raise ValueError("this server has no video model (--vlm none)")
        if session is None:
            self.check_room()
        if sid in self.streams:
            raise ValueError(f"stream {sid!r} exists")
        method = spec.method or next(m for m in self.config.methods if m in ("livevlm", "full", "rekv", "sink_window"))
        if method not in self.config.methods:
            raise ValueError(f"method {method!r} is not served here; choose one of {list(self.config.methods)}")
        source = self._source(spec)
        if session is None:
            make_method(method, context="stream", **spec.knobs)  # a clear error for a bad knob, before anything
            session = StreamSession(self.models.vlm, method, system=spec.system or self.models.system,
                                    memory_tokens=spec.memory_tokens, **spec.knobs)
        stream = Stream(sid or new_id(), session, self.engine, spec.model_dump(), self.config.max_queue_frames,
                        self.config.clip_frames)
        self.streams[stream.id] = stream
        if source is not None:
            stream.start_reader(source, spec.fps, spec.source.realtime)
        return stream

    def _source(self, spec: StreamCreate) -> str | None:
        """The file or URL a stream reads, checked against ``--media-dir`` and ``--allow-urls``."""
        src = spec.source
        if src.type == "push":
            return None
        if src.type == "url":
            if not self.config.allow_urls:
                raise PermissionError("URL sources are off on this server (start it with --allow-urls)")
            if not src.url or "://" not in src.url:
                raise ValueError("a url source needs a url (rtsp://, http(s)://, ...)")
            return src.url
        if self.config.media_dir is None:
            raise PermissionError("file sources are off on this server (start it with --media-dir)")
        root = pathlib.Path(self.config.media_dir).resolve()
        path = (root / (src.path or "")).resolve()
        if root not in path.parents or not path.is_file():
            raise ValueError(f"no such file under the media directory: {src.path!r}")
        return str(path)

    def stream(self, sid: str) -> Stream:
        if sid not in self.streams:
            raise KeyError(f"no stream {sid!r}")
        return self.streams[sid]

    def delete_stream(self, sid: str) -> None:
        self.stream(sid).close()
        del self.streams[sid]
        self._forget("stream", sid)

    async def snapshot_stream(self, stream: Stream, directory: pathlib.Path) -> dict:
        """Save ``stream`` into ``directory``, after the frames queued so far are ingested (at most 30 s) and between
        answers; returns its record."""
        await stream.drained()
        async with stream.ask_lock:
            def save():
                stream.session.save(directory)
                stream.counters.snapshot_frames = stream.counters.ingested
                return {**state.stream_record(stream), "queued": len(stream.queue)}
            return await self.engine.run(save, priority=ANSWER)

    def load_session(self, directory: pathlib.Path, sent: bool = False) -> StreamSession:
        """A stream's session from its snapshot (``sent``: by a client, which may not choose what only the server
        sets); its questions limited as a new session's are."""
        if self.models.vlm is None:
            raise ValueError("this server has no video model (--vlm none)")
        if sent:
            state.check_sent(directory, self.config.methods)
        session = StreamSession.load(directory, self.models.vlm)
        session.max_question_tokens = min(session.max_question_tokens, MAX_QUESTION_TOKENS)
        return session

    def restore_stream(self, record: StreamRecord, session: StreamSession, sid: str | None = None) -> Stream:
        """A stream from its snapshot (``record`` checked, ``session`` loaded): the session exactly as saved; a file
        source resumes after what was ingested; frames that were queued, not ingested, count as dropped (a file
        source reads them again). Nothing is held if it fails."""
        spec, queued = record.spec, record.queued
        file_source = spec.source.type == "file"
        source = self._source(spec)
        counters = Counters(**record.counters.model_dump())
        counters.dropped += 0 if file_source else queued
        counters.seen -= queued if file_source else 0
        push = spec.model_copy(update={"source": spec.source.model_copy(update={"type": "push"})})
        stream = self.create_stream(push, sid or record.id, session)
        stream.spec, stream.counters = spec.model_dump(), counters
        if file_source:
            stream.source_done = False
            stream.start_reader(source, spec.fps, spec.source.realtime, skip=counters.ingested)
        return stream

    # --- chats ------------------------------------------------------------------------------------------------------
    def delete_chat(self, sid: str) -> None:
        if self.chats is None or sid not in self.chats.sessions:
            raise KeyError(f"no session {sid!r}")
        del self.chats.sessions[sid]
        self._forget("chat", sid)

    def _forget(self, kind: str, sid: str) -> None:
        """A deleted ``kind`` (``"stream"``, ``"chat"``) session: its saved state removed, ``on_end`` told."""
        if self.config.state_dir:
            state.remove(self.config.state_dir, f"{kind}s", sid)
        if self.on_end:
            self.on_end(kind, sid)

    # --- the state directory ----------------------------------------------------------------------------------------
    async def save_all(self) -> None:
        """Snapshot every live session into ``--state-dir`` (one that cannot be is logged; the others are saved)."""
        chats = list(self.chats.sessions.values()) if self.chats else []
        for kind, session in [("stream", s) for s in list(self.streams.values())] + [("chat", c) for c in chats]:
            try:
                await (self._save_stream(session) if kind == "stream" else self._save_chat(session))
            except Exception:  # noqa: BLE001
                logger.exception("could not snapshot %s %s", kind, session.id)

    async def _save_stream(self, stream: Stream) -> None:
        record = await self.snapshot_stream(stream, pathlib.Path(self.config.state_dir, "streams", stream.id))
        self._saved("stream", stream, record)

    async def _save_chat(self, chat: ChatSession) -> None:
        async with chat.lock:
            directory = pathlib.Path(self.config.state_dir, "chats", chat.id)
            await self.engine.run(chat.cache.save, directory, self.models.text[0], priority=ANSWER)
        self._saved("chat", chat, state.chat_record(chat))

    def _saved(self, kind: str, session: Stream | ChatSession, record: dict) -> None:
        """``session``'s snapshot was just written: its record goes beside it, unless the session ended (or another
        took its id) while it was written; then the snapshot goes: a deleted session never comes back."""
        held = self.streams if kind == "stream" else self.chats.sessions
        if held.get(session.id) is session:
            state.write_json(pathlib.Path(self.config.state_dir, f"{kind}s", f"{session.id}.json"), record)
        else:
            state.remove(self.config.state_dir, f"{kind}s", session.id)

    def restore_chat(self, directory: pathlib.Path, record: dict) -> ChatSession:
        """A chat session from its snapshot: its cache and the token ids it holds."""
        cache = LiveKVCache.load(directory, self.models.text[0])
        chat = self.chats.sessions[record["id"]] = ChatSession(record["id"], record["method"], record["knobs"], cache,
                                                               record["tokens"])
        return chat

    def restore_all(self) -> None:
        """Resume the sessions saved in ``--state-dir`` (one that cannot be resumed is left there, and logged)."""
        for kind in ("stream", "chat") if self.chats else ("stream",):
            for directory, record_file in state.saved(self.config.state_dir, f"{kind}s"):
                self._restore_saved(kind, directory, record_file)

    def _restore_saved(self, kind: str, directory: pathlib.Path, record_file: pathlib.Path) -> bool:
        """Resume one saved session; whether it was (one that cannot be is logged and left in ``directory``)."""
        try:
            record = json.loads(record_file.read_text())
            if kind == "stream":
                self.restore_stream(StreamRecord.model_validate(record), self.load_session(directory))
            else:
                self.restore_chat(directory, record)
        except (ValueError, TypeError, KeyError, OSError) as e:
            logger.error("could not resume %s %s (left in %s): %s", kind, directory.name, directory.parent, e)
            return False
        logger.info("resumed %s %s", kind, directory.name)
        return True

    def holds(self, kind: str, sid: str) -> bool:
        """Whether this server holds the stream (``kind`` "stream") or chat session ("chat") ``sid``."""
        return sid in (self.streams if kind == "stream" else self.chats.sessions if self.chats else {})

    def restore_one(self, kind: str, sid: str) -> bool:
        """Resume the one session ``sid`` (``kind``: "stream" or "chat") from its snapshot in ``--state-dir``, if
        there is one and it is not held here already (how a Ray replica takes over the session of one that died);
        whether it was resumed."""
        if not self.config.state_dir or self.holds(kind, sid) or (kind == "chat" and self.chats is None):
            return False
        found = state.saved_one(self.config.state_dir, f"{kind}s", sid)
        return found is not None and self._restore_saved(kind, *found)  # not resumed: the request finds no session

    async def expire_idle(self) -> None:
        """Sessions unused for ``--idle-timeout-s`` end (their snapshots go too); not one answering a question."""
        limit = time.monotonic() - self.config.idle_timeout_s
        for sid, stream in list(self.streams.items()):
            if stream.last_used < limit and stream.source_done and not stream.queue and not stream.ask_lock.locked():
                self.delete_stream(sid)
        for sid, chat in list(self.chats.sessions.items()) if self.chats else []:
            if chat.last_used < limit and not chat.lock.locked():
                self.delete_chat(sid)

    async def background(self) -> None:
        """Every second: expire idle sessions; every ``--snapshot-every-s``: snapshot into ``--state-dir``."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            try:  # a failure (a full disk) is logged and tried again: this task is the only one that does this work
                await self.expire_idle()
                if self.config.state_dir and time.monotonic() - last >= self.config.snapshot_every_s:
                    last = time.monotonic()
                    await self.save_all()
            except Exception:  # noqa: BLE001
                logger.exception("the periodic expiry or snapshot failed")

    async def shutdown(self) -> None:
        """Sources stop, what they queued is ingested, every session is snapshotted (with ``--state-dir``)."""
        for stream in self.streams.values():
            stream.stop_source()
        if self.config.state_dir:
            await self.save_all()
        for stream in self.streams.values():
            stream.close()
        self.engine.close()
