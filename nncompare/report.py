"""Tables of results: training/inference throughput rows with ratios, and training curves."""
from __future__ import annotations

import statistics

from tabulate import tabulate


def add_ratios(rows: list[dict], baseline: str) -> None:
    """Training throughput relative to the baseline framework's row of the same model, device and batch."""
    base = {(r["model"], r["device"], r["batch_size"]): r.get("train_samples_s")
            for r in rows if r["backend"] == baseline}
    for r in rows:
        b = base.get((r["model"], r["device"], r["batch_size"]))
        if b and r.get("train_samples_s"):
            r["vs_baseline"] = r["train_samples_s"] / b


def _f(value, fmt):
    return "-" if value is None else format(value, fmt)


RUN_HEADERS = ("Model", "Framework", "Device", "Batch", "Path", "First step s", "Train samples/s", "Infer samples/s",
               "Peak MB", "GFLOP/s", "% peak", "Loss")


def render_table(rows: list[dict], baseline: str) -> str:
    table = []
    for r in rows:
        if "error" in r:
            table.append((r["model"], r["backend"], r["device"], r["batch_size"], "ERROR: " + r["error"][:70])
                         + ("",) * (len(RUN_HEADERS) - 4))
            continue
        table.append((r["model"], r["version"].split(" / ")[0] or r["backend"],
                      r["device"], r["batch_size"], r["path"], _f(r["first_step_s"], ".2f"),
                      f"{r['train_samples_s']:,.0f} ±{100 * r['train_spread']:.0f}%",
                      f"{r['infer_samples_s']:,.0f}", _f(r["host_rss_mb"], ",.0f") +
                      (f" / {r['device_mem_mb']:,.0f}" if r.get("device_mem_mb") is not None else ""),
                      _f(r["train_gflops"], ".2f"), _f(r.get("peak_pct"), ".1f"), _f(r["loss"], ".4f"),
                      _f(r.get("vs_baseline"), ".2f")))
    return tabulate(table, headers=(*RUN_HEADERS, f"x {baseline}"), disable_numparse=True)


def render_training(results: list[dict], target: float | None) -> str:
    ok = [r for r in results if "error" not in r]
    epochs = max((len(r["train_loss"]) for r in ok), default=0)
    per_epoch = [[e + 1] + [f"{r['train_loss'][e]:.4f} / {r['test_loss'][e]:.4f} / {100 * r['test_accuracy'][e]:.1f}%"
                            for r in ok] for e in range(epochs)]
    heads = [f"{r['backend']} ({r['device']})" for r in ok]
    summary = []
    for r in results:
        if "error" in r:
            summary.append((r["backend"], r["device"], "ERROR: " + r["error"][:80], "", "", "", ""))
            continue
        summary.append((r["backend"], r["device"], f"{100 * r['final_accuracy']:.2f}%", f"{r['test_loss'][-1]:.4f}",
                        f"{statistics.median(r['epoch_s']):.2f}", f"{r['train_s']:.1f}",
                        "-" if r["time_to_target_s"] is None
                        else f"{r['time_to_target_s']:.1f} s (epoch {r['epochs_to_target']})"))
    target_head = f"Time to {100 * target:g}%" if target is not None else "Time to target"
    return (tabulate(per_epoch, headers=["Epoch", *heads], disable_numparse=True)
            + "\n(each cell: train loss / test loss / test accuracy)\n\n"
            + tabulate(summary, headers=("Framework", "Device", "Final accuracy", "Test loss", "s/epoch (median)",
                                         "Train s", target_head), disable_numparse=True))
