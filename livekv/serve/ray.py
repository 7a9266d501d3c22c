"""``livekv serve`` on Ray Serve: the same HTTP API, served by several replicas of the same server (on one machine
or a Ray cluster), each session pinned to one replica, and moved with its snapshot when that replica dies.

    livekv serve --ray --replicas 2 --state-dir DIR              # a local Ray cluster, started and stopped here
    livekv serve --ray --ray-address auto --max-replicas 4 ...   # join the cluster `ray start` runs, autoscale
    serve run livekv.serve.ray:app                               # Ray's own CLI (defaults), or
    serve run livekv.serve.ray:build_app replicas=2 state_dir=/shared/livekv threads=1   # any option as key=value

The application: Ray's HTTP proxy -> ``LiveKVIngress`` (no model, no CPU reserved) -> ``LiveKVReplica`` x N (each
a ``livekv.serve.server.Server`` with its own models and model thread, the whole ``livekv serve`` app run
in-process on it).

The ingress reads which session a request is about (a stream id in the path, a chat ``session`` or ``stream_id``
in the body) and forwards the request, as it came, through a handle whose ``session_id`` is that session:
``stream/<id>`` or ``chat/<id>``. A new stream's id is chosen here first, so its creation is pinned like the rest.
``SessionRouter`` sends a session's requests to the replica that reports holding it (replicas report their
sessions through Serve's multiplexing), and never elsewhere while that replica lives; a session no replica holds
goes to the replica holding the fewest. Requests about no session (one-off chat completions, ``/v1/models``) go to
the less busy of two replicas picked at random. ``GET /health`` and ``GET /v1/streams`` ask every replica.

Replicas snapshot their sessions into ``--state-dir`` (every ``--snapshot-every-s``, and on a graceful stop: a
scale-down, ``serve shutdown``, Ctrl-C). A replica records the sessions it holds there too (``<id>.owner``), and
releases them after its last snapshots when it stops gracefully. When a replica dies, Ray takes it out of the
routing; the next request of one of its sessions goes to another replica, which resumes the session from its last
snapshot before serving it (having waited, if the session's replica was stopping, for it to release the session).
What is lost is what the session got after that snapshot: a stream's frames sent since then (counted in its
``frames.lost``: the ingress tells the new replica how many frames the stream had been sent), a chat's cache of the
turns since then (nothing a client sees: every chat request carries the whole conversation, so the turns missing
from the cache are prefilled again), and any request in flight on the dead replica (its client gets an error or a
cut answer); a session with no snapshot yet is lost whole (a stream answers 404, a chat starts over from the
conversation its next request carries). ``--state-dir`` must be readable by every replica: a directory on one machine, a shared filesystem
(NFS, or an object store mounted with s3fs, gcsfuse or mountpoint-s3) on several.
"""

import asyncio
import collections
import dataclasses
import json
import logging
import pathlib
import random
import signal
import tempfile
import threading
import time
import typing
import uuid
import weakref

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from livekv.serve import state
from livekv.serve.config import RayConfig, ServeConfig

logger = logging.getLogger("livekv.serve")

APP = "livekv"
REPLICA = "LiveKVReplica"
INGRESS = "LiveKVIngress"
REPLICA_HEADER = "x-livekv-replica"  # on every response: the replica that served it
SEEN_HEADER = "x-livekv-frames-seen"  # on a stream's responses: frames the stream has been sent so far
PIN_S = 60.0  # how long a router remembers where it sent a new session, until that replica reports holding it
HANDOVER_S = 60.0  # how long a replica waits for another that holds a session to let it go
HOP_BY_HOP = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive"}


# --- routing ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Route:
    """Where the ingress sends a request: ``pin`` a session (``stream/<id>``, ``chat/<id>``) or none; ``new_stream``:
    the id a stream created by this request takes; ``streaming``: the response is server-sent events; ``fanout``:
    every replica answers (merged)."""

    pin: str = ""
    new_stream: str | None = None
    streaming: bool = False
    fanout: bool = False

    @property
    def stream(self) -> str | None:
        return self.pin.partition("/")[2] if self.pin.startswith("stream/") else None


