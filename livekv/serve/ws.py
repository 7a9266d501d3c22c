"""The WebSocket of a live stream: frames in (binary messages, an encoded image each), questions in (JSON) and events
out (JSON): ``frames`` after each frame, ``stats`` every second, ``answer.delta``, ``answer.done``, ``error``."""

from __future__ import annotations

import asyncio
import contextlib
import json

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.websockets import WebSocketState

from livekv.serve import media
from livekv.serve.config import ServeConfig
from livekv.serve.schemas import AskRequest
from livekv.serve.server import Server
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
    stream = server.streams[sid]
    await socket.accept()
    send_lock, tasks = asyncio.Lock(), set()

    async def send(event: dict) -> None:
        async with send_lock:
            await socket.send_json(event)

    async def ended():
        if socket.application_state != WebSocketState.CONNECTED:  # closed already (the other task saw it first)
            return
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):  # or the client is gone
            await send({"type": "error", "message": f"stream {sid!r} has ended", "code": 404})
            await socket.close(code=4404, reason=f"stream {sid!r} has ended")

    async def tick():
        while not stream.closed:
            await send({"type": "stats", **stream.stats()})
            await asyncio.sleep(1.0)
        await ended()  # deleted (or expired) while this socket was open; a client that only listens hears it too

    async def answer(event: dict):
        qid = event.get("id")
        try:
            pieces, ask = [], _ask_request(event)
            answer = stream.ask(ask.question, min(ask.max_tokens, config.max_tokens))
            async with contextlib.aclosing(answer):
                async for piece in answer:
                    pieces.append(piece)
                    await send({"type": "answer.delta", "id": qid, "delta": piece})
            await send({"type": "answer.done", "id": qid, "answer": "".join(pieces),
                        "ttft_ms": stream.counters.last_ttft_ms, "frames_ingested": stream.counters.ingested})
        except ValueError as e:
            await send({"type": "error", "id": qid, "message": str(e), "code": 400})

    tasks.add(asyncio.create_task(tick()))
    try:
        while True:
            message = await socket.receive()
            if message["type"] == "websocket.disconnect":
                break
            if stream.closed:
                await ended()
                break
            if message.get("bytes") is not None:
                await _ws_frame(stream, message["bytes"], config, send)
            elif message.get("text") is not None:
                event = _json(message["text"])
                if event.get("type") == "ask":
                    tasks.add(asyncio.create_task(answer(event)))
                elif event.get("type") == "stats":
                    await send({"type": "stats", **stream.stats()})
                else:
                    await send({"type": "error", "message": f"unknown event {event.get('type')!r}", "code": 400})
    except WebSocketDisconnect:
        pass
    finally:
        for task in tasks:
            task.cancel()


async def _ws_frame(stream, data: bytes, config: ServeConfig, send) -> None:
    try:
        images = await asyncio.to_thread(media.decode, data, media.image_type(data), stream.spec["fps"],
                                         config.max_upload_bytes, config.max_frame_pixels, config.max_queue_frames)
    except media.MediaError as e:
        await send({"type": "error", "message": str(e), "code": e.status})
        return
    dropped = stream.push(images)
    await send({"type": "frames", "accepted": len(images), "dropped": dropped, "frames": stream.stats()["frames"]})


def _ask_request(event: dict) -> AskRequest:
    """An ``ask`` event's question and ``max_tokens``, checked as ``POST /v1/streams/{id}/ask`` checks them
    (``ValueError``)."""
    try:
        return AskRequest.model_validate({k: event[k] for k in ("question", "max_tokens") if k in event})
    except ValidationError as e:
        raise ValueError("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None


def _json(text: str) -> dict:
    try:
        event = json.loads(text)
    except json.JSONDecodeError:
        return {"type": None}
    return event if isinstance(event, dict) else {"type": None}
