"""Timing one (model, backend, device, batch size) cell, inside a fresh process: see docs/design.md "Timing"
and docs/performance.md (what was measured to choose each setting)."""
from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

from ..models import ModelSpec

from . import BACKENDS
from .base import Optimizer, parse_device

# glibc malloc thresholds (mallopt(3)); fixed, they also stop glibc from moving them as it sees large frees.
# Left dynamic, a process whose allocation history kept them low page-faults its step buffers in afresh on
# every training step: 0 to 2,800 faults per step between two processes running the same loop, up to 8 ms
# a step (docs/performance.md "Allocator"). glibc's ceiling for the mmap threshold is 32 MiB on 64-bit.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}
# Everything a cell's environment sets for its framework; inherited values are dropped first.
TOOL_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                  "TF_NUM_INTEROP_THREADS", "MXNET_CPU_WORKER_NTHREADS", "MXNET_OMP_MAX_THREADS", *ALLOCATOR_ENV)
# Noise control: repeats continue until the last SETTLE_K agree within SPREAD_BOUND, or the budget runs out.
SETTLE_K = 5
SPREAD_BOUND = 0.03
PROBE_ROUNDS = 6  # choose_threads: 4 rounds kept mxnet mlp b32's faster count in 4 runs of 6, 6 rounds in 7 of 8
TIME_BUDGET_S = 1.7  # per cell after warm-up: keeps `python compare.py` (12 cells) within a minute on 2 cores (56-64 s at 2.0)
# choose_threads: another count must beat the first offered (the framework's own choice) by more than this.
# mxnet mlp b32: in 2 rounds of 6 the probe had 1 and 2 threads within 2 % while fresh 1-thread processes beat
# 2-thread ones by 1.25x in the same rounds; 2 threads beat 1 by 9-30 % on every convnet cell.
PROBE_TIE = 0.05
MIN_REPEAT_S = 0.05  # a repeat shorter than this is mostly timer and scheduler jitter: steps are raised to fit


def time_budget() -> float:
    """Seconds of timing per cell: $NNCOMPARE_TIME_BUDGET (a finite number >= 0), else TIME_BUDGET_S."""
    text = os.environ.get("NNCOMPARE_TIME_BUDGET") or str(TIME_BUDGET_S)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"NNCOMPARE_TIME_BUDGET must be a finite number of seconds >= 0, got {text!r}")
    return value


def _framework(backend: str | None) -> str | None:
    """The framework whose thread pools a backend's cell sizes ("keras-torch" runs torch kernels)."""
    return BACKENDS[backend].framework if backend in BACKENDS else backend


def tool_env(threads: int, backend: str | None = None) -> dict[str, str]:
    """The thread and allocator variables of `backend`'s cell, chosen per framework by measurement; set before
    the process starts (glibc reads the allocator's at start-up, the frameworks theirs when they load).

    MXNet keeps MXNET_CPU_WORKER_NTHREADS at its default (one engine worker) and gives that worker up to
    `threads` OpenMP threads: one worker per core, each with a core-wide OpenMP pool, oversubscribes (trap 13).
    backend=None gives the variables that are right for every framework at once.
    """
    n = str(threads)
    env = {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, **ALLOCATOR_ENV}
    fw = _framework(backend)
    if fw in (None, "tensorflow"):
        env["TF_NUM_INTRAOP_THREADS"] = n
        # inter-op 1 vs `threads`: no consistent direction (docs/performance.md); `threads` is TensorFlow's
        # default and what the Keras adapter's set_threads asks for, so the two agree
        env["TF_NUM_INTEROP_THREADS"] = n
    if fw in (None, "mxnet"):
        env["MXNET_OMP_MAX_THREADS"] = n
    if fw == "mxnet":
        # unset, MXNet's operators follow the engine worker's OpenMP count, which the cell can then choose
        # by measurement (thread_choices); set, MXNet fixes every operator's count as it loads
        del env["OMP_NUM_THREADS"]
    return env