def route(method: str, path: str, body: bytes) -> Route:
    """The route of an HTTP request of the ``livekv serve`` API."""
    parts = [p for p in path.split("/") if p]
    if method == "GET" and (parts == ["health"] or parts == ["v1", "streams"]):
        return Route(fanout=True)
    if parts[:2] == ["v1", "streams"]:
        if method == "POST" and parts[2:] in ([], ["restore"]):
            sid = f"stream-{uuid.uuid4().hex[:16]}"
            return Route(f"stream/{sid}", new_stream=sid)
        if len(parts) >= 3:
            streaming = parts[3:] == ["ask"] and _json(body).get("stream", True) is not False
            return Route(f"stream/{parts[2]}", streaming=streaming)
    if parts[:2] == ["v1", "sessions"] and len(parts) == 3:
        return Route(f"chat/{parts[2]}")
    if parts == ["v1", "chat", "completions"] and method == "POST":
        request = _json(body)
        model = request.get("model") if isinstance(request.get("model"), str) else ""
        stream_id = request.get("stream_id") or (model.split("/", 1)[1] if model.startswith("stream/") else None)
        streaming = request.get("stream") is True
        if isinstance(stream_id, str) and stream_id:
            return Route(f"stream/{stream_id}", streaming=streaming)
        if isinstance(request.get("session"), str) and request["session"]:
            return Route(f"chat/{request['session']}", streaming=streaming)
        return Route(streaming=streaming)
    return Route()


def _json(body: bytes) -> dict:
    try:
        value = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


class SessionRouter(RequestRouter):
    """Serve's request router for ``LiveKVReplica``: a session's requests go to the replica holding it, and only
    there while it lives (Serve's default router would send them elsewhere when that replica is busy, and a session
    must never be resumed twice); a new session, or one whose replica died, goes to the replica holding the fewest
    sessions; requests about no session to the less busy of two replicas picked at random. ``replica/<id>`` targets
    one replica (how the ingress asks every replica). A request's session comes as its handle's ``session_id``; the
    replicas report the sessions they hold through Serve's multiplexing (``multiplexed_model_ids``)."""

    def initialize_state(self, **kwargs) -> None:
        import livekv.serve.ray as home  # Serve may hand this class over by value: the real module's registry

        self._pins: dict[str, tuple[object, float]] = {}  # session -> (replica id, when): sent there, not yet reported
        home._ROUTERS.append(weakref.ref(self))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # a busy replica is waited for, not spun on
        pin = pending_request.metadata.session_id if pending_request is not None else ""
        if not candidate_replicas:
            return []
        if not pin:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        if pin.startswith("replica/"):
            return [[r for r in candidate_replicas if r.replica_id.unique_id == pin[len("replica/"):]]]
        holders = [r for r in candidate_replicas if pin in r.multiplexed_model_ids]
        if holders:
            self._pins.pop(pin, None)
            return [holders]
        now, live = time.monotonic(), {r.replica_id: r for r in candidate_replicas}
        pinned = self._pins.get(pin)
        if pinned is not None and pinned[0] in live and now - pinned[1] < PIN_S:
            return [[live[pinned[0]]]]
        for key, (_, when) in list(self._pins.items()):
            if now - when >= PIN_S:
                del self._pins[key]
        pending = collections.Counter(replica for replica, _ in self._pins.values())
        choice = min(candidate_replicas, key=lambda r: (len(r.multiplexed_model_ids) + pending[r.replica_id],
                                                        random.random()))
        self._pins[pin] = (choice.replica_id, now)
        return [[choice]]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """The replica chosen for a request goes to that very request. (Serve's base router gives it to the pending
        request with the same internal request id; but the calls one request makes share that id (the ingress's
        fan-out, a WebSocket's frames and questions), so one call would take the replica chosen for another, and
        the other would never be sent.)"""
        for pending in self._pending_requests_to_fulfill:
            if pending.metadata is request_metadata and not pending.future.done():
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                self._remove_pending_request_from_indices(pending)
                return


_ROUTERS: list = []  # the SessionRouters of this process (weak references)


def replica_ids(app: str, deployment: str = REPLICA) -> list[str]:
    """The replicas of ``deployment`` a router of this process routes to now (their unique ids)."""
    import livekv.serve.ray as home

    for ref in reversed(home._ROUTERS):
        router = ref()
        if router is not None and router._deployment_id.app_name == app and router._deployment_id.name == deployment:
            return [replica.unique_id for replica in list(router.curr_replicas)]
    return []


