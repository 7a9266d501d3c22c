"""How a request of the ``livekv serve`` API reaches its replica: the ingress reads the session it is about
(``route``: a ``Route``) and asks through a handle whose ``session_id`` is that session; ``SessionRouter``, Serve's
request router for the replicas, sends it to the replica holding the session. Also the names the application's
parts share: the application's and its deployments', and the headers a replica answers with."""

import collections
import dataclasses
import random
import time
import uuid
import weakref

from pydantic import TypeAdapter, ValidationError
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from livekv.serve.bodies import json_object

APP = "livekv"
REPLICA = "LiveKVReplica"
INGRESS = "LiveKVIngress"
REPLICA_HEADER = "x-livekv-replica"  # on every response: the replica that served it
SEEN_HEADER = "x-livekv-frames-seen"  # on a stream's responses: frames the stream has been sent so far
PIN_S = 60.0  # how long a router remembers where it sent a new session, until that replica reports holding it


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


def _flag(value) -> bool:
    """A request's boolean as the replica's pydantic model reads it (``1``, ``"true"``, ``"yes"`` are true); a value
    it refuses is not (the replica answers 400, whole)."""
    try:
        return _BOOL.validate_python(value)
    except ValidationError:
        return False


_BOOL = TypeAdapter(bool)


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
            streaming = parts[3:] == ["ask"] and _flag(json_object(body).get("stream", True))
            return Route(f"stream/{parts[2]}", streaming=streaming)
    if parts[:2] == ["v1", "sessions"] and len(parts) == 3:
        return Route(f"chat/{parts[2]}")
    if parts == ["v1", "chat", "completions"] and method == "POST":
        request = json_object(body)
        model = request.get("model") if isinstance(request.get("model"), str) else ""
        stream_id = request.get("stream_id") or (model.split("/", 1)[1] if model.startswith("stream/") else None)
        streaming = _flag(request.get("stream", False))
        if isinstance(stream_id, str) and stream_id:
            return Route(f"stream/{stream_id}", streaming=streaming)
        if isinstance(request.get("session"), str) and request["session"]:
            return Route(f"chat/{request['session']}", streaming=streaming)
        return Route(streaming=streaming)
    return Route()


class SessionRouter(RequestRouter):
    """Serve's request router for ``LiveKVReplica``: a session's requests go to the replica holding it, and only
    there while it lives (Serve's default router would send them elsewhere when that replica is busy, and a session
    must never be resumed twice); a new session, or one whose replica died, goes to the replica holding the fewest
    sessions; requests about no session to the less busy of two replicas picked at random. ``replica/<id>`` targets
    one replica (how the ingress asks every replica). A request's session comes as its handle's ``session_id``; the
    replicas report the sessions they hold through Serve's multiplexing (``multiplexed_model_ids``)."""

    def initialize_state(self, **kwargs) -> None:
        import livekv.serve.ray.routing as home  # Serve pickles this class by value: the real module's registry

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
        reported = set().union(*(r.multiplexed_model_ids for r in candidate_replicas))
        for key, (_, when) in list(self._pins.items()):
            if now - when >= PIN_S or key in reported:  # a reported session counts once, as its replica's
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
    import livekv.serve.ray.routing as home

    for ref in reversed(home._ROUTERS):
        router = ref()
        if router is not None and router._deployment_id.app_name == app and router._deployment_id.name == deployment:
            return [replica.unique_id for replica in list(router.curr_replicas)]
    return []
