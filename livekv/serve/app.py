"""The HTTP API of ``livekv serve`` (FastAPI): OpenAI-compatible chat, live video streams, snapshots.

    GET    /                                the browser page: camera or file in, answers out (static/; no key needed,
                                            the page asks for one when the server wants it)
    GET    /page.json                       what the page needs: stream methods, whether a key is needed, the video
                                            model's frame size and the questions the embedded model knows
    GET    /health                          liveness, sessions held, resident memory (no key needed)
    GET    /v1/models                       the text and video models served
    POST   /v1/chat/completions             OpenAI's chat completion (stream: SSE chunks); livekv's own fields:
                                            method, budget, knobs, session, stream_id
    GET    /v1/sessions/{id}                a chat session: tokens its cache holds, memory per tier; DELETE ends it
    POST   /v1/streams                      a live video session (method, memory_tokens, knobs, source, fps)
    GET    /v1/streams, /v1/streams/{id}    counters: frames seen / ingested / dropped, memory per tier, ingest fps
    POST   /v1/streams/{id}/frames          an image or a video chunk (the body; Content-Type says which)
    POST   /v1/streams/{id}/ask             a question (stream: SSE events ``delta``, ``done``; else JSON)
    WS     /v1/streams/{id}/ws              frames in (binary messages), questions in and events out (JSON)
    GET    /v1/streams/{id}/snapshot        the session as a tar archive; POST /v1/streams/restore takes one back
    DELETE /v1/streams/{id}                 end it

Errors are JSON in OpenAI's shape, ``{"error": {"message", "type", "code"}}``, with the status that fits.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib

from fastapi import Depends, FastAPI, HTTPException, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from livekv.serve import bodies, media, responses, state, ws
from livekv.serve.chat import SessionLimit
from livekv.serve.config import ServeConfig
from livekv.serve.schemas import AskRequest, ChatCompletionRequest, StreamCreate, StreamRecord, problems
from livekv.serve.server import Models, Server, load_models
from livekv.serve.streams import new_id
from livekv.snapshot import SnapshotError
from livekv.stream.session import StreamSession
from livekv.sysmem import rss_bytes

STATIC = pathlib.Path(__file__).parent / "static"
PAGE_METHODS = ("livevlm", "rekv", "sink_window", "full")  # the page's method switch, in create_stream's order
STATUS = {ValueError: 400, SnapshotError: 400, media.MediaError: 400, PermissionError: 403, KeyError: 404,
          SessionLimit: 429}


def create_app(config: ServeConfig, models: Models | None = None, server: Server | None = None) -> FastAPI:
    """The application (models loaded at start-up unless given). ``server``: one made and run by the caller (a Ray
    replica, ``livekv.serve.ray``): the app serves it, and its start-up and shutdown are the caller's."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if server is not None:
            yield
            return
        loaded = models or await asyncio.to_thread(load_models, config)
        s = app.state.server = Server(config, loaded)
        if config.state_dir:
            s.restore_all()
        task = asyncio.create_task(s.background())
        yield
        task.cancel()
        await s.shutdown()

    app = FastAPI(title="livekv", lifespan=lifespan)
    if server is not None:
        app.state.server = server
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(bodies.LimitBodies, limit=config.max_request_bytes)
    _errors(app)
    _routes(app, config)
    return app


def _errors(app: FastAPI) -> None:
    def body(status: int, message: str, kind: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's, and the router's own 404 and 405
    async def http_error(request, e: StarletteHTTPException):
        response = body(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")
        response.headers.update(e.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return body(400, problems(e.errors(), skip=1) or "invalid request", "invalid_request_error")

    for kind, status in STATUS.items():
        app.add_exception_handler(kind, _handler(body, status))


def _handler(body, status):
    async def handle(request, e):
        code = getattr(e, "status", status)
        message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        return body(code, message, "invalid_request_error" if code != 429 else "rate_limit_error")
    return handle


def _routes(app: FastAPI, config: ServeConfig) -> None:
    def authorized(request: Request) -> None:
        if not config.accepts(request.headers.get("authorization"), request.query_params.get("api_key")):
            raise HTTPException(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                headers={"WWW-Authenticate": "Bearer"})

    key = [Depends(authorized)]

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/page.json", include_in_schema=False)
    async def page_info(request: Request):
        return _page_info(config, _server(request).models)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health(request: Request):
        s = _server(request)
        return {"status": "ok", "sessions": s.sessions, "engine_jobs_pending": s.engine.pending,
                "rss_bytes": rss_bytes()}

    @app.get("/v1/models", dependencies=key)
    async def list_models(request: Request):
        m = _server(request).models
        data = [(m.text_id, "chat") if m.text else None, (m.vlm_id, "video streams") if m.vlm else None]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "livekv",
                                            "livekv": {"serves": what, "methods": list(config.methods)}}
                                           for i, what in filter(None, data)]}

    _chat_routes(app, key)
    _stream_routes(app, config, key)
    _snapshot_routes(app, config, key)


def _server(request: Request) -> Server:
    return request.app.state.server


