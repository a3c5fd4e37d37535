"""PNG charts for compare.py (matplotlib, no display needed): training curves and throughput bars."""
from __future__ import annotations


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def training_curves(results: list[dict], path: str, title: str = "") -> None:
    """Train loss, test loss and test accuracy per epoch, one line per framework and device."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "x")]  # equal curves overlap: keep each visible
    for i, r in enumerate(r for r in results if "error" not in r):
        label = f"{r['backend']} ({r['device']})"
        epochs = range(1, len(r["train_loss"]) + 1)
        line, marker = styles[i % len(styles)]
        for ax, key in zip(axes, ("train_loss", "test_loss", "test_accuracy")):
            ax.plot(epochs, r[key], linestyle=line, marker=marker, markersize=5, label=label, alpha=0.8)
    for ax, name in zip(axes, ("train loss", "test loss", "test accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def throughput_chart(rows: list[dict], path: str) -> None:
    """Training samples/s per (model, device, batch) group, one bar per framework, with spread."""
    plt = _pyplot()
    ok = [r for r in rows if "error" not in r]
    groups = list(dict.fromkeys((r["model"], r["device"], r["batch_size"]) for r in ok))
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    width = 0.8 / max(len(backends), 1)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(groups)), 4.5))
    for i, b in enumerate(backends):
        xs, hs, errs = [], [], []
        for g, key in enumerate(groups):
            r = next((r for r in ok if (r["model"], r["device"], r["batch_size"]) == key and r["backend"] == b), None)
            if r:
                xs.append(g + (i - (len(backends) - 1) / 2) * width)
                hs.append(r["train_samples_s"])
                errs.append(r["train_spread"] * r["train_samples_s"])
        ax.bar(xs, hs, width, yerr=errs, capsize=3, label=b)
    ax.set_xticks(range(len(groups)), [f"{m}\n{d}, batch {bs}" for m, d, bs in groups])
    ax.set_ylabel("training samples/s (median)")
    ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
