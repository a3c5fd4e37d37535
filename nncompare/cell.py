"""One cell: the Task it runs, its process's environment and command line, and its entry point
(`python -m nncompare.cell TASKS_JSON`), which prints one result line per task."""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib.util
import json
import os
import signal
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np

from .backends import BackendError
from .models import ModelSpec, SpecError
from .models.data import DataError

PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # where `import nncompare` finds this package
MODULE = "nncompare.cell"  # what a cell process runs
RESULT_MARK = "NNCOMPARE_RESULT "


@dataclass(frozen=True)
class Task:
    """What one cell process does: time training ("measure"), train on data ("train"), compare a backend with
    the oracle ("check"), or measure the device's GEMM peak ("peak"). Travels to the cell as JSON."""

    kind: str
    device: str = "cpu"
    threads: int = 1
    backend: str = ""
    model_name: str = ""
    spec: dict = field(default_factory=dict)
    batch_size: int = 32
    optimizer: dict = field(default_factory=dict)  # {"type": "sgd"|"adam", "args": {...}}
    # measure (steps also: optimizer steps of a check)
    steps: int = 10
    repeats: int = 3
    warmup: int = 2
    compile: bool = False
    sections: tuple[str, ...] = ("train", "infer", "latency")  # what a measure task times (bench.SECTIONS)
    # train
    dataset: str = ""
    epochs: int = 1
    target: float | None = None
    data_dir: str | None = None
    # an imported model: the .npz of its canonical weights, loaded after the build, and their weights_digest
    weights: str | None = None
    weights_sha256: str | None = None

    def __post_init__(self):
        from .backends.bench import check_sections
        object.__setattr__(self, "sections", check_sections(self.sections))  # JSON brings a list

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Task":
        return cls(**json.loads(text))

    @property
    def key(self) -> str:
        """Identity of the cell's configuration (every setting that defines it): what --resume matches on. Imported
        weights count by their content's hash, not by the path of the temporary file that carries them."""
        fields = dataclasses.asdict(self)
        del fields["weights"]
        if fields["weights_sha256"] is None:
            del fields["weights_sha256"]  # a spec's seeded init: the key is what it was before weights travelled
        if self.sections == Task.sections:
            del fields["sections"]  # every section: the key is what it was before cells could time fewer
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]

    @property
    def exclusive(self) -> bool:
        """Timing cells own their node's cores: parallel timing on shared cores corrupts the numbers."""
        return self.kind in ("measure", "peak")


