"""What a client may not do to the server: name files (session ids, the disk tier's directory), send bodies past
the limits, restore snapshots whose record or manifest lies, or get an answer outside OpenAI's error shape."""

import asyncio
import io
import json
import tarfile
import time

import httpx
import pytest
import torch
from serve_fixtures import free_port, png, serving, wait_ingested

from livekv.serve import ServeConfig
from livekv.serve.server import Server, load_models
from livekv.vlm.world import World

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
CHAT = {"model": "x", "method": "dense", "max_tokens": 2, "temperature": 0,
        "messages": [{"role": "user", "content": "Hi!"}]}


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(2)
    return load_models(ServeConfig())


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    config = ServeConfig(port=free_port(), max_sessions=4, max_request_bytes=20_000, max_queue_frames=8,
                         media_dir=str(media))
    with serving(config, models) as base, httpx.Client(base_url=base, timeout=120) as c:
        yield c, base, media


def error(r, status: int, words: str) -> bool:
    body = r.json()
    return r.status_code == status and words in body["error"]["message"] and body["error"]["code"] == status


def test_requests_that_would_name_files_or_overflow_are_refused(server):
    c, _, _ = server
    for session in ("..", ".", "a/b", ".hidden"):
        assert error(c.post("/v1/chat/completions", json={**CHAT, "session": session}), 400, "session")
    assert error(c.post("/v1/chat/completions", json={**CHAT, "knobs": {"host": "disk", "host_dir": "/etc"}}), 400,
                 "host_dir: set by the server")
    assert error(c.post("/v1/streams", json={"method": "full", "knobs": {"host_dir": "/etc"}}), 400, "host_dir")
    for stream in (False, True):  # refused before the answer starts, streamed or not
        assert error(c.post("/v1/chat/completions", json={**CHAT, "seed": 2**70, "stream": stream}), 400, "seed")
    assert c.post("/v1/chat/completions", json={**CHAT, "session": "ok-1.b:2"}).status_code == 200


def test_unknown_routes_and_methods_answer_in_openais_shape(server):
    c, _, _ = server
    assert error(c.get("/v1/nope"), 404, "Not Found")
    assert error(c.put("/v1/chat/completions"), 405, "Method Not Allowed")


def test_json_bodies_past_the_limit_get_413_declared_or_chunked(server):
    c, _, _ = server
    big = {**CHAT, "messages": [{"role": "user", "content": "word " * 5000}]}
    assert error(c.post("/v1/chat/completions", json=big), 413, "exceeds the limit of 20000")
    chunks = (json.dumps(big)[i : i + 1000].encode() for i in range(0, 30_000, 1000))
    r = c.post("/v1/chat/completions", content=chunks, headers={"content-type": "application/json"})
    assert error(r, 413, "exceeds the limit of 20000")
    assert c.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_a_prompt_is_tokenized_off_the_event_loop(server, monkeypatch):
    import threading

    from livekv.serve.chat import Chats

    c, base, _ = server
    inside, go, prompt = threading.Event(), threading.Event(), Chats.prompt
    monkeypatch.setattr(Chats, "prompt", lambda self, body: (inside.set(), go.wait(30), prompt(self, body))[-1])
    answers = []
    chat = threading.Thread(target=lambda: answers.append(httpx.post(f"{base}/v1/chat/completions", json=CHAT,
                                                                     timeout=120).status_code))
    chat.start()
    try:
        assert inside.wait(30)
        assert c.get("/health", timeout=5).status_code == 200  # the server answers while the prompt tokenizes
    finally:
        go.set()
        chat.join()
    assert answers == [200]


def test_a_sessions_memory_is_read_between_its_steps(server, monkeypatch):
    import threading

    from livekv.serve.chat import Chats

    c, base, _ = server
    first = c.post("/v1/chat/completions", json={**CHAT, "session": "m", "method": "freekv"})
    assert first.status_code == 200 and first.json()["livekv"]["memory"]["host_kv_bytes"] > 0
    inside, go, feed = threading.Event(), threading.Event(), Chats._feed

    def held(self, session, ids):
        inside.set()
        assert go.wait(30)
        return feed(self, session, ids)

    monkeypatch.setattr(Chats, "_feed", held)
    turn = {**CHAT, "session": "m", "method": "freekv", "messages": CHAT["messages"] * 2}
    chat = threading.Thread(target=lambda: httpx.post(f"{base}/v1/chat/completions", json=turn, timeout=120))
    chat.start()
    read = []
    try:
        assert inside.wait(30)
        reader = threading.Thread(target=lambda: read.append(c.get("/v1/sessions/m").json()))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive()  # it waits for the step in progress
    finally:
        go.set()
        chat.join()
    reader.join()
    assert read[0]["memory"]["fast_kv_bytes"] > 0 and read[0]["memory"]["host_kv_bytes"] > 0


