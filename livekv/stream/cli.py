"""``livekv stream``: play a video into a streaming session, answer questions during and after playback."""

from __future__ import annotations

import contextlib
import queue
import sys
import threading

import torch

from livekv.methods import knob_options
from livekv.options import given
from livekv.stream.session import StreamSession
from livekv.stream.source import VideoError, clips, frames

SYSTEM = "You are watching a live video. Answer questions about it briefly."  # for a checkpoint's own chat template


def random_adapter(dtype: torch.dtype = torch.float32, weights: str = "float32"):
    """A small random LLaVA-OneVision (hidden 256, 4 layers, 16 tokens per frame) with SmolLM2's tokenizer: for
    trying the mechanics without a checkpoint, in ``dtype`` with its language model's weights stored as ``weights``
    (``cast_and_quantize``). Its answers are meaningless."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from livekv.models import default_tokenizer
    from livekv.stream.adapters import LlavaOnevisionAdapter, cast_and_quantize

    tokenizer = default_tokenizer()
    vocab = len(tokenizer)
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", vocab_size=vocab + 2, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, image_size=64, patch_size=8, vision_use_head=False),
        image_token_index=vocab, video_token_index=vocab + 1, vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=[[64, 64]],
    )
    torch.manual_seed(0)
    model = cast_and_quantize(LlavaOnevisionForConditionalGeneration(config), dtype, weights)
    return LlavaOnevisionAdapter(model.eval(), tokenizer)


def _questions_at(specs: list[str]) -> list[tuple[float, str]]:
    out = []
    for spec in specs:
        seconds, sep, question = spec.partition(":")
        try:
            out.append((float(seconds), question.strip()))
        except ValueError:
            sep = ""
        if not sep or not question.strip():
            raise ValueError(f"--ask-at takes SECONDS:QUESTION, got {spec!r}")
    return sorted(out)


def _stdin_questions(box: queue.Queue) -> None:
    for line in sys.stdin:
        if line.strip():
            box.put(line.strip())
    box.put(None)


def _status(session: StreamSession, t: float) -> str:
    s, mem = session.stats, session.memory()
    ttft = f", last TTFT {s.ttft_s * 1e3:.0f} ms" if s.ttft_s is not None else ""
    return (f"[t={t:6.1f}s  {s.frames} frames, ingest {s.ingest_fps:.1f} frames/s | KV fast {mem['fast_kv_bytes'] / 1e6:.1f} MB, "
            f"host {mem['host_kv_bytes'] / 1e6:.1f} MB, {mem['memory_tokens']} tokens{ttft}]")


class _Bounded:
    """Frames of a source until ``max_frames`` frames or ``duration`` seconds of stream (a camera never ends);
    ``cut`` names the bound that ended them (None: the source ended)."""

    def __init__(self, frame_iter, max_frames: int | None, duration: float | None):
        self.frame_iter, self.max_frames, self.duration = frame_iter, max_frames, duration
        self.cut: str | None = None

    def __iter__(self):
        with contextlib.closing(self.frame_iter):
            for n, frame in enumerate(self.frame_iter, 1):
                if self.duration is not None and frame.time >= self.duration:
                    self.cut = f"--duration {self.duration:g}"
                    return
                yield frame
                if n == self.max_frames:
                    self.cut = f"--max-frames {self.max_frames}"
                    return


def _load(model: str, dtype: torch.dtype = torch.float32, weights: str = "float32"):
    """``(adapter, default system prompt)`` of ``--model``, in ``dtype`` with ``weights`` (``--dtype``,
    ``--weights``)."""
    if model == "random":
        return random_adapter(dtype, weights), SYSTEM
    if model == "default":
        from livekv.vlm import model as default_vlm

        return default_vlm.load_default_vlm(dtype=dtype, weights=weights), default_vlm.SYSTEM
    from livekv.stream.adapters import load_adapter

    return load_adapter(model, dtype=dtype, weights=weights), SYSTEM


class _Player:
    """One ``livekv stream`` run: plays clips into the session and answers questions; ``t`` is the stream time
    reached (the last pushed frame's). ``answers`` and ``memory`` (after each clip) record what was measured."""

    def __init__(self, session: StreamSession, args):
        self.session, self.args, self.t = session, args, 0.0
        self.answers: list[dict] = []
        self.memory: list[dict] = []

    def play(self, source: _Bounded, pending: list[tuple[float, str]], typed: queue.Queue) -> bool:
        """Push the clips of ``source``, answering the questions that come due while it plays. Returns whether
        stdin is still open for typed questions."""
        session, stdin_open = self.session, self.args.interactive
        for t, clip in clips(source, self.args.clip_frames or session.adapter.frame_multiple):
            if len(clip) % session.adapter.frame_multiple:
                break  # a last partial clip this model cannot take
            session.push(clip)
            self.t = t + (len(clip) - 1) / self.args.fps
            self.memory.append({"t": self.t, "frames": session.stats.frames, "ingest_fps": session.stats.ingest_fps,
                                **session.memory()})
            print(f"\r{_status(session, self.t)}", end="", file=sys.stderr, flush=True)
            while pending and pending[0][0] <= self.t:
                self.answer(pending.pop(0)[1])
            while not typed.empty():
                question = typed.get()
                if question is None:  # stdin closed while the video played
                    stdin_open = False
                else:
                    self.answer(question)
        return stdin_open

    def answer(self, question: str) -> None:
        """Print the answer as it is decoded; a question the session refuses (``ValueError``) is reported on
        stderr, and the run goes on."""
        session = self.session
        session.stats.ttft_s = None  # set again by this answer's first token (an empty answer has none)
        try:
            pieces = iter(session.ask(question, self.args.max_new_tokens))
            first = next(pieces, "")
        except ValueError as e:
            print(f"\nlivekv: cannot answer {question!r}: {e}", file=sys.stderr, flush=True)
            self.answers.append({"t": self.t, "question": question, "error": str(e)})
            return
        print(f"\nQ (t={self.t:.1f}s): {question}\nA: {first}", end="", flush=True)
        answer = [first]
        for piece in pieces:
            print(piece, end="", flush=True)
            answer.append(piece)
        ttft = session.stats.ttft_s
        print(f"\n   (first token after {ttft * 1e3:.0f} ms)" if ttft is not None else "", flush=True)
        self.answers.append({"t": self.t, "question": question, "answer": "".join(map(str, answer)),
                             "ttft_ms": None if ttft is None else ttft * 1e3})

    def record(self, how: str) -> dict:
        """What the run measured (``--json``)."""
        a = self.args
        return {"video": a.video, "model": a.model, "dtype": a.dtype, "weights": a.weights, "method": a.method,
                **given(a, knob_options("stream")),
                "fps": a.fps, "stopped": how, "frames": self.session.stats.frames, "questions": self.answers,
                "memory": self.memory}


def stream(args) -> tuple[dict, BaseException | None]:
    """``livekv stream``: returns what it measured and how it failed (``VideoError``, ``KeyboardInterrupt``; None
    when the video ended or a bound was reached). However the stream stops, the questions still pending are
    answered from the memory held then; the caller then raises the failure (a read error exits with its message,
    status 1; Ctrl-C as an interrupt, status 130, in ``livekv.cli.main``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    adapter, system = _load(args.model, getattr(torch, args.dtype), args.weights)
    knobs = given(args, knob_options("stream"))
    session = StreamSession(adapter, args.method, system=args.system or system, memory_tokens=args.memory_tokens,
                            **knobs)
    player = _Player(session, args)
    pending = _questions_at(args.ask_at)
    typed: queue.Queue = queue.Queue()
    if args.interactive:
        threading.Thread(target=_stdin_questions, args=(typed,), daemon=True).start()
        print("type a question and Enter at any time; the video keeps playing", file=sys.stderr)
    source = _Bounded(frames(args.video, fps=args.fps, realtime=args.realtime), args.max_frames, args.duration)
    failure, stdin_open = None, False
    try:
        stdin_open = player.play(source, pending, typed)
        how = f"reached {source.cut}" if source.cut else "end of video"
    except VideoError as e:
        if not player.session.stats.frames:
            raise  # nothing was seen: nothing to answer from
        failure, how = e, f"stopped: {e}"
    except KeyboardInterrupt as e:
        failure, how = e, "stopped: interrupted"
    print(f"\r{_status(player.session, player.t)}  {how}", file=sys.stderr, flush=True)
    try:
        for question in [q for _, q in pending] + args.ask:
            player.answer(question)
        if stdin_open and failure is None:
            print("the video has ended; ask more, or Ctrl-D to quit", file=sys.stderr)
            while (question := typed.get()) is not None:
                player.answer(question)
    except KeyboardInterrupt as e:
        failure = e
    return player.record(how), failure
