"""Frame input for a live-video streaming session.

``frames(source, fps)`` turns any of these into an iterator of ``Frame(time, image [H, W, 3] uint8 RGB)``:

* a video file path, or a URL (``rtsp://``, ``http(s)://``, ``udp://``, ...): decoded with PyAV and sampled at
  ``fps`` by the frames' timestamps;
* a camera, ``"device:<name>"``: ``device:/dev/video0`` (Linux, v4l2), ``device:0`` (macOS, avfoundation camera
  index), ``device:video=<camera name>`` (Windows, dshow);
* a folder of images (png, jpg, jpeg, bmp, webp), sorted by file name;
* in-memory frames: an array ``[F, H, W, 3]`` uint8, or an iterable of ``[H, W, 3]`` uint8 arrays;
* an open binary file holding a video (e.g. ``io.BytesIO`` of an uploaded chunk).

Images and in-memory frames are consecutive frames ``1 / fps`` seconds apart, every one of them used.
``clips`` groups frames into ``[F, H, W, 3]`` clips; ``write_video`` encodes frames to a file (tests, demos).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_CAMERA_FORMATS = {"linux": "v4l2", "darwin": "avfoundation", "win32": "dshow"}
# Without a timeout a stalled network stream blocks the session forever; with it PyAV raises (-> VideoError).
_NETWORK_TIMEOUT_S = 10.0
# Slack for comparing float timestamps with sampling instants (pts * time_base is rarely exact in floats).
_EPS = 1e-6


class VideoError(ValueError):
    """The source cannot be read: missing, not a video, corrupt, truncated, empty, or frames of the wrong shape."""


@dataclass
class Frame:
    """One frame: ``time`` in seconds since the stream's first frame, ``image [H, W, 3]`` uint8 RGB."""

    time: float
    image: np.ndarray


