"""Cells: (model, backend, device, batch) tasks run in fresh interpreters (one per framework for its CPU timing
cells), devices, and whole-or-nothing files."""
from __future__ import annotations

import collections
import csv
import dataclasses
import fcntl
import gc
import hashlib
import importlib.util
import io
import json
import math
import os
import queue
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

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


def canonical_device(device: str, have: list[str] | None = None) -> str:
    """'cuda' -> 'gpu:0'; raises UsageError for a device this machine (or `have`) lacks."""
    try:
        kind, index = parse_device(device)
    except BackendError as e:
        raise UsageError(str(e)) from None
    name = "cpu" if kind == "cpu" else f"gpu:{index}"
    have = have or available_devices()
    if name not in have:
        raise UsageError(f"device {device!r} is not available on this machine (devices: {', '.join(have)})")
    return name


# --- files -----------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def short(text: str, limit: int = 80) -> str:
    """`text` as repr, cut to about `limit` characters: an error line must stay one readable line."""
    r = repr(text)
    return r if len(r) <= limit else r[:limit - 4] + "...'"


def check_target(path: str, what: str = "output") -> None:
    """Refuse, before any work, a path a results file must not replace: a link, a folder, a device node..."""
    if not path.strip():
        raise UsageError(f"{what} path is empty")
    if "\0" in path:
        raise UsageError(f"{what} path {short(path)} holds a NUL byte")
    if os.path.islink(path):
        raise UsageError(f"will not write over {short(path)}: it is a symbolic link")
    if os.path.isdir(path) or path.endswith(os.sep):
        raise UsageError(f"{what} path {short(path)} is a directory")
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        raise UsageError(f"will not write over {short(path)}: it is not a regular file")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"will not write over {short(path)}: it is read-only")
    if os.path.exists(path) and _locked(path):
        raise UsageError(f"another run is writing these results: a running compare.py holds {short(path)}; wait "
                         "for it to finish, or write to another file")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {short(path)}: folder {short(parent)} does not exist or is not writable")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    name = len(os.fsencode(os.path.basename(path)))
    if name > name_max:
        raise UsageError(f"cannot write {short(path)} ({what}): its file name is {name} bytes, longer than the "
                         f"{name_max} this file system allows")
    try:  # the folder really takes a new file (access() says yes for root on /proc, a read-only mount...)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)[:64]}.")
    except OSError as e:
        raise UsageError(f"cannot write {short(path)}: {e.strerror or e} in folder {short(parent)}") from None
    os.close(fd)
    os.unlink(tmp)


