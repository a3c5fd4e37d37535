#!/usr/bin/env python3
"""Adapter against hand-written loops: `compare.py run`'s cell for each (framework, model, batch) against the
framework's idiomatic training loop (benchmarks/native_loops.py, which never imports nncompare), each in its
own fresh process: the native loop twice, under the framework's default environment (no thread or allocator
variables) and under the tool's (tool_env), and the cell exactly as compare.py starts it. Each round starts
the three afresh and times them in lockstep (benchmarks/lockstep.py): they take turns on the cores, one timed
repeat each, so the machine's drift (up to 2x over seconds on a shared host) hits all three alike. Per native
environment, adapter / native is the median over rounds of each round's median per-turn ratio; adapter / best
native is the lower of the two; the worst cell is printed last. The samples/s columns are medians over rounds
of each side's median over the turns where all three timed a repeat.

    python benchmarks/native_vs_adapter.py [--backends torch mxnet] [--models lenet5] [--batch-sizes 128]
                                           [--rounds 10] [--turns 10] [--threads N] [--json out.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lockstep import median, paired, positive, run_round, spill_note  # noqa: E402

NATIVE = Path(__file__).resolve().parent / "native_loops.py"
MODELS = ("mlp", "lenet5", "cifar_cnn")
CANDIDATES = ("keras", "torch", "mxnet", "keras-jax", "keras-torch")
SIDES = ("native_default", "adapter", "native_tool")


def default_env() -> dict[str, str]:
    """The caller's environment without the tool's thread and allocator variables: each framework (and glibc)
    keeps its own defaults."""
    from nncompare.backends.bench import TOOL_VARIABLES
    env = {k: v for k, v in os.environ.items() if k not in TOOL_VARIABLES}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def sides(backend: str, model: str, batch: int, args) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """The three processes of a round: (command, environment, result-line prefix). The cell is started as
    runner.run_subprocess starts it; its inference, timed after the turns, gets the minimum repeats."""
    from nncompare.backends import SGD
    from nncompare.backends.bench import tool_env
    from nncompare.models import zoo
    from nncompare.cell import RESULT_MARK, Task, cell_command, cell_env
    native = [sys.executable, str(NATIVE), backend, model, str(batch), "--steps", str(args.steps),
              "--repeats", str(args.repeats)]
    opt = SGD(lr=0.01, momentum=0.9)
    task = Task("measure", device="cpu", threads=args.threads, backend=backend, model_name=model,
                spec=zoo.get(model).to_dict(), batch_size=batch, optimizer={"type": "sgd", "args": vars(opt)},
                steps=args.steps, repeats=args.repeats, warmup=2)
    return {"native_default": (native, default_env(), ""),
            "adapter": (cell_command([task]), cell_env(args.threads, backend, {"NNCOMPARE_TIME_BUDGET": "0"}), RESULT_MARK),
            "native_tool": (native, dict(default_env(), **tool_env(args.threads, backend)), "")}


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


def common_medians(round_: dict[str, dict]) -> dict[str, float]:
    """Each side's median samples/s over the turns where every side has a timed repeat (the same moments)."""
    live = {side: r["turns"] for side, r in round_.items() if "error" not in r}
    both = [i for i in range(min(map(len, live.values()), default=0)) if all(t[i] for t in live.values())]
    return {side: statistics.median(t[i] for i in both) for side, t in live.items()} if both else {}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", help=f"default: the installed ones of {', '.join(CANDIDATES)}")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128])
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
    from tabulate import tabulate

    backends, notes = backends_to_run(args.backends)
    runs: dict[tuple, dict[str, list[dict]]] = {}
    for model in args.models:
        for batch in args.batch_sizes:
            for backend in backends:
                key = (model, batch, backend)
                runs[key] = {side: [] for side in SIDES}
                for i in range(args.rounds):
                    for side, run in run_round(sides(backend, model, batch, args), args.turns, args.timeout,
                                               start=i).items():
                        runs[key][side].append(run)
                    print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

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
        rows.append((model, batch, backend, path,
                     *(f"{v:,.0f}" if v else "-" for v in (nd, nt, ad)),
                     *(f"{v:.3f}" if v else "-" for v in (pd, pt)),
                     f"{best:.3f}" if best is not None else "ERROR: " + (errors[0][:80] if errors else "?"),
                     len(r["adapter"])))
        for e in errors:
            notes.append(f"{model} b{batch} {backend}: {e[:200]}")
        for side in SIDES:
            if note := spill_note(r[side]):
                notes.append(f"{model} b{batch} {backend}: {side} {note}")
    print(f"cpu, tool threads {args.threads}; {args.rounds} rounds of three fresh processes taking {args.turns} "
          "timed turns each, medians"
          + (" (--quick: a smoke run, the numbers mean nothing)" if args.quick else ""))
    print(tabulate(rows, headers=("Model", "Batch", "Framework", "Adapter path", "Native, default env",
                                  "Native, tool env", "Adapter", "Adapter / native default",
                                  "Adapter / native tool", "Adapter / best native", "Rounds"),
                   disable_numparse=True))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"model": m, "batch_size": b, "backend": k, **r} for (m, b, k), r in runs.items()], indent=1) + "\n")
    if not worst:
        print("worst adapter / best native: none (every cell failed)")
        return 1
    ratio, model, batch, backend = min(worst)
    print(f"worst adapter / best native: {ratio:.3f} ({backend}, {model}, batch {batch})")
    return 1 if len(worst) < len(runs) else 0


if __name__ == "__main__":
    sys.exit(main())
