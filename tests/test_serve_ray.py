"""livekv on Ray Serve (``livekv.serve.ray``): how the ingress routes each request of the API; and a local Ray
cluster serving two replicas with the embedded models, one of them killed under its sessions, which go on on
the other from their last snapshot, with the answers of an uninterrupted single-process run from that point and
what was lost counted."""

import asyncio
import itertools
import json
import threading
import time
import warnings

import httpx
import pytest
import torch
from serve_fixtures import free_port, png, serving

from livekv.serve import ServeConfig
from livekv.serve.config import RayConfig
from livekv.serve.server import load_models
from livekv.stream import StreamSession
from livekv.vlm import load_default_vlm
from livekv.vlm.model import SYSTEM
from livekv.vlm.world import World

with warnings.catch_warnings():  # Ray Serve's own pydantic deprecations, at import
    warnings.simplefilter("ignore", DeprecationWarning)
    from livekv.serve.ray import APP, REPLICA, REPLICA_HEADER, route

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
QUESTIONS = ("how many objects are there now ?", "where is the first circle ?", "what colour is the first square ?")


def test_each_request_is_routed_to_its_session():
    assert route("GET", "/health", b"").fanout and route("GET", "/v1/streams", b"").fanout
    new = route("POST", "/v1/streams", b"{}")
    assert new.pin == f"stream/{new.new_stream}" and new.new_stream.startswith("stream-")
    assert route("POST", "/v1/streams/restore", b"tar").new_stream
    assert route("POST", "/v1/streams/s1/frames", b"\x89PNG").pin == "stream/s1"
    assert route("POST", "/v1/streams/s1/ask", b'{"question": "q"}').streaming  # SSE unless stream is false
    assert not route("POST", "/v1/streams/s1/ask", b'{"question": "q", "stream": false}').streaming
    for text in (b'"true"', b"1", b'"yes"'):  # what pydantic takes for true streams as the replica will answer
        assert route("POST", "/v1/streams/s1/ask", b'{"stream": %s}' % text).streaming
        assert route("POST", "/v1/chat/completions", b'{"model": "x", "stream": %s}' % text).streaming
    assert not route("POST", "/v1/streams/s1/ask", b'{"stream": "0"}').streaming
    assert route("DELETE", "/v1/streams/s1", b"").pin == "stream/s1"
    assert route("GET", "/v1/sessions/c1", b"").pin == "chat/c1"
    chat = route("POST", "/v1/chat/completions", b'{"model": "x", "session": "c1", "stream": true}')
    assert chat.pin == "chat/c1" and chat.streaming
    assert route("POST", "/v1/chat/completions", b'{"model": "x", "session": "c1", "stream_id": "s1"}').pin == "stream/s1"
    assert route("POST", "/v1/chat/completions", b'{"model": "stream/s1"}').pin == "stream/s1"
    assert route("POST", "/v1/chat/completions", b'{"model": "x"}').pin == ""  # any replica
    assert route("POST", "/v1/chat/completions", b"not json").pin == ""  # the replica answers 400
    assert route("GET", "/v1/models", b"") == route("GET", "/nowhere", b"")


