"""Tables of results: throughput rows with ratios (one run, or many merged from several machines), thread
scaling, and training curves."""
from __future__ import annotations

import json
import math
import os
import re
import statistics

from tabulate import tabulate

from .backends import BACKENDS
from .backends.check import within

# Settings that define a timing row beside its model, framework, device and batch: two rows that differ in any
# of them are different measurements, never one.
SETTINGS = ("threads", "steps", "repeats", "warmup", "optimizer", "lr", "compile")


# Control characters (a terminal's escape sequences, a newline that would forge a table line), invisible and
# direction-changing characters: results files come from other machines, so none reaches the terminal as is.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
MAX_CELL = 200  # characters of one table cell


def escape(text: str, markdown: bool = False) -> str:
    """`text` safe to print: unsafe characters as Python escapes (\\x1b, \\n, \\u202e), `|` as `\\|` in a
    Markdown table."""
    text = _UNSAFE.sub(lambda m: repr(m.group())[1:-1], text)
    return text.replace("|", "\\|") if markdown else text


def _safe(table: list, markdown: bool) -> list:
    """Every text cell of a table escaped and cut to MAX_CELL characters."""
    def cell(v):
        if not isinstance(v, str):
            return v
        v = escape(v, markdown)
        return v if len(v) <= MAX_CELL else v[:MAX_CELL - 3] + "..."
    return [[cell(v) for v in row] for row in table]


def _settings_value(row: dict, key: str):
    value = row.get(key)
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def group_key(row: dict) -> tuple:
    """The rows one ratio compares: same machine (Ray node), results file, device, model, batch and settings."""
    return (row.get("host"), row.get("node_id"), row.get("source"), row["device"], row["model"], row["batch_size"],
            *(_settings_value(row, k) for k in SETTINGS))


def add_ratios(rows: list[dict], baseline: str) -> None:
    """Training throughput relative to the baseline framework's row of the same group (see group_key); no ratio
    where the group has no baseline row or several (two versions of it: ambiguous)."""
    base: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["backend"] == baseline:
            base.setdefault(group_key(r), []).append(r)
    for r in rows:
        r.pop("vs_baseline", None)
        b = base.get(group_key(r), [])
        if len(b) == 1 and b[0].get("train_samples_s") and r.get("train_samples_s"):
            r["vs_baseline"] = r["train_samples_s"] / b[0]["train_samples_s"]


def _f(value, fmt):
    return "-" if value is None else format(value, fmt)


def varying(rows: list[dict], keys) -> list[str]:
    """The keys whose values differ between rows: shown as columns, so that no two rows look alike."""
    return [k for k in keys if len({_settings_value(r, k) for r in rows}) > 1]


RUN_HEADERS = ("Model", "Framework", "Device", "Batch", "Path", "First step s", "Train samples/s", "Peak MB", "GFLOP/s",
               "% peak", "Loss")


def machine(row: dict) -> str:
    return row.get("host") or "?"


def operator_threads_note(row: dict) -> str:
    """'1 of 2 threads' where the cell measured fewer operator threads to be faster than the ones asked for
    (MXNet: its best count depends on the model), else ''."""
    used = (row.get("settings") or {}).get("operator_threads")
    return f"{used} of {row['threads']} threads" if used is not None and used != row.get("threads") else ""


def trains(row: dict) -> bool:
    """Whether the row's backend trains at all (onnxruntime runs inference only); an unknown name is taken to."""
    b = BACKENDS.get(row.get("backend"))
    return b is None or b.trains


def training_rows(rows: list[dict]) -> list[dict]:
    """The rows the training table shows: those that timed training, failed, or belong to a backend that does not
    train (it says so there); not the inference-only cells of one that does."""
    return [r for r in rows if "error" in r or r.get("train_samples_s") is not None or not trains(r)]


def _where(rows: list[dict], show_machine: bool | None) -> tuple[bool, bool]:
    """Whether a table needs a Machine column (rows of several hosts) and a File column (two runs of one host)."""
    if show_machine is None:
        show_machine = len({machine(r) for r in rows}) > 1
    files: dict[str, set] = {}
    for r in rows:
        files.setdefault(machine(r), set()).add(r.get("source"))
    return show_machine, any(len(f) > 1 for f in files.values())


def _framework(r: dict) -> str:
    """The backend's name (keras, keras-jax, keras-torch share Keras' version) and its first version number."""
    return r["backend"] + (f" {r['version'].split(' / ')[0].split()[-1]}" if r.get("version") else "")


