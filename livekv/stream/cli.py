"""``livekv stream``: play a video into a streaming session, answer questions during and after playback."""

from __future__ import annotations

import queue
import sys
import threading

import torch

from livekv.stream.session import StreamSession
from livekv.stream.source import clips, frames

KNOBS = ("short_term", "long_term", "retrieve", "top_frames")
SYSTEM = "You are watching a live video. Answer questions about it briefly."  # for a checkpoint's own chat template


def random_adapter():
    """A small random LLaVA-OneVision (hidden 256, 4 layers, 16 tokens per frame) with SmolLM2's tokenizer: for
    trying the mechanics without a checkpoint. Its answers are meaningless."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from livekv.models import default_tokenizer
    from livekv.stream.adapters import LlavaOnevisionAdapter

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
    return LlavaOnevisionAdapter(LlavaOnevisionForConditionalGeneration(config).eval(), tokenizer)


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


def _answer(session: StreamSession, question: str, t: float, max_new_tokens: int) -> None:
    print(f"\nQ (t={t:.1f}s): {question}\nA: ", end="", flush=True)
    for piece in session.ask(question, max_new_tokens):
        print(piece, end="", flush=True)
    print(f"\n   (first token after {session.stats.ttft_s * 1e3:.0f} ms)" if session.stats.ttft_s is not None else "", flush=True)


def stream(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    system = SYSTEM
    if args.model == "random":
        adapter = random_adapter()
    elif args.model == "default":
        from livekv.vlm import model as default_vlm

        adapter, system = default_vlm.load_default_vlm(), default_vlm.SYSTEM
    else:
        from livekv.stream.adapters import load_adapter

        adapter = load_adapter(args.model)
    knobs = {k: getattr(args, k) for k in KNOBS}
    session = StreamSession(adapter, args.method, system=args.system or system, **knobs)
    per_clip = args.clip_frames or adapter.frame_multiple
    pending = _questions_at(args.ask_at)
    typed: queue.Queue = queue.Queue()
    if args.interactive:
        threading.Thread(target=_stdin_questions, args=(typed,), daemon=True).start()
        print("type a question and Enter at any time; the video keeps playing", file=sys.stderr)
    t, stdin_open = 0.0, args.interactive
    for t, clip in clips(frames(args.video, fps=args.fps, realtime=args.realtime), per_clip):
        if len(clip) % adapter.frame_multiple:
            break  # a last partial clip this model cannot take
        session.push(clip)
        t += (len(clip) - 1) / args.fps
        print(f"\r{_status(session, t)}", end="", file=sys.stderr, flush=True)
        while pending and pending[0][0] <= t:
            _answer(session, pending.pop(0)[1], t, args.max_new_tokens)
        while not typed.empty():
            question = typed.get()
            if question is None:  # stdin closed while the video played
                stdin_open = False
            else:
                _answer(session, question, t, args.max_new_tokens)
    print(f"\r{_status(session, t)}  end of video", file=sys.stderr, flush=True)
    for _, question in pending:
        _answer(session, question, t, args.max_new_tokens)
    for question in args.ask:
        _answer(session, question, t, args.max_new_tokens)
    if stdin_open:
        print("the video has ended; ask more, or Ctrl-D to quit", file=sys.stderr)
        while (question := typed.get()) is not None:
            _answer(session, question, t, args.max_new_tokens)
