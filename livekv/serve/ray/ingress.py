"""The ingress: Ray's HTTP proxy hands it every request; it forwards each, as it came, to the replica its session
is pinned to (``livekv.serve.ray.routing``), the answers of every replica merged for ``GET /health`` and
``GET /v1/streams``; it holds the WebSockets (``livekv.serve.ray.websocket``)."""

import asyncio
import json
import logging
import pathlib

from fastapi import FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError

from livekv.serve import bodies
from livekv.serve.config import ServeConfig
from livekv.serve.ray.routing import INGRESS, REPLICA_HEADER, SEEN_HEADER, Route, replica_ids, route
from livekv.serve.ray.websocket import forward_websocket

logger = logging.getLogger("livekv.serve")

HOP_BY_HOP = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive"}


async def _rest(answer):
    """The body pieces of a streamed response (a replica dying mid-answer cuts it; a client going away cancels
    it on the replica: the generation stops, the session stays)."""
    done = False
    try:
        async for piece in answer:
            yield piece
        done = True
    except RayActorError:
        logger.warning("livekv ingress: a replica died while streaming an answer")
    finally:
        if not done:
            answer.cancel()


def _headers(headers: list) -> list:
    """A replica's response headers, less those of its own connection."""
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "server_error" if status >= 500 else
                                   "invalid_request_error", "code": status}}, status_code=status)