def render_table(rows: list[dict], baseline: str, markdown: bool = False, show_machine: bool | None = None) -> str:
    """Training: one line per row (see training_rows); a Machine column when rows come from several hosts, and a
    column for every setting that differs between rows."""
    rows = training_rows(rows)
    show_machine, show_source = _where(rows, show_machine)
    extra = varying(rows, SETTINGS)
    lead = ("Machine",) * show_machine + ("File",) * show_source
    table = []
    for r in rows:
        head = (machine(r),) * show_machine + (os.path.basename(r.get("source") or "-"),) * show_source
        tail = tuple(str(_settings_value(r, k)) for k in extra)
        if "error" in r:
            body = (r["model"], r["backend"], r["device"], r["batch_size"], "ERROR: " + r["error"][:70])
            table.append(head + body + ("",) * (len(RUN_HEADERS) - 4) + tail)
            continue
        version = _framework(r)
        device = r["device"] + (f" ({r['device_name']})" if show_machine and r.get("device_name") else "")
        sps = r.get("train_samples_s")
        table.append(head + (
            r["model"], version, device, r["batch_size"], ", ".join(filter(None, (r.get("path", "-"), operator_threads_note(r)))),
            _f(r.get("first_step_s"), ".2f"),
            f"{sps:,.0f} ±{100 * (r.get('train_spread') or 0):.0f}%" if sps is not None
            else "not timed" if trains(r) else "does not train",
            _f(r.get("host_rss_mb"), ",.0f") + (f" / {r['device_mem_mb']:,.0f}" if r.get("device_mem_mb") is not None else ""),
            _f(r.get("train_gflops"), ".2f"), _f(r.get("peak_pct"), ".1f"), _f(r.get("loss"), ".4f"),
            _f(r.get("vs_baseline"), ".2f")) + tail)
    headers = (*lead, *RUN_HEADERS, f"x {escape(baseline)}", *(k.replace("_", " ").capitalize() for k in extra))
    return tabulate(_safe(table, markdown), headers=headers, disable_numparse=True,
                    tablefmt="github" if markdown else "simple")


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _ms(v) -> str:
    return "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def inference_rows(rows: list[dict]) -> list[dict]:
    """The rows the inference table shows: those that timed inference or latency, or failed."""
    return [r for r in rows if "error" in r or r.get("infer_samples_s") is not None
            or r.get("latency_p50_ms") is not None]


def render_inference(rows: list[dict], markdown: bool = False, show_machine: bool | None = None) -> str:
    """Inference: samples/s at each batch size and batch-1 latency (median and 99th percentile over `Calls` single
    calls), one line per model, framework, device and settings; '' when no row timed inference."""
    rows = inference_rows(rows)
    if not rows:
        return ""
    show_machine, show_source = _where(rows, show_machine)
    extra = varying(rows, SETTINGS)
    batches = sorted({r["batch_size"] for r in rows if "error" in r or r.get("infer_samples_s") is not None})
    lines: dict[tuple, dict] = {}
    for r in rows:
        device = r["device"] + (f" ({r['device_name']})" if show_machine and r.get("device_name") else "")
        key = ((machine(r),) * show_machine + (os.path.basename(r.get("source") or "-"),) * show_source
               + (r["model"], r["backend"] if "error" in r else _framework(r), device,
                  "-" if "error" in r else ", ".join(filter(None, (r.get("path", "-"), operator_threads_note(r)))))
               + tuple(str(_settings_value(r, k)) for k in extra))
        line = lines.setdefault(key, {"by_batch": {}, "latency": None})
        line["by_batch"][r["batch_size"]] = r
        if r.get("latency_p50_ms") is not None:
            line["latency"] = r

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        if "error" in r:
            return "ERROR: " + r["error"][:60]
        sps = r.get("infer_samples_s")
        return "-" if sps is None else f"{sps:,.0f} ±{100 * (r.get('infer_spread') or 0):.0f}%"
    table = []
    for key, line in lines.items():
        lat = line["latency"] or {}
        lead, settings = key[:len(key) - len(extra)], key[len(key) - len(extra):]
        table.append(lead + tuple(cell(line["by_batch"].get(b)) for b in batches)
                     + (_ms(lat.get("latency_p50_ms")), _ms(lat.get("latency_p99_ms")),
                        f"{lat['latency_calls']:,}" if lat.get("latency_calls") else "-") + settings)
    headers = (("Machine",) * show_machine + ("File",) * show_source + ("Model", "Framework", "Device", "Path")
               + tuple(f"Batch {b} samples/s" for b in batches) + ("Batch 1 p50 ms", "p99 ms", "Calls")
               + tuple(k.replace("_", " ").capitalize() for k in extra))
    return ("Inference: predict, host NumPy in and out (samples/s: median, ± spread); batch-1 latency per call\n"
            + tabulate(_safe(table, markdown), headers=headers, disable_numparse=True,
                       tablefmt="github" if markdown else "simple"))


