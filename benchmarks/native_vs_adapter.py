#!/usr/bin/env python3
"""Adapter against hand-written loops: `compare.py run`'s cell for each (mode, framework, model, batch) against
the framework's idiomatic hand-written loop (benchmarks/native_loops.py, which never imports nncompare), each in
its own fresh process: the native loop twice, under the framework's default environment (no thread or allocator
variables) and under the tool's (tool_env), and the cell exactly as compare.py starts it, timing only the mode's
section (Task.sections). Each round starts the three afresh and times them in lockstep (benchmarks/lockstep.py):
they take turns on the cores, one timed repeat each, so the machine's drift (up to 2x over seconds on a shared
host) hits all three alike.

Modes (--modes, default all three; one table each):
  train    training samples/s at each batch size (SGD with momentum, cross-entropy from logits).
  infer    inference samples/s at each batch size: eval mode, host NumPy in, the result fetched to the host as NumPy.
  latency  batch-1 inference, host in and out, per (model, framework): a turn is a block of single calls lasting
           at least 50 ms, and its value is 1 / (median seconds per call in the block), calls/s at the median;
           the table shows it as p50 milliseconds.
Every engine in nncompare's registry but the reference joins each table it supports (onnxruntime: infer and
latency; its hand-written side is a plain InferenceSession on the torch model's ONNX export).

Per native environment, adapter / native is the median over rounds of each round's median per-turn ratio (> 1:
the adapter is faster, latency included); adapter / best native is the lower of the two; the worst cell of each
table and of the run is printed. The samples/s (p50) columns are medians over rounds of each side's median over
the turns where all three timed a repeat.

    python benchmarks/native_vs_adapter.py [--modes train infer latency] [--backends torch mxnet]
                                           [--models lenet5 resnet20] [--batch-sizes 128] [--rounds 10]
                                           [--turns 10] [--threads N] [--json out.json] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import native_loops  # noqa: E402  (numpy only at import: what each framework's loops cover)
from lockstep import median, paired, positive, run_round, spill_note  # noqa: E402

NATIVE = Path(__file__).resolve().parent / "native_loops.py"
MODES = ("train", "infer", "latency")
MODELS = tuple(native_loops.SHAPES)
DEFAULT_MODELS = ("mlp", "lenet5", "cifar_cnn")
SIDES = ("native_default", "adapter", "native_tool")


def engines() -> list[str]:
    """Every engine nncompare registers apart from the reference, from its descriptors (imports no framework)."""
    from nncompare.backends import BACKENDS
    return [b.name for b in BACKENDS.values() if not b.reference]


def unsupported(backend: str, mode: str) -> str | None:
    """Why `backend` has no row in `mode`'s table, or None."""
    from nncompare.backends import BACKENDS
    if mode == "train" and not BACKENDS[backend].trains:
        return "inference only"
    if backend not in (native_loops.LOOPS if mode == "train" else native_loops.INFER):
        return "no hand-written loop in benchmarks/native_loops.py"
    return None


def task_has_sections() -> bool:
    from nncompare.cell import Task
    return "sections" in {f.name for f in dataclasses.fields(Task)}


def default_env() -> dict[str, str]:
    """The caller's environment without the tool's thread and allocator variables: each framework (and glibc)
    keeps its own defaults."""
    from nncompare.backends.bench import TOOL_VARIABLES
    env = {k: v for k, v in os.environ.items() if k not in TOOL_VARIABLES}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def sides(mode: str, backend: str, model: str, batch: int, args) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """The three processes of a round: (command, environment, result-line prefix). The cell is started as
    runner.run_subprocess starts it, with the mode as its one section."""
    from nncompare.backends import SGD
    from nncompare.backends.bench import tool_env
    from nncompare.models import zoo
    from nncompare.cell import RESULT_MARK, Task, cell_command, cell_env
    native = [sys.executable, str(NATIVE), backend, model, str(batch), "--mode", mode, "--steps", str(args.steps),
              "--repeats", str(args.repeats)]
    opt = SGD(lr=native_loops.LR, momentum=native_loops.MOMENTUM)
    task = Task("measure", device="cpu", threads=args.threads, backend=backend, model_name=model,
                spec=zoo.get(model).to_dict(), batch_size=batch, optimizer={"type": "sgd", "args": vars(opt)},
                steps=args.steps, repeats=args.repeats, warmup=2,
                **({"sections": (mode,)} if task_has_sections() else {}))
    return {"native_default": (native, default_env(), ""),
            "adapter": (cell_command([task]), cell_env(args.threads, backend, {"NNCOMPARE_TIME_BUDGET": "0"}), RESULT_MARK),
            "native_tool": (native, dict(default_env(), **tool_env(args.threads, backend)), "")}


