"""Timing one (model, backend, device, batch size) cell, inside a fresh process: see DESIGN.md "Timing"."""
from __future__ import annotations

import resource
import statistics
import time

import numpy as np

from ..models import ModelSpec

from .base import Optimizer, parse_device

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                    "TF_NUM_INTEROP_THREADS", "MXNET_CPU_WORKER_NTHREADS", "MXNET_OMP_MAX_THREADS")


def thread_env(threads: int) -> dict[str, str]:
    """Environment that gives every framework the same thread count; set before the framework loads."""
    return {v: str(threads) for v in THREAD_VARIABLES}


def _spread(values: list[float]) -> float:
    """Half the min-max range, as a fraction of the median."""
    med = statistics.median(values)
    return (max(values) - min(values)) / 2 / med if med else 0.0


def measure(backend: str, spec: ModelSpec, device: str, batch_size: int, steps: int, repeats: int,
            warmup: int, optimizer: Optimizer, threads: int, seed: int = 0, compile: bool = False) -> dict:
    """Build, time the first step apart, warm up, then time `repeats` x `steps` training and inference steps."""
    from . import get_adapter  # imports the framework: only ever called in a cell's own process

    t0 = time.perf_counter()
    cls = get_adapter(backend)
    cls.set_threads(threads)
    import_s = time.perf_counter() - t0

    rng = np.random.default_rng(seed)
    pool = [(rng.standard_normal((batch_size,) + spec.input_shape).astype(np.float32),
             rng.integers(0, max(spec.num_classes, 2), batch_size).astype(np.int64)) for _ in range(4)]

    t0 = time.perf_counter()
    net = cls.build(spec, device=device, seed=seed, optimizer=optimizer, compile=compile)
    net.sync()
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    float(net._train_batch(*pool[0]))  # trace / compile / allocate: reported apart
    net.sync()
    first_step_s = time.perf_counter() - t0
    for i in range(warmup):
        handle = net._train_batch(*pool[i % len(pool)])
    if warmup:
        float(handle)
        net.sync()

    train, loss = [], float("nan")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            handle = net._train_batch(*pool[i % len(pool)])
        loss = float(handle)  # fetching the last loss waits for the queued steps (MXNet engine, CUDA)
        net.sync()
        train.append(steps * batch_size / (time.perf_counter() - t0))

    net.predict(pool[0][0])  # the inference path may compile on first use
    infer = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            net.predict(pool[i % len(pool)][0])  # returns host numpy: synchronised
        infer.append(steps * batch_size / (time.perf_counter() - t0))

    train_sps = statistics.median(train)
    return {
        "version": cls.version(), "device_name": net.device_name, "path": net.execution_path,
        "import_s": import_s, "build_s": build_s, "first_step_s": first_step_s,
        "train_samples_s": train_sps, "train_spread": _spread(train), "train_runs": train,
        "infer_samples_s": statistics.median(infer), "infer_spread": _spread(infer),
        # training FLOPs ~ 3x forward (forward, backward to activations, backward to weights)
        "train_gflops": 3 * spec.flops * train_sps / 1e9,
        "host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device_mem_mb": (lambda b: None if b is None else b / 2**20)(net.peak_device_memory()),
        "loss": loss,
    }


def gemm_peak(device: str, n: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 GEMM GFLOP/s of a device: NumPy's BLAS on CPU, torch (TF32 off) on GPU."""
    kind, index = parse_device(device)
    if kind == "cpu":
        a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
        a @ a
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t0)
        return 2 * n ** 3 / min(times) / 1e9
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n * 2, n * 2, device=f"cuda:{index}")
    a @ a
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * (2 * n) ** 3 / min(times) / 1e9



def train_run(backend: str, spec: ModelSpec, dataset: str, device: str, epochs: int, batch_size: int,
              optimizer: Optimizer, threads: int, target: float | None, data_dir: str | None = None,
              seed: int = 0) -> dict:
    """Train from the canonical weights over the shared batch order; per-epoch losses, accuracy and times."""
    from ..models.data import load
    from . import get_adapter

    data = load(dataset, spec, data_dir)
    cls = get_adapter(backend)
    cls.set_threads(threads)
    net = cls.build(spec, device=device, seed=seed, optimizer=optimizer)
    result = {"version": cls.version(), "device_name": net.device_name, "path": net.execution_path,
              "train_loss": [], "test_loss": [], "test_accuracy": [], "epoch_s": [], "time_to_target_s": None}
    elapsed = 0.0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        loss = net.fit(data.x_train, data.y_train, epochs=1, batch_size=batch_size, seed=seed,
                       start_epoch=epoch)["loss"][0]
        net.sync()
        seconds = time.perf_counter() - t0
        elapsed += seconds
        test_loss, accuracy = net.evaluate(data.x_test, data.y_test)
        for key, value in (("train_loss", loss), ("test_loss", test_loss), ("test_accuracy", accuracy),
                           ("epoch_s", seconds)):
            result[key].append(value)
        if target is not None and result["time_to_target_s"] is None and accuracy >= target:
            result["time_to_target_s"] = elapsed
            result["epochs_to_target"] = epoch + 1
    result["train_s"] = elapsed
    result["final_accuracy"] = result["test_accuracy"][-1]
    return result
