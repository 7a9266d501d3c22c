"""The ingress's WebSocket: ``WS /v1/streams/{id}/ws`` as ``livekv serve`` has it (``livekv.serve.ws``), held by the
ingress, each message forwarded to the stream's replica as the HTTP request it stands for (frames, questions
answered as server-sent events, stats), its answers sent back as events."""

import asyncio
import json
import logging

from fastapi import WebSocket
from fastapi.responses import Response, StreamingResponse

from livekv.serve.media import image_type
from livekv.serve.ray.routing import Route
from livekv.serve.sockets import EventSocket

logger = logging.getLogger("livekv.serve")


class _Bridge(EventSocket):
    """One WebSocket of stream ``sid``, forwarded through ``ingress`` (its ``send``, as its HTTP requests are)."""

    gone = (Exception,)  # the socket went away, however it was noticed

    def __init__(self, ingress, socket: WebSocket, sid: str):
        super().__init__(socket)
        key = ingress.config.api_key
        self.ingress, self.sid = ingress, sid
        self.auth = [(b"authorization", f"Bearer {key}".encode())] if key else []

    async def call(self, method: str, path: str, body: bytes = b"", kind: str = "application/json", streaming=False):
        """The stream's replica's response to the HTTP request a message stands for."""
        message = {"method": method, "path": path, "query": b"", "body": body, "client": None,
                   "headers": self.auth + [(b"content-type", kind.encode())]}
        return await self.ingress.send(Route(f"stream/{self.sid}", streaming=streaming), message)

    async def result(self, response: Response, kind: str, qid=None) -> None:
        """A whole response as an event: ``kind`` with its fields, or an error."""
        out = json.loads(response.body)
        if response.status_code == 200:
            await self.send({"type": kind, **({"id": qid} if qid is not None else {}), **out})
        else:
            ended = response.status_code == 404  # deleted, expired: said as the plain server says it
            message = f"stream {self.sid!r} has ended" if ended else out.get("error", {}).get("message", "")
            await self.send({"type": "error", **({"id": qid} if qid is not None else {}), "message": message,
                             "code": response.status_code})
        if response.status_code == 404:
            await self.socket.close(code=4404, reason=f"stream {self.sid!r} has ended")

    async def tick(self) -> None:
        """The stream's stats every second."""
        while True:
            await asyncio.sleep(1.0)
            await self.stats()

    async def answer(self, event: dict) -> None:
        """An ``ask`` event: the question asked, its answer sent back as ``answer.delta`` events, then
        ``answer.done``."""
        qid = event.get("id")  # the question and max_tokens as sent: the replica checks them (400)
        request = {**{k: event[k] for k in ("question", "max_tokens") if k in event}, "stream": True}
        response = await self.call("POST", f"/v1/streams/{self.sid}/ask", json.dumps(request).encode(),
                                   streaming=True)
        if not isinstance(response, StreamingResponse) or response.status_code != 200:
            if isinstance(response, StreamingResponse):  # an error, whole
                response = Response(b"".join([c if isinstance(c, bytes) else c.encode()
                                              async for c in response.body_iterator]), response.status_code)
            await self.result(response, "answer.done", qid)
            return
        await self._relay(response, qid)

    async def _relay(self, response: StreamingResponse, qid) -> None:
        """An answer's server-sent events as ``answer.delta`` and ``answer.done`` events."""
        async for chunk in response.body_iterator:
            for block in (chunk if isinstance(chunk, str) else chunk.decode()).split("\n\n"):
                data = next((line[6:] for line in block.splitlines() if line.startswith("data: ")), None)
                if data is None or data == "[DONE]":
                    continue
                event = json.loads(data)
                if "delta" in event:
                    await self.send({"type": "answer.delta", "id": qid, "delta": event["delta"]})
                elif "answer" in event:
                    await self.send({"type": "answer.done", "id": qid, **event})

    async def frame(self, data: bytes) -> None:
        await self.result(await self.call("POST", f"/v1/streams/{self.sid}/frames", data, image_type(data)), "frames")

    async def stats(self) -> None:
        await self.result(await self.call("GET", f"/v1/streams/{self.sid}"), "stats")

    def went(self, error: BaseException) -> None:
        logger.info("livekv ingress: websocket of %s ended (%s)", self.sid, type(error).__name__)


async def forward_websocket(ingress, socket: WebSocket, sid: str) -> None:
    """``WS /v1/streams/{id}/ws`` on ``ingress``: the API key checked, the stream looked up on its replica, then
    the socket accepted and served."""
    if not ingress.config.accepts(socket.headers.get("authorization"), socket.query_params.get("api_key")):
        await socket.close(code=1008, reason="missing or wrong API key")
        return
    bridge = _Bridge(ingress, socket, sid)
    info = await bridge.call("GET", f"/v1/streams/{sid}")
    if info.status_code != 200:
        await socket.close(code=4404 if info.status_code == 404 else 1011, reason=f"no stream {sid!r}")
        return
    await socket.accept()
    await bridge.serve()