def test_the_router_keeps_a_session_on_its_replica_and_balances_new_ones():
    """``SessionRouter.choose_replicas`` on stand-in replicas: the replica reporting a session gets it, only it; a
    new session goes to the replica holding the fewest (counting those just sent there) and stays there until that
    replica reports it; a session whose replica is gone goes to another; ``replica/<id>`` targets one."""
    from collections import namedtuple
    from types import SimpleNamespace

    from livekv.serve.ray import SessionRouter

    ReplicaID = namedtuple("ReplicaID", "unique_id")  # Serve's ReplicaID is hashable: the router keys on it

    def replica(name, *held):
        return SimpleNamespace(replica_id=ReplicaID(name), multiplexed_model_ids=set(held))

    def request(pin):
        return SimpleNamespace(metadata=SimpleNamespace(session_id=pin),
                               routing_context=SimpleNamespace(should_backoff=False))

    def choose(replicas, pin):
        ranks = asyncio.run(router.choose_replicas(replicas, request(pin)))
        return [[r.replica_id.unique_id for r in rank] for rank in ranks]

    router = object.__new__(SessionRouter)
    router.initialize_state()
    a, b = replica("a", "stream/s1", "chat/c1", "chat/c3"), replica("b", "stream/s2")
    assert choose([a, b], "stream/s1") == [["a"]] and choose([a, b], "stream/s2") == [["b"]]
    assert choose([a, b], "chat/new") == [["b"]]  # b holds fewer
    assert choose([a, b], "chat/new2") == [["b"]]  # 1 held + 1 on its way < 3
    assert choose([a, b], "chat/new3") in ([["a"]], [["b"]])  # 3 and 3: either
    for _ in range(5):
        assert choose([a, b], "chat/new") == [["b"]]  # where it was sent, until b reports it
    b.multiplexed_model_ids.add("chat/new")
    assert choose([a, b], "chat/new") == [["b"]] and "chat/new" not in router._pins
    b.multiplexed_model_ids.add("chat/new2")  # reported, never asked for again: counted once, not twice
    choose([a, b], "chat/new4")
    assert "chat/new2" not in router._pins
    assert choose([b], "stream/s1") == [["b"]]  # its replica gone: another takes it (and resumes it)
    assert choose([a, b], "replica/b") == [["b"]] and choose([a], "replica/b") == [[]]
    assert sorted(map(sorted, choose([a, b], ""))) == [["a", "b"]]  # no session: the less busy of two
    pending = request("stream/s1")
    asyncio.run(router.choose_replicas([a, b], pending))
    assert pending.routing_context.should_backoff  # a busy replica is waited for


def test_the_ingress_hands_saved_sessions_to_replicas_before_it_lists_them(tmp_path):
    """Every answer that lists sessions waits for the one hand-over of the saved sessions: concurrent first
    calls, and a call after a first one whose client went mid-way (stand-in replicas that take 0.2 s each)."""
    import json

    from fastapi.responses import Response

    from livekv.serve.ray import ingress

    (tmp_path / "streams").mkdir()
    for sid in ("s1", "s2", "s3"):
        (tmp_path / "streams" / f"{sid}.json").write_text("{}")
    held = set()

    class Replicas:
        def options(self, **kwargs):
            return self

        class http:
            @staticmethod
            async def remote(message):
                return {"status": 200, "headers": [], "body": json.dumps({"data": [{"id": h} for h in sorted(held)]})}

    cls = ingress.LiveKVIngress.func_or_class

    class Front(cls):
        def __del__(self):  # never served: nothing to shut down
            pass

    front = Front.__new__(Front)
    front.config, front.replicas, front.app_name, front.sent, front.resuming = \
        ServeConfig(state_dir=str(tmp_path)), Replicas(), "livekv", {}, None

    async def send(where, message):
        await asyncio.sleep(0.2)  # a replica resuming the session from its snapshot
        held.add(where.pin.split("/")[1])
        return Response(b"{}")

    front.send = send
    listing = {"method": "GET", "path": "/v1/streams", "query": b"", "headers": [], "client": None, "body": b""}

    def listed(response):
        return sorted(d["id"] for d in json.loads(response.body)["data"])

    names = cls._fanout.__globals__  # Serve keeps the class by value, with its own module names
    original, names["replica_ids"] = names["replica_ids"], lambda app: ["r1"]

    async def run():
        first, second = await asyncio.gather(front._fanout(listing), front._fanout(listing))
        held.clear()
        front.resuming = None
        gone = asyncio.create_task(front._fanout(listing))
        await asyncio.sleep(0.3)
        gone.cancel()
        return listed(first), listed(second), listed(await front._fanout(listing))

    try:
        assert asyncio.run(run()) == (["s1", "s2", "s3"],) * 3
    finally:
        names["replica_ids"] = original