def backends_to_run(requested: list[str] | None) -> tuple[list[str], list[str]]:
    """(backends to run, notes on those skipped)."""
    from nncompare.backends import available_backends
    info, registered = available_backends(), engines()
    run, notes = [], []
    for b in requested or registered:
        if b not in registered:
            notes.append(f"{b}: skipped, not a registered nncompare engine")
        elif not info[b]["installed"]:
            notes.append(f"{b}: skipped, not installed")
        else:
            run.append(b)
    return run, notes


def common_medians(round_: dict[str, dict]) -> dict[str, float]:
    """Each side's median value over the turns where every side has a timed repeat (the same moments)."""
    live = {side: r["turns"] for side, r in round_.items() if "error" not in r}
    both = [i for i in range(min(map(len, live.values()), default=0)) if all(t[i] for t in live.values())]
    return {side: statistics.median(t[i] for i in both) for side, t in live.items()} if both else {}


def summarize(mode: str, runs: dict[tuple, dict[str, list[dict]]], notes: list[str]) -> tuple[list[tuple], list]:
    """The table rows of one mode and its (adapter / best native, model, batch, backend) per cell."""
    rows, worst = [], []
    for (model, batch, backend), r in runs.items():
        rounds = [{side: r[side][i] for side in SIDES} for i in range(len(r["adapter"]))]
        meds = [common_medians(x) for x in rounds]
        nd, ad, nt = (median([m.get(side) for m in meds]) for side in SIDES)
        errors = [f"{side}: {x['error']}" for side in SIDES for x in r[side] if "error" in x]
        # per round, the median per-turn adapter / native ratio; then the median over rounds
        pd, pt = (median([paired(x["adapter"]["turns"], x[side]["turns"]) for x in rounds
                          if "error" not in x["adapter"] and "error" not in x[side]])
                  for side in ("native_default", "native_tool"))
        # against the best native loop: the lower of the two (not a ratio of medians: turns pair the moments)
        best = min((v for v in (pd, pt) if v), default=None)
        if best is not None:
            worst.append((best, model, batch, backend))
        path = next((x.get("path") for x in r["adapter"] if "path" in x), "")
        if mode == "latency":  # calls/s at the median -> p50 milliseconds
            values = [f"{1e3 / v:.3f}" if v else "-" for v in (nd, nt, ad)]
            cell = (model, backend, path)
        else:
            values = [f"{v:,.0f}" if v else "-" for v in (nd, nt, ad)]
            cell = (model, batch, backend, path)
        rows.append((*cell, *values, *(f"{v:.3f}" if v else "-" for v in (pd, pt)),
                     f"{best:.3f}" if best is not None else "ERROR: " + (errors[0][:80] if errors else "?"),
                     len(r["adapter"])))
        where = f"{mode} {model}" + ("" if mode == "latency" else f" b{batch}") + f" {backend}"
        for e in errors:
            notes.append(f"{where}: {e[:200]}")
        for side in SIDES:
            if note := spill_note(r[side]):
                notes.append(f"{where}: {side} {note}")
    return rows, worst


TITLES = {"train": "Training samples/s",
          "infer": "Inference samples/s (inference mode, host NumPy in, the result fetched to the host)",
          "latency": "Batch-1 latency, p50 ms (turns: blocks of single calls >= 50 ms, each's calls/s at its median; "
                     "ratio > 1: the adapter is faster)"}


