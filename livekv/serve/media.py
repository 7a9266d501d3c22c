"""Frames from what clients upload: an image (JPEG, PNG, WebP, BMP) or a chunk of video (MP4, WebM, MKV, MOV),
checked against the server's limits before anything is decoded in full."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from livekv.stream.source import VideoError, frames

IMAGE_TYPES = {"image/jpeg", "image/png", "image/webp", "image/bmp"}
VIDEO_TYPES = {"video/mp4", "video/webm", "video/x-matroska", "video/quicktime"}


def image_type(data: bytes) -> str:
    """The content type of a frame sent as bare bytes (a WebSocket message): PNG, WebP, else JPEG."""
    return "image/png" if data[:4] == b"\x89PNG" else "image/webp" if data[8:12] == b"WEBP" else "image/jpeg"


class MediaError(ValueError):
    """Media a request cannot use: ``status`` 413 (too large), 415 (unsupported type) or 400 (corrupt)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def decode(data: bytes, content_type: str | None, fps: float, max_bytes: int, max_pixels: int,
           max_frames: int) -> list[np.ndarray]:
    """``[H, W, 3]`` uint8 RGB frames of an uploaded image or video chunk (a video sampled at ``fps``, at most
    ``max_frames`` of it: a small file can hold many frames)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if len(data) > max_bytes:
        raise MediaError(f"upload of {len(data)} bytes exceeds the limit of {max_bytes}", 413)
    if not data:
        raise MediaError("empty upload", 400)
    if kind in IMAGE_TYPES:
        return [image(data, max_pixels)]
    if kind in VIDEO_TYPES:
        return video(data, fps, max_pixels, max_frames)
    raise MediaError(f"unsupported media type {kind or '(none)'!r}: send one of "
                     f"{', '.join(sorted(IMAGE_TYPES | VIDEO_TYPES))}", 415)


def image(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            _check_size(*im.size, max_pixels)  # before decoding the pixels
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise MediaError(f"corrupt or unreadable image: {e}", 400) from None


def video(data: bytes, fps: float, max_pixels: int, max_frames: int) -> list[np.ndarray]:
    out = []
    try:
        for frame in frames(io.BytesIO(data), fps=fps):
            _check_size(frame.image.shape[1], frame.image.shape[0], max_pixels)
            if len(out) == max_frames:
                raise MediaError(f"the video chunk holds more than {max_frames} frames at the stream's {fps} fps (the "
                                 "most a stream queues): send shorter chunks", 413)
            out.append(frame.image)
    except VideoError as e:
        raise MediaError(f"corrupt or unreadable video: {e}", 400) from None
    return out


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise MediaError(f"a frame of {width}x{height} exceeds the limit of {max_pixels} pixels", 413)