@pytest.mark.slow
def test_a_killed_replica_s_sessions_go_on_on_the_other_from_their_snapshots(tmp_path):
    """Two replicas (one torch thread each); a stream and a chat session on each (the router balances new sessions);
    every request of a session lands on its replica. The replica holding stream ``s1`` snapshots its sessions, then
    takes ``N2`` more frames and a chat turn, and is killed. The next requests of its sessions are served by another
    replica, which resumes them from the snapshot: the stream says it lost the ``N2`` frames, and, fed ``N3`` more,
    answers as a single-process session fed the same frames (``N1`` then ``N3``); the chat's next turn reuses the
    restored cache and answers as an uninterrupted server fed turn 1 and then that turn. Then, with the killed
    replica replaced, the application is deployed again with one replica under a steady flow of frames: the
    sessions of the replicas stopped go on on the new one, nothing lost."""
    import ray
    import websockets.sync.client as ws_client
    from ray import serve

    from livekv.serve.ray import build

    frames = [png(image) for _, image in World(seed=12, duration_s=80).frames()]
    n1, n2, n3 = 20, 6, 10
    state, port = tmp_path / "state", free_port()
    config = ServeConfig(threads=1, state_dir=str(state), snapshot_every_s=3600)
    t0, stopped = time.monotonic(), False
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(config, RayConfig(replicas=2, replica_cpus=1)), name=APP, route_prefix="/")
        where: dict[str, list[str]] = {}

        def call(c, method, path, session, **kwargs):
            r = c.request(method, path, **kwargs)
            assert r.status_code in (200, 201), (path, r.status_code, r.text)
            where.setdefault(session, []).append(r.headers[REPLICA_HEADER])
            return r

        def push(c, sid, data):
            return call(c, "POST", f"/v1/streams/{sid}/frames", sid, content=data,
                        headers={"content-type": "image/png"}).json()

        def ingested(c, sid, count):
            deadline = time.monotonic() + 120
            while (f := call(c, "GET", f"/v1/streams/{sid}", sid).json()["frames"])["ingested"] < count:
                assert time.monotonic() < deadline, f
                time.sleep(0.05)
            return f

        def chat(c, session, messages):
            body = {"model": "x", "session": session, "method": "dense", "temperature": 0, "max_tokens": 8,
                    "messages": messages}
            return call(c, "POST", "/v1/chat/completions", session, json=body).json()

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            health = c.get("/health").json()
            assert len(health["replicas"]) == 2 and health["sessions"] == 0
            s1 = call(c, "POST", "/v1/streams", "s1", json={"method": "livevlm", "memory_tokens": 56}).json()["id"]
            where[s1] = where.pop("s1")
            s2 = call(c, "POST", "/v1/streams", "s2", json={"method": "full"}).json()["id"]
            where[s2] = where.pop("s2")
            assert where[s1] != where[s2]  # new sessions go to the replica holding the fewest
            u1 = [{"role": "user", "content": "Hi!"}]
            first = {s: chat(c, s, u1) for s in ("c1", "c2")}
            victim, survivor = where[s1][0], where[s2][0]
            cv, co = sorted(("c1", "c2"), key=lambda s: where[s] != [victim])  # the chat on the victim, the other
            assert where[cv] == [victim] and where[co] == [survivor]
            for data in frames[:n1]:
                push(c, s1, data)
                push(c, s2, data)
            ingested(c, s1, n1)
            ingested(c, s2, n1)

            snap = serve.get_deployment_handle(REPLICA, APP).options(session_id=f"stream/{s1}").checkpoint.remote()
            assert snap.result(timeout_s=120) == {"replica": victim, "streams": 1, "chats": 1}
            assert (state / "streams" / f"{s1}.json").is_file() and (state / "chats" / f"{cv}.json").is_file()
            for data in frames[n1 : n1 + n2]:  # taken by the victim after its snapshot: lost with it
                push(c, s1, data)
            assert ingested(c, s1, n1 + n2)["since_snapshot"] == n2
            u2 = u1 + [first[cv]["choices"][0]["message"], {"role": "user", "content": "How are you?"}]
            second = chat(c, cv, u2)

            before = {s: list(r) for s, r in where.items()}
            killed = time.monotonic()
            ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#{REPLICA}#{victim}", namespace="serve"), no_restart=True)
            resumed = call(c, "GET", f"/v1/streams/{s1}", s1).json()["frames"]
            failover_s = time.monotonic() - killed
            assert resumed == {**resumed, "seen": n1 + n2, "ingested": n1, "lost": n2, "dropped": 0, "queued": 0}
            for data in frames[n1 + n2 : n1 + n2 + n3]:
                push(c, s1, data)
            f = ingested(c, s1, n1 + n3)
            assert f == {**f, "seen": n1 + n2 + n3, "ingested": n1 + n3, "lost": n2}
            owner = json.loads((state / "streams" / f"{s1}.owner").read_text())
            assert owner["replica"] == where[s1][-1] != victim and not owner["released"]
            answers = {q: call(c, "POST", f"/v1/streams/{s1}/ask", s1, json={"question": q, "stream": False,
                                                                           "max_tokens": 8}).json()["answer"]
                       for q in QUESTIONS}
            sse = call(c, "POST", f"/v1/streams/{s1}/ask", s1, json={"question": QUESTIONS[0]}).text
            events = [line for line in sse.splitlines() if line]
            assert json.loads(events[-2][6:])["answer"] == answers[QUESTIONS[0]] and events[-1] == "data: [DONE]"
            with ws_client.connect(f"ws://127.0.0.1:{port}/v1/streams/{s1}/ws") as socket:  # held by the ingress
                socket.send(frames[-1])
                assert _event(socket, "frames")["frames"]["seen"] == n1 + n2 + n3 + 1
                socket.send(json.dumps({"type": "ask", "question": QUESTIONS[0], "id": "q1"}))
                done = _event(socket, "answer.done")
                socket.send(json.dumps({"type": "ask", "question": "how many zebras ?", "id": "q2"}))
                assert "zebras" in _event(socket, "error")["message"]
            assert done["id"] == "q1" and done["answer"] and done["frames_ingested"] == n1 + n3 + 1
            u3 = u2 + [second["choices"][0]["message"], {"role": "user", "content": "Tell me a colour."}]
            third = chat(c, cv, u3)
            assert third["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the restored cache, reused
            push(c, s2, frames[n1])  # the other replica's sessions stay where they are
            assert chat(c, co, u1)["choices"] == first[co]["choices"]
            listed = {s["id"]: s["frames"]["lost"] for s in c.get("/v1/streams").json()["data"]}
            assert listed == {s1: n2, s2: 0}
            after = {s: r[len(before[s]) :] for s, r in where.items()}
            assert {s: set(before[s]) for s in (s1, cv, s2, co)} == {s1: {victim}, cv: {victim}, s2: {survivor},
                                                                     co: {survivor}}
            assert len(set(after[s1])) == len(set(after[cv])) == 1 and victim not in after[s1] + after[cv]
            assert set(after[s2] + after[co]) == {survivor}

            # Serve replaces the killed replica; a new stream goes there (it holds the fewest). Then the application
            # is deployed again with one replica (a new version: Serve stops both, gracefully, for a new one), while
            # frames keep coming: a replica stopping snapshots and releases its sessions, and the one that gets
            # their next request waits for that and resumes them. Nothing is lost, no frame, no chat turn.
            deadline = time.monotonic() + 180
            while len(c.get("/health").json()["replicas"]) < 2:
                assert time.monotonic() < deadline, "the killed replica was not replaced"
                time.sleep(0.5)
            s3 = call(c, "POST", "/v1/streams", "s3", json={"method": "full"}).json()["id"]
            where[s3] = where.pop("s3")
            last = {cv: (u3, third), co: (u1, chat(c, co, u1))}
            streams = {s: call(c, "GET", f"/v1/streams/{s}", s).json()["frames"]["seen"] for s in (s1, s2, s3)}
            sent, failures, stop = dict.fromkeys(streams, 0), [], threading.Event()

            def keep_pushing():
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as pc:
                    for k in itertools.count():
                        for sid in streams:
                            r = pc.post(f"/v1/streams/{sid}/frames", content=frames[k % len(frames)],
                                        headers={"content-type": "image/png"})
                            if r.status_code != 200:
                                failures.append((sid, r.status_code, r.text))
                            sent[sid] += 1
                        if stop.wait(0.1):
                            return

            pusher = threading.Thread(target=keep_pushing)
            pusher.start()
            try:
                time.sleep(1)
                serve.run(build(config, RayConfig(replicas=1, replica_cpus=1)), name=APP, route_prefix="/")
                deadline = time.monotonic() + 120
                while len(c.get("/health").json()["replicas"]) > 1:
                    assert time.monotonic() < deadline, "the scale-down did not happen"
                    time.sleep(0.5)
                time.sleep(2)
            finally:
                stop.set()
                pusher.join(60)
            assert not failures and all(sent.values())
            remaining = c.get("/health").json()["replicas"][0]["replica"]
            moved = sorted(s for s in (s1, s2, s3, cv, co) if where[s][-1] != remaining)
            assert moved  # sessions of a replica stopped went on on another
            for sid, seen in streams.items():
                lost = n2 if sid == s1 else 0
                f = ingested(c, sid, seen + sent[sid] - lost)
                assert f == {**f, "seen": seen + sent[sid], "lost": lost, "dropped": 0, "queued": 0}
            for session, (messages, reply) in last.items():
                more = chat(c, session, messages + [reply["choices"][0]["message"],
                                                    {"role": "user", "content": "And another one?"}])
                cached = reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"] - 1
                assert more["usage"]["prompt_tokens_details"]["cached_tokens"] >= cached  # its last turn was kept
            assert c.get("/health").json()["sessions"] == 5

        serve.shutdown()  # graceful: the replicas left snapshot what they hold
        stopped = True
        assert {p.name for p in (state / "streams").glob("*.json")} == {f"{s1}.json", f"{s2}.json", f"{s3}.json"}
        assert {p.name for p in (state / "chats").glob("*.json")} == {"c1.json", "c2.json"}
        assert all(json.loads(p.read_text())["released"] for p in state.glob("*/*.owner"))  # let go, after snapshots
        print(f"ray cluster up to shutdown: {time.monotonic() - t0:.1f} s; failover (kill to the next answer): "
              f"{failover_s:.2f} s; moved by the scale-down: {moved}")
        serve.start(http_options={"host": "127.0.0.1", "port": port})  # started again: the saved sessions are listed
        serve.run(build(config, RayConfig(replicas=1, replica_cpus=1)), name=APP, route_prefix="/")
        stopped = False
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            assert sorted(s["id"] for s in c.get("/v1/streams").json()["data"]) == sorted([s1, s2, s3])
            assert c.get("/health").json()["sessions"] == 5
        serve.shutdown()
        stopped = True
    finally:
        if not stopped:
            serve.shutdown()
        ray.shutdown()

    torch.set_num_threads(1)
    vlm = load_default_vlm()
    reference = StreamSession(vlm, "livevlm", system=SYSTEM, memory_tokens=56)
    for data in frames[:n1] + frames[n1 + n2 : n1 + n2 + n3]:  # the snapshot's frames, then those after the failover
        reference.push(_decode(data)[None])
    assert answers == {q: reference.answer(q, max_new_tokens=8) for q in QUESTIONS}
    models = load_models(ServeConfig(vlm="none"))
    with serving(ServeConfig(port=free_port(), threads=1, vlm="none"), models) as url, httpx.Client(base_url=url, timeout=120) as c:
        body = {"model": "x", "session": "ref", "method": "dense", "temperature": 0, "max_tokens": 8}
        assert c.post("/v1/chat/completions", json={**body, "messages": u1}).json()["choices"] == first[cv]["choices"]
        uninterrupted = c.post("/v1/chat/completions", json={**body, "messages": u3}).json()  # turn 2 not in the cache
    assert third["choices"] == uninterrupted["choices"] and third["usage"] == uninterrupted["usage"]


def _event(socket, kind: str) -> dict:
    """The next WebSocket event of type ``kind`` (stats and the rest skipped)."""
    while (event := json.loads(socket.recv(timeout=60)))["type"] != kind:
        pass
    return event


def _decode(data: bytes):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
