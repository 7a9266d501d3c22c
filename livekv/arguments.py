"""The ``livekv`` command line: its parser, one function per group of commands. Knobs come from the config
dataclasses (``livekv.options``): a method's from its config, the server's from ``ServeConfig``, training's from
``TrainConfig``."""

from __future__ import annotations

import argparse

from livekv.methods import knob_options
from livekv.options import Option, add_options, fields_of, ints, positive_float, positive_int, weights_list
from livekv.quantize import WEIGHTS
from livekv.serve.config import RayConfig, ServeConfig


def build_parser(commands: dict, description: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``commands`` maps a command's name (``"demo"``, ``"eval"``, ...) to the function that runs it."""
    parser = argparse.ArgumentParser(prog="livekv", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (_demo, _text, _evals, _train, _bench, _stream, _serve):
        group(sub, commands)
    return parser


def _demo(sub, commands: dict) -> None:
    """``livekv demo``: the main job."""
    p = sub.add_parser("demo", help="the main job: questions about a live synthetic video stream, answered by the "
                       "embedded VLM from livevlm's bounded memory (--text: a needle on the embedded SmolLM2)")
    add_model_args(p)
    p.add_argument("--text", action="store_true", help="the long-context text demo instead (needle, dense vs quest)")
    p.add_argument("--method", default="livevlm", help="streaming method of the video demo")
    p.add_argument("--minutes", type=float, default=2.0, help="length of the video demo's stream")
    p.add_argument("--speed", type=float, default=0.0, help="pace the video demo at this many times real time (0: as fast as it runs)")
    p.add_argument("--json", help="write every question, answer, latency and the memory held here")
    p.set_defaults(func=commands["demo"])


def _text(sub, commands: dict) -> None:
    """``livekv generate`` and ``livekv chat``."""
    for name in ("generate", "chat"):
        p = sub.add_parser(name, help=f"{name} with a livekv cache; reports tokens/s and KV bytes per tier")
        add_model_args(p)
        add_method_args(p, multi=False)
        if name == "generate":
            p.add_argument("--prompt")
            p.add_argument("--prompt-file")
            form = p.add_mutually_exclusive_group()
            form.add_argument("--raw", action="store_true",
                              help="feed the prompt as is (default: in the model's chat template, if it has one)")
            form.add_argument("--chat", action="store_true",
                              help="the prompt in the model's chat template (the default; kept for compatibility)")
        p.add_argument("--max-new-tokens", type=positive_int, default=128)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens)")
        p.add_argument("--json", help="write the text, tokens, speed and KV bytes per tier here" +
                       (", one record per turn" if name == "chat" else ""))
        p.set_defaults(func=commands[name])


def _evals(sub, commands: dict) -> None:
    """``livekv eval needle | fidelity | ruler | stream-qa``."""
    evals = sub.add_parser("eval", help="accuracy and fidelity").add_subparsers(dest="task", required=True)
    for task, text in (("needle", "needle in a haystack on the real model"),
                       ("fidelity", "fidelity to dense and perplexity on the real model")):
        p = evals.add_parser(task, help=text)
        add_model_args(p)
        add_method_args(p, multi=True)
        p.add_argument("--context", type=ints, default="2048,4096", help="context lengths, comma-separated")
        p.add_argument("--depths", type=int, default=5, help="needle: depths per length")
        p.add_argument("--target", type=int, default=256, help="fidelity: tokens fed one by one after the context")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", help="write results here (and a PNG plot against the budget beside it)")
        p.set_defaults(func=commands["eval"])
    _ruler(evals, commands)
    p = evals.add_parser("stream-qa", help="streaming video QA on the synthetic world, with the embedded VLM")
    p.add_argument("--method", "--methods", dest="method", default="full,livevlm", help="streaming methods, comma-separated")
    p.add_argument("--minutes", type=float, default=2.0, help="stream length")
    p.add_argument("--questions", type=int, default=60, help="questions per stream")
    p.add_argument("--streams", type=int, default=1, help="streams (seeds seed, seed+1, ...), questions pooled")
    p.add_argument("--memory-tokens", type=int, default=None,
                   help="fast-tier memory of every bounded method, tokens per layer (default: each method's own)")
    p.add_argument("--model", default=None, help="a checkpoint made by `livekv train-vlm` (default: the embedded one)")
    add_precision_args(p, video=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="write results here")
    p.set_defaults(func=commands["stream_qa"])


def _ruler(evals, commands: dict) -> None:
    p = evals.add_parser("ruler", help="RULER-style long-context tasks (needles, variable tracking, common and "
                         "frequent words) on the real model, on a dev or a held-apart test split")
    add_model_args(p)
    add_method_args(p, multi=True)
    p.set_defaults(method="dense,quest,freekv,clusterkv", budget=[256])
    p.add_argument("--context", type=ints, default="4096", help="context lengths, comma-separated")
    p.add_argument("--split", choices=["dev", "test"], default="dev",
                   help="dev: choose on it; test: held apart, quote it (livekv/evals/ruler/__init__.py says what differs)")
    p.add_argument("--tasks", default="all", help="comma-separated: niah_single, niah_multikey, niah_multivalue, "
                   "niah_multiquery, vt, cwe, fwe (default: all)")
    p.add_argument("--cases", type=int, default=10, help="cases per task (one case is 100/N points of a task)")
    p.add_argument("--first", type=int, default=0, help="index of the first case (run more cases in pieces)")
    p.add_argument("--protocol", choices=["prompt", "fed", "both"], default="both",
                   help="prompt: the question prefilled with the context, the answer decoded sparse; fed: the "
                   "question fed token by token after the context")
    p.add_argument("--template", choices=["chat", "raw"], default="chat", help="the prompt in the model's chat "
                   "template, or plain text")
    p.add_argument("--json", help="write results and every case here (and a PNG of accuracy against the budget "
                   "per task beside it)")
    p.set_defaults(func=commands["eval_ruler"])


def _train(sub, commands: dict) -> None:
    """``livekv train-vlm``."""
    p = sub.add_parser("train-vlm", help="train the embedded default VLM from scratch on the synthetic world")
    add_options(p, train_vlm_options())
    p.set_defaults(func=commands["train_vlm"])


def _bench(sub, commands: dict) -> None:
    """``livekv bench decode | stream | serve | soak``."""
    bench = sub.add_parser("bench", help="speed benchmarks").add_subparsers(dest="task", required=True)
    p = bench.add_parser("decode", help="decode ms/token per method and context length")
    add_model_args(p, several_weights=True)
    add_method_args(p, multi=True)
    p.add_argument("--context", type=ints, default="4096,16384,32768", help="context lengths, comma-separated")
    p.add_argument("--steps", type=int, default=8, help="decode steps per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    p.add_argument("--recall-core", action="store_true",
                   help="methods that recall in the background (freekv) compute on one thread fewer, leaving a core to the recall worker")
    p.add_argument("--json", help="write results here (and a PNG plot beside it)")
    p.set_defaults(func=commands["bench"], method="dense,quest", budget="256")
    p = bench.add_parser("stream", help="video streams: ingest frames/s, time to first answer token, memory vs frames")
    p.add_argument("--methods", dest="method", default="full,rekv,livevlm",
                   help="streaming methods, comma-separated; `offline`: the whole video prefilled when the question comes")
    p.add_argument("--frames", type=ints, default="16,64,256,512", help="checkpoints: frames streamed, comma-separated")
    p.add_argument("--image-size", type=int, default=64, help="pixels per frame side: (size/16)^2 tokens per frame (224: 196)")
    p.add_argument("--layers", type=int, default=None, help="text layers (default: the 0.5B model's 24)")
    p.add_argument("--clip-frames", type=positive_int, default=4, help="frames per clip pushed")
    add_precision_args(p, video=True)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", help="write results here (and a PNG plot beside it)")
    p.set_defaults(func=commands["bench"])

    p = bench.add_parser("serve", help="load on livekv serve: sessions ingesting a video at fps and asked every "
                         "few seconds: TTFT p50/p95, ingest, drops, memory, sessions held in real time")
    p.add_argument("--sessions", default="1,2,4,8", help="numbers of concurrent sessions, comma-separated")
    p.add_argument("--duration", type=positive_float, default=30.0, help="seconds of video each session streams")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second each session pushes")
    p.add_argument("--ask-every", type=float, default=10.0, help="seconds between a session's questions")
    p.add_argument("--method", default="livevlm", help="the streams' method")
    p.add_argument("--url", default=None, help="a running server (default: start `livekv serve` for the run)")
    p.add_argument("--api-key", default=None, help="its API key, if it needs one")
    p.add_argument("--server-threads", type=int, default=2, help="torch threads of the server started here")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="write results here (and a PNG plot beside it)")
    p.set_defaults(func=commands["bench"])
    p = bench.add_parser("soak", help="a long stream into one session of the embedded video model on its defaults: "
                         "RSS, fast-tier bytes and ingest at start and end")
    p.add_argument("--method", default="livevlm")
    p.add_argument("--frames", type=int, default=10_000)
    p.add_argument("--every", type=int, default=500, help="a record every this many frames")
    add_precision_args(p, video=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write results here (and a PNG plot beside it)")
    p.set_defaults(func=commands["bench"])


def _stream(sub, commands: dict) -> None:
    """``livekv stream``."""
    p = sub.add_parser("stream", help="stream a video into a video-language model and ask questions while it plays")
    p.add_argument("video", help="video file, stream URL, device:/dev/videoN, or a folder of images")
    p.add_argument("--model", default="default", help="'default': the embedded video model (it knows only the "
                   "synthetic world of `livekv eval stream-qa`); a local LLaVA-OneVision or Qwen2-VL checkpoint "
                   "directory; or 'random' (a tiny random model: mechanics and speed only, its answers are meaningless)")
    add_precision_args(p, video=True)
    p.add_argument("--method", default="livevlm", help="streaming method (see `livekv methods`)")
    p.add_argument("--ask", action="append", default=[], help="a question answered when the video ends (repeatable)")
    p.add_argument("--ask-at", action="append", default=[], metavar="SECONDS:QUESTION",
                   help="a question asked once the stream reaches SECONDS (repeatable)")
    p.add_argument("--interactive", action="store_true", help="type questions while the video plays")
    p.add_argument("--fps", type=float, default=0.5, help="frames sampled per second of video")
    p.add_argument("--clip-frames", type=positive_int, default=None,
                   help="frames per clip (default: 1, or the model's multiple)")
    p.add_argument("--realtime", action="store_true", help="pace the stream at the video's own speed")
    p.add_argument("--max-frames", type=positive_int, default=None,
                   help="stop after this many sampled frames (a camera never ends)")
    p.add_argument("--duration", type=positive_float, default=None, metavar="SECONDS",
                   help="stop at this time of the stream")
    p.add_argument("--system", default=None, help="system prompt (default: the embedded model's own; for a "
                   "checkpoint, one asking for brief answers about a live video)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--memory-tokens", type=int, default=None, help="fast-tier memory of a bounded method, tokens "
                   "per layer; the method sets its budgets from it (default: what fits the model)")
    add_options(p, knob_options("stream"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="write every answer with its latency, and the memory over time, here (and a PNG "
                   "plot of the memory and ingest speed beside it)")
    p.set_defaults(func=commands["stream"])


def _serve(sub, commands: dict) -> None:
    """``livekv serve`` and ``livekv methods``."""
    p = sub.add_parser("serve", help="an HTTP server: OpenAI-compatible chat and live video sessions")
    add_options(p, fields_of(ServeConfig))
    add_options(p.add_argument_group("on Ray Serve (livekv.serve.ray)"), fields_of(RayConfig))
    p.set_defaults(func=commands["serve"])

    p = sub.add_parser("methods", help="list the registered methods and their knobs")
    p.set_defaults(func=commands["methods"])


def add_model_args(p: argparse.ArgumentParser, several_weights: bool = False) -> None:
    """``--model``, ``--dtype``, ``--weights`` (with ``several_weights``: comma-separated, a list), ``--device``,
    ``--threads``."""
    p.add_argument("--model", default=None, help="local model directory (default: the embedded SmolLM2-135M-Instruct)")
    add_precision_args(p, several_weights)
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_precision_args(p: argparse.ArgumentParser, several_weights: bool = False, video: bool = False) -> None:
    """``--dtype`` and ``--weights`` (with ``several_weights``: comma-separated, a list). ``video``: the weights are
    the language model's (a video model's vision tower is cast to --dtype, never quantized)."""
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's dtype: its activations, its KV cache, and its weights unless --weights")
    layers = ("the language model's linear layers' weights (lm_head too; the vision tower's stay in --dtype)" if video
              else "the linear layers' weights (lm_head too)")
    text = (f"how {layers} are stored: float32: as loaded (in --dtype); bfloat16; int8 (a scale per output channel) "
            "or int4 (groups of 32): weight-only, CPU only, for faster decoding")
    if several_weights:
        p.add_argument("--weights", type=weights_list, default=["float32"], help=text + "; comma-separated: each "
                       "form measured with every method, interleaved (default: float32)")
    else:
        p.add_argument("--weights", default="float32", choices=WEIGHTS, help=text + " (default: float32)")


def add_method_args(p: argparse.ArgumentParser, multi: bool) -> None:
    """``--method`` and every text method's knobs (from their config dataclasses); with ``multi``, comma-separated
    methods and budgets."""
    help_m = "method name(s), comma-separated" if multi else "method name"
    p.add_argument("--method", "--methods", dest="method", default="quest", help=f"{help_m} (see `livekv methods`)")
    if multi:
        p.add_argument("--budget", type=ints, default=None, help="tokens read per KV head per decode step "
                       "(comma-separated list)")
    add_options(p, [o for o in knob_options("text") if not (multi and o.name == "budget")])


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def train_vlm_options() -> list[Option]:
    """``livekv train-vlm``'s options: the ``TrainConfig`` fields with a help text (``--max-seconds`` for
    ``max_seconds``)."""
    from livekv.vlm.train import TrainConfig

    return [option for option in fields_of(TrainConfig) if option.help]
