#!/usr/bin/env python3
"""Adapter overhead: each framework's adapter training loop against a minimal hand-written native loop of
the same LeNet-5, in one fresh process per framework, repeats interleaved. Prints samples/s and ratios.

    python benchmarks/native_vs_adapter.py [--batch-size 128] [--steps 20] [--repeats 7] [--threads N]
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


def native_torch(batch_size):
    import torch
    from torch import nn
    net = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                        nn.Linear(84, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step(x, y):
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(xt), yt)
        loss.backward()
        opt.step()
        return loss.detach()
    return step, lambda x: x, float


def native_keras(batch_size):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    from keras import layers
    net = keras.Sequential([keras.Input((28, 28, 1)), layers.Conv2D(6, 5, padding="same", activation="relu"),
                            layers.MaxPooling2D(2), layers.Conv2D(16, 5, activation="relu"), layers.MaxPooling2D(2),
                            layers.Flatten(), layers.Dense(120, activation="relu"), layers.Dense(84, activation="relu"),
                            layers.Dense(10)])
    net.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def step(x, y):  # the documented per-batch Keras API; returns a host float
        return net.train_on_batch(x, y)
    return step, lambda x: x.transpose(0, 2, 3, 1).copy(), float  # native Keras data is channels-last


def native_mxnet(batch_size):
    import numpy
    if not hasattr(numpy, "bool"):
        numpy.bool = bool  # MXNet 1.9.1 still uses the alias that numpy 1.24 removed
    import mxnet as mx
    from mxnet import autograd, gluon
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(6, 5, padding=2, activation="relu"), gluon.nn.MaxPool2D(2),
            gluon.nn.Conv2D(16, 5, activation="relu"), gluon.nn.MaxPool2D(2), gluon.nn.Flatten(),
            gluon.nn.Dense(120, activation="relu"), gluon.nn.Dense(84, activation="relu"), gluon.nn.Dense(10))
    net.initialize(mx.init.Xavier())
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01, "momentum": 0.9})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    def step(x, y):
        xn, yn = mx.nd.array(x), mx.nd.array(y)
        with autograd.record():
            loss = loss_fn(net(xn), yn)
        loss.backward()
        trainer.step(len(x))
        return loss
    return step, lambda x: x, lambda loss: float(loss.mean().asscalar())


NATIVE = {"torch": native_torch, "keras": native_keras, "mxnet": native_mxnet}


def worker(backend: str, batch_size: int, steps: int, repeats: int, threads: int) -> dict:
    """Time the adapter and the native loop alternately in this process; samples/s per repeat."""
    import numpy as np

    from nncompare.backends import SGD, get_adapter
    from nncompare.models import zoo

    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((batch_size, 1, 28, 28)).astype(np.float32),
             rng.integers(0, 10, batch_size).astype(np.int64)) for _ in range(4)]
    cls = get_adapter(backend)
    cls.set_threads(threads)
    net = cls.build(zoo.get("lenet5"), optimizer=SGD(lr=0.01, momentum=0.9))
    native_step, to_native, fetch = NATIVE[backend](batch_size)
    native_data = [(to_native(x), y) for x, y in data]

    def adapter_run():
        for i in range(steps):
            h = net._train_batch(*data[i % 4])
        float(h)
        net.sync()

    def native_run():
        for i in range(steps):
            h = native_step(*native_data[i % 4])
        fetch(h)

    for run in (adapter_run, native_run):  # warm-up: tracing, allocation
        run()
    times = {"adapter": [], "native": []}
    for _ in range(repeats):
        for name, run in (("adapter", adapter_run), ("native", native_run)):
            t0 = time.perf_counter()
            run()
            times[name].append(steps * batch_size / (time.perf_counter() - t0))
    return {"path": net.execution_path, **{k: statistics.median(v) for k, v in times.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["keras", "torch", "mxnet"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch_size, args.steps, args.repeats, args.threads)))
        return 0
    from tabulate import tabulate
    from nncompare.backends.bench import thread_env
    rows = []
    for backend in args.backends:
        cmd = [sys.executable, __file__, "--worker", backend, "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True,
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **thread_env(args.threads)))
        if out.returncode != 0:
            rows.append((backend, "ERROR", (out.stderr.strip().splitlines() or ["?"])[-1][:80], "", ""))
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((backend, r["path"], f"{r['adapter']:,.0f}", f"{r['native']:,.0f}", f"{r['adapter'] / r['native']:.3f}"))
    print(f"lenet5, batch {args.batch_size}, cpu, {args.threads} threads, median of {args.repeats} x {args.steps} steps")
    print(tabulate(rows, headers=("Framework", "Adapter path", "Adapter samples/s", "Native samples/s",
                                  "Adapter / native"), disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
