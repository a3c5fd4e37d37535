"""Charts for compare.py (matplotlib, no display needed): training curves, throughput bars, thread scaling.
Each is written whole or not at all (files.write_atomic), in the format the file name's extension names."""
from __future__ import annotations

import io
import os

from .files import write_atomic


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _text(value, limit: int = 60) -> str:
    """A label from a results file as plain text: control characters escaped, `$` not read as mathtext (a model
    named `$\\x$` would otherwise fail the whole chart), cut to `limit` characters."""
    from .report import escape
    text = escape(str(value))
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return text.replace("$", r"\$")


def _values(values: list) -> list[float]:
    """Per-epoch values with a diverged run's nulls as NaN (a gap in the line)."""
    return [float("nan") if v is None else v for v in values]


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format=os.path.splitext(path)[1][1:].lower(), dpi=110)
    write_atomic(path, buf.getvalue())


def training_curves(results: list[dict], path: str, title: str = "") -> None:
    """Train loss, test loss and test accuracy per epoch, one line per framework and device."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "x")]  # equal curves overlap: keep each visible
    for i, r in enumerate(r for r in results if "error" not in r):
        label = _text(f"{r['backend']} ({r['device']})")
        epochs = range(1, len(r["train_loss"]) + 1)
        line, marker = styles[i % len(styles)]
        for ax, key in zip(axes, ("train_loss", "test_loss", "test_accuracy")):
            ax.plot(epochs, _values(r[key]), linestyle=line, marker=marker, markersize=5, label=label, alpha=0.8)
    for ax, name in zip(axes, ("train loss", "test loss", "test accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[2].legend()
    fig.suptitle(_text(title, 120))
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _group(r: dict, hosts: bool) -> tuple:
    """Machine (and results file, when a report merges several) first; then model, device, batch, threads."""
    where = ((r.get("host") or "?",) if hosts else ()) + ((os.path.basename(r["source"]),) if r.get("source") else ())
    return where + (r["model"], r["device"], r["batch_size"], r["threads"])


def throughput_chart(rows: list[dict], path: str) -> None:
    """Training samples/s per (machine, model, device, batch, threads) group, one bar per framework, with spread."""
    plt = _pyplot()
    ok = [r for r in rows if r.get("train_samples_s") is not None]  # inference-only rows have none
    hosts = len({r.get("host") for r in ok}) > 1
    if len({r.get("source") for r in ok}) <= 1:
        ok = [{k: v for k, v in r.items() if k != "source"} for r in ok]
    groups = list(dict.fromkeys(_group(r, hosts) for r in ok))
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    width = 0.8 / max(len(backends), 1)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(groups)), 4.5))
    for i, b in enumerate(backends):
        xs, hs, errs = [], [], []
        for g, key in enumerate(groups):
            r = next((r for r in ok if _group(r, hosts) == key and r["backend"] == b), None)
            if r:
                xs.append(g + (i - (len(backends) - 1) / 2) * width)
                hs.append(r["train_samples_s"])
                errs.append((r.get("train_spread") or 0) * r["train_samples_s"])
        ax.bar(xs, hs, width, yerr=errs, capsize=3, label=_text(b))
    ax.set_xticks(range(len(groups)), ["\n".join(map(_text, g[:-3])) + f"\n{_text(g[-3])}, batch {g[-2]}, {g[-1]} thr"
                                       for g in groups])
    ax.set_ylabel("training samples/s (median)")
    ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def scaling_chart(rows: list[dict], path: str) -> None:
    """Training samples/s against the thread count, one line per (machine, model, framework, device, batch)."""
    plt = _pyplot()
    ok = [r for r in rows if r.get("train_samples_s") is not None]
    hosts = len({r.get("host") for r in ok}) > 1
    lines: dict[tuple, list[tuple[int, float]]] = {}
    for r in ok:
        key = ((r.get("host") or "?",) if hosts else ()) + (r["model"], r["backend"], r["device"], f"b{r['batch_size']}")
        lines.setdefault(key, []).append((r["threads"], r["train_samples_s"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, points in lines.items():
        points.sort()
        ax.plot([t for t, _ in points], [s for _, s in points], marker="o", label=" ".join(map(_text, key)))
    threads = sorted({r["threads"] for r in ok})
    ax.set_xscale("log", base=2)
    ax.set_xticks(threads, [str(t) for t in threads])
    ax.set_xlabel("threads")
    ax.set_ylabel("training samples/s (median)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
