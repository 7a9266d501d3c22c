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
conversation its next request carries). ``--state-dir`` must be readable by every replica: a directory on one
machine, a shared filesystem (NFS, or an object store mounted with s3fs, gcsfuse or mountpoint-s3) on several.

The package, one part a file: ``routing`` (``Route``, ``route``, ``SessionRouter``, the shared names), ``replica``
(``LiveKVReplica`` and its ASGI bridge), ``ingress`` (``LiveKVIngress``: HTTP forwarding, fan-out), ``websocket``
(the ingress's WebSocket), ``deploy`` (``build``, ``build_app``, ``run``).
"""

from livekv.serve.ray.deploy import build, build_app, run
from livekv.serve.ray.ingress import LiveKVIngress
from livekv.serve.ray.replica import LiveKVReplica
from livekv.serve.ray.routing import (APP, INGRESS, REPLICA, REPLICA_HEADER, SEEN_HEADER, Route, SessionRouter,
                                      replica_ids, route)

__all__ = ["APP", "INGRESS", "REPLICA", "REPLICA_HEADER", "SEEN_HEADER", "LiveKVIngress", "LiveKVReplica", "Route",
           "SessionRouter", "build", "build_app", "replica_ids", "route", "run"]


def __getattr__(name: str):
    """``livekv.serve.ray:app``, the application with the defaults, made when asked for (importing this package
    in a replica makes nothing)."""
    if name == "app":
        return build_app({})
    raise AttributeError(name)