def inference_note(rows: list[dict]) -> str:
    """What the inference table timed (for the footer); '' when no row timed inference."""
    done = [r for r in rows if "error" not in r]
    lat = [r for r in done if r.get("latency_p50_ms") is not None]
    parts = []
    if any(r.get("infer_samples_s") is not None for r in done):
        parts.append("inference: predict from host NumPy to host NumPy, samples/s at each batch size")
    if lat:
        calls = [r["latency_calls"] for r in lat if isinstance(r.get("latency_calls"), int)]
        cells = sorted({r["batch_size"] for r in lat})
        span = f"{min(calls):,}" + (f"-{max(calls):,}" if max(calls) > min(calls) else "") + " " if calls else ""
        parts.append(f"batch-1 latency: {span}single calls after warm-up (median and 99th percentile), once per model, "
                     f"framework, device and thread count, in its batch-{'/'.join(map(str, cells))} cell")
    untrained = sorted({r["backend"] for r in done if not trains(r)})
    if untrained:
        parts.append(f"{', '.join(untrained)}: inference only (does not train)")
    if any(r.get("train_samples_s") is None and trains(r) for r in done):
        parts.append("training not timed in the rows that say so (--inference-only)")
    return escape("; ".join(p for p in parts if p))


def peak_line(where: str, peak) -> str:
    """A device's GEMM peak for the footer: the library that gave it, the others, and on a CPU how close it comes
    to the theoretical FMA peak; '' when there is none. Values read back from a file are checked, not trusted."""
    if not isinstance(peak, dict) or not _number(peak.get("gflops")):
        return ""

    def text(v) -> str:
        return str(v)[:100]
    gflops = _number(peak["gflops"])
    candidates = peak.get("candidates") if isinstance(peak.get("candidates"), dict) else {}
    others = [f"{text(k)} {_number(v):,.0f}" if _number(v) else f"{text(k)} {text(v)}"
              for k, v in list(candidates.items())[:8] if k != peak.get("library")]
    line = (f"{where} GEMM peak {gflops:,.0f} GFLOP/s: {text(peak.get('library'))}, fp32"
            + (f" {peak['n']}x{peak['n']}" if isinstance(peak.get("n"), int) else "")
            + (f" (also {'; '.join(others)})" if others else ""))
    t = peak.get("theoretical")
    if isinstance(t, dict) and _number(t.get("gflops")) and _number(t.get("ghz")):
        cores = f"{text(t.get('cores'))} core{'s' * (t.get('cores') != 1)}"
        line += (f". Theoretical fp32 FMA peak {_number(t['gflops']):,.0f} GFLOP/s = {cores} x "
                 f"{text(t.get('fma_units'))} FMA units x {text(t.get('lanes'))} lanes x 2 x {_number(t['ghz']):.2f} "
                 f"GHz (clock: {text(t.get('clock'))}; assumed: {text(t.get('assumed'))}): measured "
                 f"{100 * gflops / _number(t['gflops']):.0f} % of it")
    return escape(line)


def compile_notes(rows: list[dict]) -> list[str]:
    """For each compiled row: how it compares with the eager row of the same cell, saying so where it is slower."""
    def cell(r):
        return machine(r), r.get("source"), r["model"], r["backend"], r["device"], r["batch_size"], r.get("threads")
    eager = {cell(r): r for r in rows if not r.get("compile") and r.get("train_samples_s")}
    notes = []
    for r in rows:
        e = eager.get(cell(r))
        if not r.get("compile") or not e or not r.get("train_samples_s"):
            continue
        ratio = r["train_samples_s"] / e["train_samples_s"]
        notes.append(f"{r.get('path', 'compiled')} {'is SLOWER than' if ratio < 1 else 'beats'} "
                     f"{e.get('path', 'eager')} for {r['model']} {r['backend']} {r['device']} batch {r['batch_size']}: "
                     f"{r['train_samples_s']:,.0f} vs {e['train_samples_s']:,.0f} training samples/s (x{ratio:.2f})")
    return notes