# --- the replica --------------------------------------------------------------------------------------------------
async def _asgi(app, request: dict):
    """Run one HTTP request through the ASGI ``app`` in this process: yields the response start ``{"status",
    "headers"}``, then the body's pieces as they are sent. Closing the generator early is the client going away."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request["method"],
             "scheme": "http", "path": request["path"], "raw_path": request["path"].encode(),
             "query_string": request["query"], "root_path": "", "headers": request["headers"],
             "client": request.get("client"), "server": None, "livekv": request.get("livekv", {})}
    messages: asyncio.Queue = asyncio.Queue()
    gone, body = asyncio.Event(), [request["body"]]

    async def receive():
        if body:
            return {"type": "http.request", "body": body.pop(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run():
        try:
            await app(scope, receive, messages.put)
        except Exception:  # noqa: BLE001 - after a response started; before, the app answered 500 itself
            logger.exception("livekv replica: a request failed")
        finally:
            messages.put_nowait(None)

    task, started, complete = asyncio.create_task(run()), False, False
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                started = True
                yield {"status": message["status"], "headers": list(message.get("headers", []))}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    complete = True
                    break
        if not started:
            yield {"status": 500, "headers": [(b"content-type", b"application/json")]}
            yield json.dumps({"error": {"message": "the replica failed to answer", "type": "server_error",
                                        "code": 500}}).encode()
    finally:
        gone.set()
        if complete:
            await asyncio.wait({task}, timeout=10)
        if not task.done():
            task.cancel()


class SessionBusy(Exception):
    """The session is held by a replica that lives but does not answer (503)."""


def _read_json(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(actor: str) -> bool:
    """Whether the Serve replica actor named ``actor`` lives (a dead one's name is gone from the cluster)."""
    import ray

    try:
        ray.get_actor(actor, namespace="serve")
    except ValueError:
        return False
    return True


@serve.deployment(name=REPLICA, graceful_shutdown_timeout_s=120)
class LiveKVReplica:
    """One ``livekv serve``: its models, its sessions, its snapshots into the shared ``--state-dir``; requests come
    whole from the ingress and go through the same FastAPI app as ``livekv serve``'s."""

    async def __init__(self, config: dict):
        from livekv.serve.app import create_app
        from livekv.serve.server import Server, load_models

        self.config = ServeConfig(**config)
        self.server = Server(self.config, await asyncio.to_thread(load_models, self.config))
        self.server.on_end = self._ended
        self.app = create_app(self.config, server=self.server)
        replica = serve.get_replica_context().replica_id
        self.id, self.actor = replica.unique_id, replica.to_full_id_str()
        self.restoring = asyncio.Lock()
        self.owned: set[str] = set()  # the sessions this replica recorded as its own in the state directory
        self.background = asyncio.create_task(self.server.background())
        logger.info("livekv replica %s ready", self.id)

    @serve.multiplexed(max_num_models_per_replica=-1)
    async def _hold(self, pin: str) -> str:
        """Serve's multiplexing: a pin "loaded" here is reported to the routers as held by this replica."""
        return pin

    def _ended(self, kind: str, sid: str) -> None:
        """A session ended here (deleted, expired): no longer reported as held, nor recorded as this replica's.
        (Serve has no call to unload a multiplexed model; this reaches into its multiplexer, which otherwise only
        grows.)"""
        multiplexer = getattr(self, "__serve_multiplex_wrapper", None)
        if multiplexer is not None and multiplexer.models.pop(f"{kind}/{sid}", None) is not None:
            multiplexer._push_multiplexed_replica_info = True
        if f"{kind}/{sid}" in self.owned:
            self.owned.discard(f"{kind}/{sid}")
            self._owner(kind, sid).unlink(missing_ok=True)

    def _owner(self, kind: str, sid: str) -> pathlib.Path:
        """``<state_dir>/<kind>s/<id>.owner``: the replica that holds the session, and whether it let it go."""
        return pathlib.Path(self.config.state_dir) / f"{kind}s" / f"{sid}.owner"

    async def _claim(self, kind: str, sid: str) -> None:
        """The session is this replica's: reported to the routers, recorded in the state directory."""
        await self._hold(f"{kind}/{sid}")
        if f"{kind}/{sid}" not in self.owned and state.file_safe(sid):
            self.owned.add(f"{kind}/{sid}")
            self._owner(kind, sid).parent.mkdir(parents=True, exist_ok=True)
            state.write_json(self._owner(kind, sid), {"replica": self.id, "actor": self.actor, "released": False})

    async def _handed_over(self, kind: str, sid: str) -> None:
        """Before resuming a session another replica holds: wait until that one let it go (a replica stopping
        gracefully snapshots its sessions, then releases them) or is gone (dead: its last snapshot is all there
        is). A session is never resumed while its replica may still change it; ``SessionBusy`` after
        ``HANDOVER_S`` (its replica lives but is out of the routing: unhealthy, until Serve replaces it)."""
        if not state.file_safe(sid):
            return
        deadline = time.monotonic() + HANDOVER_S
        while (owner := _read_json(self._owner(kind, sid))) and owner.get("replica") != self.id \
                and not owner.get("released") and await asyncio.to_thread(_alive, owner.get("actor", "")):
            if time.monotonic() > deadline:
                raise SessionBusy(f"{kind} {sid!r} is held by replica {owner['replica']}, which does not answer; "
                                  "try again")
            await asyncio.sleep(0.2)

    async def _take(self, kind: str, sid: str, sent: int) -> None:
        """Before a session's request: resume it from its snapshot if this replica does not hold it (its replica
        died, or stopped), claim it, and count the frames it lost."""
        if not self.server.holds(kind, sid):
            await self._handed_over(kind, sid)
            async with self.restoring:
                if not self.server.holds(kind, sid) and self.server.restore_one(kind, sid):
                    logger.warning("replica %s resumed %s %s from its snapshot", self.id, kind, sid)
        if self.server.holds(kind, sid):
            await self._claim(kind, sid)
            if kind == "stream" and sent and (lost := self.server.streams[sid].account_lost(sent)):
                logger.warning("stream %s lost the %d frames it was sent after its last snapshot", sid, lost)

    async def _exchange(self, request: dict):
        """The app's response to ``request``: its start (status, headers), then its body in pieces."""
        kind, _, sid = request.get("pin", "").partition("/")
        session = kind in ("stream", "chat")
        if session:
            try:
                await self._take(kind, sid, request.get("frames_sent", 0))
            except SessionBusy as e:
                yield {"status": 503, "headers": [(b"content-type", b"application/json"), (b"retry-after", b"5")]}
                yield json.dumps({"error": {"message": str(e), "type": "server_error", "code": 503}}).encode()
                return
        async for item in _asgi(self.app, request):
            if isinstance(item, dict):
                headers = [(k, v) for k, v in item["headers"] if k.lower() not in (REPLICA_HEADER.encode(),
                                                                                   SEEN_HEADER.encode())]
                headers.append((REPLICA_HEADER.encode(), self.id.encode()))
                if session and self.server.holds(kind, sid):
                    await self._claim(kind, sid)  # a session this request created
                    if kind == "stream":
                        headers.append((SEEN_HEADER.encode(), str(self.server.streams[sid].counters.seen).encode()))
                item = {**item, "headers": headers}
            yield item

    async def http(self, request: dict) -> dict:
        """One request, its whole response: ``{"status", "headers", "body"}``."""
        start, body = None, []
        async for item in self._exchange(request):
            if isinstance(item, dict):
                start = item
            else:
                body.append(item)
        return {**start, "body": b"".join(body)}

    async def http_stream(self, request: dict):
        """One request, its response as it comes (server-sent events): the start, then body pieces."""
        async for item in self._exchange(request):
            yield item

    async def checkpoint(self) -> dict:
        """Snapshot every session of this replica into the state directory now."""
        await self.server.save_all()
        return {"replica": self.id, "streams": len(self.server.streams),
                "chats": len(self.server.chats.sessions) if self.server.chats else 0}

    async def __del__(self):
        """A graceful stop: every session snapshotted, then released (its next request resumes it on another
        replica, which waited for this)."""
        self.background.cancel()
        await self.server.shutdown()
        for pin in list(self.owned):
            kind, _, sid = pin.partition("/")
            state.write_json(self._owner(kind, sid), {"replica": self.id, "actor": self.actor, "released": True})


# --- the ingress --------------------------------------------------------------------------------------------------
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


async def _websocket(ingress, socket: WebSocket, sid: str) -> None:
    """``WS /v1/streams/{id}/ws`` as ``livekv serve`` has it (``livekv.serve.ws``), each message forwarded to the
    stream's replica as the HTTP request it stands for."""
    key = ingress.config.api_key
    if not ingress.config.accepts(socket.headers.get("authorization"), socket.query_params.get("api_key")):
        await socket.close(code=1008, reason="missing or wrong API key")
        return
    auth = [(b"authorization", f"Bearer {key}".encode())] if key else []

    async def call(method: str, path: str, body: bytes = b"", kind: str = "application/json", streaming=False):
        message = {"method": method, "path": path, "query": b"", "body": body, "client": None,
                   "headers": auth + [(b"content-type", kind.encode())]}
        return await ingress.send(Route(f"stream/{sid}", streaming=streaming), message)

    info = await call("GET", f"/v1/streams/{sid}")
    if info.status_code != 200:
        await socket.close(code=4404 if info.status_code == 404 else 1011, reason=f"no stream {sid!r}")
        return
    await socket.accept()
    lock, tasks = asyncio.Lock(), set()

    async def send(event: dict) -> None:
        async with lock:
            await socket.send_json(event)

    async def result(response: Response, kind: str, qid=None) -> None:
        out = json.loads(response.body)
        if response.status_code == 200:
            await send({"type": kind, **({"id": qid} if qid is not None else {}), **out})
        else:
            await send({"type": "error", **({"id": qid} if qid is not None else {}),
                        "message": out.get("error", {}).get("message", ""), "code": response.status_code})

    async def tick():
        while True:
            await asyncio.sleep(1.0)
            await result(await call("GET", f"/v1/streams/{sid}"), "stats")

    async def answer(event: dict):
        qid = event.get("id")
        request = {"question": str(event.get("question", "")), "stream": True}
        if isinstance(event.get("max_tokens"), int):
            request["max_tokens"] = event["max_tokens"]
        response = await call("POST", f"/v1/streams/{sid}/ask", json.dumps(request).encode(), streaming=True)
        if not isinstance(response, StreamingResponse) or response.status_code != 200:
            if isinstance(response, StreamingResponse):  # an error, whole
                response = Response(b"".join([c if isinstance(c, bytes) else c.encode()
                                              async for c in response.body_iterator]), response.status_code)
            await result(response, "answer.done", qid)
            return
        pieces = []
        async for chunk in response.body_iterator:
            for block in (chunk if isinstance(chunk, str) else chunk.decode()).split("\n\n"):
                data = next((line[6:] for line in block.splitlines() if line.startswith("data: ")), None)
                if data is None or data == "[DONE]":
                    continue
                event = json.loads(data)
                if "delta" in event:
                    pieces.append(event["delta"])
                    await send({"type": "answer.delta", "id": qid, "delta": event["delta"]})
                elif "answer" in event:
                    await send({"type": "answer.done", "id": qid, **event})

    tasks.add(asyncio.create_task(tick()))
    try:
        while True:
            message = await socket.receive()
            if message["type"] == "websocket.disconnect":
                break
            if message.get("bytes") is not None:
                data = message["bytes"]
                kind = "image/png" if data[:4] == b"\x89PNG" else "image/webp" if data[8:12] == b"WEBP" else "image/jpeg"
                out = await call("POST", f"/v1/streams/{sid}/frames", data, kind)
                await result(out, "frames")
            elif message.get("text") is not None:
                event = _json(message["text"].encode())
                if event.get("type") == "ask":
                    tasks.add(asyncio.create_task(answer(event)))
                elif event.get("type") == "stats":
                    await result(await call("GET", f"/v1/streams/{sid}"), "stats")
                else:
                    await send({"type": "error", "message": f"unknown event {event.get('type')!r}", "code": 400})
    except Exception as e:  # noqa: BLE001 - the socket went away
        logger.info("livekv ingress: websocket of %s ended (%s)", sid, type(e).__name__)
    finally:
        for task in tasks:
            task.cancel()



# (Serve pickles the ingress class when it is decorated, with the module's names defined by then: its helpers come first.)
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

    @api.websocket("/v1/streams/{sid}/ws")
    async def websocket(self, socket: WebSocket, sid: str):
        await _websocket(self, socket, sid)

    @api.api_route("/{path:path}", methods=METHODS)
    async def forward(self, request: Request, path: str):
        limit = 1 << 34 if path.rstrip("/") == "v1/streams/restore" else self.config.max_upload_bytes + (1 << 20)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _error(413, f"upload of {declared} bytes exceeds the limit of {limit}")
        body = await request.body()
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

    async def _fanout(self, message: dict) -> Response:
        """``GET /health`` and ``GET /v1/streams``: every replica's answer, merged."""
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
        bodies = [(dict(o["headers"]).get(REPLICA_HEADER.encode(), b"").decode(), json.loads(o["body"]))
                  for o in answers]
        if message["path"].rstrip("/") == "/health":
            return JSONResponse({"status": "ok", "sessions": sum(b["sessions"] for _, b in bodies),
                                 "engine_jobs_pending": sum(b["engine_jobs_pending"] for _, b in bodies),
                                 "rss_bytes": sum(b.get("rss_bytes") or 0 for _, b in bodies),
                                 "replicas": [{"replica": r, **b} for r, b in bodies],
                                 "unreachable": len(ids) - len(answers)})
        return JSONResponse({"object": "list", "data": [s for _, b in bodies for s in b["data"]]})


# --- building and running it --------------------------------------------------------------------------------------
def build(config: ServeConfig, ray_config: RayConfig | None = None):
    """The Serve application: the ingress and the replicas, configured from ``config`` (each replica's server) and
    ``ray_config`` (how many, autoscaling, CPUs). Without a ``state_dir``, a new temporary directory (one machine
    only: replicas on several need a shared one)."""
    ray_config = ray_config or RayConfig()
    config = dataclasses.replace(config, state_dir=config.state_dir or tempfile.mkdtemp(prefix="livekv-ray-state-"),
                                 threads=config.threads or max(1, int(ray_config.replica_cpus)))
    options = dict(ray_actor_options={"num_cpus": ray_config.replica_cpus},
                   max_ongoing_requests=ray_config.max_ongoing_requests,
                   request_router_config=RequestRouterConfig(request_router_class=SessionRouter))
    if ray_config.max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": ray_config.min_replicas,
                                         "initial_replicas": max(ray_config.min_replicas, 1),
                                         "max_replicas": ray_config.max_replicas,
                                         "target_ongoing_requests": ray_config.target_ongoing_requests}
    else:
        options["num_replicas"] = ray_config.replicas
    fields = dataclasses.asdict(config)
    return LiveKVIngress.bind(LiveKVReplica.options(**options).bind(fields), fields)


