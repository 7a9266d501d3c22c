"""A ``livekv serve --state-dir`` process killed (SIGTERM) mid-stream and started again resumes its sessions: the
stream goes on reading its file where it stopped, nothing is lost, and every answer is the one an uninterrupted
session gives; a chat session keeps its cache."""

import signal
import time

import httpx
import torch
from serve_fixtures import free_port, png, serve_process, wait_ingested

from livekv.vlm.world import World
from livekv.stream import StreamSession, frames
from livekv.vlm import load_default_vlm
from livekv.vlm.model import SYSTEM

QUESTIONS = ("how many objects are there now ?", "where is the first circle ?", "what colour is the first square ?")


def test_killed_and_restarted_server_resumes_with_the_same_answers(tmp_path):
    media, state = tmp_path / "media", tmp_path / "state"
    media.mkdir()
    world = World(seed=11, duration_s=1200)  # 600 frames: still being read when the server is stopped
    world.write_video(media / "world.mp4", fps=0.5)
    pushed = World(seed=12, duration_s=40)
    port = free_port()
    args = ("--state-dir", str(state), "--media-dir", str(media), "--snapshot-every-s", "3600")
    with serve_process(*args, port=port) as proc, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
        sid = c.post("/v1/streams", json={"method": "livevlm", "memory_tokens": 56,
                                          "source": {"type": "file", "path": "world.mp4"}}).json()["id"]
        pid = c.post("/v1/streams", json={"method": "full"}).json()["id"]
        for _, image in pushed.frames():
            c.post(f"/v1/streams/{pid}/frames", content=png(image), headers={"content-type": "image/png"})
        chat = c.post("/v1/chat/completions", json={"model": "x", "session": "c1", "method": "dense", "temperature": 0,
                                                    "max_tokens": 8, "messages": [{"role": "user", "content": "Hi!"}]})
        deadline = time.monotonic() + 300
        while c.get(f"/v1/streams/{sid}").json()["frames"]["ingested"] < 100:
            assert time.monotonic() < deadline, "the file source stalled"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
    assert sorted(p.name for p in (state / "streams").iterdir()) == sorted([sid, f"{sid}.json", pid, f"{pid}.json"])
    with serve_process(*args, port=port), httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
        info = wait_ingested(c, sid)
        assert info["frames"] == {**info["frames"], "seen": 600, "ingested": 600, "dropped": 0}
        assert c.get(f"/v1/streams/{pid}").json()["frames"]["ingested"] == len(pushed.frame_times)
        answers = {q: c.post(f"/v1/streams/{sid}/ask", json={"question": q, "stream": False, "max_tokens": 8}
                             ).json()["answer"] for q in QUESTIONS}
        pushed_answer = c.post(f"/v1/streams/{pid}/ask", json={"question": QUESTIONS[0], "stream": False}).json()
        messages = [{"role": "user", "content": "Hi!"}, chat.json()["choices"][0]["message"],
                    {"role": "user", "content": "How are you?"}]
        turn = c.post("/v1/chat/completions", json={"model": "x", "session": "c1", "method": "dense", "temperature": 0,
                                                    "max_tokens": 8, "messages": messages}).json()
        assert turn["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

    torch.set_num_threads(2)
    vlm = load_default_vlm()
    uninterrupted = StreamSession(vlm, "livevlm", system=SYSTEM, memory_tokens=56)
    for frame in frames(media / "world.mp4", fps=0.5):  # the frames the server decoded
        uninterrupted.push(frame.image[None])
    assert answers == {q: uninterrupted.answer(q, max_new_tokens=8) for q in QUESTIONS}
    reference = StreamSession(vlm, "full", system=SYSTEM)
    for _, image in pushed.frames():
        reference.push(image[None])
    assert pushed_answer["answer"] == reference.answer(QUESTIONS[0])
