"""The browser page of ``livekv serve``, driven end to end in a real headless Chromium (Debian's ``chromium``) with
Playwright's Python package pointed at that browser (``playwright install`` is never run).

The camera is Chromium's fake capture device playing a .y4m file the test writes from a rendered ``World`` (frames
scaled up to 240 px); the file test hands the page a WebM of another World through its file input. Each test asks a
question whose answer the world's ground truth fixes and waits for the right answer on the page.

With ``LIVEKV_SCREENSHOTS=DIR`` the camera test also saves the page at desktop (1280x800) and phone (390x844) width
into DIR (``docs/screenshots`` holds the committed ones).
"""

import os
import pathlib
import shutil
import subprocess
import tempfile
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="livekv serve needs fastapi and uvicorn")
pytest.importorskip("uvicorn", reason="livekv serve needs fastapi and uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="the page tests need Playwright (pip install playwright)")

from serve_fixtures import free_port, serving  # noqa: E402

from livekv.serve import ServeConfig  # noqa: E402
from livekv.serve.server import load_models  # noqa: E402
from livekv.stream.source import write_video  # noqa: E402
from livekv.vlm.world import NUMBERS, World  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# The flags a root process needs for Chromium on these machines (see the environment notes): no sandbox, no GPU,
# and none of the background connections that the closed network would refuse; Playwright adds its own as well.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FAKE_CAMERA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
SIZE = 240  # the camera's and the file's frames: the world's 48 px scaled up 5x; the page scales them back down
CAMERA = dict(seed=0, start=16, seconds=10)  # three objects throughout (one of them moves at 24 s)
FILE = dict(seed=10, start=20, seconds=12)  # two objects, then three, then four for its last 6 seconds


def chromium() -> str:
    """The system Chromium, installed with apt-get when missing (as root); the test skips when it cannot be."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run("apt-get update -q && apt-get install -y -q chromium chromium-driver", shell=True,
                           env=env, capture_output=True, timeout=900)
        except subprocess.TimeoutExpired:
            pass
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("Chromium not found: install Debian's chromium (apt-get install -y chromium chromium-driver)")
    return found


def frames(world: World, start: float, seconds: float, fps: float) -> list[np.ndarray]:
    """The world from ``start`` for ``seconds`` at ``fps``, each frame scaled up to SIZE px (nearest)."""
    scale = SIZE // world.size
    return [world.render(start + k / fps).repeat(scale, 0).repeat(scale, 1) for k in range(round(seconds * fps))]


def write_y4m(path: pathlib.Path, images: list[np.ndarray], fps: int) -> None:
    """A YUV4MPEG2 file (4:2:0, BT.601 studio range), what Chromium's fake camera plays (in a loop)."""
    h, w = images[0].shape[:2]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for image in images:
            r, g, b = (image[..., i].astype(np.float32) for i in range(3))
            y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
            u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
            v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
            f.write(b"FRAME\n")
            for plane in (y, *(c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) for c in (u, v))):
                f.write(np.clip(np.rint(plane), 0, 255).astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    camera = World(seed=CAMERA["seed"], duration_s=CAMERA["start"] + CAMERA["seconds"])
    write_y4m(root / "camera.y4m", frames(camera, CAMERA["start"], CAMERA["seconds"], 2), fps=2)
    played = World(seed=FILE["seed"], duration_s=FILE["start"] + FILE["seconds"])
    write_video(root / "world.webm", np.stack(frames(played, FILE["start"], FILE["seconds"], 4)), fps=4, codec="libvpx")
    return root, camera, played


@pytest.fixture(scope="module")
def models():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the other core is Chromium's
    yield load_models(ServeConfig(model="none"))  # the video model only: the page asks streams, not chat
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser(media):
    executable = chromium()
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory(prefix="livekv-chromium-") as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, viewport={"width": 1280, "height": 800},
            args=FLAGS + FAKE_CAMERA + [f"--use-file-for-fake-video-capture={media[0] / 'camera.y4m'}"])
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield page
    page.close()
    assert not errors, f"the page raised or logged errors: {errors}"


def answer_of(page, question_id: str, role: str, timeout_ms: int = 30_000) -> dict:
    """The reply of one session (``method`` or ``full``) to a question, once it is done."""
    page.wait_for_function("([id, role]) => { const a = window.livekv.answers.find((x) => x.id === id);"
                           " return a && a.replies[role] && a.replies[role].done; }",
                           arg=[question_id, role], timeout=timeout_ms)
    return page.evaluate("([id, role]) => { const r = window.livekv.answers.find((x) => x.id === id).replies[role];"
                         " return {text: r.text, ttft_ms: r.ttft_ms, error: r.error}; }", [question_id, role])


def memory_held(points: list[dict], after_frames: int) -> int:
    """The fast-tier bytes a bounded session holds once ``after_frames`` frames are in: the same at every stats
    event from then on, and never more before."""
    full = [p for p in points if p["ingested"] >= after_frames]
    held = full[0]["used"]
    assert held > 0 and all(p["used"] == held for p in full) and max(p["used"] for p in points) == held, points
    return held


def counters(page) -> dict:
    return page.evaluate("Object.fromEntries(window.livekv.streams.map((s) => [s.role, s.record.frames]))")


