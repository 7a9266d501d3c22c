import time
import wave

import av
import numpy as np
import pytest
from PIL import Image

from livekv.stream.source import Frame, VideoError, clips, frames, write_video

F, H, W, FPS = 24, 48, 64, 8  # the test video: 3 s, each frame its own solid colour, 88+ apart (L1) from the others
COLOURS = np.array([(40 + 88 * (i % 3), 40 + 88 * (i // 3 % 3), 40 + 88 * (i // 9)) for i in range(F)], np.uint8)


def solid_frames(n: int = F) -> np.ndarray:
    return np.broadcast_to(COLOURS[:n, None, None, :], (n, H, W, 3)).copy()


def source_index(image: np.ndarray) -> int:
    """The test-video frame whose colour is nearest to ``image``'s mean colour (robust to codec error)."""
    return int(np.abs(COLOURS - image.reshape(-1, 3).mean(0)).sum(1).argmin())


def read_all(source, **kwargs) -> tuple[list[Frame], VideoError | None]:
    got: list[Frame] = []
    try:
        for frame in frames(source, **kwargs):
            got.append(frame)
    except VideoError as e:
        return got, e
    return got, None


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("video") / "colours.mp4"
    write_video(path, solid_frames(), fps=FPS)
    return str(path)


@pytest.mark.parametrize(
    "fps, indices",
    [
        (2, [0, 4, 8, 12, 16, 20]),
        (0.5, [0, 16]),
        (3, [0, 3, 6, 8, 11, 14, 16, 19, 22]),  # the first frame at or after each k / 3 s
        (30, list(range(F))),  # faster than the source: every source frame exactly once
    ],
)
def test_video_sampled_at_fps(video, fps, indices):
    got = list(frames(video, fps=fps))
    assert [f.time for f in got] == pytest.approx([i / FPS for i in indices])
    for f in got:
        assert f.image.shape == (H, W, 3) and f.image.dtype == np.uint8
    assert [source_index(f.image) for f in got] == indices
    assert np.abs(got[-1].image.reshape(-1, 3).mean(0) - COLOURS[indices[-1]]).max() < 12


def test_video_size_and_max_frames(video):
    got = list(frames(video, fps=2, size=(32, 24), max_frames=3))
    assert [f.time for f in got] == [0.0, 0.5, 1.0]
    assert all(f.image.shape == (24, 32, 3) for f in got)
    assert [source_index(f.image) for f in got] == [0, 4, 8]
    assert list(frames(video, max_frames=0)) == []


def test_image_folder(tmp_path):
    images = solid_frames(4)
    for i in reversed(range(4)):  # written out of order: the order comes from the names
        Image.fromarray(images[i]).save(tmp_path / f"frame_{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    got = list(frames(tmp_path, fps=2))
    assert [f.time for f in got] == [0.0, 0.5, 1.0, 1.5]
    assert all(np.array_equal(f.image, images[i]) for i, f in enumerate(got))


def test_in_memory_array_and_generator():
    images = solid_frames(5)
    for source in (images, (image for image in images)):
        got = list(frames(source, fps=4))
        assert [f.time for f in got] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert all(np.array_equal(f.image, images[i]) for i, f in enumerate(got))
    resized = list(frames(images, size=(20, 10), max_frames=2))
    assert len(resized) == 2 and resized[0].image.shape == (10, 20, 3)
    assert source_index(resized[1].image) == 1


def test_realtime_pacing():
    it = frames(solid_frames(6), fps=20, realtime=True)
    next(it)
    start = time.monotonic()
    rest = list(it)
    assert len(rest) == 5
    assert time.monotonic() - start >= 5 / 20 * 0.9


def test_errors(tmp_path):
    with pytest.raises(VideoError, match="no such file"):
        list(frames(tmp_path / "missing.mp4"))
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="noise.mp4"):
        list(frames(noise))
    sound = tmp_path / "sound.wav"
    with wave.open(str(sound), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(1600))
    with pytest.raises(VideoError, match="no video stream"):
        list(frames(sound))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(VideoError, match="no images"):
        list(frames(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    with pytest.raises(VideoError, match="a.png"):
        list(frames(broken))
    with pytest.raises(VideoError, match=r"\[F, H, W, 3\] uint8"):
        list(frames(np.zeros((H, W, 3), np.uint8)))
    with pytest.raises(VideoError, match=r"\[F, H, W, 3\] uint8"):
        list(frames(np.zeros((2, H, W, 3), np.float32)))
    with pytest.raises(VideoError, match="no frames"):
        list(frames(np.zeros((0, H, W, 3), np.uint8)))
    got, error = read_all(iter([solid_frames(1)[0], np.zeros((H, W), np.uint8)]))
    assert len(got) == 1 and "frame 1" in str(error)
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 5, 6, 3), np.uint8))


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.02])
def test_truncated_video_raises(video, tmp_path, keep):
    """A cut in the frame data: PyAV yields the frames before the cut and then simply ends (no error); the
    container's frame count turns that into a VideoError. A cut in the header fails to open at all."""
    data = open(video, "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * keep)])
    got, error = read_all(cut, fps=100)
    assert error is not None and "cut.mp4" in str(error)
    assert len(got) < F
    # the last frame may come from the packet the cut went through, decoded as well as the codec could
    assert [source_index(f.image) for f in got[:-1]] == list(range(len(got) - 1))
    if keep == 0.9:
        assert len(got) > 0


def test_corrupt_video_raises_after_good_frames(video, tmp_path):
    data = bytearray(open(video, "rb").read())
    middle = len(data) * 3 // 4  # inside the frame data (the header comes first)
    data[middle : middle + 300] = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    got, error = read_all(bad, fps=100)
    assert 0 < len(got) < F
    assert "bad.mp4" in str(error) and isinstance(error.__cause__, av.FFmpegError)


def test_clips():
    grouped = list(clips(frames(solid_frames(5), fps=2), frames_per_clip=2))
    assert [t for t, _ in grouped] == [0.0, 1.0, 2.0]
    assert [c.shape for _, c in grouped] == [(2, H, W, 3), (2, H, W, 3), (1, H, W, 3)]
    assert np.array_equal(np.concatenate([c for _, c in grouped]), solid_frames(5))
    with pytest.raises(ValueError):
        next(clips(iter([]), 0))


def test_a_clip_of_frames_of_different_sizes_is_a_video_error():
    shapes = [(8, 8, 3), (8, 8, 3), (8, 12, 3)]
    source = (Frame(float(i), np.zeros(shape, np.uint8)) for i, shape in enumerate(shapes))
    with pytest.raises(VideoError, match="different sizes"):
        list(clips(source, 3))
