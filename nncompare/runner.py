"""Cells: one fresh interpreter per (model, backend, device, batch) task, devices, and whole-or-nothing files."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .backends import BackendError, parse_device
from .models import ModelSpec, SpecError
from .models.data import DataError

PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # where `import nncompare` finds this package
RESULT_MARK = "NNCOMPARE_RESULT "


class UsageError(Exception):
    """Bad input found before any long work starts: printed as one line, exit code 2."""


# --- devices ---------------------------------------------------------------------------------------
def gpu_names() -> list[str]:
    """GPU names from nvidia-smi, without loading any framework."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [l.strip() for l in out.stdout.splitlines() if l.strip()] if out.returncode == 0 else []


def available_devices() -> list[str]:
    return ["cpu"] + [f"gpu:{i}" for i in range(len(gpu_names()))]


def canonical_device(device: str) -> str:
    """'cuda' -> 'gpu:0'; raises UsageError for a device this machine does not have."""
    try:
        kind, index = parse_device(device)
    except BackendError as e:
        raise UsageError(str(e)) from None
    name = "cpu" if kind == "cpu" else f"gpu:{index}"
    have = available_devices()
    if name not in have:
        raise UsageError(f"device {device!r} is not available on this machine (devices: {', '.join(have)})")
    return name


# --- files -----------------------------------------------------------------------------------------
def check_writable(path: str | None) -> None:
    if path is None:
        return
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise UsageError(f"output path {path!r} is a directory")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {path!r}: folder {str(parent)!r} does not exist or is not writable")


def write_atomic(path: str, text: str) -> None:
    """Write a whole file or nothing: a temporary file in the same folder, then an atomic rename."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".", prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rows_to_csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (list, dict))))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# --- cells -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """What one cell process does: time training ("measure"), train on data ("train"), or measure the
    device's GEMM peak ("peak"). Travels to the cell as JSON."""

    kind: str
    device: str = "cpu"
    threads: int = 1
    backend: str = ""
    model_name: str = ""
    spec: dict = field(default_factory=dict)
    batch_size: int = 32
    optimizer: dict = field(default_factory=dict)  # {"type": "sgd"|"adam", "args": {...}}
    # measure
    steps: int = 10
    repeats: int = 3
    warmup: int = 2
    compile: bool = False
    # train
    dataset: str = ""
    epochs: int = 1
    target: float | None = None
    data_dir: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Task":
        return cls(**json.loads(text))


def cell_env(threads: int) -> dict[str, str]:
    from .backends.bench import thread_env
    env = dict(os.environ, **thread_env(threads))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
    return env


def run_subprocess(task: Task, timeout: float) -> dict:
    """Run one task in a fresh interpreter; a crash, hang or bad exit becomes {"error": reason}."""
    cmd = [sys.executable, "-m", "nncompare.cli", "_cell", task.to_json()]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cell_env(task.threads),
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    if out.returncode < 0:
        reason = f"killed by signal {-out.returncode}" + (" (out of memory?)" if out.returncode == -9 else "")
    else:
        reason = f"exit code {out.returncode}"
    return {"error": f"{reason}: {lines[-1].strip()}" if lines else reason}


def _optimizer(task_opt: dict):
    from .backends import Adam, SGD
    return (SGD if task_opt["type"] == "sgd" else Adam)(**task_opt["args"])


def cell_main(task_json: str) -> int:
    """Entry point of a cell process: run the task, print one result line."""
    task = Task.from_json(task_json)
    fault = os.environ.get("NNCOMPARE_FAULT", "")  # test hook: "<backend>:<model>:crash|hang"
    if task.kind == "measure" and fault.startswith(f"{task.backend}:{task.model_name}:"):
        if fault.endswith(":hang"):
            time.sleep(3600)
        os.abort()
    try:
        if task.kind == "peak":
            from .backends.bench import gemm_peak
            result = {"gemm_gflops": gemm_peak(task.device)}
        elif task.kind == "train":
            from .backends.bench import train_run
            result = train_run(task.backend, ModelSpec.from_dict(task.spec), task.dataset, task.device,
                               task.epochs, task.batch_size, _optimizer(task.optimizer), task.threads,
                               task.target, task.data_dir)
        else:
            from .backends.bench import measure
            result = measure(task.backend, ModelSpec.from_dict(task.spec), task.device, task.batch_size,
                             task.steps, task.repeats, task.warmup, _optimizer(task.optimizer), task.threads,
                             compile=task.compile)
    except (BackendError, SpecError, DataError, MemoryError, RuntimeError, ValueError) as e:
        result = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0