# (Serve pickles the ingress class when it is decorated, with the module's names defined by then: its helpers, and
# the imports above, come first.)
api = FastAPI(title="livekv on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


@serve.deployment(name=INGRESS, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
@serve.ingress(api)
class LiveKVIngress:
    """The HTTP entry: each request forwarded, as it came, to the replica its session is pinned to."""

    def __init__(self, replicas, config: dict):
        self.replicas = replicas
        self.config = ServeConfig(**config)
        self.app_name = serve.get_replica_context().app_name
        self.sent: dict[str, int] = {}  # stream -> frames it had been sent, as its replica last said
        self.resuming: asyncio.Task | None = None  # handing the sessions saved in the state directory to replicas

    @api.websocket("/v1/streams/{sid}/ws")
    async def websocket(self, socket: WebSocket, sid: str):
        await forward_websocket(self, socket, sid)

    @api.api_route("/{path:path}", methods=METHODS)
    async def forward(self, request: Request, path: str):
        path = path.rstrip("/")
        limit = (self.config.max_snapshot_bytes if path == "v1/streams/restore" else
                 self.config.max_upload_bytes if path.endswith("/frames") else self.config.max_request_bytes)
        try:
            body = await bodies.read(request, limit)
        except HTTPException as e:
            return _error(e.status_code, e.detail)
        message = {"method": request.method, "path": request.url.path, "query": request.url.query.encode(),
                   "headers": [(k, v) for k, v in request.headers.raw if k.lower() != b"host"],
                   "client": (request.client.host, request.client.port) if request.client else None, "body": body}
        return await self.send(route(request.method, request.url.path, body), message)

    async def send(self, where: Route, message: dict) -> Response:
        if where.fanout:
            return await self._fanout(message)
        if where.new_stream:
            message["livekv"] = {"stream_id": where.new_stream}
        if where.stream:
            message["frames_sent"] = self.sent.get(where.stream, 0)
        message["pin"] = where.pin
        handle = self.replicas.options(session_id=where.pin)
        for attempt in (0, 1):  # a replica that died under the request: once more (Ray no longer routes to it)
            try:
                if where.streaming:
                    answer = handle.options(stream=True).http_stream.remote(message)
                    start = await answer.__anext__()
                    self._note(where, message, start)
                    response = StreamingResponse(_rest(answer), status_code=start["status"])
                    response.raw_headers = _headers(start["headers"])
                    return response
                out = await handle.http.remote(message)
                self._note(where, message, out)
                response = Response(out["body"], status_code=out["status"])
                response.raw_headers = _headers(out["headers"]) + [(b"content-length", str(len(out["body"])).encode())]
                return response
            except RayActorError as e:
                logger.warning("livekv ingress: the replica serving %s failed (%s)%s", where.pin or "a request",
                               type(e).__name__, "; retrying" if not attempt else "")
        return _error(503, "the replica serving this request died; try again")

    def _note(self, where: Route, message: dict, start: dict) -> None:
        """Remember how many frames a stream had been sent (what a replica resuming it lost is counted from it)."""
        if where.stream is None:
            return
        seen = next((int(v) for k, v in start["headers"] if k.lower() == SEEN_HEADER.encode()), None)
        if start["status"] == 404 or (message["method"] == "DELETE" and start["status"] == 200):
            self.sent.pop(where.stream, None)
        elif seen is not None:
            self.sent[where.stream] = max(self.sent.get(where.stream, 0), seen)

    async def resumed(self) -> None:
        """Before the first answer that lists or counts sessions: every session saved in the state directory
        handed to a replica (as ``livekv serve`` resumes them all at start). One task, which every such answer
        waits for (not cancelled with a caller that goes; started again if it failed)."""
        if self.resuming is None or self.resuming.done() and (self.resuming.cancelled() or self.resuming.exception()):
            self.resuming = asyncio.ensure_future(self._resume_saved())
        await asyncio.shield(self.resuming)

    async def _resume_saved(self) -> None:
        """A request for every saved session: its replica resumes it before it reads the request, whatever its
        answer."""
        key = [(b"authorization", f"Bearer {self.config.api_key}".encode())] if self.config.api_key else []
        for kind, prefix in (("streams", "/v1/streams/"), ("chats", "/v1/sessions/")):
            for record in sorted(pathlib.Path(self.config.state_dir, kind).glob("*.json")):
                path = prefix + record.stem
                message = {"method": "GET", "path": path, "query": b"", "headers": key, "client": None, "body": b""}
                try:
                    status = (await self.send(route("GET", path, b""), message)).status_code
                except Exception as e:  # noqa: BLE001 - one session's failure is not the others'
                    status = repr(e)
                if status != 200:
                    logger.warning("livekv ingress: saved session %s was not resumed (%s)", path, status)

    async def _fanout(self, message: dict) -> Response:
        """``GET /health`` and ``GET /v1/streams``: every replica's answer, merged."""
        if self.config.state_dir:
            await self.resumed()
        ids = replica_ids(self.app_name)
        if not ids:  # this process's router starts with its first request
            await self.replicas.http.remote({**message, "path": "/health", "query": b"", "body": b""})
            ids = replica_ids(self.app_name)

        async def ask(replica: str):
            return await self.replicas.options(session_id=f"replica/{replica}").http.remote(message)

        outs = await asyncio.gather(*(asyncio.wait_for(ask(i), 30) for i in ids), return_exceptions=True)
        for replica, out in zip(ids, outs):
            if isinstance(out, BaseException):
                logger.warning("livekv ingress: replica %s did not answer %s: %r", replica, message["path"], out)
        answers = [o for o in outs if isinstance(o, dict)]
        if not answers:
            return _error(503, "no replica answered")
        bad = next((o for o in answers if o["status"] != 200), None)
        if bad is not None:
            response = Response(bad["body"], status_code=bad["status"])
            response.raw_headers = _headers(bad["headers"]) + [(b"content-length", str(len(bad["body"])).encode())]
            return response
        replies = [(dict(o["headers"]).get(REPLICA_HEADER.encode(), b"").decode(), json.loads(o["body"]))
                   for o in answers]
        if message["path"].rstrip("/") == "/health":
            return JSONResponse({"status": "ok", "sessions": sum(b["sessions"] for _, b in replies),
                                 "engine_jobs_pending": sum(b["engine_jobs_pending"] for _, b in replies),
                                 "rss_bytes": sum(b.get("rss_bytes") or 0 for _, b in replies),
                                 "replicas": [{"replica": r, **b} for r, b in replies],
                                 "unreachable": len(ids) - len(answers)})
        return JSONResponse({"object": "list", "data": [s for _, b in replies for s in b["data"]]})
