#!/usr/bin/env python3
"""The adapter's training step beside the hand-written loop (benchmarks/native_loops.py) in ONE process,
repeats interleaved: what is left between them is the adapter's own per-step cost, with process start-up,
environment and machine drift taken out. A diagnostic for a gap native_vs_adapter.py shows between fresh
processes, not the reference itself (both sides share this process's environment).

    python benchmarks/step_ab.py FRAMEWORK MODEL BATCH [--steps 50] [--repeats 20] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("framework", choices=("keras", "keras-jax", "keras-torch", "torch", "mxnet"))
    p.add_argument("model", choices=("mlp", "lenet5", "cifar_cnn"))
    p.add_argument("batch", type=int)
    p.add_argument("--steps", type=int, default=50, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=20, help="repeats per side, alternating which goes first")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()

    from nncompare.backends import SGD, get_adapter
    from nncompare.backends.bench import tool_env
    from nncompare.models import zoo
    os.environ.update(tool_env(args.threads, args.framework))  # before the framework loads, as a cell does
    cls = get_adapter(args.framework)  # sets KERAS_BACKEND for the Keras engines, then imports the framework
    cls.set_threads(args.threads)
    import native_loops

    net = cls.build(zoo.get(args.model), optimizer=SGD(lr=native_loops.LR, momentum=native_loops.MOMENTUM))
    pool = [net.to_device(x, y) for x, y in native_loops.host_batches(args.model, args.batch)]
    native_step, fetch, _, _ = native_loops.LOOPS[args.framework](args.model, args.batch)
    sides = {"adapter": (lambda i: net._train_batch(*pool[i % len(pool)]), float),
             "native": (native_step, fetch)}
    for step, get in sides.values():  # trace / compile / allocate
        for i in range(5):
            h = step(i)
        get(h)
    speeds: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.repeats):
        for name in (("adapter", "native") if r % 2 == 0 else ("native", "adapter")):
            step, get = sides[name]
            t0 = time.perf_counter()
            for i in range(args.steps):
                h = step(i)
            get(h)  # the last result on the host: queued work is done
            speeds[name].append(args.steps * args.batch / (time.perf_counter() - t0))
    a, n = (statistics.median(speeds[k]) for k in ("adapter", "native"))
    paired = statistics.median(x / y for x, y in zip(speeds["adapter"], speeds["native"]))
    print(f"{args.framework} {args.model} b{args.batch}, {args.threads} threads, {args.repeats} interleaved "
          f"repeats of {args.steps} steps: adapter {a:,.0f}, native {n:,.0f} samples/s; "
          f"adapter / native {a / n:.3f} (paired {paired:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
