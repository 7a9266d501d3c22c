"""``StreamSession``: a live video stream and the questions asked about it, over a ``StreamCache``.

Example::

    session = StreamSession(adapter, method="livevlm", system="You watch a live video.")
    for t, clip in clips(frames("match.mp4", fps=0.5), 4):
        session.push(clip)                                   # encoded and prefilled now, as the video plays
    print("".join(session.ask("Who scored?")))               # answered at once, the video is never re-read
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from livekv import snapshot
from livekv.methods import StreamMethod, make_method
from livekv.stream.adapters.base import Segment, VideoLMAdapter, as_frames
from livekv.stream.cache import StreamCache
from livekv.stream.memory import Chunk


MAX_QUESTION_TOKENS = 1024  # a question longer than this is refused: a limit on what a client may send


@dataclass
class StreamStats:
    frames: int = 0
    clips: int = 0
    ingest_s: float = 0.0  # time spent encoding + prefilling clips
    questions: int = 0
    ttft_s: float | None = None  # time from the last question to its first answer token
    answer_tokens: int = 0  # tokens of the last answer (an end token not counted)

    @classmethod
    def restored(cls, values: dict) -> StreamStats:
        """The counters a snapshot kept (``ValueError`` unless each is a number; ``ttft_s`` may be None)."""
        stats = cls(**values)
        if not all(isinstance(v, (int, float)) or (k == "ttft_s" and v is None) for k, v in vars(stats).items()):
            raise ValueError(f"stream counters that are not numbers: {values}")
        return stats

    @property
    def ingest_fps(self) -> float:
        return self.frames / self.ingest_s if self.ingest_s else 0.0


class StreamSession:
    """One video stream: ``push`` clips at any time, ``ask`` questions at any time (answers stream token by token).

    A session is safe to use from several threads: pushes and answers are serialised (an answer holds the session
    from its first token to its last, so a push from another thread waits for it). A push or a second question
    from the thread that is still reading an answer is refused: it would wait for itself.

    Args:
        adapter: the video-language model (``livekv.stream.adapters``).
        method: a registered streaming method (``full``, ``sink_window``, ``rekv``, ``livevlm``) or its config.
        system: the system prompt (text or token ids): the memory's sink.
        memory_tokens: the fast-tier memory of a bounded method, tokens per layer, from which the method sets the
            budgets not given as knobs (default: ``adapter.default_memory_tokens``, what fits the model).
        max_question_tokens: longer questions are refused (a limit on what a client may send).
        **knobs: the method's knobs (``short_term``, ``long_term``, ``top_frames``, ...).
    """

    def __init__(self, adapter: VideoLMAdapter, method: str | StreamMethod = "livevlm", system=None,
                 memory_tokens: int | None = None, max_question_tokens: int = MAX_QUESTION_TOKENS, **knobs):
        self.adapter = adapter
        self.method = dataclasses.replace(make_method(method, context="stream", **knobs))  # resolved below: a copy
        self._knobs = dataclasses.asdict(self.method)  # as given, before resolve: what a snapshot restores
        self.memory_tokens = adapter.default_memory_tokens if memory_tokens is None else memory_tokens
        for name, value in (("memory_tokens", self.memory_tokens), ("max_question_tokens", max_question_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.method.resolve(self.memory_tokens, adapter.tokens_per_frame)
        self.cache = StreamCache(adapter, self.method)
        self.stats = StreamStats()
        self.max_question_tokens = max_question_tokens
        self._lock, self._owner = threading.Lock(), None
        if system is not None:
            self.push_text(adapter.system_template.format(system=system) if isinstance(system, str) else system)

    @contextlib.contextmanager
    def _exclusive(self, what: str):
        """Hold the session for ``what`` (a push or an answer); other threads wait, this thread may not nest."""
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError(f"{what} while an answer from ask() is still being read in this thread: read the "
                               "answer to its end (or close() it) first")
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    @classmethod
    def from_pretrained(cls, path: str, method: str | StreamMethod = "livevlm", system=None, **knobs) -> StreamSession:
        """A session on a local checkpoint of a supported video-language model (never fetched from a hub)."""
        from livekv.stream.adapters import load_adapter

        return cls(load_adapter(path), method, system, **knobs)

    # --- the stream ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def push(self, frames) -> None:
        """Encode a clip, ``[F, H, W, 3]`` uint8 RGB frames (or a list of ``[H, W, 3]``), into the memory. Bad input
        raises ``ValueError`` and leaves the memory as it was."""
        frames = as_frames(frames)
        if frames.shape[0] % self.adapter.frame_multiple:
            raise ValueError(f"this model takes clips of a multiple of {self.adapter.frame_multiple} frames, got {frames.shape[0]}")
        with self._exclusive("push()"):
            t0 = time.perf_counter()
            segment = self.adapter.video(frames)  # the vision encoder runs before the memory is touched
            segment.frame[segment.visual] += self.stats.frames
            self.cache.seal_sink()
            self._prefill(segment)
            self.stats.ingest_s += time.perf_counter() - t0
            self.stats.frames += frames.shape[0]
            self.stats.clips += 1

    @torch.inference_mode()
    def push_text(self, text) -> None:
        """Append text (a string or token ids) to the stream, e.g. a timestamp or a subtitle."""
        segment = self.adapter.text(text)
        with self._exclusive("push_text()"):
            self._prefill(segment)

    def _prefill(self, segment: Segment) -> torch.Tensor:
        positions = segment.positions + self.cache.cursor
        rows = None
        if self.method.vsb_rows:
            visual = segment.visual.nonzero()[:, 0]
            rows = (visual if len(visual) else torch.arange(len(segment)))[-self.method.vsb_rows :]
        with self.cache.chunk(Chunk(positions, segment.frame, rows)):
            hidden = self.adapter.forward(segment.embeds, positions, self.cache)
        self.cache.cursor += segment.span
        self.cache.settle()
        return hidden

    # --- questions ----------------------------------------------------------------------------------------------
    def ask(self, question, max_new_tokens: int = 64) -> Iterator[str | int]:
        """Answer ``question`` (text or token ids) over the memory, greedily; yields the answer as it is decoded
        (text pieces with a tokenizer, else token ids). The memory is unchanged afterwards.

        Raises ``ValueError`` at once (before the generator is read) for a question that cannot be answered: empty,
        longer than ``max_question_tokens``, or with words the model does not know."""
        with torch.inference_mode():
            segment = self._question(question)
        return self._answer(segment, max_new_tokens)

    def _question(self, question) -> Segment:
        adapter = self.adapter
        if isinstance(question, str):
            if not question.strip():
                raise ValueError("empty question")
            question = adapter.question_template.format(question=question)
        ids = adapter.tokenize(question)
        if len(ids) > self.max_question_tokens:
            raise ValueError(f"the question is {len(ids)} tokens long; this session takes at most "
                             f"{self.max_question_tokens} (max_question_tokens)")
        return adapter.text(ids)

    def _answer(self, segment: Segment, max_new_tokens: int) -> Iterator[str | int]:
        adapter = self.adapter
        ids: list[int] = []
        shown = ""
        # inference mode around each step, not the generator: the caller's code between pieces keeps its own mode
        with self._exclusive("push() or ask()"), self.cache.answering():
            t0 = time.perf_counter()
            self.stats.ttft_s = None
            position = self.cache.cursor
            embeds, positions = segment.embeds, segment.positions + position
            position += segment.span
            embed = adapter.language_model.get_input_embeddings()
            for step in range(max_new_tokens):
                with torch.inference_mode():
                    with self.cache.chunk(Chunk(positions, torch.full((embeds.shape[1],), -1), question=True)):
                        hidden = adapter.forward(embeds, positions, self.cache)
                    token = int(adapter.lm_head(hidden[:, -1]).argmax(-1))
                    embeds = embed(torch.tensor([[token]], device=adapter.device))  # the next step's input
                if step == 0:
                    self.stats.ttft_s = time.perf_counter() - t0  # the first token, an end token included
                if token in adapter.eos_ids:
                    break
                ids.append(token)
                if adapter.tokenizer is None:
                    yield token
                else:
                    text = adapter.tokenizer.decode(ids, skip_special_tokens=True)
                    if len(text) > len(shown) and not text.endswith("\ufffd"):
                        yield text[len(shown) :]
                        shown = text
                positions = torch.full((adapter.position_dims, 1), position)
                position += 1
            self.stats.questions += 1
            self.stats.answer_tokens = len(ids)

    @torch.inference_mode()
    def logits(self, question) -> torch.Tensor:
        """The next-token logits ``[1, V]`` after ``question`` (token ids, or text as it is, no template) read over
        the memory as an answer reads it; the memory is unchanged (for exactness checks)."""
        segment = self.adapter.text(question)
        positions = segment.positions + self.cache.cursor
        with self._exclusive("logits()"), self.cache.answering(), self.cache.chunk(
                Chunk(positions, segment.frame, question=True)):
            return self.adapter.lm_head(self.adapter.forward(segment.embeds, positions, self.cache))[:, -1]

    def answer(self, question, max_new_tokens: int = 64) -> str | list[int]:
        """The whole answer at once (a string with a tokenizer, else token ids)."""
        pieces = list(self.ask(question, max_new_tokens))
        return "".join(pieces) if self.adapter.tokenizer is not None else pieces

    def memory(self) -> dict[str, int]:
        """KV bytes used and reserved in the fast and host tiers, and the tokens the memory holds (per layer)."""
        return self.cache.memory()

    # --- snapshots ----------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write the session to ``directory`` (replaced atomically): its memory in both tiers, the method and its
        knobs, the counters and the model's fingerprint. ``StreamSession.load`` continues it bit-identically. Waits
        for a push or an answer in progress (in another thread) to finish."""
        with self._exclusive("save()"):
            tensors, layers = snapshot.layer_states(self.cache.layers)
            meta = {"method": self.method.name, "knobs": self._knobs, "memory_tokens": self.memory_tokens,
                    "max_question_tokens": self.max_question_tokens, "stats": dataclasses.asdict(self.stats),
                    "cache": self.cache.state(), "layers": layers}
            snapshot.write(directory, "livekv-stream", self.adapter.model, meta, tensors)

    @classmethod
    def load(cls, directory: str | os.PathLike, adapter: VideoLMAdapter) -> StreamSession:
        """The session saved in ``directory`` by ``save``, on ``adapter`` (the same model: ``SnapshotError``
        otherwise, and for a damaged snapshot; nothing is loaded then)."""
        manifest, tensors = snapshot.read(directory, "livekv-stream", adapter.model)
        with snapshot.restoring(directory):
            session = cls(adapter, manifest["method"], memory_tokens=manifest["memory_tokens"],
                          max_question_tokens=manifest["max_question_tokens"], **snapshot.knobs_here(manifest["knobs"]))
            session.stats = StreamStats.restored(manifest["stats"])
            session.cache.load_state(manifest["cache"])
            snapshot.load_layers(session.cache.layers, manifest, tensors, adapter.device)
        return session
