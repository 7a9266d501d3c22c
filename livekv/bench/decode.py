"""Decode speed per method and context length, measured side by side in one run.

For each context length every method gets its own cache, filled to that length; then the methods decode in
interleaved rounds (so machine noise hits them alike) and the median ms/token per method is reported, with:

* the share of a step spent in selection and in recall on the critical path (from a separate profiled round:
  profiling synchronises); for methods that recall in the background (``freekv``) also the background recall
  time as a share of the step and the share of it the critical path did not wait for ("hidden"; on a CPU whose
  cores all compute, hidden work still slows the compute threads: compare ms/token, not this share);
* bytes read per step: weights + the KV that attention and selection actually touch;
* the memory-traffic limit: those bytes divided by this machine's measured memory bandwidth, and how far the
  measured time is from it.

``recall_core``: methods that recall in the background run their model compute on one thread fewer, leaving a
core to the recall worker (on a CPU that is how such a method should be deployed: with every core computing, the
worker only competes with the compute threads). The other methods keep every thread.

Filling: a real prefill of ``fill_tokens`` of natural text gives each layer real keys and values, which are then
tiled up to the context length (an 8k prefill takes ~25 s here, 32k would take minutes; decode speed depends on
the amount of KV, not on its content). SmolLM2's rotary positions past 8k are extrapolated: this measures speed,
not accuracy.
"""

from __future__ import annotations

import statistics
import time

import torch

from livekv.cache import LiveKVCache
from livekv.layers import DenseLayer, RecallableLayer
from livekv.protocol import LayerStats
from livekv.generation import prefill
from livekv.progress import above_bars, bar
from livekv.quantize import weight_bytes
from livekv.sysmem import available_bytes


