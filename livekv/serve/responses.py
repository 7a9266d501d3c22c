"""Response bodies in OpenAI's shapes: chat completions (whole, or as SSE chunks) and a stream's answers (SSE
events ``delta`` and ``done``); a chat completion that names a stream asks it."""

from __future__ import annotations

import contextlib
import json
import time
import uuid

from fastapi.responses import StreamingResponse

from livekv.serve.chat import Turn
from livekv.serve.schemas import ChatCompletionRequest
from livekv.serve.server import Server


async def ask_by_chat(s: Server, body: ChatCompletionRequest, stream_id: str):
    """A chat completion that names a stream asks it: the last user message is the question."""
    stream = s.stream(stream_id)
    question = next((m.text() for m in reversed(body.messages) if m.role == "user"), "")
    limit = body.limit(s.config.max_tokens)
    answer = stream.ask(question, limit)
    first = await first_piece(answer)

    async def events():
        turn = Turn(prompt=[], cached=0)
        yield first, turn
        async with contextlib.aclosing(answer):
            async for piece in answer:
                yield piece, turn
        turn.generated = stream.session.stats.answer_tokens  # a piece may span tokens; read before any await
        turn.finish_reason = "length" if turn.generated >= limit else "stop"
        turn.ttft_s = (stream.counters.last_ttft_ms or 0) / 1e3
        yield "", turn

    model = f"stream/{stream_id}"
    return sse(chunks(body, events(), model)) if body.stream else await completion(body, events(), model, None)


async def first_piece(answer) -> str:
    """The first piece of an answer ('' if it is empty): errors of the question surface before any response."""
    try:
        return await answer.__anext__()
    except StopAsyncIteration:
        return ""


async def completion(body: ChatCompletionRequest, events, model: str, memory=None) -> dict:
    """The whole answer as one ``chat.completion``; ``memory``: an async callable giving the session's memory."""
    text, turn = [], None
    async with contextlib.aclosing(events):
        async for delta, turn in events:
            text.append(delta)
    out = _envelope("chat.completion", model)
    out["choices"] = [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                       "finish_reason": turn.finish_reason, "logprobs": None}]
    out["usage"] = _usage(turn)
    out["livekv"] = {"ttft_ms": (turn.ttft_s or 0) * 1e3, "session": body.session,
                     "memory": await memory() if memory is not None else None}
    return out


async def chunks(body: ChatCompletionRequest, events, model: str):
    """OpenAI's streaming chunks: the role first, then content deltas, then the finish reason (and usage)."""
    base = _envelope("chat.completion.chunk", model)
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    turn = None
    async with contextlib.aclosing(events):
        async for delta, turn in events:
            if delta:
                yield {**base, "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": turn.finish_reason if turn else "stop"}]}
    if body.stream_options and body.stream_options.include_usage and turn is not None:
        yield {**base, "choices": [], "usage": _usage(turn)}


def _usage(turn) -> dict:
    prompt, completion = len(turn.prompt), len(turn.tokens) if turn.generated is None else turn.generated
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": turn.cached}}


def _envelope(kind: str, model: str) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


async def ask_events(stream, first: str, answer):
    yield {"event": "delta", "delta": first}
    pieces = [first]
    async with contextlib.aclosing(answer):
        async for piece in answer:
            pieces.append(piece)
            yield {"event": "delta", "delta": piece}
    yield {"event": "done", "answer": "".join(pieces), "ttft_ms": stream.counters.last_ttft_ms,
           "frames_ingested": stream.counters.ingested}


def sse(events) -> StreamingResponse:
    """Server-sent events: each item a ``data:`` line of JSON (an ``event:`` line when it names one), then
    ``data: [DONE]``."""
    async def lines():
        async with contextlib.aclosing(events):  # a client gone mid-answer: generation stops, the session stays
            async for item in events:
                name = item.pop("event", None)
                yield (f"event: {name}\n" if name else "") + f"data: {json.dumps(item)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