def _chat_routes(app: FastAPI, key: list) -> None:
    @app.post("/v1/chat/completions", dependencies=key)
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        s = _server(request)
        stream_id = body.stream_id or (body.model.split("/", 1)[1] if body.model.startswith("stream/") else None)
        if stream_id:
            return await responses.ask_by_chat(s, body, stream_id)
        if s.chats is None:
            raise HTTPException(404, "this server has no text model (--model none)")
        prompt = await asyncio.to_thread(s.chats.prompt, body)  # a long prompt tokenizes off the event loop
        method, knobs = s.chats.method_of(body)
        session = s.chats.session(body, method, knobs, s.sessions)
        events = s.chats.complete(body, session, prompt, request.is_disconnected)
        if body.stream:
            return responses.sse(responses.chunks(body, events, s.models.text_id))
        return await responses.completion(body, events, s.models.text_id, lambda: s.chats.memory(session))

    @app.get("/v1/sessions/{sid}", dependencies=key)
    async def get_session(request: Request, sid: str):
        chats = _server(request).chats
        if chats is None or sid not in chats.sessions:
            raise KeyError(f"no session {sid!r}")
        chat = chats.sessions[sid]
        memory = await chats.memory(chat)  # first: after the step in progress, which may add a token
        return {"id": sid, "object": "session", "method": chat.method, "tokens": len(chat.tokens), "memory": memory}

    @app.delete("/v1/sessions/{sid}", dependencies=key)
    async def delete_session(request: Request, sid: str):
        _server(request).delete_chat(sid)
        return {"id": sid, "object": "session", "deleted": True}


def _stream_routes(app: FastAPI, config: ServeConfig, key: list) -> None:
    @app.post("/v1/streams", dependencies=key, status_code=201)
    async def create_stream(request: Request, body: StreamCreate):
        return _server(request).create_stream(body, _assigned_id(request)).stats()

    @app.get("/v1/streams", dependencies=key)
    async def list_streams(request: Request):
        return {"object": "list", "data": [st.stats() for st in _server(request).streams.values()]}

    @app.get("/v1/streams/{sid}", dependencies=key)
    async def get_stream(request: Request, sid: str):
        return _server(request).stream(sid).stats()

    @app.delete("/v1/streams/{sid}", dependencies=key)
    async def delete_stream(request: Request, sid: str):
        _server(request).delete_stream(sid)
        return {"id": sid, "object": "stream", "deleted": True}

    @app.post("/v1/streams/{sid}/frames", dependencies=key)
    async def push_frames(request: Request, sid: str):
        stream = _server(request).stream(sid)
        data = await bodies.read(request, config.max_upload_bytes)
        images = await asyncio.to_thread(media.decode, data, request.headers.get("content-type"),
                                         stream.spec["fps"], config.max_upload_bytes, config.max_frame_pixels,
                                         config.max_queue_frames)
        dropped = stream.push(images)
        return {"accepted": len(images), "dropped": dropped, "frames": stream.stats()["frames"]}

    @app.post("/v1/streams/{sid}/ask", dependencies=key)
    async def ask(request: Request, sid: str, body: AskRequest):
        stream = _server(request).stream(sid)
        answer = stream.ask(body.question, min(body.max_tokens, config.max_tokens))
        first = await responses.first_piece(answer)  # a question that cannot be answered fails here, as a 400
        if body.stream:
            return responses.sse(responses.ask_events(stream, first, answer))
        async with contextlib.aclosing(answer):
            text = first + "".join([piece async for piece in answer])
        return {"answer": text, "ttft_ms": stream.counters.last_ttft_ms, "frames_ingested": stream.counters.ingested}

    @app.websocket("/v1/streams/{sid}/ws")
    async def websocket(socket: WebSocket, sid: str):
        await ws.websocket(socket, sid, config)


def _snapshot_routes(app: FastAPI, config: ServeConfig, key: list) -> None:
    @app.get("/v1/streams/{sid}/snapshot", dependencies=key)
    async def snapshot(request: Request, sid: str):
        s = _server(request)
        with state.scratch() as tmp:
            record = await s.snapshot_stream(s.stream(sid), pathlib.Path(tmp, "snap"))
            data = state.to_tar(pathlib.Path(tmp, "snap"), record)
        return Response(data, media_type="application/x-tar",
                        headers={"Content-Disposition": f'attachment; filename="{sid}.tar"'})

    @app.post("/v1/streams/restore", dependencies=key, status_code=201)
    async def restore(request: Request):
        s = _server(request)
        s.check_room()
        data = await bodies.read(request, config.max_snapshot_bytes)

        def unpack(into: pathlib.Path) -> tuple[StreamRecord, StreamSession]:  # off the event loop: MBs of tensors
            return StreamRecord.model_validate(state.from_tar(data, into)), s.load_session(into, sent=True)

        with state.scratch() as tmp:
            record, session = await asyncio.to_thread(unpack, pathlib.Path(tmp, "snap"))
        s.check_room()  # again: others may have come while this one loaded
        return s.restore_stream(record, session, _assigned_id(request) or new_id()).stats()


def _page_info(config: ServeConfig, models: Models) -> dict:
    """What the browser page needs to know. ``questions``: the embedded model's question forms, from its world
    (``livekv.vlm.world``: it answers nothing else); ``None`` for another model, which takes free text."""
    questions, vlm = None, models.vlm
    if vlm is not None:
        from livekv.vlm.model import DefaultVLMAdapter

        if isinstance(vlm, DefaultVLMAdapter):
            from livekv.vlm import world

            slots = {"colour": list(world.COLOURS), "shape": list(world.SHAPES), "cell": list(world.CELLS)}
            questions = {"templates": world.TEMPLATES, "slots": slots}
    size = getattr(vlm, "image_size", None)
    frame_size = [size, size] if size else list(getattr(vlm, "frame_size", ())) or None
    return {"video_model": models.vlm_id if vlm is not None else None, "frame_size": frame_size,
            "methods": [m for m in PAGE_METHODS if m in config.methods] if vlm is not None else [],
            "api_key_required": bool(config.api_key), "max_tokens": config.max_tokens, "questions": questions}


def _assigned_id(request: Request) -> str | None:
    """The id a new stream takes when its caller chose it: a router that pins sessions to replicas
    (``livekv.serve.ray``) picks it first. It comes in the ASGI scope, which no HTTP client can set."""
    return request.scope.get("livekv", {}).get("stream_id")
