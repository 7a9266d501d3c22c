"""The registry of streaming methods (video streams), selectable by name."""

from __future__ import annotations

from livekv.methods import configure
from livekv.stream.methods.base import StreamMethod
from livekv.stream.methods.full import Full
from livekv.stream.methods.livevlm import LiveVLM
from livekv.stream.methods.rekv import ReKV
from livekv.stream.methods.sink_window import SinkWindow

STREAM_METHODS: dict[str, type[StreamMethod]] = {cls.name: cls for cls in (Full, SinkWindow, ReKV, LiveVLM)}


def make_stream_method(method: str | StreamMethod, *, ignore_unknown: bool = False, **knobs) -> StreamMethod:
    """A streaming method config from its name and knobs (``None`` knobs take the method's default)."""
    if isinstance(method, StreamMethod):
        if knobs:
            raise ValueError("pass knobs either in the StreamMethod or as keywords, not both")
        return method
    return configure(STREAM_METHODS, method, knobs, ignore_unknown)


__all__ = ["STREAM_METHODS", "StreamMethod", "make_stream_method"]