def memory_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Measured copy bandwidth in bytes/s, counting the bytes read and written (best of ``repeats``)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def fill_cache(cache: LiveKVCache, layer_kv: list[tuple[torch.Tensor, torch.Tensor]], context: int) -> None:
    """Append ``context`` tokens to every layer by tiling that layer's ``[B, G, n, D]`` keys and values."""
    for layer, (k, v) in zip(cache.layers, layer_kv):
        reps = -(-context // k.shape[2])
        layer.append(k.repeat(1, 1, reps, 1)[:, :, :context], v.repeat(1, 1, reps, 1)[:, :, :context])


def bytes_per_step(model, cache: LiveKVCache) -> int:
    """Bytes a decode step must read: the weights (``weight_bytes``: quantized ones as stored) + the KV it reads
    (dense: all; sparse: what the last selection read (page digests, those of a two-level selection's coarse
    runs and candidate pages, or cluster centroids) + the recalled tokens, read from the host tier and again by
    attention)."""
    total = weight_bytes(model)
    for layer in cache.layers:
        if isinstance(layer, DenseLayer):
            total += layer.fast.used
        elif isinstance(layer, RecallableLayer):
            s = layer.stats
            recalled = s.bytes_recalled / max(s.steps, 1)
            index = layer.selector.select_nbytes  # digests (those scored) or centroids
            total += index + 2 * int(recalled)
    return total


def check_room(caches: list[LiveKVCache], total: int, context: int) -> None:
    """Before the next of ``total`` caches is filled: a ``MemoryError`` where the largest one filled so far would
    not fit in the memory left (with a tenth to spare), instead of the process being killed part-way."""
    free = available_bytes()
    if not caches or free is None:
        return
    reserved = [c.memory() for c in caches]
    largest = max(m["fast_kv_reserved_bytes"] + m["host_kv_reserved_bytes"] for m in reserved)
    if largest * 1.1 > free:
        raise MemoryError(
            f"bench decode: {total} caches at context {context} do not fit: the largest of the {len(caches)} made "
            f"so far takes {largest / 2**30:.2f} GiB and {free / 2**30:.2f} GiB is left; run fewer methods, budgets "
            f"or weights per call (every cache of a context is kept, so that the methods interleave)")


def recalls_in_background(cache: LiveKVCache) -> bool:
    """Whether a cache has layers that recall on a worker thread (freekv)."""
    return any(layer.background for layer in cache.recallable_layers)


@torch.no_grad()
def _decode_round(models: list, caches: list[LiveKVCache], token: torch.Tensor, steps: int,
                  threads: list[int]) -> list[float]:
    """ms/token of each cache, one after the other, cache i decoded by ``models[i]`` with ``threads[i]`` torch
    threads."""
    out, default = [], torch.get_num_threads()
    for model, cache, n in zip(models, caches, threads):
        torch.set_num_threads(n)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.wait()  # background recalls belong to this method's time
        out.append((time.perf_counter() - t0) / steps * 1000)
    torch.set_num_threads(default)
    return out


def _filled_caches(config, entries: list, layer_kv: list, context: int) -> list[LiveKVCache]:
    """One cache per entry, each filled to ``context`` tokens (refused before one would not fit)."""
    caches = []
    for _, _, name, knobs in entries:
        check_room(caches, len(entries), context)
        caches.append(LiveKVCache(config, name, ignore_unknown=True, **knobs))
        fill_cache(caches[-1], layer_kv, context)
    return caches


def _timed_rounds(models, caches, token, steps: int, rounds: int, threads: list[int], rounds_bar):
    """A warm-up round, ``rounds`` timed rounds, then one profiled round (selection and recall clocked): the ms per
    token of each timed round and of the profiled one, per cache."""
    _decode_round(models, caches, token, 2, threads)  # warm-up: allocations, first selections
    rounds_bar.update()
    rounds_ms = []
    for _ in range(rounds):
        rounds_ms.append(_decode_round(models, caches, token, steps, threads))
        rounds_bar.update()
    for cache in caches:
        cache.set_profile(True)
        for layer in cache.recallable_layers:
            layer.stats = LayerStats()
    profiled = _decode_round(models, caches, token, steps, threads)
    rounds_bar.update()
    return rounds_ms, profiled


def _record(entry, cache: LiveKVCache, context: int, threads: int, ms: float, profiled_ms: float, steps: int,
            bandwidth: float) -> dict:
    """One method's result: speed, the shares of its step (from the profiled round), bytes and memory."""
    weights, form, name, _ = entry
    s = cache.stats()
    step_bytes = bytes_per_step(form, cache)
    limit_ms = step_bytes / bandwidth * 1000

    def share(seconds: float) -> float:
        return seconds / steps / (profiled_ms / 1000)

    return {
        **({} if weights is None else {"weights": weights}),
        "method": name,
        "context": context,
        "budget": getattr(cache.method, "budget", None),
        "compute_threads": threads,
        "ms_per_token": ms,
        "tokens_per_s": 1000 / ms,
        "select_share": share(s["select_s"]),
        "recall_share": share(s["recall_s"]),
        "recall_background_share": share(s["background_s"]),
        "recall_hidden": s["recall_hidden"],
        "bytes_per_step": step_bytes,
        "bandwidth_bytes_per_s": bandwidth,
        "traffic_limit_ms": limit_ms,
        "x_traffic_limit": ms / limit_ms,
        **cache.memory(),
    }


def _line(r: dict) -> str:
    label = r["method"] if "weights" not in r else f"{r['method']}/{r['weights']}"
    hidden = "" if r["recall_hidden"] is None else (
        f"(background {r['recall_background_share']:5.1%}, {r['recall_hidden']:4.0%} hidden) ")
    return (
        f"decode {label:12s} context={r['context']:6d} budget={r['budget']!s:6s} threads={r['compute_threads']} "
        f"{r['ms_per_token']:8.1f} ms/token select={r['select_share']:5.1%} recall={r['recall_share']:5.1%} {hidden}"
        f"read={r['bytes_per_step'] / 1e6:7.1f} MB/step limit={r['traffic_limit_ms']:6.1f} ms "
        f"(x{r['x_traffic_limit']:.1f}) fast={r['fast_kv_bytes'] / 1e6:.0f} MB host={r['host_kv_bytes'] / 1e6:.0f} MB"
    )


@torch.no_grad()
def run(
    model,
    tokenizer,
    methods: list[tuple[str, dict]],
    contexts: list[int],
    steps: int = 8,
    rounds: int = 3,
    fill_tokens: int = 1024,
    recall_core: bool = False,
    log=print,
    progress: bool = False,
) -> dict:
    """Every method at every context length (see the module docstring); ``progress``: a bar of the decode rounds
    (warm-up, ``rounds``, profiled) on stderr. ``model``: the model, or ``{weights: model}``, forms of one model
    (``--weights``) each decoding with every method, interleaved like methods; records then carry ``weights``."""
    from livekv.evals.corpus import filler_token_ids

    forms = model if isinstance(model, dict) else {None: model}
    model = next(iter(forms.values()))
    entries = [(weights, form, name, knobs) for weights, form in forms.items() for name, knobs in methods]
    models = [form for _, form, _, _ in entries]

    bandwidth = memory_bandwidth()
    log(f"memory bandwidth (copy, read+write): {bandwidth / 1e9:.1f} GB/s; threads={torch.get_num_threads()}")
    ids = torch.tensor([filler_token_ids(tokenizer, fill_tokens)])
    source = LiveKVCache(model.config, "dense")
    prefill(model, source, ids)
    layer_kv = [layer.fast.view() for layer in source.layers]
    token = ids[:, -1:]
    results = []
    rounds_bar = bar(len(contexts) * (rounds + 2), "decode", "round", enabled=progress)
    log = above_bars(log)
    for context in contexts:
        caches = _filled_caches(model.config, entries, layer_kv, context)
        total = torch.get_num_threads()
        threads = [max(1, total - 1) if recall_core and recalls_in_background(c) else total for c in caches]
        rounds_ms, profiled = _timed_rounds(models, caches, token, steps, rounds, threads, rounds_bar)
        for i, (entry, cache) in enumerate(zip(entries, caches)):
            ms = statistics.median(r[i] for r in rounds_ms)
            results.append(_record(entry, cache, context, threads[i], ms, profiled[i], steps, bandwidth))
            log(_line(results[-1]))
        del caches
    rounds_bar.close()
    return {"results": results, "bandwidth_bytes_per_s": bandwidth, "threads": torch.get_num_threads()}


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in dict.fromkeys((r["method"], r["budget"], r.get("weights")) for r in results):
        rows = [r for r in results if (r["method"], r["budget"], r.get("weights")) == key]
        method, budget, weights = key
        method = " ".join(str(x) for x in (method, budget, weights) if x is not None)
        ctx = [r["context"] for r in rows]
        ax.plot(ctx, [r["ms_per_token"] for r in rows], "o-", label=f"{method} measured")
        ax.plot(ctx, [r["traffic_limit_ms"] for r in rows], "x--", alpha=0.6, label=f"{method} memory-traffic limit")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode ms / token")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
