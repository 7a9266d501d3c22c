"""Chat completions on the text model, over a ``LiveKVCache`` per conversation.

A request with a ``session`` id keeps its cache and the token ids it holds: the next turn's prompt (the whole
conversation, rendered by the chat template) prefills only what extends them; a prompt that does not extend them
(an edited history, another method) starts the cache over. Every prefill chunk and decode step is a job of the
engine (``livekv.serve.engine``): conversations interleave token by token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from livekv import LiveKVCache
from livekv.methods import make_method
from livekv.serve.engine import ANSWER, PREFILL, Engine
from livekv.serve.schemas import ChatCompletionRequest

PREFILL_CHUNK = 512  # tokens per prefill job: a long prompt never holds the engine for long


@dataclass
class ChatSession:
    """A conversation's cache and the token ids it holds."""

    id: str
    method: str
    knobs: dict
    cache: LiveKVCache
    tokens: list[int] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Turn:
    """One completion in progress: its prompt, what it reused, and what it produced."""

    prompt: list[int]
    cached: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    ttft_s: float | None = None
    generated: int | None = None  # tokens produced where ``tokens`` does not hold them (a stream's answer)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """A token from ``logits [V]``: greedy at temperature 0, else softmax sampling within the top-p mass."""
    if temperature == 0:
        return int(logits.argmax())
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1:
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(-1) - ordered >= top_p  # the smallest prefix holding top_p stays
        probs = torch.zeros_like(probs).scatter_(-1, order, ordered.masked_fill(outside, 0))
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Decoded text of a growing list of token ids, as deltas, cut before the first stop string (text that could
    still become one is held back)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, list(stops or [])
        self.sent, self.stopped = "", False
        self._hold = max((len(s) for s in self.stops), default=1) - 1

    def delta(self, ids: list[int], final: bool = False) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped, final = text[:cut], True, True
        if text.endswith("\ufffd") and not final:
            return ""
        end = len(text) if final else max(len(self.sent), len(text) - self._hold)
        out, self.sent = text[len(self.sent) : end], text[:end]
        return out


class Chats:
    """The chat sessions of one text model."""

    def __init__(self, model, tokenizer, engine: Engine, config):
        self.model, self.tokenizer, self.engine, self.config = model, tokenizer, engine, config
        self.sessions: dict[str, ChatSession] = {}
        self.eos = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))

    def prompt(self, request: ChatCompletionRequest) -> list[int]:
        """The conversation rendered by the chat template, as token ids (``ValueError`` if too long)."""
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
        limit = min(self.config.max_prompt_tokens, self.model.config.max_position_embeddings - request.limit(
            self.config.max_tokens))
        if len(ids) > limit:
            raise ValueError(f"the prompt is {len(ids)} tokens; this server takes at most {limit} with "
                             f"max_tokens={request.limit(self.config.max_tokens)}")
        return ids

    def method_of(self, request: ChatCompletionRequest) -> tuple[str, dict]:
        """The method and knobs a request asks for (checked: ``ValueError``), or the server's default."""
        name = request.method or next(m for m in self.config.methods if m in TEXT_METHODS)
        if name not in self.config.methods:
            raise ValueError(f"method {name!r} is not served here; choose one of {list(self.config.methods)}")
        knobs = {**request.knobs, **({"budget": request.budget} if request.budget is not None else {})}
        cfg = make_method(name, context="text", ignore_unknown=request.budget is not None and not request.knobs,
                          **knobs)
        return name, {k: v for k, v in dataclasses.asdict(cfg).items()}

    def session(self, request: ChatCompletionRequest, method: str, knobs: dict, total_sessions: int) -> ChatSession:
        """The request's conversation (``session`` id), or a one-off one; a new id counts against the limit."""
        sid = request.session
        existing = self.sessions.get(sid) if sid else None
        if existing is not None and (existing.method, existing.knobs) == (method, knobs):
            existing.last_used = time.monotonic()
            return existing
        if existing is None and sid and total_sessions >= self.config.max_sessions:
            raise SessionLimit(f"the server holds its maximum of {self.config.max_sessions} sessions")
        made = ChatSession(sid or f"oneoff-{uuid.uuid4().hex}", method, knobs,
                           LiveKVCache(self.model.config, method, **knobs))
        if sid:
            self.sessions[sid] = made
        return made

    async def complete(self, request: ChatCompletionRequest, session: ChatSession, prompt: list[int],
                       disconnected=None) -> AsyncIterator[tuple[str, Turn]]:
        """Generate a reply: yields ``(text delta, turn)`` as tokens come; the turn's ``finish_reason`` is set at
        the end. ``disconnected()``: an async callable; when true, generation stops and the session stays as fed."""
        async with session.lock:
            start = time.perf_counter()
            # on the engine: a step of a request whose client went (cancelled, lock released) may still be running
            turn = await self.engine.run(self._reuse, session, prompt, priority=PREFILL)
            logits = None
            for i in range(turn.cached, len(prompt), PREFILL_CHUNK):
                logits = await self.engine.run(self._feed, session, prompt[i : i + PREFILL_CHUNK], priority=PREFILL)
            text = TextStream(self.tokenizer, request.stop)
            generator = torch.Generator().manual_seed(request.seed) if request.seed is not None else None
            limit, deadline = request.limit(self.config.max_tokens), start + self.config.generation_timeout_s
            while turn.finish_reason is None:
                token, logits = await self.engine.run(self._step, session, logits, request, generator)
                turn.ttft_s = turn.ttft_s or time.perf_counter() - start
                if token in self.eos:
                    turn.finish_reason = "stop"
                    yield text.delta(turn.tokens, final=True), turn
                    break
                turn.tokens.append(token)
                delta = text.delta(turn.tokens, final=len(turn.tokens) >= limit)
                if text.stopped:
                    turn.finish_reason = "stop"
                elif len(turn.tokens) >= limit or time.perf_counter() > deadline:
                    turn.finish_reason = "length"
                yield delta, turn
                if disconnected is not None and await disconnected():
                    turn.finish_reason = "disconnected"
            session.last_used = time.monotonic()

    async def memory(self, session: ChatSession) -> dict:
        """``session``'s cache memory, read on the engine (between its steps: not a half-made step's)."""
        return await self.engine.run(session.cache.memory)

    def _reuse(self, session: ChatSession, prompt: list[int]) -> Turn:
        """Keep the cache if the prompt extends what it holds; else start it over."""
        held = session.tokens
        if len(prompt) > len(held) and prompt[: len(held)] == held:
            return Turn(prompt, len(held))
        session.cache.reset()
        session.tokens = []
        return Turn(prompt, 0)

    def _feed(self, session: ChatSession, ids: list[int]) -> torch.Tensor:
        """Prefill ``ids`` (one chunk); the logits of the last ``[V]``."""
        out = self.model(torch.tensor([ids], device=self.model.device), past_key_values=session.cache, use_cache=True,
                         logits_to_keep=1)
        session.tokens += ids
        return out.logits[0, -1]

    def _step(self, session: ChatSession, logits, request: ChatCompletionRequest, generator):
        """Sample the next token; if it goes on, feed it and return the next logits."""
        token = sample(logits, request.temperature, request.top_p, generator)
        if token in self.eos:
            return token, logits
        return token, self._feed(session, [token])


TEXT_METHODS = ("dense", "sink_window", "quest", "freekv", "clusterkv")


class SessionLimit(Exception):
    """The server holds its maximum number of sessions (429)."""


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, int) else list(value)
