"""PNG plots beside the ``--json`` results of the console script (matplotlib, Agg backend; ``eval`` extra)."""

from __future__ import annotations

NEEDLE = [("accuracy", "needle accuracy")]
FIDELITY = [("agreement", "greedy agreement with dense"), ("mass_recall", "attention mass recalled"),
            ("ppl_ratio", "perplexity / dense perplexity")]
STREAM = [("fast_kv_bytes", "fast-tier KV (MB)", 1e-6), ("host_kv_bytes", "host-tier KV (MB)", 1e-6),
          ("ingest_fps", "ingest (frames/s, mean so far)", 1.0)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def against_budget(results: list[dict], path: str, panels: list[tuple[str, str]]) -> None:
    """One panel per ``(key, label)``: the key against the budget, a line per method and context; methods without
    a budget (dense) as a dashed horizontal line."""
    plt = _pyplot()
    budgets = sorted({r["budget"] for r in results if r["budget"] is not None}) or [1]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for method, context in dict.fromkeys((r["method"], r["context"]) for r in results):
            rows = [r for r in results if (r["method"], r["context"]) == (method, context) and r.get(key) is not None]
            name = f"{method}, context {context}"
            if rows and rows[0]["budget"] is None:
                ax.plot([budgets[0], budgets[-1]], [rows[0][key]] * 2, "--", alpha=0.7, label=name)
            elif rows:
                ax.plot([r["budget"] for r in rows], [r[key] for r in rows], "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (tokens per KV head)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    _save(fig, plt, path)


def ruler_tasks(results: list[dict], path: str) -> None:
    """``livekv eval ruler``: a panel per task (and the retrieval / other / all means), accuracy against the
    budget, a line per method, protocol and context; dense as a dashed horizontal line."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in results))
    cols = min(4, len(tasks))
    rows_n = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        mine = [r for r in results if r["task"] == task]
        for key in dict.fromkeys((r["method"], r["protocol"], r["context"]) for r in mine):
            rows = sorted((r for r in mine if (r["method"], r["protocol"], r["context"]) == key),
                          key=lambda r: r["budget"] or 0)
            name = f"{key[0]}, {key[1]}, {key[2]}"
            ys = [100 * r["accuracy"] for r in rows]
            if rows[0]["budget"] is None:
                ax.axhline(ys[0], linestyle="--", alpha=0.7, label=name)  # seen with a single budget too
            else:
                ax.plot([r["budget"] for r in rows], ys, "o-", label=name)
        ax.set_title(f"{task} ({mine[0]['cases']} cases)", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("budget (tokens per KV head)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=6)
    _save(fig, plt, path)


def stream_timeline(series: list[dict], path: str) -> None:
    """Memory per tier and ingest speed against the stream time, one point per pushed clip."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(STREAM), figsize=(4.2 * len(STREAM), 3.4))
    for ax, (key, label, scale) in zip(axes, STREAM):
        ax.plot([m["t"] for m in series], [m[key] * scale for m in series], ".-")
        ax.set_xlabel("stream time (s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    _save(fig, plt, path)


def _save(fig, plt, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
