"""The WebSocket of a live stream: frames in (binary messages, an encoded image each), questions in (JSON) and events
out (JSON): ``frames`` after each frame, ``stats`` every second, ``answer.delta``, ``answer.done``, ``error``."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.websockets import WebSocketState

from livekv.serve import media
from livekv.serve.config import ServeConfig
from livekv.serve.schemas import AskRequest, problems
from livekv.serve.server import Server
from livekv.serve.sockets import EventSocket
from livekv.serve.streams import Stream


async def websocket(socket: WebSocket, sid: str, config: ServeConfig) -> None:
    """Binary messages are frames (an encoded image each); text messages are JSON events: ``{"type": "ask",
    "question": ..., "max_tokens": ..., "id": ...}``, ``{"type": "stats"}``. Out: ``answer.delta``,
    ``answer.done``, ``frames`` (after each frame), ``stats`` (every second) and ``error`` events."""
    if not config.accepts(socket.headers.get("authorization"), socket.query_params.get("api_key")):
        await socket.close(code=1008, reason="missing or wrong API key")
        return
    server: Server = socket.app.state.server
    if sid not in server.streams:
        await socket.close(code=4404, reason=f"no stream {sid!r}")
        return
    await socket.accept()
    await _StreamSocket(socket, server.streams[sid], config).serve()


class _StreamSocket(EventSocket):
    """One WebSocket of a stream: its messages handled, its stats sent every second, its end announced."""

    def __init__(self, socket: WebSocket, stream: Stream, config: ServeConfig):
        super().__init__(socket)
        self.stream, self.config = stream, config

    async def receive(self, message: dict) -> bool:
        if self.stream.closed:
            await self.ended()
            return False
        return await super().receive(message)

    async def stats(self) -> None:
        await self.send({"type": "stats", **self.stream.stats()})

    async def frame(self, data: bytes) -> None:
        """An encoded image: queued, answered with a ``frames`` event (or an ``error``)."""
        config = self.config
        try:
            images = await asyncio.to_thread(media.decode, data, media.image_type(data), self.stream.spec["fps"],
                                             config.max_upload_bytes, config.max_frame_pixels, config.max_queue_frames)
        except media.MediaError as e:
            await self.send({"type": "error", "message": str(e), "code": e.status})
            return
        dropped = self.stream.push(images)
        await self.send({"type": "frames", "accepted": len(images), "dropped": dropped,
                         "frames": self.stream.stats()["frames"]})

    async def tick(self) -> None:
        while not self.stream.closed:
            await self.send({"type": "stats", **self.stream.stats()})
            await asyncio.sleep(1.0)
        await self.ended()  # deleted (or expired) while this socket was open; a client that only listens hears it

    async def ended(self) -> None:
        if self.socket.application_state != WebSocketState.CONNECTED:  # closed already (the other task saw it)
            return
        why = f"stream {self.stream.id!r} has ended"
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):  # or the client is gone
            await self.send({"type": "error", "message": why, "code": 404})
            await self.socket.close(code=4404, reason=why)

    async def answer(self, event: dict) -> None:
        qid, stream = event.get("id"), self.stream
        try:
            pieces, ask = [], _ask_request(event)
            answer = stream.ask(ask.question, min(ask.max_tokens, self.config.max_tokens))
            async with contextlib.aclosing(answer):
                async for piece in answer:
                    pieces.append(piece)
                    await self.send({"type": "answer.delta", "id": qid, "delta": piece})
            await self.send({"type": "answer.done", "id": qid, "answer": "".join(pieces),
                             "ttft_ms": stream.counters.last_ttft_ms, "frames_ingested": stream.counters.ingested})
        except ValueError as e:
            await self.send({"type": "error", "id": qid, "message": str(e), "code": 400})


def _ask_request(event: dict) -> AskRequest:
    """An ``ask`` event's question and ``max_tokens``, checked as ``POST /v1/streams/{id}/ask`` checks them
    (``ValueError``)."""
    try:
        return AskRequest.model_validate({k: event[k] for k in ("question", "max_tokens") if k in event})
    except ValidationError as e:
        raise ValueError(problems(e.errors())) from None

