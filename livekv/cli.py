"""The ``livekv`` console script.

    livekv demo                                   the main job: a live synthetic video, questions answered while it plays
    livekv demo --text                            a needle in 2k tokens on the embedded SmolLM2, dense vs quest
    livekv generate --prompt "..." --method quest --budget 256
    livekv chat --method quest --budget 512
    livekv eval needle --method dense,quest --budget 256 --context 2048,4096 --json out/needle.json
    livekv eval fidelity --method quest --budget 1024 --context 8192 --json out/fidelity.json
    livekv eval ruler --method dense,quest,freekv,clusterkv --budget 256 --context 4096 --split test --json out/ruler.json
    livekv bench decode --methods dense,quest --context 4096,16384,32768 --json out/decode.json
    livekv stream VIDEO --model DIR --ask "What happened?" --ask-at 30:"What colour is the car?"
    livekv bench stream --methods full,rekv,livevlm --frames 16,64,256,512 --json out/stream.json
    livekv eval stream-qa --methods full,livevlm,rekv,sink_window --minutes 2 --memory-tokens 56 --streams 8 --json out/qa.json
    livekv train-vlm                              retrain the embedded VLM from scratch (the shipped weights are this command's output)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from livekv import arguments
from livekv.methods import knob_options, split_specs
from livekv.options import fields_of, given
from livekv.serve.config import ServeConfig

def _knobs(args) -> dict:
    """The text knobs given on the command line."""
    return given(args, knob_options("text"))


def _method_grid(args) -> list[tuple[str, dict]]:
    """(name, knobs) for every method x budget; dense once (it has no budget)."""
    from livekv.methods import make_method

    names = [m for m in args.method.split(",") if m]
    budgets = args.budget if args.budget is not None else [None]
    knobs = {k: v for k, v in _knobs(args).items() if k != "budget"}
    grid = []
    for name in names:
        for budget in budgets:
            cfg_knobs = {**knobs, "budget": budget}
            make_method(name, ignore_unknown=True, **cfg_knobs)  # validate now, with a clear error
            grid.append((name, cfg_knobs))
            if name == "dense":
                break
    return grid


def _require_corpus() -> None:
    from livekv.evals.corpus import check_corpus

    check_corpus()


def _load(args, weights: str | None = None):
    """The model and tokenizer the arguments name, its weights stored as ``weights`` (default: ``--weights``)."""
    import torch

    from livekv.models import load_model
    from livekv.quantize import weight_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    weights = weights or args.weights
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device, weights=weights)
    print(f"loaded {model.config.model_type} ({weights} weights, {weight_bytes(model) / 1e6:.0f} MB read per "
          f"token) in {time.perf_counter() - t0:.1f} s on {args.device}", file=sys.stderr)
    return model, tokenizer


def _check_positions(model, what: str, tokens: int, used: int = 0) -> None:
    """Refuse an input of ``tokens`` positions beyond the model's limit, before any work; warn when the work will
    use ``used`` positions, past the limit (rotary positions past it are extrapolated)."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not limit:
        return
    if tokens > limit:
        raise ValueError(f"{what} of {tokens} tokens exceeds the model's {limit} positions (max_position_embeddings)")
    if used > limit:
        print(f"livekv: warning: {what} of {tokens} tokens and what follows use {used} positions, past the model's "
              f"{limit}: the last {used - limit} are extrapolated", file=sys.stderr)


def _prefill_progress(tokens: int, chunk: int):
    """``progress(done, total)`` for ``generate_stream``: a bar on stderr when the prompt spans several chunks."""
    from livekv.progress import bar

    prefilled = bar(tokens, "prefill", "tok", enabled=tokens > chunk)

    def progress(done: int, total: int) -> None:
        prefilled.update(done - prefilled.n)
        if done == total:
            prefilled.close()

    return progress


def _stats_line(stats) -> str:
    mem = stats.memory
    return (f"[prompt {stats.prompt_tokens} tok, prefill {stats.prefill_tokens_per_s:.0f} tok/s | "
            f"{stats.new_tokens} new tok, decode {stats.decode_tokens_per_s:.1f} tok/s | "
            f"KV fast tier {mem.get('fast_kv_bytes', 0) / 1e6:.1f} MB, host tier {mem.get('host_kv_bytes', 0) / 1e6:.1f} MB]")


