"""Request bodies read within a limit: refused (413) as soon as they pass it, whether their size was declared
(``Content-Length``) or not (chunked), before anything parses them."""

from __future__ import annotations

import json

from fastapi import HTTPException, Request

RAW_BODY_PATHS = ("/frames", "/restore")  # routes that read their body themselves, with limits of their own


async def read(request: Request, limit: int) -> bytes:
    """The request body (``HTTPException`` 413 past ``limit`` bytes)."""
    _check_declared(request.headers.get("content-length"), limit)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise HTTPException(413, f"the request body exceeds the limit of {limit} bytes")
    return bytes(data)


class LimitBodies:
    """ASGI middleware: the body of every HTTP request but those of ``RAW_BODY_PATHS`` (the JSON of a chat, a new
    stream, a question) is cut off at ``limit`` bytes with a 413, raised where the route reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].rstrip("/").endswith(RAW_BODY_PATHS):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"").decode() or None
        received = 0

        async def limited():
            nonlocal received
            _check_declared(declared, self.limit)
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, f"the request body exceeds the limit of {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def _check_declared(declared: str | None, limit: int) -> None:
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"a request body of {declared} bytes exceeds the limit of {limit}")


def json_object(body: str | bytes) -> dict:
    """The JSON object ``body`` holds; ``{}`` if it holds none (not JSON, or not an object)."""
    try:
        value = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