def headers(mode: str) -> tuple[str, ...]:
    unit = " p50 ms" if mode == "latency" else ""
    cell = ("Model", "Framework", "Adapter path") if mode == "latency" else ("Model", "Batch", "Framework",
                                                                             "Adapter path")
    return (*cell, f"Native{unit}, default env", f"Native{unit}, tool env", f"Adapter{unit}",
            "Adapter / native default", "Adapter / native tool", "Adapter / best native", "Rounds")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--backends", nargs="+", help="default: every installed engine nncompare registers")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS,
                   help=f"default: {' '.join(DEFAULT_MODELS)}")
    p.add_argument("--batch-sizes", nargs="+", type=positive, default=[32, 128],
                   help="train and infer (latency is batch 1)")
    p.add_argument("--rounds", type=positive, default=10,
                   help="rounds per cell, each with three fresh processes (their spread, not the turns, limits precision)")
    p.add_argument("--turns", type=positive, default=10, help="timed repeats per process in a round, taken in turns")
    p.add_argument("--steps", type=int, default=2,
                   help="minimum steps per timed repeat (raised to fill 50 ms where steps are short)")
    p.add_argument("--repeats", type=int, default=5, help="minimum timed repeats per process")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the tool's thread count")
    p.add_argument("--timeout", type=float, default=600, help="seconds a process may take to start or to answer a turn")
    p.add_argument("--json", help="write every run's result here")
    p.add_argument("--quick", action="store_true", help="functional smoke run: 1 round, tiny steps, no timing value")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.turns, args.steps, args.repeats = 1, 2, 1, 1
    modes = [m for m in MODES if m in args.modes]
    from tabulate import tabulate

    backends, notes = backends_to_run(args.backends)
    if not task_has_sections() and set(modes) - {"train"}:
        notes.append("infer, latency: skipped, this nncompare's cell has no Task.sections to time them alone")
        modes = [m for m in modes if m == "train"]
    runs: dict[str, dict[tuple, dict[str, list[dict]]]] = {m: {} for m in modes}
    for mode in modes:
        for backend in backends:
            if why := unsupported(backend, mode):
                notes.append(f"{mode}: {backend} has no row ({why})")
        for model in args.models:
            for batch in [1] if mode == "latency" else args.batch_sizes:
                for backend in backends:
                    if unsupported(backend, mode):
                        continue
                    cell = runs[mode][(model, batch, backend)] = {side: [] for side in SIDES}
                    for i in range(args.rounds):
                        for side, run in run_round(sides(mode, backend, model, batch, args), args.turns,
                                                   args.timeout, start=i).items():
                            cell[side].append(run)
                        print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    print(f"cpu, tool threads {args.threads}; {args.rounds} rounds of three fresh processes taking {args.turns} "
          "timed turns each, medians"
          + (" (--quick: a smoke run, the numbers mean nothing)" if args.quick else ""))
    worst_all, cells = [], 0
    for mode in modes:
        rows, worst = summarize(mode, runs[mode], notes)
        cells += len(runs[mode])
        print(f"\n{TITLES[mode]}")
        print(tabulate(rows, headers=headers(mode), disable_numparse=True))
        if worst:
            ratio, model, batch, backend = min(worst)
            print(f"worst {mode} adapter / best native: {ratio:.3f} ({backend}, {model}, batch {batch})")
            worst_all += [(ratio, mode, model, batch, backend) for ratio, model, batch, backend in worst]
    print()
    for note in notes:
        print(f"note: {note}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"mode": mode, "model": m, "batch_size": b, "backend": k, **r}
             for mode in modes for (m, b, k), r in runs[mode].items()], indent=1) + "\n")
    if not worst_all:
        print("worst adapter / best native: none (every cell failed)")
        return 1
    ratio, mode, model, batch, backend = min(worst_all)
    print(f"worst adapter / best native: {ratio:.3f} ({mode}: {backend}, {model}, batch {batch})")
    return 1 if len(worst_all) < cells else 0


if __name__ == "__main__":
    sys.exit(main())
