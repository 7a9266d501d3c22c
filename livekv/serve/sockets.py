"""What the stream WebSocket does on either side of a Ray deployment (``livekv.serve.ws`` in the server,
``livekv.serve.ray.websocket`` in the ingress): events sent one at a time, messages read until the client goes,
each dispatched (a frame, a question, a stats request), a task per question and one for the stats every second.
Imports neither the models nor Ray: the ingress uses it without loading either."""

from __future__ import annotations

import asyncio

from fastapi import WebSocket, WebSocketDisconnect

from livekv.serve.bodies import json_object


class EventSocket:
    """One WebSocket of a stream. Subclasses say what a frame, a question, a stats request and the stats ticker do,
    and which errors mean the client went (``gone``)."""

    gone: tuple[type[BaseException], ...] = (WebSocketDisconnect,)

    def __init__(self, socket: WebSocket):
        self.socket, self.lock, self.tasks = socket, asyncio.Lock(), set()

    async def send(self, event: dict) -> None:
        async with self.lock:
            await self.socket.send_json(event)

    async def serve(self) -> None:
        """Until the client goes away (or ``receive`` says the stream ended)."""
        self.tasks.add(asyncio.create_task(self.tick()))
        try:
            while (message := await self.socket.receive())["type"] != "websocket.disconnect":
                if not await self.receive(message):
                    break
        except self.gone as e:
            self.went(e)
        finally:
            for task in self.tasks:
                task.cancel()

    async def receive(self, message: dict) -> bool:
        """A frame (bytes), or an ``ask`` or ``stats`` event; whether to go on reading."""
        if message.get("bytes") is not None:
            await self.frame(message["bytes"])
        elif message.get("text") is not None:
            event = json_object(message["text"])
            if event.get("type") == "ask":
                self.tasks.add(asyncio.create_task(self.answer(event)))
            elif event.get("type") == "stats":
                await self.stats()
            else:
                await self.send({"type": "error", "message": f"unknown event {event.get('type')!r}", "code": 400})
        return True

    def went(self, error: BaseException) -> None:
        """The client went away (``error``: how it was noticed)."""

    async def tick(self) -> None:
        raise NotImplementedError

    async def frame(self, data: bytes) -> None:
        raise NotImplementedError

    async def answer(self, event: dict) -> None:
        raise NotImplementedError

    async def stats(self) -> None:
        raise NotImplementedError

