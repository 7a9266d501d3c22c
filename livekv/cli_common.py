"""What the ``livekv`` commands share: a method's knobs from the flags, loading the model, checks made before any
work (corpus, positions, ``--json`` paths), progress, and writing JSON and plots."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from livekv.methods import knob_options
from livekv.options import given


def method_knobs(args) -> dict:
    """The text knobs given on the command line."""
    return given(args, knob_options("text"))


def one_method_knobs(args) -> dict:
    """The text knobs given on the command line of a command that runs one method (``--method``), checked against
    it (``ValueError``) before any model loads."""
    from livekv.methods import make_method

    knobs = method_knobs(args)
    make_method(args.method, **knobs)
    return knobs


def method_grid(args) -> list[tuple[str, dict]]:
    """(name, knobs) for every method x budget; dense once (it has no budget). A name may be a spec with knobs of
    its own (``quest:coarse_pages=0``), which win over the shared ones."""
    from livekv.methods import make_method, split_specs

    names = split_specs(args.method)
    budgets = args.budget if args.budget is not None else [None]
    knobs = {k: v for k, v in method_knobs(args).items() if k != "budget"}
    grid = []
    for name in names:
        for budget in budgets:
            cfg_knobs = {**knobs, "budget": budget}
            make_method(name, ignore_unknown=True, **cfg_knobs)  # validate now, with a clear error
            grid.append((name, cfg_knobs))
            if name.partition(":")[0] == "dense":
                break
    return grid


def require_corpus() -> None:
    from livekv.evals.corpus import check_corpus

    check_corpus()


def load(args, weights: str | None = None):
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


def precision(args) -> dict:
    """``--dtype`` (as a torch dtype) and ``--weights``: the keyword arguments of the video models' loaders."""
    import torch

    return {"dtype": getattr(torch, args.dtype), "weights": args.weights}


def check_positions(model, what: str, tokens: int, used: int = 0) -> None:
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


def prefill_progress(tokens: int, chunk: int):
    """``progress(done, total)`` for ``generate_stream``: a bar on stderr when the prompt spans several chunks."""
    from livekv.progress import bar

    prefilled = bar(tokens, "prefill", "tok", enabled=tokens > chunk)

    def progress(done: int, total: int) -> None:
        prefilled.update(done - prefilled.n)
        if done == total:
            prefilled.close()

    return progress


def stats_line(stats) -> str:
    mem = stats.memory
    return (f"[prompt {stats.prompt_tokens} tok, prefill {stats.prefill_tokens_per_s:.0f} tok/s | "
            f"{stats.new_tokens} new tok, decode {stats.decode_tokens_per_s:.1f} tok/s | "
            f"KV fast tier {mem.get('fast_kv_bytes', 0) / 1e6:.1f} MB, host tier {mem.get('host_kv_bytes', 0) / 1e6:.1f} MB]")


def check_json_path(path: str | None) -> None:
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
    try:  # a file made and gone at once: os.access says yes to root where nothing can be written (/proc, read-only)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise SystemExit(f"livekv: error: --json {path}: {parent} is not writable ({e.strerror})") from None


def write_json(path: str | None, payload: dict, args) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"command": " ".join(sys.argv), **payload}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}", file=sys.stderr)


def chat_ids(tok, messages: list[dict]) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def prompt_ids(tok, text: str, args) -> list[int]:
    """The prompt in the model's chat template when the tokenizer has one (an instruct model fed raw text tends to
    end its answer at once), else, or with ``--raw``, as is."""
    if args.raw:
        return tok.encode(text)
    if not getattr(tok, "chat_template", None):
        if args.chat:
            raise ValueError("--chat: this model's tokenizer has no chat template")
        return tok.encode(text)
    return chat_ids(tok, [{"role": "user", "content": text}])


def print_tokens(tok, tokens) -> list[int]:
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


def reply_record(tok, ids: list[int], stats) -> dict:
    """Say on stderr why a reply stopped and what it measured; return that as a record (for ``--json``)."""
    stopped = "eos" if ids and ids[-1] == tok.eos_token_id else "max_new_tokens"
    if stopped == "max_new_tokens":
        print(f"[stopped after {len(ids)} tokens: --max-new-tokens]", file=sys.stderr)
    print(stats_line(stats), file=sys.stderr)
    return {"text": tok.decode(ids, skip_special_tokens=True), "token_ids": ids, "new_tokens": len(ids),
            "stopped": stopped, "prompt_tokens": stats.prompt_tokens, "prefill_s": stats.prefill_s,
            "prefill_tokens_per_s": stats.prefill_tokens_per_s, "decode_s": stats.decode_s,
            "decode_tokens_per_s": stats.decode_tokens_per_s, **stats.memory}


def write_plot(json_path: str | None, draw) -> None:
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