def test_a_video_chunk_of_more_frames_than_a_stream_queues_is_refused(server, tmp_path):
    c, _, _ = server
    sid = c.post("/v1/streams", json={"method": "full", "fps": 4}).json()["id"]
    World(seed=3, duration_s=4).write_video(tmp_path / "long.mp4", fps=4)  # 16 frames at the stream's 4 fps
    r = c.post(f"/v1/streams/{sid}/frames", content=(tmp_path / "long.mp4").read_bytes(),
               headers={"content-type": "video/mp4"})
    assert error(r, 413, "more than 8 frames")
    assert c.get(f"/v1/streams/{sid}").json()["frames"]["seen"] == 0
    c.delete(f"/v1/streams/{sid}")


def altered(archive: bytes, record=None, manifest=None) -> bytes:
    """The snapshot archive with its record.json and manifest.json passed through ``record`` and ``manifest``
    (each takes the parsed JSON and returns what to write)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(archive)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            change = {"record.json": record, "manifest.json": manifest}.get(member.name)
            if change is not None:
                data = json.dumps(change(json.loads(data))).encode()
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return out.getvalue()


def test_a_restore_whose_record_or_manifest_lies_is_refused_and_holds_nothing(server):
    c, _, _ = server
    sid = c.post("/v1/streams", json={"method": "livevlm", "knobs": {"offload": True}}).json()["id"]
    world = World(seed=1, duration_s=10)
    for t in range(2):
        c.post(f"/v1/streams/{sid}/frames", content=png(world.render(t)), headers={"content-type": "image/png"})
    wait_ingested(c, sid, source=False, count=2)
    archive = c.get(f"/v1/streams/{sid}/snapshot").content
    held = len(c.get("/v1/streams").json()["data"])
    bad = [dict(record=lambda r: []), dict(record=lambda r: {k: v for k, v in r.items() if k != "counters"}),
           dict(record=lambda r: {**r, "spec": {**r["spec"], "source": {"type": "file", "path": "gone.mp4"}}}),
           dict(record=lambda r: {**r, "counters": {**r["counters"], "extra": 1}}),
           dict(record=lambda r: {**r, "queued": -3}), dict(record=lambda r: {**r, "id": "../x"}),
           dict(manifest=lambda m: {**m, "stats": {**m["stats"], "extra": 1}}),
           dict(manifest=lambda m: {k: v for k, v in m.items() if k != "layers"}),
           dict(manifest=lambda m: {**m, "layers": m["layers"][:1]}),
           dict(manifest=lambda m: {**m, "memory_tokens": "x"}),
           dict(manifest=lambda m: {**m, "knobs": {**m["knobs"], "host": "disk", "host_dir": "/etc"}}),
           dict(manifest=lambda m: {**m, "method": "livevlm:host=disk,host_dir=/etc"}),
           dict(manifest=lambda m: {**m, "max_question_tokens": "x"}),
           dict(manifest=lambda m: {**m, "stats": {**m["stats"], "frames": "x"}}),
           dict(manifest=lambda m: {**m, "model": "x"}), dict(manifest=lambda m: [m])]
    for change in bad:
        r = c.post("/v1/streams/restore", content=altered(archive, **change))
        assert r.status_code == 400 and r.json()["error"]["code"] == 400, (bad.index(change), r.text[:200])
    assert len(c.get("/v1/streams").json()["data"]) == held  # nothing half-made was left behind
    longer = c.post("/v1/streams/restore", content=altered(archive, manifest=lambda m: {**m,
                                                                                       "max_question_tokens": 10**9}))
    question = "how many objects are there now ? " * 200  # 1,600 words: more than a new session takes
    r = c.post(f"/v1/streams/{longer.json()['id']}/ask", json={"question": question})
    assert error(r, 400, "at most 1024 (max_question_tokens)")
    for s in (sid, longer.json()["id"]):
        c.delete(f"/v1/streams/{s}")


def next_event(socket, wanted, within: float = 30.0) -> dict:
    """The first event ``wanted(event)`` accepts, received within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        event = json.loads(socket.recv(timeout=max(0.1, deadline - time.monotonic())))
        if wanted(event):
            return event
    raise TimeoutError("no such event")


