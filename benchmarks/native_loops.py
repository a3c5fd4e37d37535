#!/usr/bin/env python3
"""Hand-written, idiomatic training loops of mlp, lenet5 and cifar_cnn in each framework: the independent
reference benchmarks/native_vs_adapter.py holds nncompare's adapters against. Never imports nncompare.

    python benchmarks/native_loops.py FRAMEWORK MODEL BATCH [--steps 10] [--repeats 5] [--budget 3]

FRAMEWORK: torch, keras (TensorFlow), keras-jax, keras-torch, mxnet. Each run is one fresh process; it
prints one JSON line: training samples/s (median of the settled repeats), spread, repeats, page faults
per timed step, and what the framework reports about its thread pools. Data is in memory as separate
per-batch native tensors; SGD with momentum 0.9; softmax cross-entropy from logits.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import numpy as np

SHAPES = {"mlp": (784,), "lenet5": (1, 28, 28), "cifar_cnn": (3, 32, 32)}
N_BATCHES = 4
LR, MOMENTUM = 0.01, 0.9


def host_batches(model: str, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((batch,) + SHAPES[model]).astype(np.float32),
             rng.integers(0, 10, batch).astype(np.int64)) for _ in range(N_BATCHES)]


def channels_last(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if x.ndim == 4 else x


# --- PyTorch: eager, nn.BatchNorm2d, torch.optim.SGD ----------------------------------------------------
def torch_loop(model: str, batch: int):
    import torch
    from torch import nn

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.MaxPool2d(2), nn.Dropout(0.25)]
    layers = {
        "mlp": lambda: [nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)],
        "lenet5": lambda: [nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                           nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
                           nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10)],
        "cifar_cnn": lambda: block(3, 32) + block(32, 64) + [nn.Flatten(), nn.Linear(64 * 8 * 8, 256), nn.ReLU(),
                                                            nn.Dropout(0.5), nn.Linear(256, 10)],
    }[model]
    net = nn.Sequential(*layers())
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    loss_fn = nn.CrossEntropyLoss()
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in host_batches(model, batch)]

    def step(i):
        x, y = data[i % N_BATCHES]
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        return loss

    settings = {"torch.get_num_threads": torch.get_num_threads(),
                "torch.get_num_interop_threads": torch.get_num_interop_threads()}
    return step, lambda loss: float(loss.detach()), f"torch {torch.__version__}", settings


# --- Keras 3: Sequential, channels-last, a compiled train step per the Keras guides -------------------------
def keras_model(model: str):
    import keras
    from keras import layers as L

    def block(filters):
        return [L.Conv2D(filters, 3, padding="same"), L.BatchNormalization(), L.ReLU(),
                L.Conv2D(filters, 3, padding="same"), L.BatchNormalization(), L.ReLU(),
                L.MaxPooling2D(2), L.Dropout(0.25)]
    stack = {
        "mlp": lambda: [keras.Input((784,)), L.Dense(256, activation="relu"), L.Dense(128, activation="relu"),
                        L.Dense(10)],
        "lenet5": lambda: [keras.Input((28, 28, 1)), L.Conv2D(6, 5, padding="same", activation="relu"),
                           L.MaxPooling2D(2), L.Conv2D(16, 5, activation="relu"), L.MaxPooling2D(2), L.Flatten(),
                           L.Dense(120, activation="relu"), L.Dense(84, activation="relu"), L.Dense(10)],
        "cifar_cnn": lambda: [keras.Input((32, 32, 3))] + block(32) + block(64) + [
            L.Flatten(), L.Dense(256, activation="relu"), L.Dropout(0.5), L.Dense(10)],
    }[model]
    return (keras.Sequential(stack()), keras.optimizers.SGD(LR, momentum=MOMENTUM),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def keras_tf_loop(model: str, batch: int):
    """"Writing a training loop from scratch in TensorFlow": GradientTape in a tf.function."""
    import keras
    import tensorflow as tf
    net, opt, loss_fn = keras_model(model)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, net(x, training=True))
        grads = tape.gradient(loss, net.trainable_weights)
        opt.apply(grads, net.trainable_weights)
        return loss

    data = [(tf.constant(channels_last(x)), tf.constant(y)) for x, y in host_batches(model, batch)]
    settings = {"tf.intra_op_parallelism_threads": tf.config.threading.get_intra_op_parallelism_threads(),
                "tf.inter_op_parallelism_threads": tf.config.threading.get_inter_op_parallelism_threads()}
    return (lambda i: train_step(*data[i % N_BATCHES]), float,
            f"keras {keras.__version__} / tensorflow {tf.__version__}", settings)


def keras_jax_loop(model: str, batch: int):
    """"Writing a training loop from scratch in JAX": stateless_call in one jax.jit step, state threaded."""
    import jax
    import keras
    net, opt, loss_fn = keras_model(model)
    opt.build(net.trainable_variables)

    def compute_loss(trainable, non_trainable, x, y):
        logits, non_trainable = net.stateless_call(trainable, non_trainable, x, training=True)
        return loss_fn(y, logits), non_trainable

    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)

    @jax.jit
    def train_step(state, x, y):
        trainable, non_trainable, opt_vars = state
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, x, y)
        trainable, opt_vars = opt.stateless_apply(opt_vars, grads, trainable)
        return loss, (trainable, non_trainable, opt_vars)

    state = [([v.value for v in net.trainable_variables], [v.value for v in net.non_trainable_variables],
              [v.value for v in opt.variables])]
    data = [(jax.device_put(channels_last(x)), jax.device_put(y)) for x, y in host_batches(model, batch)]

    def step(i):
        loss, state[0] = train_step(state[0], *data[i % N_BATCHES])
        return loss

    return step, float, f"keras {keras.__version__} / jax {jax.__version__}", {"jax.devices": str(jax.devices())}


def keras_torch_loop(model: str, batch: int):
    """"Writing a training loop from scratch in PyTorch": eager, loss.backward(), the Keras optimizer."""
    import keras
    import torch
    net, opt, loss_fn = keras_model(model)
    opt.build(net.trainable_weights)
    data = [(torch.from_numpy(channels_last(x)), torch.from_numpy(y)) for x, y in host_batches(model, batch)]

    def step(i):
        x, y = data[i % N_BATCHES]
        loss = loss_fn(y, net(x, training=True))
        net.zero_grad()
        loss.backward()
        grads = [v.value.grad for v in net.trainable_weights]
        with torch.no_grad():
            opt.apply(grads, net.trainable_weights)
        return loss

    settings = {"torch.get_num_threads": torch.get_num_threads(),
                "torch.get_num_interop_threads": torch.get_num_interop_threads()}
    return (step, lambda loss: float(loss.detach()), f"keras {keras.__version__} / torch {torch.__version__}",
            settings)


# --- MXNet Gluon: hybridized with static_alloc, gluon.Trainer, one NDArray per batch ------------------------
def mxnet_loop(model: str, batch: int, sliced: bool = False):
    if "bool" not in vars(np):
        np.bool = bool  # MXNet 1.9 uses the alias NumPy 1.24 removed
    import warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import mxnet as mx
    from mxnet import autograd, gluon
    from mxnet.gluon import nn

    net = nn.HybridSequential()

    def block(filters):
        return [nn.Conv2D(filters, 3, padding=1), nn.BatchNorm(), nn.Activation("relu"),
                nn.Conv2D(filters, 3, padding=1), nn.BatchNorm(), nn.Activation("relu"),
                nn.MaxPool2D(2), nn.Dropout(0.25)]
    layers = {
        "mlp": lambda: [nn.Dense(256, activation="relu"), nn.Dense(128, activation="relu"), nn.Dense(10)],
        "lenet5": lambda: [nn.Conv2D(6, 5, padding=2, activation="relu"), nn.MaxPool2D(2),
                           nn.Conv2D(16, 5, activation="relu"), nn.MaxPool2D(2), nn.Flatten(),
                           nn.Dense(120, activation="relu"), nn.Dense(84, activation="relu"), nn.Dense(10)],
        "cifar_cnn": lambda: block(32) + block(64) + [nn.Flatten(), nn.Dense(256, activation="relu"),
                                                      nn.Dropout(0.5), nn.Dense(10)],
    }[model]
    with net.name_scope():
        net.add(*layers())
    net.initialize(mx.init.Xavier())
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": LR, "momentum": MOMENTUM})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    loss_fn.hybridize(static_alloc=True, static_shape=True)
    # one NDArray per batch: slicing one big NDArray inside autograd.record halves the speed (trap 14); copied
    # by the engine thread: mx.nd.array of a large array starts an OpenMP team on this thread, after which
    # every operator runs slower (trap 21)
    def nd(a):
        return mx.nd.from_numpy(np.array(a, np.float32, order="C"), zero_copy=True).copyto(mx.cpu())
    data = [(nd(x), nd(y)) for x, y in host_batches(model, batch)]
    big_x = mx.nd.concat(*(x for x, _ in data), dim=0)  # only for --sliced, the trap's demonstration
    big_y = mx.nd.concat(*(y for _, y in data), dim=0)

    def step(i):
        x, y = data[i % N_BATCHES]
        with autograd.record():
            if sliced:
                j = i % N_BATCHES
                x, y = big_x[j * batch:(j + 1) * batch], big_y[j * batch:(j + 1) * batch]
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(batch)
        return loss

    settings = {"mxnet.cpu_workers": int(os.environ.get("MXNET_CPU_WORKER_NTHREADS") or 1),
                "mxnet.engine": os.environ.get("MXNET_ENGINE_TYPE", "ThreadedEnginePerDevice")}
    def fetch(loss):
        # the engine runs the last step's backward and update after its loss is ready: a repeat that ended on
        # the loss alone left up to 13 % of its work (cifar_cnn b32) to spill into the next process's turn
        mx.nd.waitall()
        return float(loss.mean().asscalar())

    return step, fetch, f"mxnet {mx.__version__}", settings


LOOPS = {"torch": torch_loop, "keras": keras_tf_loop, "keras-jax": keras_jax_loop, "keras-torch": keras_torch_loop,
         "mxnet": mxnet_loop}
KERAS_BACKEND = {"keras": "tensorflow", "keras-jax": "jax", "keras-torch": "torch"}


def spread(values: list[float]) -> float:
    med = statistics.median(values)
    return (max(values) - min(values)) / 2 / med if med else 0.0


class Turns:
    """Lockstep with other processes (benchmarks/native_vs_adapter.py): $NNCOMPARE_TURNS="GO_FD,DONE_FD"; each
    timed repeat waits for a byte on GO and answers its samples/s ("-" if dropped as too short) on DONE; EOF on
    GO ends the turns. The same protocol as nncompare's cells, written out again to keep this file independent."""

    def __init__(self, text: str):
        self.go, self.done = (int(v) for v in text.split(","))
        self.say("ready")

    def say(self, text: str) -> None:
        os.write(self.done, (text + "\n").encode())

    def wait(self) -> bool:
        return os.read(self.go, 1) != b""


