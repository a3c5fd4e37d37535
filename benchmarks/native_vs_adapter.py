#!/usr/bin/env python3
"""Adapter against hand-written loops: `compare.py run`'s cell for each (framework, model, batch) against the
framework's idiomatic training loop (benchmarks/native_loops.py, which never imports nncompare), each in its
own fresh process. The native loop runs twice per round: under the framework's default environment (no thread
variables) and under the tool's (thread_env); the adapter runs as compare.py's cell does. Rounds interleave
native and adapter runs; the table shows medians and adapter / best native, the worst ratio last; "paired" is,
for each of the two native environments, the median over rounds of each round's adapter / native run (drift
between rounds cancels), the lower of the two.

Run-to-run spread between fresh processes is widest where steps are shortest (mlp: +-10 % between processes
whose in-process speeds agree), and those runs are the cheapest: --cell-seconds gives every cell rounds until
it has used that much wall time (at least --rounds, at most --max-rounds), so short cells get more rounds.

    python benchmarks/native_vs_adapter.py [--backends torch mxnet] [--models lenet5] [--batch-sizes 128]
                                           [--rounds 3] [--cell-seconds 120] [--threads N] [--json out.json]
                                           [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NATIVE = Path(__file__).resolve().parent / "native_loops.py"
MODELS = ("mlp", "lenet5", "cifar_cnn")
CANDIDATES = ("keras", "torch", "mxnet", "keras-jax", "keras-torch")


def default_env() -> dict[str, str]:
    """The caller's environment without any thread variable: each framework sizes its own pools."""
    from nncompare.backends.bench import THREAD_VARIABLES
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_native(backend: str, model: str, batch: int, args, env: dict[str, str]) -> dict:
    cmd = [sys.executable, str(NATIVE), backend, model, str(batch), "--steps", str(args.steps),
           "--repeats", str(args.repeats), "--budget", str(args.budget)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:g} s"}
    if out.returncode != 0:
        lines = [l for l in out.stderr.splitlines() if l.strip()]
        return {"error": f"exit code {out.returncode}: {lines[-1][:100] if lines else ''}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_adapter(backend: str, model: str, batch: int, args) -> dict:
    """The cell exactly as `compare.py run` starts it (fresh process, the runner's cell environment)."""
    from nncompare.backends import SGD
    from nncompare.models import zoo
    from nncompare.runner import Task, run_subprocess
    opt = SGD(lr=0.01, momentum=0.9)
    task = Task("measure", device="cpu", threads=args.threads, backend=backend, model_name=model,
                spec=zoo.get(model).to_dict(), batch_size=batch, optimizer={"type": "sgd", "args": vars(opt)},
                steps=args.steps, repeats=args.repeats, warmup=2)
    # the cell splits its budget 2:1 between training and inference: training gets what the native loop gets
    return run_subprocess(task, args.timeout, env={"NNCOMPARE_TIME_BUDGET": str(args.budget * 1.5)})


def backends_to_run(requested: list[str] | None) -> tuple[list[str], list[str]]:
    """(backends to run, notes on those skipped)."""
    from nncompare.backends import available_backends, names
    info, registered = available_backends(), names()
    run, notes = [], []
    for b in requested or CANDIDATES:
        if b not in registered:
            notes.append(f"{b}: skipped, not a registered nncompare backend")
        elif not info[b]["installed"]:
            notes.append(f"{b}: skipped, not installed")
        else:
            run.append(b)
    return run, notes


def median(results: list[dict], key: str = "train_samples_s") -> float | None:
    values = [r[key] for r in results if key in r]
    return statistics.median(values) if values else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", help=f"default: the installed ones of {', '.join(CANDIDATES)}")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128])
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved native/adapter rounds per cell (medians over them); the minimum with --cell-seconds")
    p.add_argument("--cell-seconds", type=float, default=0.0,
                   help="more rounds while a cell has used less wall time than this (cheap, noisier cells get more)")
    p.add_argument("--max-rounds", type=int, default=15, help="rounds per cell at most, with --cell-seconds")
    p.add_argument("--steps", type=int, default=2,
                   help="minimum steps per timed repeat (raised to fill 50 ms where steps are short)")
    p.add_argument("--repeats", type=int, default=5, help="minimum timed repeats per process")
    p.add_argument("--budget", type=float, default=2.0,
                   help="native loop's seconds of timing after warm-up (as a cell gives training)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the tool's thread count")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", help="write every run's result here")
    p.add_argument("--quick", action="store_true", help="functional smoke run: 1 round, tiny steps, no timing value")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps, args.repeats, args.budget, args.cell_seconds = 1, 1, 1, 0.0, 0.0
    from tabulate import tabulate

    from nncompare.backends.bench import thread_env

    backends, notes = backends_to_run(args.backends)
    runs: dict[tuple, dict[str, list[dict]]] = {}
    for model in args.models:
        for batch in args.batch_sizes:
            for backend in backends:
                key = (model, batch, backend)
                runs[key] = {"native_default": [], "native_tool": [], "adapter": []}
                tool_env = dict(default_env(), **thread_env(args.threads, backend))
                started, rounds = time.perf_counter(), 0
                # interleaved: drift in machine load hits both sides alike
                while rounds < args.rounds or (rounds < args.max_rounds
                                               and time.perf_counter() - started < args.cell_seconds):
                    rounds += 1
                    runs[key]["native_default"].append(run_native(backend, model, batch, args, default_env()))
                    runs[key]["adapter"].append(run_adapter(backend, model, batch, args))
                    runs[key]["native_tool"].append(run_native(backend, model, batch, args, tool_env))
                    print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    rows, ratios, paired_ratios = [], [], []
    for (model, batch, backend), r in runs.items():
        nd, nt, ad = (median(r[k]) for k in ("native_default", "native_tool", "adapter"))
        errors = [x["error"] for side in r.values() for x in side if "error" in x]
        best = max((v for v in (nd, nt) if v), default=None)
        ratio = ad / best if ad and best else None
        if ratio is not None:
            ratios.append((ratio, model, batch, backend))
        # paired: each round's adapter run against that round's native runs, per environment; the lower median
        # (not the better of two medians: the max of two noisy medians is biased upward)
        paired = [statistics.median(ratios_) for ratios_ in (
            [a["train_samples_s"] / n["train_samples_s"] for a, n in zip(r["adapter"], r[side])
             if "train_samples_s" in a and "train_samples_s" in n] for side in ("native_default", "native_tool"))
            if ratios_]
        if paired:
            paired_ratios.append((min(paired), model, batch, backend))
        noisy = sum(bool(x.get("noisy") or x.get("train_noisy")) for side in r.values() for x in side)
        path = next((x.get("path") for x in r["adapter"] if "path" in x), "")
        rows.append((model, batch, backend, path,
                     *(f"{v:,.0f}" if v else "-" for v in (nd, nt, ad)),
                     f"{ratio:.3f}" if ratio is not None else "ERROR: " + (errors[0][:60] if errors else "?"),
                     f"{min(paired):.3f}" if paired else "-", len(r["adapter"]), noisy or ""))
    rounds_text = (f"{args.rounds}-{args.max_rounds} interleaved rounds ({args.cell_seconds:g} s a cell)"
                   if args.cell_seconds else f"{args.rounds} interleaved rounds")
    print(f"cpu, tool threads {args.threads}; {rounds_text}, medians; every run a fresh process"
          + (" (--quick: a smoke run, the numbers mean nothing)" if args.quick else ""))
    print(tabulate(rows, headers=("Model", "Batch", "Framework", "Adapter path", "Native, default env",
                                  "Native, tool env", "Adapter", "Adapter / best native",
                                  "Paired (lower env)", "Rounds", "Noisy runs"),
                   disable_numparse=True))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"model": m, "batch_size": b, "backend": k, **r} for (m, b, k), r in runs.items()], indent=1) + "\n")
    if not ratios:
        print("worst adapter / best native: none (every cell failed)")
        return 1
    if paired_ratios:
        worst = min(paired_ratios)
        print(f"worst paired ratio: {worst[0]:.3f} ({worst[3]}, {worst[1]}, batch {worst[2]})")
    worst = min(ratios)
    print(f"worst adapter / best native: {worst[0]:.3f} ({worst[3]}, {worst[1]}, batch {worst[2]})")
    return 1 if len(ratios) < len(runs) else 0


if __name__ == "__main__":
    sys.exit(main())
