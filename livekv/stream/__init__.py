"""Live video streams: frames are encoded into a bounded stream memory as they arrive, questions are answered at
once from it (``StreamSession``); the methods that shape the memory are in ``livekv.stream.methods``."""

from livekv.stream.methods import STREAM_METHODS, StreamMethod, make_stream_method
from livekv.stream.session import StreamSession, StreamStats
from livekv.stream.source import Frame, VideoError, clips, frames, write_video

__all__ = ["STREAM_METHODS", "Frame", "StreamMethod", "StreamSession", "StreamStats", "VideoError", "clips", "frames",
           "make_stream_method", "write_video"]
