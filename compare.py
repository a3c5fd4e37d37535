#!/usr/bin/env python3
"""nncompare command line: list, summary (and, as they land, run, check, train)."""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys

from tabulate import tabulate

from backends import BackendError, available_backends
from models import SpecError, resolve, zoo


class UsageError(Exception):
    """Bad input found before any long work starts: printed as one line, exit code 2."""


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def cmd_list(args) -> int:
    rows = [(n, s.input_shape, f"{s.params:,}", f"{s.flops:,}", s.layers.__len__())
            for n, s in ((n, zoo.get(n)) for n in zoo.names())]
    print(tabulate(rows, headers=("Model", "Input", "Params", "FLOPs/sample", "Layers"),
                   colalign=("left", "left", "right", "right", "right")))
    print()
    print(tabulate([(n, "installed" if i["installed"] else "not installed", i["version"] or "-")
                    for n, i in available_backends().items()], headers=("Backend", "Status", "Version")))
    print()
    devices = [("cpu", f"{cpu_name()} ({os.cpu_count()} logical cores)")]
    devices += [(f"gpu:{i}", n) for i, n in enumerate(gpu_names())]
    print(tabulate(devices, headers=("Device", "Name")))
    return 0


def cmd_summary(args) -> int:
    print(resolve(args.model).summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare.py", description="Compare deep-learning frameworks on one spec.")
    sub = p.add_subparsers(dest="command")
    sp = sub.add_parser("list", help="zoo models, installed backends, devices")
    sp.set_defaults(func=cmd_list)
    sp = sub.add_parser("summary", help="layer table of a zoo model or spec JSON file")
    sp.add_argument("model", help="zoo model name or path to a spec .json file")
    sp.set_defaults(func=cmd_summary)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (SpecError, BackendError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