def _locked(path: str) -> bool:
    """Whether another process holds a lock on the regular file `path` (a running sweep's journal)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def open_input(path: str, what: str) -> int:
    """A descriptor of the regular file `path`, opened without blocking: a FIFO, a device or a folder given as an
    input is refused at once (reading a FIFO would wait forever, /dev/zero never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UsageError(f"cannot read {what} {short(path)}: {e.strerror or e}") from None
    except ValueError:  # a NUL byte in the path
        raise UsageError(f"cannot read {what} {short(path)}: the path holds a NUL byte") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{what} {short(path)} is not a regular file")
    return fd


def check_input(path: str, what: str) -> None:
    """Refuse a non-regular input file (a FIFO, a device) before anything opens it the blocking way."""
    os.close(open_input(path, what))


MAX_RESULTS_BYTES = 256 * 2 ** 20  # a results file of thousands of rows is a few MiB
MAX_INT_DIGITS = 20  # every integer a row holds fits in 64 bits


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def _unique_keys(pairs: list[tuple]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):  # which value counts would be a guess: a row written twice over, or forged
        twice = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {twice[:40]!r} in one object")
    return dict(pairs)


def parse_json(text: str):
    """Strict-enough JSON for files from elsewhere: a ValueError (never a RecursionError or an integer too large
    for a float) for what no results file holds, duplicate keys included."""
    try:
        return json.loads(text, parse_int=_bounded_int, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_results(path: str, what: str = "results file") -> object:
    """A results file's JSON (UTF-8, a BOM accepted), size-bounded; every problem is one UsageError."""
    with os.fdopen(open_input(path, what), "rb") as f:
        try:
            raw = f.read(MAX_RESULTS_BYTES + 1)
        except OSError as e:
            raise UsageError(f"cannot read {what} {short(path)}: {e.strerror or e}") from None
    if len(raw) > MAX_RESULTS_BYTES:
        raise UsageError(f"{short(path)} is larger than {MAX_RESULTS_BYTES // 2 ** 20} MiB: not a {what}")
    try:
        return parse_json(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UsageError(f"{short(path)} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    except ValueError as e:
        raise UsageError(f"{short(path)} is not JSON: {str(e).splitlines()[0][:120]}") from None


def check_outputs(outputs: dict[str, str | None], inputs: list[str] = ()) -> None:
    """Every output writable, none a link or special file, no two the same file, none an input file."""
    seen: dict[str, str] = {}
    for path in inputs:
        if os.path.exists(path):
            seen[os.path.realpath(path)] = f"the input {path!r}"
    for option, path in outputs.items():
        if path is None:
            continue
        check_target(path, option)
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError(f"will not write over {path!r} ({option}): it is also {seen[real]}")
        seen[real] = f"the {option} output"


def check_plot(path: str | None) -> None:
    """matplotlib is installed and can write this file type: checked before any work."""
    if path is None:
        return
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(f"--plot {path!r} needs matplotlib: pip install 'nncompare[plot]'") from None
    formats = Figure().canvas.get_supported_filetypes()
    ext = os.path.splitext(path)[1][1:].lower()
    if ext not in formats:
        raise UsageError(f"--plot {path!r}: unsupported file type {('.' + ext) if ext else '(no extension)'} "
                         f"(use one of {', '.join(sorted(formats))})")


def write_atomic(path: str, data: str | bytes) -> None:
    """Write a whole file or nothing: a temporary file in the same folder, then an atomic rename. Never replaces
    a link or a special file; a new file gets the umask's mode, a replaced one keeps its own."""
    target = Path(path)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    else:
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"will not write over {path!r}: it is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
    # the temporary's name is cut short: a results name near the file system's limit must still get one
    fd, tmp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".", prefix=f".{target.name[:64]}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite(obj):
    """NaN and infinities as None, recursively: strict JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def strict_json(obj, indent: int | None = 2) -> str:
    return json.dumps(finite(obj), indent=indent, allow_nan=False)


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

    @property
    def key(self) -> str:
        """Identity of the cell's configuration (every setting that defines it): what --resume matches on."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:20]

    @property
    def exclusive(self) -> bool:
        """Timing cells own their node's cores: parallel timing on shared cores corrupts the numbers."""
        return self.kind in ("measure", "peak")


def cell_env(threads: int, backend: str = "", extra: dict[str, str] | None = None) -> dict[str, str]:
    """The cell's environment: the thread and allocator variables chosen for its framework (inherited ones dropped), then
    `extra` (forwarded settings, test hooks)."""
    from .backends.bench import TOOL_VARIABLES, tool_env
    env = {k: v for k, v in os.environ.items() if k not in TOOL_VARIABLES}
    env.update(tool_env(threads, backend or None), **(extra or {}))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
    return env


def forwarded_env() -> dict[str, str]:
    """The driver's NNCOMPARE_* settings (data folder, test hooks), which a Ray worker elsewhere lacks."""
    return {k: v for k, v in os.environ.items() if k.startswith("NNCOMPARE_")}


def node_info() -> dict:
    from .backends.base import cpu_name
    return {"host": socket.gethostname(), "cpu_name": cpu_name()}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def cell_command(tasks: list[Task]) -> list[str]:
    """The command line of a cell process running `tasks` in turn (also what the benchmarks start)."""
    return [sys.executable, "-m", "nncompare.cli", "_cell", json.dumps([dataclasses.asdict(t) for t in tasks])]


def process_groups(tasks: list[Task]) -> list[list[int]]:
    """Indices of the tasks that share one cell process, in run order. A framework's CPU timing cells at one
    thread count share one (its import and one-time set-up, seconds each, are paid once: docs/design.md "Timing");
    every other task runs alone. A GPU cell runs alone because not every framework can reset its peak device
    memory."""
    shared: dict[tuple, list[int]] = {}
    groups: list[list[int]] = []
    for i, t in enumerate(tasks):
        if t.kind == "measure" and t.device == "cpu":
            key = (t.backend, t.threads, t.compile)
            if key in shared:
                shared[key].append(i)
                continue
            shared[key] = [i]
            groups.append(shared[key])
        else:
            groups.append([i])
    return groups


def _reader(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def _one_process(tasks: list[Task], timeout: float, verbose: bool, env: dict[str, str] | None,
                 report: Callable[[int, dict], None]) -> int:
    """Start one cell process for `tasks` and report each result as its line arrives. Returns how many tasks
    it settled: all of them, or up to and including the one that crashed, hung or exited early."""
    proc = subprocess.Popen(cell_command(tasks), stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE,
                            text=True, errors="replace", env=cell_env(tasks[0].threads, tasks[0].backend, env),
                            stdin=subprocess.DEVNULL, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    stderr_tail: collections.deque = collections.deque(maxlen=50)
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    drain = threading.Thread(target=lambda: stderr_tail.extend(proc.stderr), daemon=True)
    if not verbose:
        drain.start()
    n, started = 0, time.time()

    def info() -> dict:
        return {**node_info(), "cell_start": started, "cell_end": time.time()}
    try:
        while n < len(tasks):
            try:
                line = lines.get(timeout=max(0.0, started + timeout - time.time()))
            except queue.Empty:
                _kill_group(proc)
                report(n, {"error": f"timed out after {timeout:g} s", **info()})
                return n + 1
            if line is None:  # the process closed its output before its last result: it died
                proc.wait()
                if drain.is_alive():
                    drain.join(timeout=5)
                tail = [l for l in stderr_tail if l.strip()]
                if proc.returncode < 0:
                    reason = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
                else:
                    reason = f"exit code {proc.returncode}"
                report(n, {"error": f"{reason}: {tail[-1].strip()}" if tail else reason, **info()})
                return n + 1
            if line.startswith(RESULT_MARK):
                report(n, {**info(), **json.loads(line[len(RESULT_MARK):])})
                n += 1
                started = time.time()
        proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    return n


def run_cells(tasks: list[Task], timeout: float, done: Callable[[int, dict], None], verbose: bool = False,
              env: dict[str, str] | None = None) -> None:
    """Run `tasks` in turn in one fresh interpreter, calling done(index, result) as each finishes. A crash,
    hang (`timeout` seconds for one cell) or bad exit becomes that cell's {"error": reason}, and the cells after
    it go on in a new interpreter. The process runs in its own process group (a terminal's Ctrl-C reaches only
    us) and is killed, with anything it started, whenever we leave early: timeout, Ctrl-C, SIGTERM."""
    first = 0
    while first < len(tasks):
        first += _one_process(tasks[first:], timeout, verbose, env, lambda j, r: done(first + j, r))


def run_subprocess(task: Task, timeout: float, verbose: bool = False, env: dict[str, str] | None = None) -> dict:
    """One task in a fresh interpreter; a crash, hang or bad exit becomes {"error": reason}."""
    out: dict[int, dict] = {}
    run_cells([task], timeout, out.__setitem__, verbose, env)
    return out[0]


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
    from .backends import get_adapter
    from .backends.check import TOLERANCE, compare
    if task.backend != "numpy" and importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401  (Keras documents a segfault when TensorFlow loads before torch)
    report = compare(get_adapter(task.backend), get_adapter("numpy"), ModelSpec.from_dict(task.spec),
                     device=task.device, steps=task.steps, compile=task.compile)
    return {"diffs": report.diffs, "where": report.where, "jitter": report.jitter, "ok": report.ok(),
            "tolerance": TOLERANCE}


def _run_task(task: Task) -> dict:
    log = os.environ.get("NNCOMPARE_CELL_LOG")  # test hook: one line per cell started
    if log:
        with open(log, "a") as f:
            f.write(f"{task.kind} {task.model_name} {task.backend} {task.batch_size} {task.threads} {os.getpid()}\n")
    fault = os.environ.get("NNCOMPARE_FAULT", "")  # test hook: "<backend>:<model>:crash|hang"
    if task.kind in ("measure", "train", "check") and fault.startswith(f"{task.backend}:{task.model_name}:"):
        if fault.endswith(":hang"):
            time.sleep(3600)
        os.abort()
    try:
        if task.kind == "peak":
            from .backends.bench import gemm_peak
            return {"gemm_gflops": gemm_peak(task.device)}
        if task.kind == "train":
            from .backends.bench import train_run
            return train_run(task.backend, ModelSpec.from_dict(task.spec), task.dataset, task.device,
                             task.epochs, task.batch_size, _optimizer(task.optimizer), task.threads,
                             task.target, task.data_dir)
        if task.kind == "check":
            return _check(task)
        from .backends.bench import measure
        return measure(task.backend, ModelSpec.from_dict(task.spec), task.device, task.batch_size,
                       task.steps, task.repeats, task.warmup, _optimizer(task.optimizer), task.threads,
                       compile=task.compile)
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


def cell_main(tasks_json: str) -> NoReturn:
    """Entry point of a cell process: run its tasks in turn, print one result line each, exit at once. A later
    cell of the process records `cell_in_process` > 0: its framework was already imported and set up."""
    _die_with_parent()
    tasks = [Task(**d) for d in json.loads(tasks_json)]
    for k, task in enumerate(tasks):
        if k:
            gc.collect()  # the previous cell's network, optimizer and batches
        own_peak = k == 0 or _reset_peak_rss()
        result = _run_task(task)
        if "error" not in result and task.kind == "measure":
            result["cell_in_process"] = k
            if not own_peak:
                result["host_rss_mb"] = None  # a high-water mark that includes an earlier cell's
        print(RESULT_MARK + json.dumps(result), flush=True)
    sys.stderr.flush()
    # The results are out: skip the interpreter's teardown, which the sweep would wait for (unloading TensorFlow,
    # torch or JAX takes 0.3-1.4 s per cell on 2 cores).
    os._exit(0)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


# --- journal ---------------------------------------------------------------------------------------
class Journal:
    """Finished cells, one JSON line each, flushed and fsynced as they finish: what a crash, a lost node or a
    Ctrl-C leaves behind, and what --resume starts from. Held under an exclusive lock from open() until the
    process ends, so two runs never write one journal."""

    MAX_LINE = 16 * 2 ** 20  # a row is a few KiB: a longer line is not one

    def __init__(self, path: str):
        self.path = path
        self.fresh = True  # the first append truncates what an earlier run left (unless resuming)
        self._fd: int | None = None
        self._started = False

    def open(self) -> None:
        """Create or open the journal and lock it; a UsageError when another run holds it or it cannot be made."""
        flags = (os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0))
        for _ in range(20):
            try:
                fd = os.open(self.path, flags, 0o666)
            except OSError as e:
                raise UsageError(f"cannot create the journal {short(self.path)}: {e.strerror or e}") from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise UsageError(f"will not write over {short(self.path)}: it is not a regular file")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UsageError(f"another run is writing these results (it holds the journal "
                                     f"{short(self.path)}): wait for it to finish, or write to another file") from None
                try:  # the run that held the lock may have finished and deleted the file meanwhile
                    now = os.stat(self.path)
                    same = (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                self._fd = fd
                return
            os.close(fd)
        raise UsageError(f"cannot lock the journal {short(self.path)}: other runs keep replacing it")

    def read(self) -> dict[str, dict]:
        """{cell key: row} of every complete line (a line cut short by a crash, or corrupted, is ignored)."""
        if self._fd is not None:
            f = os.fdopen(os.dup(self._fd), "rb")
            f.seek(0)
        else:
            try:
                f = os.fdopen(open_input(self.path, "journal"), "rb")
            except UsageError:
                if not os.path.lexists(self.path):
                    return {}
                raise
        rows = {}
        with f:
            if os.fstat(f.fileno()).st_size > MAX_RESULTS_BYTES:
                raise UsageError(f"the journal {short(self.path)} is larger than {MAX_RESULTS_BYTES // 2 ** 20} MiB: "
                                 "not one this tool wrote")
            while line := f.readline(self.MAX_LINE):
                if not line.endswith(b"\n"):
                    while (more := f.readline(self.MAX_LINE)) and not more.endswith(b"\n"):
                        pass  # the rest of an overlong line
                    continue  # overlong, or the last line cut short by a crash
                try:
                    entry = parse_json(line.decode("utf-8"))
                except ValueError:  # corrupted, or bytes that are not UTF-8
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("cell"), str) and isinstance(entry.get("row"), dict):
                    rows[entry["cell"]] = entry["row"]
        return rows

    def _start(self) -> None:
        """Before the first line: start afresh, or (resuming) drop a last line a crash cut short, which the next
        line would otherwise be glued onto and lost with."""
        if self.fresh:
            os.ftruncate(self._fd, 0)
            return
        size = end = os.fstat(self._fd).st_size
        if not size or os.pread(self._fd, 1, size - 1) == b"\n":
            return
        keep = 0
        while end > 0:
            start = max(0, end - (1 << 16))
            i = os.pread(self._fd, end - start, start).rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            end = start
        os.ftruncate(self._fd, keep)

    def append(self, key: str, row: dict) -> None:
        if self._fd is None:
            self.open()
        if not self._started:
            self._start()
            self._started = True
        data = memoryview((strict_json({"cell": key, "row": row}, indent=None) + "\n").encode("utf-8"))
        while data:
            data = data[os.write(self._fd, data):]
        os.fsync(self._fd)

    def close(self) -> None:
        """Release the lock; a journal nothing was ever written to is removed (it holds no finished cell)."""
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_size == 0:
                Path(self.path).unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        Path(self.path).unlink(missing_ok=True)  # still under the lock
        self.close()


# --- executors -------------------------------------------------------------------------------------
class Interrupted(Exception):
    """SIGTERM (or SIGINT) reached the driver: stop, keep every finished cell, exit 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.code = 128 + signum


@contextmanager
def interruptible():
    """SIGTERM raises Interrupted like Ctrl-C raises KeyboardInterrupt, so cleanup runs either way."""
    def handler(signum, frame):
        raise Interrupted(signum)
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def uninterruptible():
    """Hold SIGINT/SIGTERM while the results are written: a second Ctrl-C must not cut the write short."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class LocalExecutor:
    """Cells on this machine, one at a time, in fresh processes (a framework's CPU timing cells share one)."""

    name = "local"

    def __init__(self, timeout: float, verbose: bool = False):
        self.timeout, self.verbose = timeout, verbose

    def devices(self) -> list[str]:
        return available_devices()

    def peaks(self, devices: list[str], threads: int) -> dict[tuple[str, str], float | None]:
        """{(host, device): GEMM GFLOP/s} of every device a timing cell will use."""
        out = {}
        for d in devices:
            r = run_subprocess(Task("peak", device=d, threads=threads), self.timeout, self.verbose)
            out[(r["host"], d)] = r.get("gemm_gflops")
        return out

    def run(self, tasks: list[Task], done: Callable[[int, dict], None]) -> None:
        for group in process_groups(tasks):
            run_cells([tasks[i] for i in group], self.timeout, lambda j, r: done(group[j], r), self.verbose)

    def close(self) -> None:
        pass


def make_executor(name: str, timeout: float, verbose: bool = False, address: str | None = None,
                  concurrency: int = 1):
    if address is not None and not address.strip():
        raise UsageError("--address is empty (omit it to start a local Ray instance)")
    if name == "local":
        if address is not None:
            raise UsageError("--address needs --executor ray")
        return LocalExecutor(timeout, verbose)
    from .ray_executor import RayExecutor
    return RayExecutor(timeout, verbose, address, concurrency)


def reusable(row, task: Task, host: str | None = None) -> bool:
    """Whether a finished row stands for `task`: a whole row of this very cell, without an error (a crash, a lost
    node), measured on `host` when given. Anything else (a corrupted line, a row copied from another machine)
    runs again."""
    return (isinstance(row, dict) and "error" not in row
            and all(row.get(k) == v for k, v in (("model", task.model_name), ("backend", task.backend),
                                                  ("device", task.device), ("batch_size", task.batch_size),
                                                  ("threads", task.threads)))
            and (host is None or row.get("host") == host))


def sweep(tasks: list[Task], make_row: Callable[[Task, dict], dict], executor, journal: Journal | None = None,
          finished: dict[str, dict] | None = None, label: Callable[[Task], str] = str,
          quiet: bool = False) -> tuple[list[dict], int | None]:
    """Run every task whose configuration has no finished row yet; each row is journaled as it finishes.
    Returns the rows in task order and, when a signal stopped the sweep, its exit code (130 Ctrl-C, 143 SIGTERM)."""
    from tqdm import tqdm
    rows: dict[int, dict] = {}
    host = socket.gethostname() if executor.name == "local" else None
    for i, t in enumerate(tasks):
        old = (finished or {}).get(t.key)
        if reusable(old, t, host):
            rows[i] = old
    todo = [i for i in range(len(tasks)) if i not in rows]
    code = None
    lost: list[OSError] = []
    with tqdm(total=len(todo), disable=quiet, unit="cell", file=sys.stderr) as bar:
        def done(j: int, result: dict) -> None:
            i = todo[j]
            row = {**make_row(tasks[i], result), "cell": tasks[i].key}
            if journal and not lost:
                try:
                    journal.append(tasks[i].key, row)
                except OSError as e:  # a full disk: the sweep goes on, its rows kept for the results files
                    lost.append(e)
                    bar.write(f"warning: cannot append to the journal {short(journal.path)} ({e.strerror or e}): "
                              "the cells finishing from now on are kept only until the results are written",
                              file=sys.stderr)
            rows[i] = row
            bar.set_description(label(tasks[i]))
            bar.update()
        try:
            with interruptible():
                executor.run([tasks[i] for i in todo], done)
        except KeyboardInterrupt:
            code = 130
        except Interrupted as e:
            code = e.code
        finally:
            with uninterruptible():
                executor.close()
    return [rows[i] for i in sorted(rows)], code