def render_scaling(rows: list[dict], markdown: bool = False) -> str:
    """Training samples/s per thread count, one line per (machine, model, framework, device, batch)."""
    threads = sorted({r["threads"] for r in rows})
    lines: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        key = (machine(r), os.path.basename(r.get("source") or "-"), r["model"], r["backend"], r["device"],
               r["batch_size"])
        lines.setdefault(key, {})[r["threads"]] = r
    show_machine = len({k[0] for k in lines}) > 1
    show_source = len({k[:2] for k in lines}) > len({k[0] for k in lines})
    table = []
    for key, by_t in lines.items():
        cells = []
        first = next((by_t[t].get("train_samples_s") for t in threads if t in by_t
                      and by_t[t].get("train_samples_s")), None)
        for t in threads:
            sps = by_t.get(t, {}).get("train_samples_s")
            note = operator_threads_note(by_t[t]) if t in by_t else ""
            cells.append("-" if t not in by_t else "ERROR" if sps is None
                         else f"{sps:,.0f}" + (f" (x{sps / first:.2f})" if first and len(threads) > 1 else "")
                         + (f" [{note}]" if note else ""))
        table.append((key[0],) * show_machine + (key[1],) * show_source + key[2:] + tuple(cells))
    headers = ("Machine",) * show_machine + ("File",) * show_source + ("Model", "Framework", "Device", "Batch",
                                              *(f"{t} thread{'s' * (t > 1)}" for t in threads))
    return ("Training samples/s by thread count (x: against the fewest threads)\n"
            + tabulate(_safe(table, markdown), headers=headers, disable_numparse=True,
                       tablefmt="github" if markdown else "simple"))


CHECKS = ("logits", "loss", "grads", "sgd", "adam")


def render_check(results: list[dict]) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["backend"], *("-" for _ in CHECKS), "ERROR: " + r["error"][:80]))
            continue
        diffs, where, tol = r["diffs"], r["where"], r["tolerance"]
        value = lambda c: float("inf") if diffs.get(c) is None else diffs[c]  # noqa: E731  (inf travels as null)
        jitter = r.get("jitter") or {}
        worst = [c for c in CHECKS if c in diffs and not within(value(c), tol, jitter.get(c))]
        at = where.get("logits") or next((where[c] for c in worst if where.get(c)), None)
        verdict = "ok" if r["ok"] else f"DIFFERS: {', '.join(worst)}" + (f" (first at {at})" if at else "")
        kinks = [f"{c} {value(c):.1e} within the oracle's own {jitter[c]:.1e} under 1e-6 input noise (a ReLU kink)"
                 for c in CHECKS if c in diffs and value(c) > tol and within(value(c), tol, jitter.get(c))]
        rows.append((r["backend"], *(f"{value(c):.1e}" if c in diffs else "-" for c in CHECKS),
                     verdict + "".join(f"; {k}" for k in kinks)))
    return tabulate(_safe(rows, False), headers=("Framework", "Logits", "Loss", "Grads", "SGD weights",
                                                  "Adam weights", "Verdict"), disable_numparse=True)


def render_training(results: list[dict], target: float | None) -> str:
    """Per-epoch losses and accuracy of every framework, then a summary; a value a diverged run recorded as null
    (NaN, written as strict JSON) shows as "-"."""
    ok = [r for r in results if "error" not in r]
    epochs = max((len(r["train_loss"]) for r in ok), default=0)

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"
    per_epoch = [[e + 1] + [f"{_f(r['train_loss'][e], '.4f')} / {_f(r['test_loss'][e], '.4f')} / "
                            f"{pct(r['test_accuracy'][e])}" if e < len(r["train_loss"]) else "-" for r in ok]
                 for e in range(epochs)]
    heads = [escape(f"{r['backend']} ({r['device']})") for r in ok]
    summary = []
    for r in results:
        if "error" in r:
            summary.append((r["backend"], r["device"], "ERROR: " + r["error"][:80], "", "", "", ""))
            continue
        seconds = [v for v in r["epoch_s"] if v is not None]
        summary.append((r["backend"], r["device"],
                        "-" if r.get("final_accuracy") is None else f"{100 * r['final_accuracy']:.2f}%",
                        _f(r["test_loss"][-1], ".4f"), f"{statistics.median(seconds):.2f}" if seconds else "-",
                        _f(r.get("train_s"), ".1f"),
                        "-" if r.get("time_to_target_s") is None
                        else f"{r['time_to_target_s']:.1f} s (epoch {r.get('epochs_to_target')})"))
    target_head = f"Time to {100 * target:g}%" if target is not None else "Time to target"
    return (tabulate(_safe(per_epoch, False), headers=["Epoch", *heads], disable_numparse=True)
            + "\n(each cell: train loss / test loss / test accuracy)\n\n"
            + tabulate(_safe(summary, False), headers=("Framework", "Device", "Final accuracy", "Test loss",
                                                       "s/epoch (median)", "Train s", target_head),
                       disable_numparse=True))
