"""Executors run a sweep's cells: the local one here (fresh processes on this machine, one cell at a time), Ray's in
nncompare.ray_executor. The sweep skips finished cells, journals each row as it comes and stops cleanly on a signal."""
from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

from . import devices as this_machine
from .cell import Task
from .errors import Interrupted, UsageError
from .files import Journal, short
from .runner import process_groups, run_cells, run_subprocess
from .signals import interruptible, uninterruptible


class LocalExecutor:
    """Cells on this machine, one at a time, in fresh processes (a framework's CPU timing cells share one)."""

    name = "local"

    def __init__(self, timeout: float, verbose: bool = False):
        self.timeout, self.verbose = timeout, verbose

    def devices(self) -> list[str]:
        return this_machine.available_devices()

    def default_threads(self, devices: list[str] | None = None) -> int:
        """Every core of this machine."""
        return os.cpu_count() or 1

    def peaks(self, devices: list[str], threads: int) -> dict[tuple[str, str], dict | None]:
        """{(host, device): its GEMM peak (backends.bench.gemm_peak)} of every device a timing cell will use."""
        out = {}
        for d in devices:
            r = run_subprocess(Task("peak", device=d, threads=threads), self.timeout, self.verbose)
            out[(r["host"], d)] = r.get("peak")
        return out

    def run(self, tasks: list[Task], done: Callable[[int, dict], None]) -> None:
        for group in process_groups(tasks):
            run_cells([tasks[i] for i in group], self.timeout, lambda j, r: done(group[j], r), self.verbose)

    def close(self) -> None:
        pass


def make_executor(name: str, timeout: float, verbose: bool = False, address: str | None = None,
                  concurrency: int | None = None):
    if address is not None and not address.strip():
        raise UsageError("--address is empty (omit it to start a local Ray instance)")
    if name == "local":
        if address is not None:
            raise UsageError("--address needs --executor ray")
        if concurrency is not None:
            raise UsageError("--concurrency needs --executor ray (the local executor runs one cell at a time)")
        return LocalExecutor(timeout, verbose)
    from .ray_executor import RayExecutor
    return RayExecutor(timeout, verbose, address, concurrency or 1)


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