def frames(
    source: str | os.PathLike | np.ndarray | Iterable[np.ndarray],
    fps: float = 0.5,
    realtime: bool = False,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
) -> Iterator[Frame]:
    """Frames of ``source`` (see the module docstring for what it may be), in time order.

    A decoded video is sampled at ``fps``: for each instant ``k / fps`` the first frame at or after it is taken
    (a frame covering several instants is taken once), so a source slower than ``fps`` gives each of its frames
    at most once. Times are the frames' own timestamps, relative to the first frame. ``realtime`` paces the
    frames against the wall clock (a frame at time ``t`` comes no earlier than ``t`` seconds after the first);
    ``size = (W, H)`` resizes (bilinear); ``max_frames`` stops early.

    Raises ``VideoError`` for a missing path, an empty folder or a badly shaped array at once; for content that
    cannot be decoded while iterating, after the frames decoded before the failure.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (W, H) with positive W and H, got {size}")
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")
    return _finish(_open(source, fps), realtime, size, max_frames)


def clips(frame_iter: Iterable[Frame], frames_per_clip: int) -> Iterator[tuple[float, np.ndarray]]:
    """Group frames into ``(time of the clip's first frame, clip [F, H, W, 3] uint8)``, ``F = frames_per_clip``
    except for the last clip, which has the frames that are left. The frames of a clip must have one shape."""
    if frames_per_clip < 1:
        raise ValueError(f"frames_per_clip must be >= 1, got {frames_per_clip}")
    group: list[Frame] = []
    for frame in frame_iter:
        group.append(frame)
        if len(group) == frames_per_clip:
            yield group[0].time, _stack(group)
            group = []
    if group:
        yield group[0].time, _stack(group)


def _stack(group: list[Frame]) -> np.ndarray:
    shapes = {f.image.shape for f in group}
    if len(shapes) > 1:
        raise VideoError(f"the frames from {group[0].time:.2f} s on have different sizes {sorted(shapes)}: one clip "
                         "takes frames of one size (use a clip of one frame)")
    return np.stack([f.image for f in group])


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 4.0, codec: str = "mpeg4") -> None:
    """Encode ``frames [F, H, W, 3]`` uint8 RGB to ``path`` (container from the suffix) as yuv420p, which needs
    even ``H`` and ``W``."""
    if not _is_rgb(frames, ndim=4):
        raise ValueError(f"frames must be a [F, H, W, 3] uint8 array, got {_describe(frames)}")
    _, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise ValueError(f"yuv420p needs even height and width, got {H}x{W} (H x W)")
    # moov first: the file streams over http, and a truncated copy stays readable up to the cut.
    options = {"movflags": "faststart"} if Path(path).suffix.lower() in (".mp4", ".mov", ".m4v") else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def _open(source, fps: float) -> Iterator[Frame]:
    if isinstance(source, np.ndarray):
        if not _is_rgb(source, ndim=4):
            raise VideoError(f"frames array must be [F, H, W, 3] uint8, got {_describe(source)}")
        if len(source) == 0:
            raise VideoError("frames array has no frames")
        return _arrays(source, fps)
    if isinstance(source, str) and source.startswith("device:"):
        device = source.removeprefix("device:")
        fmt = _CAMERA_FORMATS.get(sys.platform)
        if fmt is None:
            raise VideoError(f"{source}: cameras are not supported on {sys.platform}")
        # avfoundation's default rate (29.97) is refused by most cameras; 30 is the one they all offer.
        options = {"framerate": "30"} if fmt == "avfoundation" else {}
        return _video(device, fps, source, format=fmt, options=options)
    if isinstance(source, str) and "://" in source:
        return _video(source, fps, source, timeout=_NETWORK_TIMEOUT_S)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            images = sorted((p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES), key=lambda p: p.name)
            if not images:
                raise VideoError(f"{path}: folder has no images ({', '.join(_IMAGE_SUFFIXES)})")
            return _images(images, fps)
        if not path.exists():
            raise VideoError(f"{path}: no such file or folder")
        return _video(str(path), fps, str(path))
    if hasattr(source, "read"):  # an open binary file, e.g. an uploaded video chunk in a BytesIO
        return _video(source, fps, getattr(source, "name", "video data"))
    if isinstance(source, Iterable):
        return _arrays(source, fps)
    raise VideoError(f"unsupported frame source: {type(source).__name__}")


def _video(target, fps: float, name: str, **open_kwargs) -> Iterator[Frame]:
    try:
        container = av.open(target, **open_kwargs)
    except av.FFmpegError as e:
        raise VideoError(f"{name}: cannot open as video: {e}") from e
    try:
        yield from _decode(container, fps, name)
    finally:
        container.close()


def _decode(container: av.container.InputContainer, fps: float, name: str) -> Iterator[Frame]:
    if not container.streams.video:
        raise VideoError(f"{name}: no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    decoded = packets = 0
    origin: float | None = None
    next_time = 0.0
    try:
        for packet in container.demux(stream):
            if packet.size or packet.dts is not None:  # not the empty packet PyAV adds at the end to flush
                packets += 1
            for frame in packet.decode():
                if frame.time is not None:
                    t = frame.time
                elif rate:
                    t = decoded / float(rate)
                else:
                    raise VideoError(f"{name}: frames have neither timestamps nor a frame rate")
                decoded += 1
                origin = t if origin is None else origin
                t -= origin
                if t < next_time - _EPS:
                    continue
                next_time = (math.floor((t + _EPS) * fps) + 1) / fps
                yield Frame(t, frame.to_ndarray(format="rgb24"))
    except av.FFmpegError as e:
        raise VideoError(f"{name}: decoding failed after {decoded} frames: {e}") from e
    if decoded == 0:
        raise VideoError(f"{name}: no decodable video frames")
    # PyAV reads a truncated file as a shorter one, without an error (the demuxer reports end of file at the
    # cut); the container's frame count (0 when unknown: live streams, mkv, ...) tells it apart. Packets, not
    # decoded frames, are counted: an edit list may legitimately drop some decoded frames.
    if packets < stream.frames:
        raise VideoError(f"{name}: truncated or corrupt: {packets} of {stream.frames} frames could be read")


def _images(paths: list[Path], fps: float) -> Iterator[Frame]:
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        except OSError as e:  # PIL's UnidentifiedImageError and truncated-file errors are OSErrors
            raise VideoError(f"{path}: cannot read image: {e}") from e
        yield Frame(i / fps, image)


def _arrays(images: Iterable[np.ndarray], fps: float) -> Iterator[Frame]:
    count = 0
    for image in images:
        if not _is_rgb(image, ndim=3):
            raise VideoError(f"frame {count} must be an [H, W, 3] uint8 array, got {_describe(image)}")
        yield Frame(count / fps, image)
        count += 1
    if count == 0:
        raise VideoError("frame source has no frames")


def _finish(
    raw: Iterator[Frame], realtime: bool, size: tuple[int, int] | None, max_frames: int | None
) -> Iterator[Frame]:
    if max_frames == 0:
        return
    with contextlib.closing(raw):  # stopping early (max_frames, or the caller's close) closes the container
        start: float | None = None
        for n, frame in enumerate(raw, 1):
            if size is not None and (frame.image.shape[1], frame.image.shape[0]) != tuple(size):
                resized = Image.fromarray(frame.image).resize(tuple(size), Image.Resampling.BILINEAR)
                frame.image = np.asarray(resized)
            if realtime:
                start = time.monotonic() - frame.time if start is None else start
                time.sleep(max(0.0, start + frame.time - time.monotonic()))
            yield frame
            if n == max_frames:
                return


def _is_rgb(x, ndim: int) -> bool:
    """Whether ``x`` is a uint8 array of ``ndim`` dimensions, the last one 3 (RGB)."""
    return isinstance(x, np.ndarray) and x.ndim == ndim and x.shape[-1] == 3 and x.dtype == np.uint8


def _describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"array {list(x.shape)} {x.dtype}"
    return type(x).__name__
