"""The cell process of the test suite: nncompare.cell with two hooks the production cell does not have.

NNCOMPARE_CELL_LOG=<file>: one line per cell started, "<kind> <model> <backend> <batch> <threads> <pid>".
NNCOMPARE_FAULT=<backend>:<model>:crash|hang: that cell aborts, or hangs for an hour.
The runner starts this module instead of nncompare.cell when NNCOMPARE_CELL_MODULE names it (tests/conftest.py).
"""
import os
import sys
import time

from nncompare import cell

HOOKS = ("NNCOMPARE_CELL_LOG", "NNCOMPARE_FAULT")
_run_task = cell.run_task


def run_task(task: cell.Task) -> dict:
    log = os.environ.get("NNCOMPARE_CELL_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{task.kind} {task.model_name} {task.backend} {task.batch_size} {task.threads} {os.getpid()}\n")
    fault = os.environ.get("NNCOMPARE_FAULT", "")
    if task.kind in ("measure", "train", "check") and fault.startswith(f"{task.backend}:{task.model_name}:"):
        if fault.endswith(":hang"):
            time.sleep(3600)
        os.abort()
    return _run_task(task)


if __name__ == "__main__":
    cell.run_task = run_task
    cell.main(sys.argv[1])
