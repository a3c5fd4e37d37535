"""nncompare command line: run (default), check, train, list, summary. `compare.py` is a thin entry point here."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tabulate import tabulate

from .backends import BackendError, available_backends, check_backend, make_optimizer, names
from .backends.base import cpu_name
from .models import ModelSpec, SpecError, resolve, zoo
from .models.data import NAMES as DATASETS, DataError
from .report import add_ratios, render_table, render_training
from .runner import (Task, UsageError, available_devices, canonical_device, cell_main, check_writable, gpu_names,
                     rows_to_csv, run_subprocess, write_atomic)

FRAMEWORKS = ("keras", "torch", "mxnet")


# --- run -------------------------------------------------------------------------------------------
def default_backends() -> list[str]:
    info = available_backends()
    return [b for b in FRAMEWORKS if info[b]["installed"]] + ["numpy"]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


def plan_run(args) -> tuple[list[ModelSpec], list[str], list[str]]:
    """Validate every option before any long work; return (specs, backends, devices)."""
    specs = [resolve(m) for m in args.models]
    backends = args.backends or default_backends()
    for b in backends:
        check_backend(b)
    devices = list(dict.fromkeys(canonical_device(d) for d in (args.devices or available_devices())))
    if args.baseline not in names():
        raise UsageError(f"unknown baseline {args.baseline!r} (known: {', '.join(names())})")
    check_writable(args.json)
    check_writable(args.csv)
    check_writable(args.plot)
    return specs, backends, devices


def reference_is_quick(spec: ModelSpec, batch: int, args) -> bool:
    """Whether the float64 NumPy row fits a default run: at most ~50 GFLOP of training work."""
    steps = 1 + args.warmup + args.steps * args.repeats
    return 3 * spec.flops * batch * steps <= 5e10


def cmd_run(args) -> int:
    specs, backends, devices = plan_run(args)
    optimizer = make_optimizer(args.optimizer, args.lr)
    opt_task = {"type": args.optimizer, "args": vars(optimizer)}
    cells = [(spec, b, d, bs) for spec in specs for d in devices for bs in args.batch_sizes for b in backends
             if b != "numpy" or d == "cpu" and (args.backends or reference_is_quick(spec, bs, args))]
    quiet = args.quiet or not sys.stderr.isatty()
    from tqdm import tqdm
    peaks = {d: run_subprocess(Task("peak", device=d, threads=args.threads), args.timeout).get("gemm_gflops")
             for d in devices}
    rows = []
    with tqdm(cells, disable=quiet, unit="cell", file=sys.stderr) as bar:
        for spec, backend, device, batch in bar:
            bar.set_description(f"{spec.name} {backend} {device} b{batch}")
            task = Task("measure", device=device, threads=args.threads, backend=backend, model_name=spec.name,
                        spec=spec.to_dict(), batch_size=batch, optimizer=opt_task, steps=args.steps,
                        repeats=args.repeats, warmup=args.warmup, compile=args.compile)
            result = run_subprocess(task, args.timeout)
            row = {"model": spec.name, "backend": backend, "device": device, "batch_size": batch,
                   "threads": args.threads, "optimizer": args.optimizer, "steps": args.steps,
                   "repeats": args.repeats, "warmup": args.warmup, "compile": args.compile, "model_params": spec.params,
                   "model_flops": spec.flops, "gemm_peak_gflops": peaks[device], **result}
            if "train_gflops" in row and peaks[device]:
                row["peak_pct"] = 100 * row["train_gflops"] / peaks[device]
            rows.append(row)
    add_ratios(rows, args.baseline)
    payload = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host_cpu": cpu_name(),
               "baseline": args.baseline, "rows": rows}
    if args.json:
        write_atomic(args.json, json.dumps(payload, indent=2) + "\n")
    if args.csv:
        write_atomic(args.csv, rows_to_csv(rows))
    if args.plot:
        from .plots import throughput_chart
        throughput_chart(rows, args.plot)
    print(render_table(rows, args.baseline))
    print(f"\nthreads {args.threads}; {args.repeats} repeats x {args.steps} steps after {args.warmup} warm-up; "
          f"optimizer {args.optimizer}; " + "; ".join(
              f"{d} GEMM peak {peaks[d]:.0f} GFLOP/s" for d in devices if peaks[d]))
    return 1 if any("error" in r for r in rows) and args.strict else 0


# --- train -----------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .models.data import load
    spec = resolve(args.model)
    if args.no_dropout:
        spec = spec.without_dropout()
    backends = args.backends or default_backends()
    for b in backends:
        check_backend(b)
    devices = list(dict.fromkeys(canonical_device(d) for d in (args.devices or ["cpu"])))
    for path in (args.json, args.csv, args.plot):
        check_writable(path)
    if args.target is not None and not 0 < args.target <= 1:
        raise UsageError(f"--target must be an accuracy in (0, 1], got {args.target}")
    data = load(args.dataset, spec, args.data_dir)  # fails here, before any training, if the files are missing
    optimizer = make_optimizer(args.optimizer, args.lr)
    print(f"{spec.name} on {args.dataset}: {len(data.x_train):,} train / {len(data.x_test):,} test samples, "
          f"{args.epochs} epochs, batch {args.batch_size}, {args.optimizer} lr {optimizer.lr:g}")
    if spec.has_dropout:
        print("note: the model trains with live dropout, which is random per framework: trajectories differ "
              "by design (use --no-dropout to compare them)")
    from tqdm import tqdm
    cells = [(b, d) for d in devices for b in backends if not (b == "numpy" and d != "cpu")]
    results = []
    for backend, device in tqdm(cells, disable=args.quiet or not sys.stderr.isatty(), unit="framework",
                                file=sys.stderr):
        task = Task("train", device=device, threads=args.threads, backend=backend, model_name=spec.name,
                    spec=spec.to_dict(), batch_size=args.batch_size,
                    optimizer={"type": args.optimizer, "args": vars(optimizer)}, dataset=args.dataset,
                    epochs=args.epochs, target=args.target, data_dir=args.data_dir)
        results.append({"model": spec.name, "dataset": args.dataset, "backend": backend, "device": device,
                        "epochs": args.epochs, "batch_size": args.batch_size, "optimizer": args.optimizer,
                        "lr": optimizer.lr, "threads": args.threads, "dropout": spec.has_dropout,
                        **run_subprocess(task, args.timeout)})
    if args.json:
        write_atomic(args.json, json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host_cpu": cpu_name(),
                                            "results": results}, indent=2) + "\n")
    if args.csv:
        write_atomic(args.csv, rows_to_csv([
            {k: v for k, v in r.items() if not isinstance(v, list)} | {
                "epoch": e + 1, **{k: r[k][e] for k in ("train_loss", "test_loss", "test_accuracy", "epoch_s")}}
            for r in results if "error" not in r for e in range(len(r["train_loss"]))]))
    if args.plot:
        from .plots import training_curves
        training_curves(results, args.plot, f"{spec.name} on {args.dataset}, {args.optimizer}, batch {args.batch_size}")
    print(render_training(results, args.target))
    return 0


# --- check -----------------------------------------------------------------------------------------
def cmd_check(args) -> int:
    from .backends.check import TOLERANCE, compare
    spec = resolve(args.model)
    if spec.has_dropout:
        spec = spec.without_dropout()  # live dropout is random per framework: compare without it
    backends = args.backends or [b for b in FRAMEWORKS if available_backends()[b]["installed"]]
    for b in backends:
        check_backend(b)
    device = canonical_device(args.device)
    from .backends import get_adapter
    if "torch" in backends:
        import torch  # noqa: F401  (Keras documents a segfault when TensorFlow loads before torch)
    oracle = get_adapter("numpy")
    rows, failed = [], False
    for b in backends:
        try:
            report = compare(get_adapter(b), oracle, spec, device=device, steps=args.steps, compile=args.compile)
        except BackendError as e:
            raise UsageError(str(e)) from None
        failed |= not report.ok()
        worst = [c for c in report.diffs if report.diffs[c] > TOLERANCE]
        where = report.where.get("logits") or next((report.where[c] for c in worst if report.where.get(c)), None)
        rows.append((b, *(f"{report.diffs[c]:.1e}" for c in ("logits", "loss", "grads", "sgd", "adam")),
                     "ok" if report.ok() else f"DIFFERS: {', '.join(worst)}" + (f" (first at {where})" if where else "")))
    print(f"{spec.name} on {device} against the float64 NumPy oracle "
          f"(max abs diff / scale; tolerance {TOLERANCE:g}; weights after {args.steps} steps)")
    print(tabulate(rows, headers=("Framework", "Logits", "Loss", "Grads", "SGD weights", "Adam weights", "Verdict"),
                   disable_numparse=True))
    return 1 if failed else 0


# --- list / summary --------------------------------------------------------------------------------
def cmd_list(args) -> int:
    rows = [(n, s.input_shape, f"{s.params:,}", f"{s.flops:,}", len(s.layers))
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


# --- parser ----------------------------------------------------------------------------------------
def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["mlp", "lenet5"], metavar="MODEL",
                   help="zoo names or spec .json files (default: mlp lenet5)")
    p.add_argument("--backends", nargs="+", metavar="BACKEND",
                   help=f"any of {', '.join(names())} (default: every installed framework, plus the numpy "
                        "reference where it is quick)")
    p.add_argument("--devices", nargs="+", metavar="DEVICE", help="cpu, gpu, gpu:N (default: every device)")
    p.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[64], metavar="N")
    p.add_argument("--steps", type=positive_int, default=10, help="timed training steps per repeat")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats (median and spread)")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed steps after the first step")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                   help="CPU threads for every framework (default: all cores)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=float, help="learning rate (default: 0.01 for sgd, 0.001 for adam)")
    p.add_argument("--compile", action="store_true",
                   help="compiled paths: Keras with XLA, torch.compile (Gluon is always hybridized)")
    p.add_argument("--baseline", default="torch", help="framework the ratio column divides by")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a cell counts as hung")
    p.add_argument("--json", metavar="PATH", help="write all rows as JSON (atomically)")
    p.add_argument("--csv", metavar="PATH", help="write all rows as CSV (atomically)")
    p.add_argument("--plot", metavar="PNG", help="bar chart of training throughput")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--strict", action="store_true", help="exit 1 when any cell failed")
    p.set_defaults(func=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare.py", description="Compare deep-learning frameworks on one spec. "
                                "Without a command: run the default comparison.")
    sub = p.add_subparsers(dest="command")
    add_run_options(sub.add_parser("run", help="time training and inference, one fresh process per cell"))
    sp = sub.add_parser("check", help="equivalence report of every framework against the NumPy oracle")
    sp.add_argument("model", help="zoo model name or spec .json file")
    sp.add_argument("--backends", nargs="+", metavar="BACKEND")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--steps", type=positive_int, default=5, help="optimizer steps before comparing weights")
    sp.add_argument("--compile", action="store_true", help="check the compiled paths (XLA, torch.compile)")
    sp.set_defaults(func=cmd_check)
    sp = sub.add_parser("train", help="train every framework on real data: accuracy, curves, time to accuracy")
    sp.add_argument("--model", required=True, help="zoo model name or spec .json file")
    sp.add_argument("--dataset", required=True, choices=DATASETS)
    sp.add_argument("--epochs", type=positive_int, default=10)
    sp.add_argument("--batch-size", type=positive_int, default=32)
    sp.add_argument("--backends", nargs="+", metavar="BACKEND")
    sp.add_argument("--devices", nargs="+", metavar="DEVICE", help="default: cpu")
    sp.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    sp.add_argument("--lr", type=float)
    sp.add_argument("--target", type=float, default=0.95, help="test accuracy whose time-to-reach is reported")
    sp.add_argument("--no-dropout", action="store_true", help="set every dropout rate to 0 (comparable curves)")
    sp.add_argument("--data-dir", help="folder holding the dataset files (default: $NNCOMPARE_DATA or "
                                       "~/.cache/nncompare)")
    sp.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    sp.add_argument("--timeout", type=float, default=1800)
    sp.add_argument("--json", metavar="PATH")
    sp.add_argument("--csv", metavar="PATH")
    sp.add_argument("--plot", metavar="PNG", help="loss and accuracy curves of every framework")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_train)
    sp = sub.add_parser("list", help="zoo models, installed backends, devices")
    sp.set_defaults(func=cmd_list)
    sp = sub.add_parser("summary", help="layer table of a zoo model or spec JSON file")
    sp.add_argument("model", help="zoo model name or path to a spec .json file")
    sp.set_defaults(func=cmd_summary)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_cell"]:
        return cell_main(argv[1])
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, BackendError, UsageError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
