"""The server's settings: what ``livekv serve`` takes on its command line (one option per field, its help from the
field), with the limits on what clients may send."""

from __future__ import annotations

import dataclasses
import os
import secrets
from dataclasses import dataclass

from livekv.quantize import check_weights


def setting(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class ServeConfig:
    """Settings of ``livekv serve``."""

    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "port to listen on")
    model: str | None = setting(None, "text model: a local directory (default: the embedded SmolLM2-135M-Instruct; "
                                      "'none': no chat)")
    weights: str = setting("float32", "how the text model's linear layers' weights are stored: float32 (as loaded), "
                                      "bfloat16, int8 or int4 (weight-only, CPU only; livekv.quantize)")
    vlm: str | None = setting(None, "video model: a local LLaVA-OneVision or Qwen2-VL directory (default: the "
                                    "embedded one; 'none': no streams)")
    vlm_weights: str = setting("float32", "how the video model's language-model linear layers' weights are stored "
                                          "(lm_head too; the vision tower's stay float32), as --weights")
    methods: tuple[str, ...] = setting(("quest", "dense", "sink_window", "freekv", "clusterkv", "livevlm", "full",
                                        "rekv"), "methods clients may choose; the first text and the first stream "
                                                 "method are the defaults")
    threads: int | None = setting(None, "torch threads of the model thread (default: torch's choice)")
    api_key: str | None = setting(os.environ.get("LIVEKV_API_KEY"), "required as 'Authorization: Bearer KEY' on "
                                  "/v1 (default: $LIVEKV_API_KEY; none: open)")
    cors_origins: tuple[str, ...] = setting((), "origins allowed by CORS (default: none, CORS off)")
    media_dir: str | None = setting(None, "stream sources given as a file must lie under this directory")
    allow_urls: bool = setting(False, "stream sources may be URLs the server reads (rtsp, http, ...)")
    state_dir: str | None = setting(None, "snapshot live sessions here (every --snapshot-every-s and on shutdown) "
                                          "and resume them at start")
    snapshot_every_s: float = setting(60.0, "seconds between snapshots into --state-dir")
    max_sessions: int = setting(16, "most sessions (chat and stream) held at once; more get 429")
    max_upload_bytes: int = setting(16 << 20, "largest upload (a frame, a video chunk), bytes; more get 413")
    max_request_bytes: int = setting(4 << 20, "largest JSON request body (a chat's messages, a question), bytes; "
                                              "more get 413")
    max_snapshot_bytes: int = setting(4 << 30, "largest session snapshot a client may upload to "
                                               "/v1/streams/restore, bytes (it is held in memory); more get 413")
    max_frame_pixels: int = setting(4096 * 4096, "largest frame, pixels; more get 413")
    max_queue_frames: int = setting(64, "frames a stream queues before it drops the oldest (and the most frames one "
                                        "video chunk may hold; more get 413)")
    max_tokens: int = setting(512, "most tokens one answer may generate")
    max_prompt_tokens: int = setting(8192, "longest chat prompt, tokens")
    idle_timeout_s: float = setting(3600.0, "sessions unused this long end")
    generation_timeout_s: float = setting(120.0, "an answer stops after this many seconds")
    clip_frames: int = setting(1, "frames per clip a stream ingests at once")

    def accepts(self, authorization: str | None, query_key: str | None = None) -> bool:
        """Whether a request may pass: no key is set, or it gives it (``Bearer KEY``, or ``?api_key=KEY`` where a
        client cannot set headers, such as a browser's WebSocket)."""
        if not self.api_key:
            return True
        given = authorization[7:].strip() if authorization and authorization.startswith("Bearer ") else query_key
        return given is not None and secrets.compare_digest(given.encode(), self.api_key.encode())

    def __post_init__(self):
        check_weights(self.weights)
        check_weights(self.vlm_weights)
        if self.media_dir is not None and not os.path.isdir(self.media_dir):
            raise ValueError(f"--media-dir {self.media_dir!r} is not a directory")
        for name in ("max_sessions", "max_upload_bytes", "max_request_bytes", "max_snapshot_bytes", "max_frame_pixels",
                     "max_queue_frames", "max_tokens", "clip_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RayConfig:
    """Settings of ``livekv serve --ray``: the same server as replicas of a Ray Serve application
    (``livekv.serve.ray``); sessions pinned to replicas and restored from ``--state-dir`` when theirs dies."""

    ray: bool = setting(False, "serve on Ray Serve: several replicas (on one machine or a Ray cluster), each "
                               "session pinned to one; needs ray[serve] (pip install 'livekv[ray]')")
    ray_address: str | None = setting(None, "the Ray cluster to join ('auto': the one `ray start` runs here; "
                                            "default: a new one on this machine)")
    replicas: int = setting(2, "replicas, each with its own models and sessions (ignored with --max-replicas)")
    min_replicas: int = setting(1, "autoscaling: fewest replicas (with --max-replicas)")
    max_replicas: int | None = setting(None, "autoscaling on ongoing requests between --min-replicas and this many")
    target_ongoing_requests: float = setting(8.0, "autoscaling: ongoing requests per replica it aims at")
    replica_cpus: float = setting(1.0, "CPUs Ray reserves for each replica (its torch threads default to this)")
    max_ongoing_requests: int = setting(64, "requests a replica takes at once (frames, questions, answers "
                                            "streaming); more wait in the router")

    def __post_init__(self):
        if self.replicas < 1 or self.min_replicas < 0:
            raise ValueError("replicas must be >= 1 and min_replicas >= 0")
        if self.max_replicas is not None and self.max_replicas < max(self.min_replicas, 1):
            raise ValueError("max_replicas must be >= min_replicas and >= 1")
