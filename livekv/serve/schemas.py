"""Request bodies of the HTTP API (pydantic): OpenAI's chat completion request with livekv's own fields, and the
live video stream resource."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SESSION_ID = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*$"  # also names the session's files in --state-dir
SERVER_KNOBS = ("host_dir",)  # where the server writes files is the server's choice


def problems(errors: list[dict], skip: int = 0) -> str:
    """Pydantic's ``errors()`` as one line, ``field: what is wrong; ...`` (``skip``: leading parts of each
    location left out, such as FastAPI's ``body``)."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'][skip:])}: {err['msg']}" for err in errors)


def client_knobs(knobs: dict[str, Any]) -> dict[str, Any]:
    """``knobs`` as a client sent them (``ValueError`` for a knob only the server sets)."""
    chosen = sorted(set(knobs) & set(SERVER_KNOBS))
    if chosen:
        raise ValueError(f"{', '.join(chosen)}: set by the server, not by a request")
    return knobs


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text (text parts joined; other parts, e.g. images, are refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        unsupported = {p.type for p in self.content if p.type != "text"}
        if unsupported:
            raise ValueError(f"unsupported content part(s) {sorted(unsupported)}: chat takes text; send video to a "
                             "stream (/v1/streams) and ask it with stream_id")
        return "".join(p.text or "" for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's ``POST /v1/chat/completions`` body. livekv's own fields: ``method`` and ``budget`` (or any knobs of
    the method in ``knobs``) choose the KV method; ``session`` keeps one cache across turns (a turn that extends the
    conversation prefills only its new tokens); ``stream_id`` asks a live video stream instead (the last user
    message is the question)."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    method: str | None = None
    budget: int | None = Field(default=None, ge=1)
    knobs: dict[str, Any] = Field(default_factory=dict)
    session: str | None = Field(default=None, max_length=128, pattern=SESSION_ID)
    stream_id: str | None = None

    @field_validator("knobs")
    @classmethod
    def _knobs(cls, knobs):
        return client_knobs(knobs)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def limit(self, cap: int) -> int:
        return min(self.max_completion_tokens or self.max_tokens or cap, cap)


class StreamSource(BaseModel):
    """Where a stream's frames come from: pushed by the client, or read by the server from a file under its media
    directory or from a URL (only with ``--allow-urls``). ``realtime``: read at the video's own pace (a URL is a
    live source: always)."""

    type: Literal["push", "file", "url"] = "push"
    path: str | None = None
    url: str | None = None
    realtime: bool = False


class StreamCreate(BaseModel):
    """``POST /v1/streams``: a live video session with a method (and its knobs), a memory budget and a source."""

    model_config = ConfigDict(extra="forbid")
    method: str | None = None
    memory_tokens: int | None = Field(default=None, ge=1)
    knobs: dict[str, Any] = Field(default_factory=dict)
    source: StreamSource = Field(default_factory=StreamSource)
    fps: float = Field(default=0.5, gt=0.0, le=60.0)
    system: str | None = Field(default=None, max_length=4096)

    @field_validator("knobs")
    @classmethod
    def _knobs(cls, knobs):
        return client_knobs(knobs)


class AskRequest(BaseModel):
    """``POST /v1/streams/{id}/ask``: a question about what the stream has shown so far."""

    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=16384)
    max_tokens: int = Field(default=16, ge=1)
    stream: bool = True


class StreamCounters(BaseModel):
    """A stream's frame counters as a snapshot's record holds them (``livekv.serve.streams.Counters``)."""

    model_config = ConfigDict(extra="forbid")
    seen: int = Field(ge=0)
    ingested: int = Field(ge=0)
    dropped: int = Field(ge=0)
    lost: int = Field(default=0, ge=0)
    snapshot_frames: int = Field(default=0, ge=0)
    questions: int = Field(default=0, ge=0)
    last_ttft_ms: float | None = None
    source_error: str | None = None


class StreamRecord(BaseModel):
    """What a stream snapshot keeps besides the session (``record.json`` of ``GET /v1/streams/{id}/snapshot``, or
    ``<id>.json`` in ``--state-dir``): checked before anything is restored."""

    id: str = Field(max_length=128, pattern=SESSION_ID)
    spec: StreamCreate
    counters: StreamCounters
    created: float
    queued: int = Field(default=0, ge=0)