class Turns:
    """Benchmark hook: fresh processes take turns on the cores, one timed repeat each, so the drift of a shared
    machine (seconds long, up to 2x here) hits adjacent repeats of every side alike. benchmarks/native_vs_adapter.py
    passes two pipe ends in $NNCOMPARE_TURNS="GO_FD,DONE_FD": a repeat waits for a byte on GO and answers with
    its samples/s ("-" for one dropped as too short). EOF on GO ends the turns for the rest of the process."""

    def __init__(self, go: int, done: int):
        self.go, self.done, self.ended = go, done, False
        self._say("ready")

    @classmethod
    def from_env(cls) -> "Turns | None":
        global _TURNS
        text = os.environ.pop(TURNS_VARIABLE, None)  # popped: nothing this process starts inherits the pipes
        if text is not None and _TURNS is None:
            try:
                go, done = (int(v) for v in text.split(","))
                _TURNS = cls(go, done)
            except (ValueError, OSError) as e:
                raise ValueError(f"{TURNS_VARIABLE} must be two open pipe ends 'GO_FD,DONE_FD', got {text!r}") from e
        return None if _TURNS is None or _TURNS.ended else _TURNS

    def _say(self, text: str) -> None:
        os.write(self.done, (text + "\n").encode())

    def wait(self) -> bool:
        """Block until it is this process's turn; False once the driver has closed GO (turns over)."""
        self.ended = self.ended or os.read(self.go, 1) == b""
        return not self.ended

    def report(self, samples_s: float | None) -> None:
        self._say("-" if samples_s is None else repr(samples_s))


TURNS_VARIABLE = "NNCOMPARE_TURNS"
_TURNS: Turns | None = None


def choose_threads(net: Any, train: Callable[[int], None], choices: list[int], steps: int, batch_size: int,
                   rounds: int = PROBE_ROUNDS, min_repeat_s: float = MIN_REPEAT_S) -> tuple[int, dict[int, float]]:
    """Of `choices` (the framework's own choice first), the operator thread count that trains fastest here, and
    each one's median samples/s: repeats in mirrored order (AB BA ...) so drift cancels; the first unless
    another is more than PROBE_TIE faster. A repeat shorter than `min_repeat_s` raises the steps and starts the
    probe over. Under Turns each repeat takes a turn and reports '-'."""
    turns = Turns.from_env()
    rates: dict[int, list[float]] = {k: [] for k in choices}
    r = 0
    while r < rounds:
        for k in choices if r % 2 == 0 else choices[::-1]:
            if turns is not None and not turns.wait():
                turns = None
            # inside the turn: work between turns would run in another process's timed repeat
            net.use_threads(k)
            train(1)  # the first step after a change starts or parks OpenMP threads: untimed
            t0 = time.perf_counter()
            train(steps)
            seconds = time.perf_counter() - t0
            if turns is not None:
                turns.report(None)
            if seconds < min_repeat_s:
                # a few milliseconds time the switch and the wake-up, not the count: steps sized from a warm-up
                # slowed by other processes starting gave mxnet mlp b32 repeats of 2 steps, ~6 ms
                steps = math.ceil(steps * 1.2 * min_repeat_s / max(seconds, 1e-9))
                rates, r = {k: [] for k in choices}, -1
                break
            rates[k].append(steps * batch_size / max(seconds, 1e-9))
        r += 1
    medians = {k: statistics.median(v) for k, v in rates.items()}
    best = max(choices, key=medians.__getitem__)
    chosen = best if medians[best] > medians[choices[0]] * (1 + PROBE_TIE) else choices[0]
    net.use_threads(chosen)
    return chosen, medians


def _spread(values: list[float]) -> float:
    """Half the min-max range, as a fraction of the median."""
    med = statistics.median(values)
    return (max(values) - min(values)) / 2 / med if med else 0.0


def timed_repeats(run: Callable[[int], None], steps: int, batch_size: int, min_repeats: int, budget_s: float,
                  k: int = SETTLE_K, bound: float = SPREAD_BOUND) -> dict:
    """Samples/s of `run(steps)` repeated until the last k repeats agree within `bound` (half range / median)
    or `budget_s` is spent, at least `min_repeats` either way. A repeat shorter than MIN_REPEAT_S is dropped
    and the steps per repeat raised. The median and spread are over the last k repeats. Under Turns each repeat
    waits for its turn, and the driver, not the budget, decides when to stop."""
    values: list[float] = []
    turns = Turns.from_env()
    start = time.perf_counter()
    while True:
        if turns is not None and not turns.wait():
            turns = None  # the driver has its paired repeats
            if values:
                break
            start = time.perf_counter()
        t0 = time.perf_counter()
        run(steps)
        seconds = time.perf_counter() - t0
        short = seconds < MIN_REPEAT_S and (turns is not None or time.perf_counter() - start < budget_s)
        if turns is not None:
            turns.report(None if short else steps * batch_size / seconds)
        if short:
            steps = math.ceil(steps * 1.2 * MIN_REPEAT_S / max(seconds, 1e-6))
            continue
        values.append(steps * batch_size / seconds)
        window = values[-k:]
        settled = len(window) == k and _spread(window) <= bound
        if turns is None and len(values) >= min_repeats and (settled or time.perf_counter() - start >= budget_s):
            break
    window = values[-k:]
    return {"samples_s": statistics.median(window), "spread": _spread(window), "repeats": len(values),
            "steps": steps, "noisy": _spread(window) > bound, "runs": values}