def test_the_websocket_checks_questions_and_says_when_its_stream_ended(server):
    import websockets.sync.client as ws_client

    c, base, _ = server
    sid = c.post("/v1/streams", json={"method": "full"}).json()["id"]
    with ws_client.connect(f"{base.replace('http', 'ws')}/v1/streams/{sid}/ws") as socket:
        for i, ask in enumerate(({"max_tokens": None}, {"max_tokens": 1e400}, {"max_tokens": -5}, {"question": None})):
            socket.send(json.dumps({"type": "ask", "question": "how many objects are there now ?", "id": i, **ask}))
            event = next_event(socket, lambda e: e.get("id") == i)
            assert event["type"] == "error" and event["code"] == 400, event
        c.delete(f"/v1/streams/{sid}")
        socket.send(png(World(seed=1, duration_s=10).render(0)))
        event = next_event(socket, lambda e: e["type"] != "stats")
        assert event["type"] == "error" and event["code"] == 404
        with pytest.raises(Exception, match="4404"):
            socket.recv(timeout=30)
    sid = c.post("/v1/streams", json={"method": "full"}).json()["id"]
    with ws_client.connect(f"{base.replace('http', 'ws')}/v1/streams/{sid}/ws") as socket:  # one that only listens
        assert json.loads(socket.recv(timeout=60))["type"] == "stats"
        c.delete(f"/v1/streams/{sid}")
        event = next_event(socket, lambda e: e["type"] != "stats")
        assert event["type"] == "error" and event["code"] == 404
        with pytest.raises(Exception, match="4404"):
            socket.recv(timeout=30)


def test_a_snapshot_record_keeps_every_counter_of_a_stream():
    import dataclasses

    from livekv.serve.schemas import StreamCounters
    from livekv.serve.streams import Counters

    assert set(StreamCounters.model_fields) == {f.name for f in dataclasses.fields(Counters)}


def test_a_session_deleted_while_its_snapshot_is_written_does_not_come_back(models, tmp_path):
    async def run():
        server = Server(ServeConfig(state_dir=str(tmp_path)), models)
        try:
            chat = server.chats.session(type("R", (), {"session": "c1"})(), "dense", {}, 0)
            async with chat.lock:  # an answer in progress: the snapshot waits for it
                saving = asyncio.create_task(server.save_all())
                await asyncio.sleep(0.1)
                server.delete_chat("c1")
            await saving
        finally:
            server.engine.close()

    asyncio.run(run())
    assert list((tmp_path / "chats").iterdir()) == []


def test_restores_keep_to_the_served_methods_and_at_once_to_the_session_limit(models):
    from concurrent.futures import ThreadPoolExecutor

    with serving(ServeConfig(port=free_port(), max_sessions=2, methods=("dense", "full")), models) as base, \
            httpx.Client(base_url=base, timeout=120) as c:
        sid = c.post("/v1/streams", json={"method": "full"}).json()["id"]
        archive = c.get(f"/v1/streams/{sid}/snapshot").content
        rekv = altered(archive, manifest=lambda m: {**m, "method": "rekv", "knobs": {}})
        assert error(c.post("/v1/streams/restore", content=rekv), 400, "'rekv' is not served here")
        def slowly():  # every request is let in before any body has arrived
            yield archive[:100]
            time.sleep(1.0)
            yield archive[100:]

        with ThreadPoolExecutor(4) as pool:
            codes = sorted(pool.map(lambda _: httpx.post(f"{base}/v1/streams/restore", content=slowly(),
                                                         timeout=120).status_code, range(4)))
        assert codes == [201, 429, 429, 429] and len(c.get("/v1/streams").json()["data"]) == 2


