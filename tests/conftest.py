"""Shared fixtures: backend availability (skip with a reason, or fail when CI requires it), the helper that runs
compare.py, and the cell process with test hooks (tests/fault_cell.py)."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Keras documents a segfault when TensorFlow is loaded before torch in one process: load torch first.
if importlib.util.find_spec("torch") is not None:
    import torch  # noqa: F401

from nncompare.backends import BACKENDS, available_backends, frameworks  # noqa: E402

# Cells time exactly their minimum steps and repeats: tests assert behaviour, never speed (see docs/performance.md).
os.environ.setdefault("NNCOMPARE_TIME_BUDGET", "0")
# Every run's peak from NumPy alone: importing torch, JAX and TensorFlow would add seconds to each run.
os.environ.setdefault("NNCOMPARE_PEAK_LIBRARIES", "numpy")
# Every cell a test starts, through compare.py or not, runs tests/fault_cell.py: the cell with its test hooks.
os.environ.setdefault("NNCOMPARE_CELL_MODULE", "tests.fault_cell")

# The frameworks this process hosts: Keras on TensorFlow is the one Keras engine it loads; keras-jax and
# keras-torch run in their own processes (tests/keras_worker.py).
FRAMEWORKS = [b for b in frameworks() if BACKENDS[b].keras_engine in (None, "tensorflow")]
REQUIRED = {b for b in os.environ.get("NNCOMPARE_REQUIRE_BACKENDS", "").split(",") if b}


def require(backend: str) -> None:
    """Skip the calling test when `backend` is not installed, unless CI requires it (then fail)."""
    if available_backends()[backend]["installed"]:
        return
    reason = f"backend {backend!r} is not installed"
    if backend in REQUIRED:
        pytest.fail(f"{reason}, but NNCOMPARE_REQUIRE_BACKENDS requires it")
    pytest.skip(reason)


@pytest.fixture(params=FRAMEWORKS)
def framework(request) -> str:
    require(request.param)
    return request.param


def interruptible() -> None:
    """preexec_fn for a child a test sends SIGINT: a shell's background job (`pytest &`) ignores SIGINT, the
    child would inherit that, and Python installs no KeyboardInterrupt handler for an ignored signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def compare(*args, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python compare.py ARGS` from the checkout, its output captured; `env` added to this process's."""
    return subprocess.run([sys.executable, "compare.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))