def _check_json_path(path: str | None) -> None:
    """Refuse a ``--json`` path that cannot be written (a folder, or a path under a file) before any work."""
    if not path:
        return
    if os.path.isdir(path):
        raise SystemExit(f"livekv: error: --json {path}: is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the folders that do not exist yet are made when writing
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise SystemExit(f"livekv: error: --json {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise SystemExit(f"livekv: error: --json {path}: {parent} is not writable")


def _write_json(path: str | None, payload: dict, args) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"command": " ".join(sys.argv), **payload}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}", file=sys.stderr)


def _chat_ids(tok, messages: list[dict]) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def _prompt_ids(tok, text: str, args) -> list[int]:
    """The prompt in the model's chat template when the tokenizer has one (an instruct model fed raw text tends to
    end its answer at once), else, or with ``--raw``, as is."""
    if args.raw:
        return tok.encode(text)
    if not getattr(tok, "chat_template", None):
        if args.chat:
            raise ValueError("--chat: this model's tokenizer has no chat template")
        return tok.encode(text)
    return _chat_ids(tok, [{"role": "user", "content": text}])


def _print_tokens(tok, tokens) -> list[int]:
    """Print the text of ``tokens`` (token ids, as they are generated) piece by piece; return the ids."""
    ids, shown = [], ""
    for token in tokens:
        ids.append(token)
        text = tok.decode(ids, skip_special_tokens=True)
        if len(text) > len(shown) and not text.endswith("\ufffd"):  # not half of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(flush=True)
    return ids


def _reply_record(tok, ids: list[int], stats) -> dict:
    """Say on stderr why a reply stopped and what it measured; return that as a record (for ``--json``)."""
    stopped = "eos" if ids and ids[-1] == tok.eos_token_id else "max_new_tokens"
    if stopped == "max_new_tokens":
        print(f"[stopped after {len(ids)} tokens: --max-new-tokens]", file=sys.stderr)
    print(_stats_line(stats), file=sys.stderr)
    return {"text": tok.decode(ids, skip_special_tokens=True), "token_ids": ids, "new_tokens": len(ids),
            "stopped": stopped, "prompt_tokens": stats.prompt_tokens, "prefill_s": stats.prefill_s,
            "prefill_tokens_per_s": stats.prefill_tokens_per_s, "decode_s": stats.decode_s,
            "decode_tokens_per_s": stats.decode_tokens_per_s, **stats.memory}


def _write_plot(json_path: str | None, draw) -> None:
    """``draw(png_path)`` beside the JSON; skipped, with a note, where matplotlib (the ``eval`` extra) is missing."""
    if not json_path:
        return
    png = os.path.splitext(json_path)[0] + ".png"
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        print(f"matplotlib is not installed (`pip install matplotlib`, livekv's eval extra): {png} skipped",
              file=sys.stderr)
        return
    draw(png)
    print(f"wrote {png}", file=sys.stderr)


def cmd_generate(args) -> None:
    import torch

    from livekv import LiveKVCache
    from livekv.generation import GenerationStats, generate_stream

    text = open(args.prompt_file).read() if args.prompt_file else args.prompt
    if text is None:
        raise SystemExit("give --prompt or --prompt-file")
    model, tok = _load(args)
    ids = _prompt_ids(tok, text, args)
    _check_positions(model, "prompt", len(ids), len(ids) + args.max_new_tokens - 1)
    cache = LiveKVCache(model.config, args.method, **_knobs(args))
    stats = GenerationStats()
    stream = generate_stream(model, cache, torch.tensor([ids], device=args.device), args.max_new_tokens,
                             stop_ids={tok.eos_token_id}, temperature=args.temperature, chunk=args.chunk,
                             progress=_prefill_progress(len(ids), args.chunk), stats=stats)
    record = _reply_record(tok, _print_tokens(tok, stream), stats)
    _write_json(args.json, {"method": args.method, **_knobs(args), **record}, args)


def cmd_chat(args) -> None:
    model, tok = _load(args)
    turns = []
    print("livekv chat: type a message, empty line or Ctrl-D to quit", file=sys.stderr)
    try:
        _chat_turns(args, model, tok, turns)
    finally:  # the turns so far are kept however the chat ends (Ctrl-C, a conversation too long)
        _write_json(args.json, {"method": args.method, **_knobs(args), "turns": turns}, args)