def screenshots(page, folder: pathlib.Path) -> None:
    """The page at desktop and at phone width (the whole page), as small palette PNGs."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=folder / "page-desktop.png")
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(1500)  # the charts redraw at the new width
    page.screenshot(path=folder / "page-phone.png", full_page=True)
    page.set_viewport_size({"width": 1280, "height": 800})
    for name in ("page-desktop.png", "page-phone.png"):
        with Image.open(folder / name) as image:
            small = image.convert("RGB").quantize(colors=96, dither=Image.Dither.NONE)
        small.save(folder / name, optimize=True)


def test_the_camera_streams_to_livevlm_beside_full_and_the_count_is_answered(models, media, page):
    _, world, _ = media
    truth = {len(world.state(CAMERA["start"] + k / 2)) for k in range(2 * CAMERA["seconds"])}
    assert truth == {3}  # the question below has one right answer whatever frame the camera is at
    t0 = time.monotonic()
    with serving(ServeConfig(port=free_port()), models) as url:
        page.goto(url)
        page.wait_for_selector("#forms li[data-kind=count_now] button")
        assert page.locator("#key-row").is_hidden()
        assert page.is_checked("input[name=source][value=camera]")  # the default; Start opens it
        page.select_option("#method", "livevlm")
        page.fill("#memory", "56")
        assert page.is_checked("#compare") and page.input_value("#rate") == "2"
        page.click("#start")
        page.wait_for_function("window.livekv.running && window.livekv.streams.length === 2")
        assert page.evaluate("document.getElementById('video').videoWidth") == SIZE  # the fake camera's frames
        # livevlm's memory (56 tokens + the system prompt) is full after 6 frames; then it holds still while
        # full's keeps growing, for 8 more seconds of points
        page.wait_for_function("(window.livekv.series.method || []).filter((p) => p.ingested >= 8).length >= 8",
                               timeout=40_000)
        series = page.evaluate("window.livekv.series")  # what the memory chart plots, a point per stats event
        held = memory_held(series["method"], after_frames=8)
        grown = [p["used"] for p in series["full"] if p["ingested"] >= 8]
        assert len(grown) >= 4 and grown == sorted(grown) and grown[-1] > grown[0] > held  # full: more and more
        page.fill("#question", "")
        page.click("#forms li[data-kind=count_now] button")
        assert page.input_value("#question") == "how many objects are there now ?"
        count = answer_of(page, "q1", "method")
        full = answer_of(page, "q1", "full")
        assert count["error"] is None and count["text"].strip() == NUMBERS[2] == full["text"].strip()
        assert count["ttft_ms"] > 0
        assert page.locator("#answers li[data-id=q1] [data-role=method] .text").inner_text() == NUMBERS[2]
        assert "TTFT" in page.locator("#answers li[data-id=q1] [data-role=method] .meta").inner_text()
        # a question with slots, set in the list's selects: the square at the top right is purple throughout
        row = page.locator("#forms li[data-kind=colour_at]")
        row.locator("select[aria-label=shape]").select_option("square")
        row.locator("select[aria-label=cell]").select_option("top right")
        row.locator("button").click()
        assert answer_of(page, "q2", "method")["text"].strip() == "purple"

        sid = page.evaluate("window.livekv.streams[0].id")
        assert httpx.get(f"{url}/v1/streams/{sid}").json()["memory"]["fast"]["used"] == held  # after the answers
        frames_now = counters(page)
        sent = page.evaluate("window.livekv.sent")
        assert frames_now["method"]["ingested"] >= 12 and frames_now["method"]["dropped"] == 0
        assert sent >= frames_now["method"]["seen"] >= frames_now["method"]["ingested"]
        assert page.locator("[data-k=ingested]").inner_text() != "0"

        shots = os.environ.get("LIVEKV_SCREENSHOTS")
        if shots:
            screenshots(page, pathlib.Path(shots))
        page.click("#stop")
        page.wait_for_function("!window.livekv.running")
    assert time.monotonic() - t0 < 60


def test_a_video_file_plays_into_a_keyed_server_and_its_last_count_is_answered(models, media, page):
    root, _, world = media
    end = FILE["start"] + FILE["seconds"]
    assert {len(world.state(t)) for t in np.arange(end - 5, end, 0.5)} == {4}  # the end: four objects, still
    assert len(world.state(FILE["start"])) == 2
    t0 = time.monotonic()
    with serving(ServeConfig(port=free_port(), api_key="sekret"), models) as url:
        page.goto(url)
        page.wait_for_selector("#key-row:not([hidden])")
        page.fill("#key", "sekret")
        page.set_input_files("#file", str(root / "world.webm"))
        assert page.is_checked("input[name=source][value=file]")
        page.wait_for_function("document.getElementById('video').readyState >= 2")
        page.select_option("#method", "livevlm")
        page.uncheck("#compare")
        page.click("#start")
        page.wait_for_function("window.livekv.running", timeout=10_000)
        assert page.evaluate("window.livekv.streams.length") == 1
        page.wait_for_function("document.getElementById('video').ended", timeout=FILE["seconds"] * 1000 + 20_000)
        page.wait_for_function("(() => { const f = window.livekv.streams[0].record.frames;"
                               " return f.queued === 0 && f.seen === window.livekv.sent; })()", timeout=10_000)
        page.fill("#question", "how many objects are there now ?")
        page.click("#ask")
        reply = answer_of(page, "q1", "method")
        assert reply["error"] is None and reply["text"].strip() == NUMBERS[3]
        frames_now = counters(page)["method"]
        assert frames_now["ingested"] >= 2 * FILE["seconds"] - 4 and frames_now["dropped"] == 0
        page.click("#stop")
        page.wait_for_function("!window.livekv.running")
    assert time.monotonic() - t0 < 60
