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
import logging
import os
import sys

from livekv import arguments
from livekv import cli_common as common
from livekv.methods import split_specs
from livekv.options import fields_of, given, ints
from livekv.serve.config import ServeConfig


def cmd_generate(args) -> None:
    import torch

    from livekv import LiveKVCache
    from livekv.generation import GenerationStats, generate_stream

    text = open(args.prompt_file).read() if args.prompt_file else args.prompt
    if text is None:
        raise SystemExit("give --prompt or --prompt-file")
    knobs = common.one_method_knobs(args)
    model, tok = common.load(args)
    ids = common.prompt_ids(tok, text, args)
    common.check_positions(model, "prompt", len(ids), len(ids) + args.max_new_tokens - 1)
    cache = LiveKVCache(model.config, args.method, **knobs)
    stats = GenerationStats()
    stream = generate_stream(model, cache, torch.tensor([ids], device=args.device), args.max_new_tokens,
                             stop_ids={tok.eos_token_id}, temperature=args.temperature, chunk=args.chunk,
                             progress=common.prefill_progress(len(ids), args.chunk), stats=stats)
    record = common.reply_record(tok, common.print_tokens(tok, stream), stats)
    common.write_json(args.json, {"method": args.method, **knobs, **record}, args)


def cmd_chat(args) -> None:
    common.one_method_knobs(args)  # a bad method or knob is refused before the model loads
    model, tok = common.load(args)
    turns = []
    print("livekv chat: type a message, empty line or Ctrl-D to quit", file=sys.stderr)
    try:
        _chat_turns(args, model, tok, turns)
    finally:  # the turns so far are kept however the chat ends (Ctrl-C, a conversation too long)
        common.write_json(args.json, {"method": args.method, **common.method_knobs(args), "turns": turns}, args)


def _chat_turns(args, model, tok, turns: list[dict]) -> None:
    """Read messages from stdin until an empty line or its end, answering each; append a record per turn."""
    import torch

    from livekv import LiveKVCache
    from livekv.generation import GenerationStats, generate_stream

    knobs = common.method_knobs(args)
    cache, fed, messages = LiveKVCache(model.config, args.method, **knobs), [], []
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        ids = common.chat_ids(tok, messages)
        common.check_positions(model, "conversation", len(ids), len(ids) + args.max_new_tokens - 1)
        if ids[: len(fed)] != fed:  # the conversation re-tokenised differently: start the cache over
            cache, fed = LiveKVCache(model.config, args.method, **knobs), []
        stats = GenerationStats()
        new = torch.tensor([ids[len(fed):]], device=args.device)
        reply = common.print_tokens(tok, generate_stream(
            model, cache, new, args.max_new_tokens, stop_ids={tok.eos_token_id}, temperature=args.temperature,
            chunk=args.chunk, stats=stats, progress=common.prefill_progress(new.shape[1], args.chunk)))
        turns.append({"user": line.strip(), **common.reply_record(tok, reply, stats)})
        fed = ids + reply[:-1] if reply and reply[-1] == tok.eos_token_id else ids + reply
        messages.append({"role": "assistant", "content": turns[-1]["text"]})


def cmd_demo(args) -> None:
    if not args.text:
        import torch

        from livekv.evals import stream_qa
        from livekv.vlm import load_default_vlm

        torch.set_num_threads(args.threads or 2)
        payload = stream_qa.demo(load_default_vlm(**common.precision(args)), method=args.method, minutes=args.minutes,
                                 speed=args.speed)
        common.write_json(args.json, payload, args)
        return
    from livekv.evals import needle

    common.require_corpus()
    model, tok = common.load(args)
    print("A 2048-token haystack of natural text hides one number; the question is decoded through the sparse "
          "path. dense reads every token; quest reads 256 per step.")
    payload = needle.evaluate(model, tok, [("dense", {}), ("quest", {"budget": 256})], [2048], depths=(0.25, 0.75))
    common.write_json(args.json, payload, args)


def cmd_eval(args) -> None:
    from livekv import plots

    methods = common.method_grid(args)
    common.require_corpus()
    model, tok = common.load(args)
    contexts = args.context
    for context in contexts:  # then needle feeds back 7 of its 8 answer tokens, fidelity all target tokens but one
        common.check_positions(model, "context", context, context + (7 if args.task == "needle" else args.target - 1))
    if args.task == "needle":
        from livekv.evals import needle

        depths = [round((i + 0.5) / args.depths, 3) for i in range(args.depths)]
        payload = needle.evaluate(model, tok, methods, contexts, depths=depths, seed=args.seed, progress=True)
    else:
        from livekv.evals import fidelity

        payload = fidelity.evaluate(model, tok, methods, contexts, target=args.target, seed=args.seed, progress=True)
    common.write_json(args.json, payload, args)
    panels = plots.NEEDLE if args.task == "needle" else plots.FIDELITY
    common.write_plot(args.json, lambda png: plots.against_budget(payload["results"], png, panels))


