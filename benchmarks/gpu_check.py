#!/usr/bin/env python3
"""GPU proof for machines with PyTorch and JAX on CUDA but no TensorFlow or MXNet (see gpu_check.sh).

Runs `compare.py check MODEL --device gpu --backends torch keras-jax keras-torch` for every zoo model (several
models at once: checks are not timings), records each backend's settings on the device (TF32 off, device name),
then a short `compare.py run` on cpu and gpu (alone: timings never overlap). Writes to OUTDIR: env.json,
check_<model>.txt, checks.json, run.json, summary.json and gpu_check.log. Exit 0 when every check is ok,
1 when one differs or fails, 3 when no GPU is visible (unless --cpu-dry-run: the same steps, tiny, on cpu).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BACKENDS = ["torch", "keras-jax", "keras-torch"]
BUDGET_S = 290  # the whole check stays under 5 minutes
NO_GPU = 3

# Several JAX processes share the GPU: without this each would reserve 75% of its memory at start.
ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_CPP_MIN_LOG_LEVEL": "2",
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

PROBE = """
import json, sys
from nncompare.backends import get_adapter
from nncompare.models import zoo
name, device = sys.argv[1], sys.argv[2]
cls = get_adapter(name)
net = cls.build(zoo.get("perceptron"), device=device)
out = {"version": cls.version(), "device_name": net.device_name, "path": net.execution_path,
       "settings": getattr(net, "settings", None)}
if "torch" in sys.modules:
    import torch
    out["torch.allow_tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32,
                               "cudnn": torch.backends.cudnn.allow_tf32}
    out["torch.cudnn.benchmark"] = torch.backends.cudnn.benchmark
if "jax" in sys.modules:
    import jax
    out["jax.default_matmul_precision"] = jax.config.jax_default_matmul_precision
    out["jax.devices"] = [str(d) for d in jax.devices()]
print("PROBE " + json.dumps(out, default=str))
"""

GUARD = """
import json
out = {}
try:
    import torch
    out["torch"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
except ImportError as e:
    out["torch"] = f"not importable: {e}"
try:
    import jax
    out["jax"] = [d.device_kind for d in jax.devices() if d.platform == "gpu"]
except ImportError as e:
    out["jax"] = f"not importable: {e}"
print(json.dumps(out))
"""


class Log:
    def __init__(self, path: Path):
        self.file = path.open("a")

    def __call__(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            self.file.write(line + "\n")
        self.file.flush()


def run(cmd: list[str], timeout: float) -> dict:
    """Run a command with the shared environment; rc, seconds and combined output (rc 124 on timeout)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True,
                           timeout=max(timeout, 1))
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc = 124
        out = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")) \
            + f"\n[gpu_check: timed out after {timeout:.0f} s]"
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - t0, 1), "output": out}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", type=Path)
    p.add_argument("--cpu-dry-run", action="store_true", help="no GPU needed: the same steps on cpu, tiny")
    p.add_argument("--jobs", type=int, default=4, help="checks run at once (default 4)")
    args = p.parse_args()
    start = time.perf_counter()
    left = lambda: BUDGET_S - (time.perf_counter() - start)  # noqa: E731
    args.outdir.mkdir(parents=True, exist_ok=True)
    log = Log(args.outdir / "gpu_check.log")
    py = sys.executable

    guard = run([py, "-c", GUARD], 120)
    seen = json.loads(guard["output"].strip().splitlines()[-1]) if guard["rc"] == 0 else {"error": guard["output"]}
    log(f"gpu_check: GPUs seen: {json.dumps(seen)}")
    has_gpu = isinstance(seen.get("torch"), list) and seen["torch"] and isinstance(seen.get("jax"), list) \
        and seen["jax"]
    if not has_gpu and not args.cpu_dry_run:
        log("gpu_check: no GPU visible to both torch and jax: nothing checked (this is not a pass). "
            "Run on a CUDA machine, or pass --cpu-dry-run to rehearse the same steps on the CPU.")
        (args.outdir / "summary.json").write_text(json.dumps({"ok": False, "reason": "no GPU", "seen": seen}))
        return NO_GPU

    device = "cpu" if args.cpu_dry_run else "gpu"
    from nncompare.models import zoo  # the core only: no framework
    models = ["perceptron", "mlp"] if args.cpu_dry_run else zoo.names()
    env = {"python": sys.version.split()[0], "device": device, "gpus": seen, "dry_run": args.cpu_dry_run,
           "env": {k: v for k, v in ENV.items() if k != "PYTHONPATH"}}
    import numpy
    env["numpy"] = numpy.__version__

    log(f"gpu_check: {len(models)} models x {BACKENDS} on {device}, {args.jobs} at once")
    jobs = [("probe", b, [py, "-c", PROBE, b, device]) for b in BACKENDS]
    jobs += [("check", m, [py, "compare.py", "check", m, "--device", device, "--backends", *BACKENDS,
                           "--timeout", "200"]) for m in models]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda j: (j[0], j[1], run(j[2], left() - 100)), jobs))  # keep ~100 s for the run

    env["backends"] = {}
    checks = {}
    for kind, name, r in done:
        if kind == "probe":
            line = next((l for l in r["output"].splitlines() if l.startswith("PROBE ")), None)
            env["backends"][name] = json.loads(line[6:]) if line else {"error": r["output"][-2000:]}
            continue
        (args.outdir / f"check_{name}.txt").write_text(r["output"])
        checks[name] = {"ok": r["rc"] == 0, **r}
        verdict = "ok" if r["rc"] == 0 else f"FAILED (exit {r['rc']})"
        log(f"--- check {name}: {verdict} in {r['seconds']} s", r["output"].rstrip())
    (args.outdir / "env.json").write_text(json.dumps(env, indent=1, default=str))
    (args.outdir / "checks.json").write_text(json.dumps(checks, indent=1))
    log("--- settings per backend:", json.dumps(env["backends"], indent=1, default=str))

    devices = ["cpu"] if args.cpu_dry_run else ["cpu", "gpu"]
    tiny = ["--models", "perceptron", "--batch-sizes", "16", "--steps", "2", "--repeats", "1", "--warmup", "1"]
    short = ["--models", "lenet5", "--batch-sizes", "128", "--steps", "10", "--repeats", "3", "--warmup", "3"]
    run_cmd = [py, "compare.py", "run", "--backends", *BACKENDS, "--devices", *devices,
               *(tiny if args.cpu_dry_run else short), "--timeout", "120", "--quiet",
               "--json", str((args.outdir / "run.json").resolve())]
    r = run(run_cmd, left())
    log(f"--- run on {' and '.join(devices)}: exit {r['rc']} in {r['seconds']} s", r["output"].rstrip())

    ok = all(c["ok"] for c in checks.values()) and r["rc"] == 0 and len(checks) == len(models)
    summary = {"ok": ok, "device": device, "dry_run": args.cpu_dry_run, "seconds": round(time.perf_counter() - start),
               "checks": {m: c["ok"] for m, c in checks.items()}, "run_rc": r["rc"]}
    (args.outdir / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"gpu_check: {'all ok' if ok else 'FAILED'} in {summary['seconds']} s; results in {args.outdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
