"""This machine's devices, found without loading any framework."""
from __future__ import annotations

import shutil
import subprocess

from .backends import BackendError, parse_device
from .errors import UsageError


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
