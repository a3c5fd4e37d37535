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

from ..models import ModelSpec, init_weights

from . import BACKENDS
from .base import Optimizer, cpu_processors, parse_device, physical_cores

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
# What a cell times, in this order: training, inference throughput at the cell's batch, batch-1 latency.
SECTIONS = ("train", "infer", "latency")
# Each section's share of the cell's time budget: training and inference as they always were (2:1); latency, in
# the one cell per (backend, model, device) that measures it, a quarter more.
SECTION_BUDGET = {"train": 2 / 3, "infer": 1 / 3, "latency": 1 / 4}
LATENCY_MIN_CALLS = 200  # the 99th percentile of fewer calls is one or two calls


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


def check_sections(sections) -> tuple[str, ...]:
    """`sections` as a tuple, or a ValueError: a non-empty subset of SECTIONS, in their order, no repeats."""
    if isinstance(sections, (list, tuple)) and sections and all(isinstance(s, str) for s in sections):
        order = [SECTIONS.index(s) for s in sections if s in SECTIONS]
        if len(order) == len(sections) and order == sorted(set(order)):
            return tuple(sections)
    raise ValueError(f"sections must be a non-empty list of {', '.join(SECTIONS)} in that order without repeats, "
                     f"got {repr(sections)[:80]}")


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
    its samples/s ("-" for one dropped as too short). EOF on GO ends the turns for the rest of the process, so
    only a cell's first timed section takes turns (the driver closes GO when it has its repeats; the sections
    after it time on their budget). A "latency" turn is a block of batch-1 calls lasting at least MIN_REPEAT_S,
    each call timed alone, answered with 1 / (median seconds per call in the block): calls/s at the median."""

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


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile by nearest rank: a value that was measured, never one interpolated between two."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1]


def timed_calls(call: Callable[[int], None], budget_s: float, min_calls: int = LATENCY_MIN_CALLS,
                clock: Callable[[], float] = time.perf_counter) -> dict:
    """Latency of single calls (`call(i)` makes the i-th), each timed alone: at least `min_calls`, more while
    `budget_s` lasts. Under Turns each turn is a block of calls lasting at least MIN_REPEAT_S, answered with
    1 / its median seconds per call, until the driver ends the turns. Median and 99th percentile over every call."""
    seconds: list[float] = []
    turns = Turns.from_env()
    start = clock()

    def one() -> float:
        t0 = clock()
        call(len(seconds))
        seconds.append(clock() - t0)
        return seconds[-1]

    while True:
        if turns is not None:
            if not turns.wait():
                turns = None  # the driver has its blocks
                if seconds:
                    break
                start = clock()
                continue
            block_start, block = clock(), []
            while not block or clock() - block_start < MIN_REPEAT_S:
                block.append(one())
            turns.report(1 / max(statistics.median(block), 1e-12))
            continue
        one()
        if len(seconds) >= min_calls and clock() - start >= budget_s:
            break
    p50, p99 = statistics.median(seconds), percentile(seconds, 99)
    return {"p50_s": p50, "p99_s": p99, "calls": len(seconds), "seconds": seconds}


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


def _build(cls: Any, spec: ModelSpec, device: str, seed: int, optimizer: Optimizer | None, compile: bool,
           train: bool, weights: dict | None = None) -> Any:
    """The network; without training no optimizer is set, so none builds its state (Keras makes its slots then)."""
    if train:
        return cls.build(spec, device=device, seed=seed, weights=weights, optimizer=optimizer, compile=compile)
    net = cls(spec, device, compile, native_init=False)
    net._seed(seed)  # as build() seeds: nothing random runs in inference, but the cell's state is the same
    net.set_weights(init_weights(spec, seed) if weights is None else weights)
    return net


def measure(backend: str, spec: ModelSpec, device: str, batch_size: int, steps: int, repeats: int,
            warmup: int, optimizer: Optimizer, threads: int, seed: int = 0, compile: bool = False,
            data: str = "resident", budget_s: float | None = None, sections=SECTIONS,
            weights: dict | None = None) -> dict:
    """Build, then time each of `sections` in SECTIONS' order, each warmed up first: "train" samples/s (the first
    step timed apart), "infer" samples/s at `batch_size` and "latency", single batch-1 calls (median and 99th
    percentile ms). Inference takes host NumPy and returns host NumPy, as a user's code does; training's
    data="resident" feeds the adapter's own tensors made once by `to_device`, data="host" host NumPy arrays
    every step (what a data loader does; the row says which). `steps` and `repeats` are minimums: repeats go on
    until the spread settles or the section's share (SECTION_BUDGET) of `budget_s` (default
    $NNCOMPARE_TIME_BUDGET, else TIME_BUDGET_S; 0 = exactly the minimums) is spent. Without "train" no
    optimizer is set and no step taken. `weights`: canonical weights to load (default: the spec's seeded init).
    Where the adapter offers thread_choices (MXNet), the operator thread count is chosen by timing each on the
    first section's work (choose_threads), inside that section's budget."""
    sections = check_sections(sections)
    if data not in ("host", "resident"):
        raise ValueError(f"data must be 'host' or 'resident', got {data!r}")
    if budget_s is None:
        budget_s = time_budget()
    from . import get_adapter  # imports the framework: only ever called in a cell's own process

    t0 = time.perf_counter()
    cls = get_adapter(backend)
    cls.set_threads(threads)
    import_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    net = _build(cls, spec, device, seed, optimizer, compile, "train" in sections, weights)
    net.sync()
    out: dict[str, Any] = {"version": cls.version(), "device_name": net.device_name, "path": net.execution_path,
                           "import_s": import_s, "build_s": time.perf_counter() - t0}
    chosen: dict[str, Any] = {}  # the operator thread count, chosen on the first section's work

    def probe(run: Callable[[int], None], unit_s: float, per_unit: int) -> float:
        """Seconds spent choosing the operator thread count: only in the first section, where there is a choice."""
        if "probed" in chosen:
            return 0.0
        chosen["probed"] = True
        t0 = time.perf_counter()
        choices = net.thread_choices(threads)
        if len(choices) > 1:  # a framework whose best thread count depends on the model (docs/performance.md)
            full = budget_s or Turns.from_env() is not None  # else budget 0: exactly the minimums
            k, medians = choose_threads(
                net, run, choices, batch_size=per_unit, rounds=PROBE_ROUNDS if full else 1,
                steps=max(steps, math.ceil(1.2 * MIN_REPEAT_S / max(unit_s, 1e-9))) if full else steps,
                min_repeat_s=MIN_REPEAT_S if full else 0.0)
            chosen.update(operator_threads=k, operator_threads_probe={str(c): v for c, v in medians.items()})
        return time.perf_counter() - t0

    def share(section: str, probe_s: float) -> float:
        return max(budget_s * SECTION_BUDGET[section] - probe_s, 0)

    placed = None
    if "train" in sections:
        pool = batch_pool(spec, batch_size, seed=seed)
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
        probe_s = probe(train, step_s, batch_size)
        last["steps"] = 0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tr = timed_repeats(train, steps, batch_size, repeats, share("train", probe_s))
        # pages the allocator handed back to the OS and faulted in again: ~0 once step buffers are reused
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / max(last["steps"], 1)
        out.update({
            "first_step_s": first_step_s, "train_samples_s": tr["samples_s"], "train_spread": tr["spread"],
            "train_runs": tr["runs"], "train_repeats": tr["repeats"], "train_steps": tr["steps"],
            "train_noisy": tr["noisy"], "train_page_faults_per_step": faults,
            # training FLOPs ~ 3x forward (forward, backward to activations, backward to weights)
            "train_gflops": 3 * spec.flops * tr["samples_s"] / 1e9, "loss": loss, "loss_after_steps": 1 + warmup})

    if "infer" in sections:
        host_x = [x for x, _ in batch_pool(spec, batch_size, seed=seed)]

        def infer(n: int) -> None:
            for i in range(n):
                net.predict(host_x[i % len(host_x)])  # returns host NumPy: synchronised

        t0 = time.perf_counter()
        infer(1)  # the inference path may trace or compile on first use
        first_infer_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        infer(warmup)
        probe_s = probe(infer, (time.perf_counter() - t0) / warmup if warmup else first_infer_s, batch_size)
        inf = timed_repeats(infer, steps, batch_size, repeats, share("infer", probe_s))
        out.update({"first_infer_s": first_infer_s, "infer_samples_s": inf["samples_s"], "infer_spread": inf["spread"],
                    "infer_repeats": inf["repeats"], "infer_steps": inf["steps"], "infer_noisy": inf["noisy"],
                    "infer_gflops": spec.flops * inf["samples_s"] / 1e9})

    if "latency" in sections:
        single = [x for x, _ in batch_pool(spec, 1, seed=seed)]

        def call(i: int) -> None:
            net.predict(single[i % len(single)])

        def calls(n: int) -> None:
            for i in range(n):
                call(i)

        t0 = time.perf_counter()
        call(0)  # a new batch shape: a tracing framework traces again
        first_call_s = time.perf_counter() - t0
        t0, n = time.perf_counter(), 0
        while n < warmup or time.perf_counter() - t0 < MIN_REPEAT_S:  # caches, allocator, thread pools awake
            call(n)
            n += 1
        probe_s = probe(calls, (time.perf_counter() - t0) / n, 1)
        lat = timed_calls(call, share("latency", probe_s))
        out.update({"latency_first_call_s": first_call_s, "latency_p50_ms": 1e3 * lat["p50_s"],
                    "latency_p99_ms": 1e3 * lat["p99_s"], "latency_calls": lat["calls"]})

    out["noisy"] = bool(out.get("train_noisy") or out.get("infer_noisy"))
    if placed:
        out["data"] = placed
    out["settings"] = {
        "threads": threads, **{v: os.environ[v] for v in TOOL_VARIABLES if v in os.environ},
        **_framework_settings(net, backend), **({"data": placed} if placed else {}),
        **({"infer_data": "host"} if {"infer", "latency"} & set(sections) else {}),
        **{k: v for k, v in chosen.items() if k != "probed"}, "process_threads": _process_threads()}
    out["host_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["device_mem_mb"] = (lambda b: None if b is None else b / 2**20)(net.peak_device_memory())
    return out


# --- the device's limit ------------------------------------------------------------------------------
GEMM_N = {"cpu": 2048, "gpu": 8192}  # one n for every library of a device: ~0.1 s a GEMM on 2 cores, ~20 ms on a GPU
GEMM_ROUNDS = 2  # the libraries in turn, then in reverse: drift hits each alike; each library's best repeat counts
GEMM_REPEATS = 3  # timed GEMMs per library and round, after one untimed
GEMM_PAUSE_S = 0.2  # between libraries: idle BLAS threads spin after a call (NumPy 1.26: 0.03 s of CPU)


class Skipped(Exception):
    """A library that is present but cannot be timed fairly here (the reason goes in the candidates)."""


def _gemm_matrix(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)


def _numpy_gemm(n: int, gpu: int | None, threads: int) -> tuple[str, Callable[[], None]]:
    if gpu is not None:
        raise Skipped("CPU only")
    a, c = _gemm_matrix(n), np.empty((n, n), np.float32)
    return f"numpy {np.__version__}", lambda: np.matmul(a, a, out=c)  # OpenBLAS/MKL: its own threads (env)


def _torch_gemm(n: int, gpu: int | None, threads: int) -> tuple[str, Callable[[], None]]:
    import torch
    if gpu is None:
        torch.set_num_threads(threads)
        a, c = torch.from_numpy(_gemm_matrix(n)), torch.empty(n, n)
        return f"torch {torch.__version__}", lambda: torch.mm(a, a, out=c)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 as the cells run it, not TF32
    dev = torch.device("cuda", gpu)
    a = torch.from_numpy(_gemm_matrix(n)).to(dev)
    c = torch.empty_like(a)

    def run() -> None:
        torch.mm(a, a, out=c)
        torch.cuda.synchronize(dev)
    return f"torch {torch.__version__}", run


def _jax_gemm(n: int, gpu: int | None, threads: int) -> tuple[str, Callable[[], None]]:
    if gpu is None and threads < len(_usable_cpus()):
        raise Skipped(f"XLA's CPU thread count cannot be set to {threads}")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leaves the GPU's memory to TensorFlow's turn
    import jax
    import jax.numpy as jnp
    dev = jax.devices("gpu")[gpu] if gpu is not None else jax.devices("cpu")[0]
    a = jax.device_put(_gemm_matrix(n), dev)
    mm = jax.jit(lambda x: jnp.matmul(x, x, precision=jax.lax.Precision.HIGHEST))  # fp32, not TF32 on a GPU
    return f"jax {jax.__version__}", lambda: mm(a).block_until_ready()


def _tensorflow_gemm(n: int, gpu: int | None, threads: int) -> tuple[str, Callable[[], None]]:
    import tensorflow as tf
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:  # the runtime already started: TF_NUM_INTRAOP_THREADS applied
        pass
    if gpu is not None:
        tf.config.experimental.enable_tensor_float32_execution(False)
    with tf.device(f"/GPU:{gpu}" if gpu is not None else "/CPU:0"):
        a = tf.constant(_gemm_matrix(n))
    mm = tf.function(lambda x: tf.linalg.matmul(x, x))

    def run() -> None:
        mm(a)  # a CPU kernel has run when the call returns
        if gpu is not None:
            tf.test.experimental.sync_devices()
    return f"tensorflow {tf.__version__}", run


# The libraries a peak is measured with where installed (torch before TensorFlow: trap 12).
GEMM_LIBRARIES: dict[str, Callable[[int, int | None, int], tuple[str, Callable[[], None]]]] = {
    "numpy": _numpy_gemm, "torch": _torch_gemm, "jax": _jax_gemm, "tensorflow": _tensorflow_gemm}


def peak_libraries() -> list[str]:
    """The libraries a peak is measured with: $NNCOMPARE_PEAK_LIBRARIES (comma-separated names of
    GEMM_LIBRARIES; fewer is quicker, the tests' choice), else all of them; a ValueError naming an unknown one."""
    text = os.environ.get("NNCOMPARE_PEAK_LIBRARIES", "").strip()
    names = [n.strip() for n in text.split(",") if n.strip()] if text else list(GEMM_LIBRARIES)
    unknown = [n for n in names if n not in GEMM_LIBRARIES]
    if unknown or not names:
        raise ValueError(f"NNCOMPARE_PEAK_LIBRARIES must name some of {', '.join(GEMM_LIBRARIES)}, got {text[:80]!r}")
    return names


def _usable_cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:
        return set(range(os.cpu_count() or 1))


def best_candidate(candidates: dict[str, float | str]) -> tuple[str | None, float | None]:
    """The library with the highest GFLOP/s (a str value is a library that could not be timed), or (None, None)."""
    rates = {k: v for k, v in candidates.items() if isinstance(v, (int, float)) and math.isfinite(v) and v > 0}
    if not rates:
        return None, None
    best = max(rates, key=rates.__getitem__)
    return best, rates[best]


def gemm_peak(device: str, threads: int | None = None, libraries: dict | None = None, n: int | None = None,
              rounds: int = GEMM_ROUNDS, repeats: int = GEMM_REPEATS, pause_s: float = GEMM_PAUSE_S,
              clock: Callable[[], float] = time.perf_counter) -> dict:
    """The best fp32 GEMM rate `device` reaches with the libraries present (peak_libraries() where importable; a
    GPU's with TF32 off), at `threads` on the CPU: {"gflops", "library" (name and version), "device", "n",
    "candidates" {library: GFLOP/s, or why it was not timed}} and on the CPU its theoretical FMA peak. Each library
    multiplies the same n x n matrices: one untimed GEMM, then the best of `repeats`, in `rounds` turns."""
    import importlib.util
    kind, index = parse_device(device)
    gpu = None if kind == "cpu" else index
    threads = threads or len(_usable_cpus())
    n = n or GEMM_N[kind]
    if libraries is None:
        libraries = {k: GEMM_LIBRARIES[k] for k in peak_libraries()
                     if importlib.util.find_spec(k) is not None and (gpu is None or k != "numpy")}
    runs: dict[str, tuple[str, Callable[[], None]]] = {}
    candidates: dict[str, float | str] = {}
    for name, setup in libraries.items():
        try:
            runs[name] = setup(n, gpu, threads)
        except Skipped as e:
            candidates[name] = f"not timed: {e}"
        except Exception as e:  # noqa: BLE001  (a broken install must not cost the run its peak)
            candidates[name] = f"failed: {type(e).__name__}: {str(e).strip()[:100]}"
    best: dict[str, float] = {}
    order, last = list(runs), None
    for r in range(rounds):
        for name in order[:] if r % 2 == 0 else order[::-1]:
            _, run = runs[name]
            if pause_s and last not in (None, name):
                time.sleep(pause_s)
            last = name
            try:
                run()
                for _ in range(repeats):
                    t0 = clock()
                    run()
                    best[name] = min(best.get(name, math.inf), clock() - t0)
            except Exception as e:  # noqa: BLE001
                candidates[name] = f"failed: {type(e).__name__}: {str(e).strip()[:100]}"
                order.remove(name)
    for name in order:
        candidates[runs[name][0]] = 2 * n ** 3 / max(best[name], 1e-12) / 1e9
    library, gflops = best_candidate(candidates)
    peak = {"gflops": gflops, "library": library, "device": "cpu" if gpu is None else f"gpu:{gpu}", "n": n,
            "threads": threads if gpu is None else None, "candidates": candidates}
    if gpu is None:
        peak["theoretical"] = cpu_fma_peak(threads)
    return peak


def cpu_fma_peak(threads: int | None = None, cpuinfo: str | None = None, max_khz: str | None = None) -> dict | None:
    """The CPU's theoretical fp32 peak, cores x FMA units x vector lanes x 2 FLOPs x clock, from what Linux reports
    (/proc/cpuinfo's flags, cores and MHz; cpufreq's maximum clock where there is one); None where it says too
    little (no x86 vector flags or no clock). `assumed` names what the machine does not report."""
    procs = cpu_processors(cpuinfo)
    usable = _usable_cpus() if cpuinfo is None else None
    procs = [p for p in procs if usable is None or p["processor"].isdigit() and int(p["processor"]) in usable] or procs
    if not procs:
        return None
    flags = set(procs[0].get("flags", "").split())
    try:
        mhz = max(float(p["cpu MHz"]) for p in procs if "cpu MHz" in p)
    except ValueError:
        return None
    clock = "/proc/cpuinfo's cpu MHz, no boost clock (a virtual machine reports its nominal one)"
    try:
        khz = max_khz if max_khz is not None else open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read()
        if float(khz) > 0:
            mhz, clock = float(khz) / 1e3, "cpufreq's cpuinfo_max_freq, boost included"
    except (OSError, ValueError):
        pass
    if not mhz or not flags & {"sse", "avx", "avx2", "avx512f"}:
        return None
    lanes = 16 if "avx512f" in flags else 8 if "avx" in flags else 4
    assumed = []
    if lanes == 16 and procs[0].get("vendor_id") == "AuthenticAMD" and procs[0].get("cpu family") == "25":
        lanes = 8
        assumed.append("AMD family 25 (Zen 4) runs 512-bit FMAs on 256-bit units: 8 lanes")
    fma = bool(flags & {"fma", "avx512f"})
    units = 2 if fma else 1
    assumed.append("2 FMA units per core" if fma else "no FMA: one multiply and one add per cycle")
    cores = physical_cores(procs) or len(procs)
    used = min(threads or cores, cores)
    return {"gflops": used * units * lanes * 2 * mhz / 1e3, "cores": used, "fma_units": units, "lanes": lanes,
            "ghz": mhz / 1e3, "clock": clock, "assumed": "; ".join(assumed)}


def train_run(backend: str, spec: ModelSpec, dataset: str, device: str, epochs: int, batch_size: int,
              optimizer: Optimizer, threads: int, target: float | None, data_dir: str | None = None,
              seed: int = 0, weights: dict | None = None) -> dict:
    """Train from `weights` (default: the spec's seeded init) over the shared batch order; per-epoch losses,
    accuracy and times."""
    from ..models.data import load
    from . import get_adapter

    data = load(dataset, spec, data_dir)
    cls = get_adapter(backend)
    cls.set_threads(threads)
    net = cls.build(spec, device=device, seed=seed, optimizer=optimizer, weights=weights)
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