def test_a_start_resumes_what_it_can_and_logs_the_rest(models, tmp_path, caplog):
    from livekv.serve.schemas import StreamCreate

    async def save(names):
        server = Server(ServeConfig(state_dir=str(tmp_path)), models)
        try:
            for sid in names:
                server.create_stream(StreamCreate(method="full"), sid)
            server.chats.session(type("R", (), {"session": "c1"})(), "dense", {}, 0)
            await server.save_all()
        finally:
            server.engine.close()

    asyncio.run(save(["good", "bad-record", "bad-snapshot"]))
    streams = tmp_path / "streams"
    (streams / "bad-record.json").write_text('{"id": "bad-rec')  # a record cut short
    tensors = next((streams / "bad-snapshot").glob("*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:40])  # a snapshot cut short
    server = Server(ServeConfig(state_dir=str(tmp_path)), models)
    try:
        server.restore_all()
        assert sorted(server.streams) == ["good"] and sorted(server.chats.sessions) == ["c1"]
        assert server.restore_one("stream", "bad-record") is False
    finally:
        server.engine.close()
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert [m.split(" (")[0] for m in logged] == ["could not resume stream bad-record", "could not resume stream bad-snapshot",
                                                  "could not resume stream bad-record"]
    assert (streams / "bad-record").is_dir() and (streams / "bad-snapshot.json").is_file()  # left for a person to see


def test_a_request_after_one_whose_client_went_waits_for_its_last_step(models, monkeypatch):
    """A cancelled request (its client gone) releases the session while its decode step still runs on the engine:
    the next request must not start the cache over under that step."""
    import threading

    from livekv.serve.chat import Chats
    from livekv.serve.schemas import ChatCompletionRequest

    inside, go, feed = threading.Event(), threading.Event(), Chats._feed

    def held(self, session, ids):
        if len(ids) == 1 and not go.is_set():  # a decode step of the first request
            inside.set()
            assert go.wait(30)
        return feed(self, session, ids)

    async def answer(chats, body, session):
        return [delta async for delta, _ in chats.complete(body, session, chats.prompt(body))]

    async def run():
        server = Server(ServeConfig(), models)
        chats = server.chats
        story = ChatCompletionRequest(**{**CHAT, "session": "s", "max_tokens": 20})
        session = chats.session(story, *chats.method_of(story), 0)
        monkeypatch.setattr(Chats, "_feed", held)
        gone = asyncio.create_task(answer(chats, story, session))
        assert await asyncio.to_thread(inside.wait, 30)
        gone.cancel()  # as Starlette does when a streaming client disconnects
        with pytest.raises(asyncio.CancelledError):
            await gone
        other = ChatCompletionRequest(**{**CHAT, "session": "s", "max_tokens": 4,
                                         "messages": [{"role": "user", "content": "What is two plus two?"}]})
        second = asyncio.create_task(answer(chats, other, session))
        await asyncio.sleep(0.3)
        go.set()
        await second
        server.engine.close()
        return chats.prompt(other), session

    prompt, session = asyncio.run(run())
    assert session.tokens[: len(prompt)] == prompt  # nothing of the first request in front of the conversation
    assert {layer.get_seq_length() for layer in session.cache.layers} == {len(session.tokens)}


def test_a_session_answering_a_question_does_not_expire(models):
    from livekv.serve.schemas import StreamCreate

    async def run():
        server = Server(ServeConfig(idle_timeout_s=60), models)
        try:
            stream = server.create_stream(StreamCreate(method="full"), "s")
            chat = server.chats.session(type("R", (), {"session": "c"})(), "dense", {}, 0)
            stream.last_used = chat.last_used = time.monotonic() - 120
            async with stream.ask_lock, chat.lock:  # a question (and a chat turn) longer than the idle timeout
                await server.expire_idle()
                held = sorted(server.streams), sorted(server.chats.sessions)
            await server.expire_idle()
            return held, sorted(server.streams), sorted(server.chats.sessions)
        finally:
            server.engine.close()

    assert asyncio.run(run()) == ((["s"], ["c"]), [], [])


def test_the_periodic_snapshot_goes_on_after_a_failure(models, tmp_path, caplog):
    async def run():
        server = Server(ServeConfig(state_dir=str(tmp_path), snapshot_every_s=0.5), models)
        calls = []

        async def failing():
            calls.append(time.monotonic())
            raise OSError("No space left on device")

        server.save_all = failing
        task = asyncio.create_task(server.background())
        await asyncio.sleep(2.6)
        alive = not task.done()
        task.cancel()
        server.engine.close()
        return len(calls), alive

    calls, alive = asyncio.run(run())
    assert calls >= 2 and alive
    assert "the periodic expiry or snapshot failed" in caplog.text and "No space left" in caplog.text


def test_a_session_that_cannot_be_saved_does_not_stop_the_others(models, tmp_path, caplog):
    from livekv.serve.schemas import StreamCreate

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    async def run():
        server = Server(ServeConfig(state_dir=str(tmp_path)), models)
        try:
            for sid in ("a", "b"):
                server.create_stream(StreamCreate(method="full"), sid)
            server.chats.session(type("R", (), {"session": "c"})(), "dense", {}, 0)
            server.streams["a"].session.save = broken
            await server.save_all()
        finally:
            server.engine.close()

    asyncio.run(run())
    assert sorted(p.name for p in tmp_path.glob("*/*")) == ["b", "b.json", "c", "c.json"]
    assert "could not snapshot stream a" in caplog.text
