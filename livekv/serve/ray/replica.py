"""The replica: one ``livekv serve`` (``livekv.serve.server.Server`` and the FastAPI app of ``livekv serve``) run
in-process on a Serve replica; the requests the ingress forwards, whole, go through the app by ``_asgi``. Before
a session's request, the replica claims the session (reported to the routers, recorded in ``--state-dir``), and
resumes it from its snapshot if it does not hold it, once the replica that held it let it go or died."""

import asyncio
import json
import logging
import pathlib
import time

from ray import serve

from livekv.serve import state
from livekv.serve.config import ServeConfig
from livekv.serve.ray.routing import REPLICA, REPLICA_HEADER, SEEN_HEADER

logger = logging.getLogger("livekv.serve")

HANDOVER_S = 60.0  # how long a replica waits for another that holds a session to let it go


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