def _chat_turns(args, model, tok, turns: list[dict]) -> None:
    """Read messages from stdin until an empty line or its end, answering each; append a record per turn."""
    import torch

    from livekv import LiveKVCache
    from livekv.generation import GenerationStats, generate_stream

    knobs = _knobs(args)
    cache, fed, messages = LiveKVCache(model.config, args.method, **knobs), [], []
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        ids = _chat_ids(tok, messages)
        _check_positions(model, "conversation", len(ids), len(ids) + args.max_new_tokens - 1)
        if ids[: len(fed)] != fed:  # the conversation re-tokenised differently: start the cache over
            cache, fed = LiveKVCache(model.config, args.method, **knobs), []
        stats = GenerationStats()
        new = torch.tensor([ids[len(fed):]], device=args.device)
        reply = _print_tokens(tok, generate_stream(
            model, cache, new, args.max_new_tokens, stop_ids={tok.eos_token_id}, temperature=args.temperature,
            chunk=args.chunk, stats=stats, progress=_prefill_progress(new.shape[1], args.chunk)))
        turns.append({"user": line.strip(), **_reply_record(tok, reply, stats)})
        fed = ids + reply[:-1] if reply and reply[-1] == tok.eos_token_id else ids + reply
        messages.append({"role": "assistant", "content": turns[-1]["text"]})


def cmd_demo(args) -> None:
    if not args.text:
        import torch

        from livekv.evals import stream_qa
        from livekv.vlm import load_default_vlm

        torch.set_num_threads(args.threads or 2)
        payload = stream_qa.demo(load_default_vlm(), method=args.method, minutes=args.minutes, speed=args.speed)
        _write_json(args.json, payload, args)
        return
    from livekv.evals import needle

    _require_corpus()
    model, tok = _load(args)
    print("A 2048-token haystack of natural text hides one number; the question is decoded through the sparse "
          "path. dense reads every token; quest reads 256 per step.")
    payload = needle.evaluate(model, tok, [("dense", {}), ("quest", {"budget": 256})], [2048], depths=(0.25, 0.75))
    _write_json(args.json, payload, args)


def cmd_eval(args) -> None:
    from livekv import plots

    methods = _method_grid(args)
    _require_corpus()
    model, tok = _load(args)
    contexts = args.context
    for context in contexts:  # then needle feeds back 7 of its 8 answer tokens, fidelity all target tokens but one
        _check_positions(model, "context", context, context + (7 if args.task == "needle" else args.target - 1))
    if args.task == "needle":
        from livekv.evals import needle

        depths = [round((i + 0.5) / args.depths, 3) for i in range(args.depths)]
        payload = needle.evaluate(model, tok, methods, contexts, depths=depths, seed=args.seed, progress=True)
    else:
        from livekv.evals import fidelity

        payload = fidelity.evaluate(model, tok, methods, contexts, target=args.target, seed=args.seed, progress=True)
    _write_json(args.json, payload, args)
    panels = plots.NEEDLE if args.task == "needle" else plots.FIDELITY
    _write_plot(args.json, lambda png: plots.against_budget(payload["results"], png, panels))


def cmd_eval_ruler(args) -> None:
    from livekv import plots
    from livekv.evals import ruler
    from livekv.methods import make_method, parse_spec

    tasks = ruler.TASKS if args.tasks == "all" else tuple(t for t in args.tasks.split(",") if t)
    unknown = [t for t in tasks if t not in ruler.TASKS]
    if unknown:
        raise ValueError(f"unknown RULER task(s) {', '.join(unknown)}; choose from {', '.join(ruler.TASKS)} or 'all'")
    protocols = ruler.PROTOCOLS if args.protocol == "both" else (args.protocol,)
    knobs = {k: v for k, v in _knobs(args).items() if k != "budget"}
    methods = []
    for spec in split_specs(args.method):  # specs such as quest:gqa_pool=mean compare knobs in one run
        name, own = parse_spec(spec)
        for budget in (args.budget or [None]):
            cfg = {**knobs, "budget": budget, **own}
            make_method(name, ignore_unknown=True, **cfg)  # validate now, with a clear error
            methods.append((spec, cfg))
            if name == "dense":
                break
    _require_corpus()
    if args.split == "test":
        from livekv.evals.corpus import check_shakespeare

        check_shakespeare()
    model, tok = _load(args)
    for context in args.context:
        _check_positions(model, "context", context, context + 100)
    payload = ruler.evaluate(model, tok, methods, args.context, args.split, tasks, args.cases, protocols,
                             first=args.first, template=args.template, progress=True)
    _write_json(args.json, payload, args)
    _write_plot(args.json, lambda png: plots.ruler_tasks(payload["results"], png))