def build_app(args: dict):
    """``serve run livekv.serve.ray:build_app key=value ...``: any field of ``ServeConfig`` or ``RayConfig``."""
    from livekv.methods import parse_value

    def typed(cls) -> dict:
        hints, out = typing.get_type_hints(cls), {}
        for f in dataclasses.fields(cls):
            if f.name in args:
                value, hint = args[f.name], hints[f.name]
                if isinstance(value, str) and typing.get_origin(hint) is tuple:
                    value = tuple(item for item in value.split(",") if item)
                elif isinstance(value, str):
                    value = parse_value(value, hint)
                out[f.name] = value
        return out

    unknown = set(args) - {f.name for cls in (ServeConfig, RayConfig) for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}: fields of ServeConfig or RayConfig")
    return build(ServeConfig(**typed(ServeConfig)), RayConfig(**typed(RayConfig)))


def __getattr__(name: str):
    """``livekv.serve.ray:app``, the application with the defaults, made when asked for (importing this module in
    a replica makes nothing)."""
    if name == "app":
        return build_app({})
    raise AttributeError(name)


def run(config: ServeConfig, ray_config: RayConfig) -> None:
    """``livekv serve --ray``: the application on the Ray cluster at ``--ray-address`` (or a new local one), its
    HTTP proxy on ``--host``/``--port``, until SIGINT/SIGTERM; then every replica snapshots its sessions."""
    import ray

    local = ray_config.ray_address is None
    ray.init(address=ray_config.ray_address, include_dashboard=False if local else None)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build(config, ray_config), name=APP, route_prefix="/", blocking=False)
        print(f"livekv on Ray Serve: http://{config.host}:{config.port} ({_replicas_text(ray_config)}); "
              "Ctrl-C stops it", flush=True)
        stop.wait()
    finally:
        print("livekv: stopping (replicas snapshot their sessions)", flush=True)
        serve.delete(APP)
        if local:
            serve.shutdown()
        ray.shutdown()


def _replicas_text(ray_config: RayConfig) -> str:
    if ray_config.max_replicas is not None:
        return f"{ray_config.min_replicas}-{ray_config.max_replicas} replicas, autoscaling"
    return f"{ray_config.replicas} replica{'s' if ray_config.replicas > 1 else ''}"