def _framework_settings(net: Any, backend: str) -> dict:
    """What the framework `backend` runs on reports about its thread pools and numerics. Only that one is asked:
    Keras imports jax whatever its engine, and asking jax for its devices would start a runtime it never used."""
    s: dict[str, Any] = {}
    gpu = getattr(net, "device", "cpu") != "cpu"
    fw = _framework(backend)
    if fw == "torch" and "torch" in sys.modules:
        torch = sys.modules["torch"]
        s["torch.get_num_threads"] = torch.get_num_threads()
        s["torch.get_num_interop_threads"] = torch.get_num_interop_threads()
        if gpu:
            s["torch.cuda.matmul.allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
            s["torch.cudnn.allow_tf32"] = torch.backends.cudnn.allow_tf32
            s["torch.cudnn.benchmark"] = torch.backends.cudnn.benchmark
    if fw == "tensorflow" and "tensorflow" in sys.modules:
        tf = sys.modules["tensorflow"]
        try:  # 0 means "TensorFlow's own choice" (the TF_NUM_*_THREADS variables, else the core count)
            s["tf.intra_op_parallelism_threads"] = tf.config.threading.get_intra_op_parallelism_threads()
            s["tf.inter_op_parallelism_threads"] = tf.config.threading.get_inter_op_parallelism_threads()
            if gpu:
                s["tf.tensor_float32_execution"] = tf.config.experimental.tensor_float32_execution_enabled()
        except AttributeError:
            pass
    if fw == "mxnet" and "mxnet" in sys.modules:
        mx = sys.modules["mxnet"]
        s["mxnet.engine"] = os.environ.get("MXNET_ENGINE_TYPE", "ThreadedEnginePerDevice")
        s["mxnet.cpu_workers"] = int(os.environ.get("MXNET_CPU_WORKER_NTHREADS") or 1)  # MXNet's default: 1
        try:
            features = mx.runtime.Features()
            s["mxnet.openmp"] = features.is_enabled("OPENMP")
            s["mxnet.mkldnn"] = features.is_enabled("MKLDNN")
        except (AttributeError, RuntimeError):
            pass
    if fw == "jax" and "jax" in sys.modules:
        jax = sys.modules["jax"]
        s["jax.devices"] = [str(d) for d in jax.devices()]
    try:  # the per-framework practices the adapter chose (memory format, fused BatchNorm, static_alloc, ...)
        chosen = net.settings
    except (AttributeError, RuntimeError):  # a report must not fail the timing it describes
        chosen = None
    if isinstance(chosen, dict):
        for k, v in chosen.items():
            try:
                json.dumps(v)
            except (TypeError, ValueError):
                v = str(v)
            s[f"adapter.{k}"] = v
    return s


def _process_threads() -> int | None:
    """OS threads of this process (Linux): engine workers and OpenMP/Eigen pools show up here."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def batch_pool(spec: ModelSpec, batch_size: int, n: int = 4, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` separate per-batch arrays (never views into one big array: slicing inside MXNet's autograd.record
    halves its throughput, trap 14)."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch_size,) + spec.input_shape).astype(np.float32),
             rng.integers(0, max(spec.num_classes, 2), batch_size).astype(np.int64)) for _ in range(n)]


def measure(backend: str, spec: ModelSpec, device: str, batch_size: int, steps: int, repeats: int,
            warmup: int, optimizer: Optimizer, threads: int, seed: int = 0, compile: bool = False,
            data: str = "resident", budget_s: float | None = None) -> dict:
    """Build, time the first step apart, warm up, then time training and inference samples/s: `steps` and
    `repeats` are minimums, repeats go on until the spread settles or `budget_s` (split 2:1 between training
    and inference; default $NNCOMPARE_TIME_BUDGET, else TIME_BUDGET_S; 0 = exactly the minimums) is spent.
    Where the adapter offers thread_choices (MXNet), the operator thread count is chosen first by timing each
    (choose_threads), inside the training budget. data="resident" feeds the adapter's own tensors made once
    by `to_device`; data="host" feeds host NumPy arrays every step (what a data loader does); the row says
    which."""
    if data not in ("host", "resident"):
        raise ValueError(f"data must be 'host' or 'resident', got {data!r}")
    if budget_s is None:
        budget_s = time_budget()
    from . import get_adapter  # imports the framework: only ever called in a cell's own process

    t0 = time.perf_counter()
    cls = get_adapter(backend)
    cls.set_threads(threads)
    import_s = time.perf_counter() - t0

    pool = batch_pool(spec, batch_size, seed=seed)

    t0 = time.perf_counter()
    net = cls.build(spec, device=device, seed=seed, optimizer=optimizer, compile=compile)
    net.sync()
    build_s = time.perf_counter() - t0

    placed = "host"
    if data == "resident":  # the framework's own tensors, made once (host arrays where it has no device copy)
        pool = [tuple(net.to_device(x, y)) for x, y in pool]
        placed = "resident"

    last = {"loss": float("nan"), "steps": 0}

    def train(n: int) -> None:
        for i in range(n):
            handle = net.train_batch(*pool[i % len(pool)])
        last["loss"] = float(handle)  # fetching the last loss waits for queued steps (MXNet engine, CUDA)
        net.sync()
        last["steps"] += n

    t0 = time.perf_counter()
    train(1)  # trace / compile / allocate: reported apart
    first_step_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if warmup:
        train(warmup)
    step_s = (time.perf_counter() - t0) / warmup if warmup else first_step_s
    # the same number of steps in every framework (repeats vary with noise): comparable across rows
    loss = last["loss"]

    t0 = time.perf_counter()
    choices = net.thread_choices(threads)
    probe: dict[int, float] = {}
    if len(choices) > 1:  # a framework whose best thread count depends on the model (docs/performance.md)
        full = budget_s or Turns.from_env() is not None  # else budget 0: exactly the minimums
        chosen, probe = choose_threads(
            net, train, choices, batch_size=batch_size, rounds=PROBE_ROUNDS if full else 1,
            steps=max(steps, math.ceil(1.2 * MIN_REPEAT_S / max(step_s, 1e-9))) if full else steps,
            min_repeat_s=MIN_REPEAT_S if full else 0.0)
    probe_s = time.perf_counter() - t0

    last["steps"] = 0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tr = timed_repeats(train, steps, batch_size, repeats, max(budget_s * 2 / 3 - probe_s, 0))
    # pages the allocator handed back to the OS and faulted in again: ~0 once step buffers are reused
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / max(last["steps"], 1)

    host_x = [x for x, _ in batch_pool(spec, batch_size, seed=seed)]

    def infer(n: int) -> None:
        for i in range(n):
            net.predict(host_x[i % len(host_x)])  # returns host NumPy: synchronised

    infer(1 + warmup)  # the inference path may compile on first use
    inf = timed_repeats(infer, steps, batch_size, repeats, budget_s / 3)

    settings = {"threads": threads, **{v: os.environ[v] for v in TOOL_VARIABLES if v in os.environ},
                **_framework_settings(net, backend), "data": placed, "infer_data": "host",
                **({"operator_threads": chosen, "operator_threads_probe": {str(k): v for k, v in probe.items()}}
                   if probe else {}),
                "process_threads": _process_threads()}
    train_sps = tr["samples_s"]
    return {
        "version": cls.version(), "device_name": net.device_name, "path": net.execution_path,
        "import_s": import_s, "build_s": build_s, "first_step_s": first_step_s,
        "train_samples_s": train_sps, "train_spread": tr["spread"], "train_runs": tr["runs"],
        "train_repeats": tr["repeats"], "train_steps": tr["steps"], "train_noisy": tr["noisy"],
        "train_page_faults_per_step": faults,
        "infer_samples_s": inf["samples_s"], "infer_spread": inf["spread"], "infer_repeats": inf["repeats"],
        "infer_steps": inf["steps"], "infer_noisy": inf["noisy"],
        "noisy": tr["noisy"] or inf["noisy"], "data": placed, "settings": settings,
        # training FLOPs ~ 3x forward (forward, backward to activations, backward to weights)
        "train_gflops": 3 * spec.flops * train_sps / 1e9,
        "host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device_mem_mb": (lambda b: None if b is None else b / 2**20)(net.peak_device_memory()),
        "loss": loss, "loss_after_steps": 1 + warmup,
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
