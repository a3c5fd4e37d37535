#!/usr/bin/env python3
"""Interleaved A/B runs of one framework setting (thread pools, data layout) on the hand-written loops of
benchmarks/native_loops.py: each variant in its own fresh process, variants alternating round by round,
medians printed. These are the measurements docs/performance.md quotes to justify each choice in
nncompare.backends.bench.thread_env.

    python benchmarks/settings_ab.py EXPERIMENT [--model lenet5] [--batch 128] [--rounds 5] [--threads N]
    python benchmarks/settings_ab.py --list
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

NATIVE = Path(__file__).resolve().parent / "native_loops.py"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                    "TF_NUM_INTEROP_THREADS", "MXNET_CPU_WORKER_NTHREADS", "MXNET_OMP_MAX_THREADS")


def experiments(n: int) -> dict[str, tuple[str, str, list[tuple[str, dict[str, str], list[str]]]]]:
    """name -> (framework, what it decides, [(variant label, environment, extra native_loops arguments)])."""
    t = str(n)
    omp = {"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t}
    return {
        "mxnet-workers": ("mxnet", "MXNet engine workers (MXNET_CPU_WORKER_NTHREADS) with N OpenMP threads", [
            ("1 worker (default)", {**omp, "MXNET_OMP_MAX_THREADS": t}, []),
            (f"{n} workers", {**omp, "MXNET_OMP_MAX_THREADS": t, "MXNET_CPU_WORKER_NTHREADS": t}, [])]),
        "mxnet-slicing": ("mxnet", "MXNet batches: separate NDArrays vs slices of one big NDArray in record", [
            ("separate per-batch NDArrays", {**omp, "MXNET_OMP_MAX_THREADS": t}, []),
            ("sliced inside autograd.record", {**omp, "MXNET_OMP_MAX_THREADS": t}, ["--sliced"])]),
        "tf-interop": ("keras", "TensorFlow inter-op pool (intra-op = N)", [
            ("inter-op 1", {**omp, "TF_NUM_INTRAOP_THREADS": t, "TF_NUM_INTEROP_THREADS": "1"}, []),
            (f"inter-op {n}", {**omp, "TF_NUM_INTRAOP_THREADS": t, "TF_NUM_INTEROP_THREADS": t}, [])]),
        "torch-threads": ("torch", "PyTorch intra-op threads: OMP_NUM_THREADS=N vs torch's own default", [
            ("default (no variable)", {}, []),
            (f"OMP_NUM_THREADS={n}", omp, [])]),
    }


def run(framework: str, model: str, batch: int, env: dict[str, str], extra: list[str], args) -> float | None:
    base = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    cmd = [sys.executable, str(NATIVE), framework, model, str(batch), "--budget", str(args.budget), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**base, "TF_CPP_MIN_LOG_LEVEL": "2", **env},
                         timeout=600, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        print(out.stderr.strip().splitlines()[-1:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["train_samples_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", nargs="?")
    p.add_argument("--list", action="store_true")
    p.add_argument("--model", default="lenet5", choices=("mlp", "lenet5", "cifar_cnn"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    table = experiments(args.threads)
    if args.list or args.experiment not in table:
        for name, (fw, what, _) in table.items():
            print(f"{name:15} {fw:7} {what}")
        return 0 if args.list else 2
    framework, what, variants = table[args.experiment]
    results: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]  # alternate which variant goes first
        for label, env, extra in order:
            value = run(framework, args.model, args.batch, env, extra, args)
            if value is not None:
                results[label].append(value)
    print(f"{what}: {framework} {args.model} batch {args.batch}, {args.rounds} interleaved rounds, training samples/s")
    first = None
    for label, values in results.items():
        if not values:
            print(f"  {label:34} failed")
            continue
        med = statistics.median(values)
        first = first or med
        print(f"  {label:34} median {med:10,.0f}   runs {', '.join(f'{v:,.0f}' for v in values)}"
              f"   x{med / first:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
