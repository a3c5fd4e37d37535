#!/usr/bin/env python3
"""A/B runs of one framework setting (thread pools, data layout) on the hand-written loops of
benchmarks/native_loops.py: each variant in its own fresh process, all of a round's processes timed in
lockstep (benchmarks/lockstep.py: turns on the cores, one repeat each, so the host's drift cancels). Prints
each variant's median samples/s and its median per-turn ratio to the first variant. These are the
measurements docs/performance.md quotes to justify each choice in nncompare.backends.bench.tool_env.

    python benchmarks/settings_ab.py EXPERIMENT [--model lenet5] [--batch 128] [--mode train] [--rounds 3]
                                     [--turns 20] [--threads N]
    python benchmarks/settings_ab.py --list
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lockstep import median, paired, positive, run_round, spill_note  # noqa: E402
from nncompare.backends.bench import ALLOCATOR_ENV as ALLOCATOR  # noqa: E402  (numpy only: no framework)

NATIVE = Path(__file__).resolve().parent / "native_loops.py"
THREAD_VARIABLES = (*ALLOCATOR, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                    "TF_NUM_INTEROP_THREADS", "MXNET_CPU_WORKER_NTHREADS", "MXNET_OMP_MAX_THREADS",
                    "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def experiments(n: int) -> dict[str, tuple[str, str, list[tuple[str, dict[str, str], list[str]]]]]:
    """name -> (framework, what it decides, [(variant label, environment, extra native_loops arguments)])."""
    t = str(n)
    omp = {"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t}
    tf_threads = {**omp, "TF_NUM_INTRAOP_THREADS": t, "TF_NUM_INTEROP_THREADS": t}
    return {
        "mxnet-workers": ("mxnet", "MXNet engine workers (MXNET_CPU_WORKER_NTHREADS) with N OpenMP threads", [
            ("1 worker (default)", {**omp, "MXNET_OMP_MAX_THREADS": t}, []),
            (f"{n} workers", {**omp, "MXNET_OMP_MAX_THREADS": t, "MXNET_CPU_WORKER_NTHREADS": t}, [])]),
        "mxnet-omp-wait": ("mxnet", "MXNet OpenMP threads and how idle OpenMP threads wait (libgomp)", [
            ("MXNet default (no variables)", {}, []),
            (f"{n} threads, libgomp default wait", {**omp, "MXNET_OMP_MAX_THREADS": t}, []),
            (f"{n} threads, OMP_WAIT_POLICY=PASSIVE", {**omp, "MXNET_OMP_MAX_THREADS": t, "OMP_WAIT_POLICY": "PASSIVE"}, []),
            (f"{n} threads, GOMP_SPINCOUNT=10000", {**omp, "MXNET_OMP_MAX_THREADS": t, "GOMP_SPINCOUNT": "10000"}, [])]),
        "mxnet-slicing": ("mxnet", "MXNet batches: separate NDArrays vs slices of one big NDArray in record", [
            ("separate per-batch NDArrays", {**omp, "MXNET_OMP_MAX_THREADS": t}, []),
            ("sliced inside autograd.record", {**omp, "MXNET_OMP_MAX_THREADS": t}, ["--sliced"])]),
        "tf-interop": ("keras", "TensorFlow inter-op pool (intra-op = N)", [
            ("inter-op 1", {**omp, "TF_NUM_INTRAOP_THREADS": t, "TF_NUM_INTEROP_THREADS": "1"}, []),
            (f"inter-op {n}", {**omp, "TF_NUM_INTRAOP_THREADS": t, "TF_NUM_INTEROP_THREADS": t}, [])]),
        "torch-threads": ("torch", "PyTorch intra-op threads: OMP_NUM_THREADS=N vs torch's own default", [
            ("default (no variable)", {}, []),
            (f"OMP_NUM_THREADS={n}", omp, [])]),
        "keras-env": ("keras", "the tool's variables for Keras on TensorFlow, in parts", [
            ("TensorFlow's default (no variables)", {}, []),
            ("allocator thresholds only", dict(ALLOCATOR), []),
            ("thread variables only", tf_threads, []),
            ("the tool's (both)", {**tf_threads, **ALLOCATOR}, [])]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", nargs="?")
    p.add_argument("--list", action="store_true")
    p.add_argument("--model", default="lenet5", choices=("mlp", "lenet5", "cifar_cnn"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--mode", choices=("train", "infer", "latency"), default="train",
                   help="what the loops time (latency: batch 1, calls/s at each turn's median)")
    p.add_argument("--rounds", type=positive, default=3, help="rounds, each with a fresh process per variant")
    p.add_argument("--turns", type=positive, default=20, help="timed repeats per process in a round, taken in turns")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    table = experiments(args.threads)
    if args.list or args.experiment not in table:
        for name, (fw, what, _) in table.items():
            print(f"{name:15} {fw:7} {what}")
        return 0 if args.list else 2
    framework, what, variants = table[args.experiment]
    base = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    base.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    batch = 1 if args.mode == "latency" else args.batch
    sides = {label: ([sys.executable, str(NATIVE), framework, args.model, str(batch), "--mode", args.mode, *extra],
                     {**base, **env}, "") for label, env, extra in variants}
    rounds = [run_round(sides, args.turns, timeout=600, start=i) for i in range(args.rounds)]
    first = variants[0][0]
    unit = {"train": "training samples/s", "infer": "inference samples/s", "latency": "batch-1 calls/s"}[args.mode]
    print(f"{what}: {framework} {args.model} batch {batch}, {args.rounds} rounds of {args.turns} turns in "
          f"lockstep, {unit}")
    for label, _, _ in variants:
        errors = [r[label]["error"] for r in rounds if "error" in r[label]]
        meds = [median(r[label]["turns"]) for r in rounds if "error" not in r[label]]
        ratio = median([paired(r[label]["turns"], r[first]["turns"]) for r in rounds
                        if "error" not in r[label] and "error" not in r[first]])
        if not meds:
            print(f"  {label:34} failed: {errors[0] if errors else '?'}")
            continue
        print(f"  {label:34} median {median(meds):10,.0f}   rounds {', '.join(f'{v:,.0f}' for v in meds if v)}"
              + (f"   x{ratio:.3f} per turn" if ratio else ""))
        if note := spill_note([r[label] for r in rounds]):
            print(f"  {'':34} note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