def time_loop(step, fetch, batch: int, steps: int, repeats: int, budget: float, k: int = 5, bound: float = 0.03,
              min_repeat_s: float = 0.05) -> dict:
    """Repeats of `steps` steps until the last k agree within `bound` or `budget` seconds pass (the same rule
    as nncompare's cells, written out again here so this file stays independent); under Turns, until the
    driver ends the turns."""
    fetch(step(0))  # trace / compile / allocate
    for i in range(2):
        loss = step(i)
    fetch(loss)
    text = os.environ.pop("NNCOMPARE_TURNS", None)
    turns = Turns(text) if text else None
    values: list[float] = []
    faults, ran = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, 0
    start = time.perf_counter()
    while True:
        if turns is not None and not turns.wait():
            break
        t0 = time.perf_counter()
        for i in range(steps):
            loss = step(i)
        fetch(loss)  # every queued step done, the last loss on the host (MXNet's engine is asynchronous)
        seconds = time.perf_counter() - t0
        ran += steps
        short = seconds < min_repeat_s and (turns is not None or time.perf_counter() - start < budget)
        if turns is not None:
            turns.say("-" if short else repr(steps * batch / seconds))
        if short:
            steps = math.ceil(steps * 1.2 * min_repeat_s / max(seconds, 1e-6))
            continue
        values.append(steps * batch / seconds)
        window = values[-k:]
        if turns is None and len(values) >= repeats and (len(window) == k and spread(window) <= bound
                                                          or time.perf_counter() - start >= budget):
            break
    window = values[-k:] or [math.nan]
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / max(ran, 1)
    return {"train_samples_s": statistics.median(window), "spread": spread(window), "repeats": len(values),
            "steps": steps, "noisy": spread(window) > bound, "page_faults_per_step": faults}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("framework", choices=sorted(LOOPS))
    p.add_argument("model", choices=sorted(SHAPES))
    p.add_argument("batch", type=int)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=2.0,
                   help="seconds of timing after warm-up (as a cell gives training)")
    p.add_argument("--sliced", action="store_true",
                   help="MXNet only: slice the batches out of one big NDArray inside autograd.record (trap 14)")
    args = p.parse_args()
    if args.framework in KERAS_BACKEND:
        os.environ["KERAS_BACKEND"] = KERAS_BACKEND[args.framework]
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.sliced and args.framework != "mxnet":
        p.error("--sliced is an MXNet experiment")
    kw = {"sliced": True} if args.sliced else {}
    step, fetch, version, settings = LOOPS[args.framework](args.model, args.batch, **kw)
    result = time_loop(step, fetch, args.batch, args.steps, args.repeats, args.budget)
    env = {v: os.environ[v] for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                                      "TF_NUM_INTEROP_THREADS", "MXNET_CPU_WORKER_NTHREADS",
                                      "MXNET_OMP_MAX_THREADS", "MALLOC_MMAP_THRESHOLD_",
                                      "MALLOC_TRIM_THRESHOLD_") if v in os.environ}
    print(json.dumps({**result, "version": version, "settings": {**env, **settings}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