def cmd_eval_ruler(args) -> None:
    from livekv import plots
    from livekv.evals import ruler
    from livekv.methods import make_method, parse_spec

    tasks = ruler.TASKS if args.tasks == "all" else tuple(t for t in args.tasks.split(",") if t)
    unknown = [t for t in tasks if t not in ruler.TASKS]
    if unknown:
        raise ValueError(f"unknown RULER task(s) {', '.join(unknown)}; choose from {', '.join(ruler.TASKS)} or 'all'")
    protocols = ruler.PROTOCOLS if args.protocol == "both" else (args.protocol,)
    knobs = {k: v for k, v in common.method_knobs(args).items() if k != "budget"}
    methods = []
    for spec in split_specs(args.method):  # specs such as quest:gqa_pool=mean compare knobs in one run
        name, own = parse_spec(spec)
        for budget in (args.budget or [None]):
            cfg = {**knobs, "budget": budget, **own}
            make_method(name, ignore_unknown=True, **cfg)  # validate now, with a clear error
            methods.append((spec, cfg))
            if name == "dense":
                break
    common.require_corpus()
    if args.split == "test":
        from livekv.evals.corpus import check_shakespeare

        check_shakespeare()
    model, tok = common.load(args)
    for context in args.context:
        common.check_positions(model, "context", context, context + 100)
    payload = ruler.evaluate(model, tok, methods, args.context, args.split, tasks, args.cases, protocols,
                             first=args.first, template=args.template, progress=True)
    common.write_json(args.json, payload, args)
    common.write_plot(args.json, lambda png: plots.ruler_tasks(payload["results"], png))


def cmd_stream_qa(args) -> None:
    import torch

    from livekv.evals import stream_qa
    from livekv.vlm import WEIGHTS, load_default_vlm

    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = load_default_vlm(args.model or WEIGHTS, **common.precision(args))
    payload = stream_qa.evaluate(adapter, split_specs(args.method), args.minutes, seed=args.seed,
                                 n_questions=args.questions, memory_tokens=args.memory_tokens, streams=args.streams)
    common.write_json(args.json, {"dtype": args.dtype, "weights": args.weights, **payload}, args)


def cmd_train_vlm(args) -> None:
    from livekv.vlm.train import TrainConfig, train

    train(TrainConfig(**given(args, arguments.train_vlm_options())))


def cmd_bench(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.task == "serve":
        from livekv.bench import serve as bench

        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
        payload = bench.run(ints(args.sessions), args.duration, args.fps, args.ask_every, args.method, args.url,
                            args.server_threads, headers)
    elif args.task == "soak":
        from livekv.bench import soak as bench
        from livekv.vlm import load_default_vlm

        payload = {"dtype": args.dtype, "weights": args.weights,
                   **bench.run(load_default_vlm(**common.precision(args)), args.method, args.frames, args.every)}
    elif args.task == "stream":
        from livekv.bench import stream as bench

        adapter = bench.random_llava_onevision(args.image_size, args.layers, **common.precision(args))
        print(f"random LLaVA-OneVision, 0.5B text shape, {adapter.tokens_per_frame} visual tokens per frame, "
              f"{args.dtype}, {args.weights} weights", file=sys.stderr)
        payload = {"dtype": args.dtype, "weights": args.weights,
                   **bench.run(adapter, [m for m in args.method.split(",") if m], args.frames,
                               clip_frames=args.clip_frames)}
    else:
        from livekv.bench import decode as bench

        methods = common.method_grid(args)
        common.require_corpus()
        loaded = {weights: common.load(args, weights) for weights in args.weights}  # each form decodes every method
        forms, tok = {weights: model for weights, (model, _) in loaded.items()}, loaded[args.weights[0]][1]
        payload = bench.run(forms, tok, methods, args.context, steps=args.steps, rounds=args.rounds,
                            recall_core=args.recall_core, progress=True)
    common.write_json(args.json, payload, args)
    common.write_plot(args.json, lambda png: bench.plot(payload["results"], png))


def cmd_stream(args) -> None:
    from livekv import plots
    from livekv.stream.cli import stream

    payload, failure = stream(args)
    common.write_json(args.json, payload, args)
    common.write_plot(args.json, lambda png: plots.stream_timeline(payload["memory"], png))
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
    common.check_json_path(getattr(args, "json", None))
    try:
        args.func(args)
        sys.stdout.flush()  # here, where a reader gone is caught (not in the interpreter's flush at exit)
    except BrokenPipeError:  # stdout's reader went (`| head`): end quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None
    except (ValueError, OSError, ModuleNotFoundError, MemoryError) as e:  # OSError: a missing, unreadable file
        raise SystemExit(f"livekv: error: {e}") from e
    except KeyboardInterrupt:
        print("\nlivekv: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
