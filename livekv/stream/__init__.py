"""Live video streams: frames are encoded into a bounded stream memory as they arrive, questions are answered at
once from it (``StreamSession``); the methods that shape the memory are in ``livekv.methods`` (``names("stream")``)."""

from livekv.stream.session import StreamSession, StreamStats
from livekv.stream.source import Frame, VideoError, clips, frames, write_video

__all__ = ["Frame", "StreamSession", "StreamStats", "VideoError", "clips", "frames", "write_video"]