# --- the process: environment and command line -----------------------------------------------------
def weights_digest(weights: dict) -> str:
    """sha256 of canonical weights (names, dtypes, shapes and values, in name order)."""
    digest = hashlib.sha256()
    for k in sorted(weights):
        a = np.ascontiguousarray(weights[k])
        digest.update(json.dumps([k, a.dtype.str, a.shape]).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def write_weights(path: str, weights: dict) -> str:
    """Write canonical weights as the .npz a task names; returns their weights_digest."""
    with open(path, "wb") as f:
        np.savez(f, **weights)
    return weights_digest(weights)


def load_weights(task: Task) -> dict | None:
    """The imported weights a task names, checked against its hash; None: the spec's seeded init."""
    if task.weights is None:
        return None
    try:
        with np.load(task.weights, allow_pickle=False) as f:
            weights = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read the weights file {task.weights}: {_first_line(e)}") from None
    if weights_digest(weights) != task.weights_sha256:
        raise ValueError(f"the weights file {task.weights} does not hold the weights this cell was given")
    return weights


def cell_env(threads: int, backend: str = "", extra: dict[str, str] | None = None) -> dict[str, str]:
    """The cell's environment: the thread and allocator variables chosen for its framework (inherited ones dropped),
    then `extra` (forwarded settings)."""
    from .backends.bench import TOOL_VARIABLES, tool_env
    env = {k: v for k, v in os.environ.items() if k not in TOOL_VARIABLES}
    env.update(tool_env(threads, backend or None), **(extra or {}))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
    return env


def forwarded_env() -> dict[str, str]:
    """The driver's NNCOMPARE_* settings (data folder, time budget), which a Ray worker elsewhere lacks."""
    return {k: v for k, v in os.environ.items() if k.startswith("NNCOMPARE_")}


def cell_command(tasks: list[Task], module: str = MODULE) -> list[str]:
    """The command line of a cell process running `tasks` in turn (also what the benchmarks start)."""
    return [sys.executable, "-m", module, json.dumps([dataclasses.asdict(t) for t in tasks])]


# --- the entry point -------------------------------------------------------------------------------
def _optimizer(task_opt: dict):
    from .backends import Adam, SGD
    return (SGD if task_opt["type"] == "sgd" else Adam)(**task_opt["args"])


def _die_with_parent() -> None:
    """Linux: the kernel kills this cell when the process that started it dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _check(task: Task) -> dict:
    from .backends import BACKENDS, get_adapter
    from .backends.check import TOLERANCE, compare
    if task.backend != "numpy" and importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401  (Keras documents a segfault when TensorFlow loads before torch)
    checks = None if BACKENDS[task.backend].trains else ("logits",)  # an inference engine: its outputs only
    report = compare(get_adapter(task.backend), get_adapter("numpy"), ModelSpec.from_dict(task.spec), checks,
                     device=task.device, steps=task.steps, compile=task.compile, weights=load_weights(task))
    return {"diffs": report.diffs, "where": report.where, "jitter": report.jitter, "ok": report.ok(),
            "tolerance": TOLERANCE}


def run_task(task: Task) -> dict:
    """The task's result; bad input and the errors a framework raises become {"error": ...}."""
    try:
        if task.kind == "peak":
            from .backends.bench import gemm_peak
            peak = gemm_peak(task.device, task.threads)
            return {"gemm_gflops": peak["gflops"], "peak": peak}
        if task.kind == "train":
            from .backends.bench import train_run
            return train_run(task.backend, ModelSpec.from_dict(task.spec), task.dataset, task.device,
                             task.epochs, task.batch_size, _optimizer(task.optimizer), task.threads,
                             task.target, task.data_dir, weights=load_weights(task))
        if task.kind == "check":
            return _check(task)
        from .backends.bench import measure
        return measure(task.backend, ModelSpec.from_dict(task.spec), task.device, task.batch_size,
                       task.steps, task.repeats, task.warmup, _optimizer(task.optimizer), task.threads,
                       compile=task.compile, sections=task.sections, weights=load_weights(task))
    except (BackendError, SpecError, DataError) as e:  # bad input found inside the cell: the CLI's exit 2
        return {"error": f"{type(e).__name__}: {_first_line(e)}", "bad_input": str(e)}
    except (MemoryError, RuntimeError, ValueError, TypeError, OSError) as e:
        return {"error": f"{type(e).__name__}: {_first_line(e)}"}


def _reset_peak_rss() -> bool:
    """Linux: restart the process's peak resident memory (VmHWM, ru_maxrss) from its current size."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def main(tasks_json: str) -> NoReturn:
    """Run the tasks in turn, print one result line each, exit at once. A later cell of the process records
    `cell_in_process` > 0: its framework was already imported and set up."""
    _die_with_parent()
    tasks = [Task(**d) for d in json.loads(tasks_json)]
    for k, task in enumerate(tasks):
        if k:
            gc.collect()  # the previous cell's network, optimizer and batches
        own_peak = k == 0 or _reset_peak_rss()
        result = run_task(task)
        if "error" not in result and task.kind == "measure":
            result["cell_in_process"] = k
            if not own_peak:
                result["host_rss_mb"] = None  # a high-water mark that includes an earlier cell's
        print(RESULT_MARK + json.dumps(result), flush=True)
    sys.stderr.flush()
    # The results are out: skip the interpreter's teardown, which the sweep would wait for (unloading TensorFlow,
    # torch or JAX takes 0.3-1.4 s per cell on 2 cores).
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
