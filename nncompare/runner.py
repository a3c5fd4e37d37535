"""Cells in fresh processes: which tasks share one, starting it, reading each result line as it comes, and turning a
crash, hang or bad exit into that cell's error."""
from __future__ import annotations

import collections
import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable

from .cell import MODULE, RESULT_MARK, Task, cell_command, cell_env

# Names the module a cell process runs in place of nncompare.cell: the tests start one that injects faults.
CELL_MODULE_VARIABLE = "NNCOMPARE_CELL_MODULE"


def node_info() -> dict:
    from .backends.base import cpu_name
    return {"host": socket.gethostname(), "cpu_name": cpu_name()}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


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
    env = cell_env(tasks[0].threads, tasks[0].backend, env)
    proc = subprocess.Popen(cell_command(tasks, env.get(CELL_MODULE_VARIABLE) or MODULE), stdout=subprocess.PIPE,
                            stderr=None if verbose else subprocess.PIPE, text=True, errors="replace", env=env,
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