def cmd_stream_qa(args) -> None:
    import torch

    from livekv.evals import stream_qa
    from livekv.vlm import WEIGHTS, load_default_vlm

    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = load_default_vlm(args.model or WEIGHTS)
    payload = stream_qa.evaluate(adapter, split_specs(args.method), args.minutes, seed=args.seed,
                                 n_questions=args.questions, memory_tokens=args.memory_tokens, streams=args.streams)
    _write_json(args.json, payload, args)


def cmd_train_vlm(args) -> None:
    import dataclasses

    from livekv.vlm.train import TrainConfig, train

    train(TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if "help" in f.metadata}))


def cmd_bench(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.task == "serve":
        from livekv.bench import serve as bench

        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
        payload = bench.run(arguments.ints(args.sessions), args.duration, args.fps, args.ask_every, args.method, args.url,
                            args.server_threads, headers)
    elif args.task == "soak":
        from livekv.bench import soak as bench
        from livekv.vlm import load_default_vlm

        payload = bench.run(load_default_vlm(), args.method, args.frames, args.every)
    elif args.task == "stream":
        from livekv.bench import stream as bench

        adapter = bench.random_llava_onevision(args.image_size, args.layers)
        print(f"random LLaVA-OneVision, 0.5B text shape, {adapter.tokens_per_frame} visual tokens per frame", file=sys.stderr)
        payload = bench.run(adapter, [m for m in args.method.split(",") if m], args.frames, clip_frames=args.clip_frames)
    else:
        from livekv.bench import decode as bench

        methods = _method_grid(args)
        _require_corpus()
        loaded = {weights: _load(args, weights) for weights in args.weights}  # each form decodes every method
        forms, tok = {weights: model for weights, (model, _) in loaded.items()}, loaded[args.weights[0]][1]
        payload = bench.run(forms, tok, methods, args.context, steps=args.steps, rounds=args.rounds,
                            recall_core=args.recall_core, progress=True)
    _write_json(args.json, payload, args)
    _write_plot(args.json, lambda png: bench.plot(payload["results"], png))


def cmd_stream(args) -> None:
    from livekv import plots
    from livekv.stream.cli import stream

    payload, failure = stream(args)
    _write_json(args.json, payload, args)
    _write_plot(args.json, lambda png: plots.stream_timeline(payload["memory"], png))
    if failure is not None:
        raise failure


def cmd_serve(args) -> None:
    from livekv.serve import run
    from livekv.serve.config import RayConfig

    config = ServeConfig(**given(args, fields_of(ServeConfig)))
    ray_options = given(args, fields_of(RayConfig))
    ray_config = RayConfig(**ray_options)
    if not ray_config.ray:
        if ray_options.keys() - {"ray"}:
            raise ValueError(f"--{'/--'.join(k.replace('_', '-') for k in sorted(ray_options.keys() - {'ray'}))} "
                             "only apply with --ray")
        run(config)
        return
    try:
        from livekv.serve import ray as on_ray
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"livekv serve --ray needs Ray Serve ({e}): pip install 'livekv[ray]'") from None
    on_ray.run(config, ray_config)


def cmd_methods(args) -> None:
    from livekv.methods import METHODS

    for name, cls in METHODS.items():
        also = f" (also: {', '.join(cls.aliases)})" if cls.aliases else ""
        print(f"{name}{also} [{', '.join(cls.contexts)}]: {' '.join((cls.__doc__ or '').split())}")
        for option in fields_of(cls):
            print(f"    {option.name} = {option.default!r}: {option.help}")


COMMANDS = {"demo": cmd_demo, "generate": cmd_generate, "chat": cmd_chat, "eval": cmd_eval, "eval_ruler": cmd_eval_ruler,
            "stream_qa": cmd_stream_qa, "train_vlm": cmd_train_vlm, "bench": cmd_bench, "stream": cmd_stream,
            "serve": cmd_serve, "methods": cmd_methods}


def build_parser() -> argparse.ArgumentParser:
    return arguments.build_parser(COMMANDS, __doc__)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    _check_json_path(getattr(args, "json", None))
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise SystemExit(f"livekv: error: {e}") from e
    except KeyboardInterrupt:
        print("\nlivekv: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
