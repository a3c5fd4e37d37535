"""nncompare command line: run (default), check, train, report, list, summary. `compare.py` is a thin entry point.

Exit codes: 0 done, 1 a failed comparison (or cell, with --strict) or results that could not be written,
2 bad input (one line, before any work), 130 interrupted by Ctrl-C, 143 by SIGTERM.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, replace

from tabulate import tabulate

from .backends import (BACKENDS, COMPILERS, BackendError, available_backends, check_backend, make_optimizer,
                       names)
from .backends.base import cpu_name
from .backends.bench import SECTIONS
from .cell import Task
from .devices import canonical_device, gpu_names
from .errors import Interrupted, UsageError
from .executors import make_executor, sweep
from .files import (Journal, check_input, check_outputs, check_plot, read_results, rows_to_csv, short, strict_json,
                    write_atomic)
from .models import ModelSpec, SpecError, resolve, zoo
from .models.data import NAMES as DATASETS, DataError
from .model_files import ImportedWeights, import_file, original_row, source_of
from .report import add_ratios, compile_notes, escape, render_check, render_scaling, render_table, render_training
from .report import inference_note, peak_line, render_inference, training_rows
from .rows import Row, TrainRow, check_schema, echo, is_whole, results_payload
from .signals import interruptible, uninterruptible


# --- option types ----------------------------------------------------------------------------------
MAX_COUNT = 10 ** 12  # no count (batch, steps, repeats, epochs) anywhere near this fits in a run
MAX_THREADS = 4096  # more threads than any machine has cores: an error row later, refused here instead


def whole_number(text: str, least: int, most: int = MAX_COUNT, what: str = "a positive integer") -> int:
    """Every integer option the same way: plain decimal digits (surrounding blanks ignored, leading zeros fine),
    within [least, most]; the echo of a bad value is cut short."""
    digits = text.strip()
    if not re.fullmatch(r"[0-9]+", digits, re.ASCII):
        raise argparse.ArgumentTypeError(f"must be {what} (decimal digits), got {short(text, 40)}")
    if len(digits.lstrip("0")) > len(str(most)) or not least <= int(digits) <= most:
        raise argparse.ArgumentTypeError(f"must be {what} from {least} to {most:,}, got {short(text, 40)}")
    return int(digits)


def positive_int(text: str) -> int:
    return whole_number(text, 1)


def nonnegative_int(text: str) -> int:
    return whole_number(text, 0, what="an integer >= 0")


def thread_count(text: str) -> int:
    return whole_number(text, 1, MAX_THREADS, "a thread count")


def positive_float(text: str) -> float:
    """A finite number > 0: a timeout or learning rate of 0, a negative, nan or inf gives nonsense rows."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {short(text, 40)}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {short(text, 40)}")
    return value


MAX_TIMEOUT_S = 1e7  # ~115 days; the OS clocks that wait on a cell overflow a little above 9e9 s


def timeout_seconds(text: str) -> float:
    value = positive_float(text)
    if value > MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TIMEOUT_S:g} seconds, got {short(text, 40)}")
    return value


def accuracy(text: str) -> float:
    """A test accuracy in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:  # nan fails too
        raise argparse.ArgumentTypeError(f"must be an accuracy in (0, 1], got {short(text, 40)}")
    return value


# --- shared plumbing -------------------------------------------------------------------------------
def reference(backend: str) -> bool:
    """Whether `backend` is the float64 oracle: CPU only, and what every other backend is checked against."""
    return BACKENDS[backend].reference


def default_backends(training: bool = False) -> list[str]:
    """run without --backends: every installed engine, then the reference; train (training=True): those that
    train."""
    info = available_backends()
    return ([b.name for b in BACKENDS.values()
             if not b.reference and info[b.name]["installed"] and (b.trains or not training)]
            + [b.name for b in BACKENDS.values() if b.reference])


def check_backends() -> list[str]:
    """check without --backends: every installed backend but the reference it is checked against."""
    info = available_backends()
    return [b.name for b in BACKENDS.values() if not b.reference and info[b.name]["installed"]]


def checked_backends(args, default: list[str]) -> list[str]:
    backends = list(dict.fromkeys(args.backends or default))
    for b in backends:
        check_backend(b)
    return backends


def distinct(arguments: list[str]) -> list[str]:
    """The arguments without repeats, a file named twice under two spellings (a.json, ./a.json) counted once."""
    seen: dict[str, str] = {}
    for a in arguments:
        key = os.path.realpath(a) if a not in zoo.names() and os.path.isfile(a) else a
        seen.setdefault(key, a)
    return list(seen.values())


def load_model(argument: str) -> tuple[ModelSpec, dict | None]:
    """A zoo model or a spec file (weights None: the spec's seeded init), or a .keras / .onnx model file (the
    spec and weights imported from it); a file that is not a regular one (a FIFO would block the read) is refused."""
    if argument not in zoo.names() and source_of(argument):
        return import_file(argument)
    if argument not in zoo.names() and os.path.lexists(argument):
        check_input(argument, "spec file")
    return resolve(argument), None


def load_spec(argument: str) -> ModelSpec:
    return load_model(argument)[0]


def imported_weights(args) -> ImportedWeights:
    """The command's imported weights on their way to the cells; main() removes their files however it ends."""
    if getattr(args, "imported", None) is None:
        args.imported = ImportedWeights()
    return args.imported


def load_models(arguments: list[str],
                imported: ImportedWeights | None = None) -> list[tuple[str, ModelSpec, str | None]]:
    """(label, spec, file) per distinct model argument; specs sharing a name are labelled with their file, so
    ratios and plots never mix two different models. An imported model file's weights go to `imported`."""
    loaded = [(a, *load_model(a)) for a in distinct(arguments)]
    counts: dict[str, int] = {}
    for _, s, _ in loaded:
        counts[s.name] = counts.get(s.name, 0) + 1
    models = [(s.name if counts[s.name] == 1 else f"{s.name} ({a})", s, None if a in zoo.names() else a)
              for a, s, _ in loaded]
    for (label, _, _), (_, _, weights) in zip(models, loaded):
        if weights is not None and imported is not None:
            imported.add(label, weights)
    return models


def plan_outputs(args, inputs: list[str], rows_key: str) -> tuple[Journal | None, dict[str, dict]]:
    """Validate every output before any work; open and lock the journal; the finished rows --resume starts from
    (only rows that pass the checks `report` makes: any other runs again)."""
    base = args.json or args.csv
    journal = Journal(base + ".journal") if base else None
    # with --json, the --csv path's journal is held too (only as a lock): two runs never write one CSV either
    csv_lock = Journal(args.csv + ".journal") if args.json and args.csv else None
    check_outputs({"--json": args.json, "--csv": args.csv, "--plot": args.plot,
                   "journal": journal.path if journal else None,
                   "--csv journal": csv_lock.path if csv_lock else None}, inputs)
    check_plot(args.plot)
    if args.resume and not journal:
        raise UsageError("--resume needs the --json or --csv path of the run to continue")
    if not journal:
        return None, {}
    args.open_journals = [journal] + [csv_lock] * bool(csv_lock)  # main() closes them however the command ends
    journal.open()  # refused here while another run writes the same results; an empty journal is removed later
    if csv_lock:
        csv_lock.open()
    try:
        finished: dict[str, dict] = {}
        if args.resume:
            if args.json and os.path.exists(args.json):
                payload = read_results(args.json, "--resume results file")
                rows = payload.get(rows_key) if isinstance(payload, dict) else None
                if not isinstance(rows, list):
                    raise UsageError(f"--resume: {short(args.json)} is not a results file of this command")
                check_schema(payload, args.json)
                finished = {r["cell"]: r for r in rows if isinstance(r, dict) and isinstance(r.get("cell"), str)}
            finished.update(journal.read())
        elif journal.read():
            raise UsageError(f"{short(journal.path)} holds the finished cells of an interrupted run: continue it "
                             "with --resume, or delete the file")
    except BaseException:
        journal.close()
        raise
    problem = (Row if rows_key == "rows" else TrainRow).problem
    bad = {k: p for k, p in ((k, problem(r)) for k, r in finished.items()) if p}
    if bad:
        n = len(bad)
        print(f"note: --resume: {n} finished row{'s' * (n > 1)} of {short(base)} {'are' if n > 1 else 'is'} not valid "
              f"({next(iter(bad.values()))}"
              f"{', ...' * (n > 1)}): {'their cells run' if n > 1 else 'its cell runs'} again", file=sys.stderr)
    journal.fresh = not args.resume
    return journal, {k: r for k, r in finished.items() if k not in bad}


def check_resume(args, finished: dict[str, dict], tasks: list[Task], executor) -> None:
    """--resume continues the run that wrote the journal: refused before any cell runs when it holds finished
    cells this command line does not run (another configuration), which writing the results would throw away.
    A command line with no cell at all (the numpy reference asked for on a GPU only) is refused too."""
    if not tasks:
        executor.close()
        raise UsageError("nothing to run: the numpy reference runs on the CPU only (add --devices cpu, or "
                         "another backend)")
    keys = {t.key for t in tasks}
    foreign = [r if isinstance(r, dict) else {} for k, r in finished.items() if k not in keys]
    if foreign:
        executor.close()
        r, n = foreign[0], len(foreign)
        raise UsageError(f"--resume: the results of {args.json or args.csv!r} hold {n} finished cell{'s' * (n > 1)} "
                         f"this command line does not run ({r.get('model')} {r.get('backend')} {r.get('device')} "
                         f"batch {r.get('batch_size')}): resume with the command line that wrote them, or write to "
                         "another file")


def write_outputs(items: list[tuple[str | None, object]]) -> list[str]:
    """Write each (path, producer of its content or writer); a failure is reported, never lost work."""
    failures = []
    with uninterruptible():
        for path, make in items:
            if path is None:
                continue
            try:
                result = make(path)
                if result is not None:
                    write_atomic(path, result)
            except Exception as e:  # noqa: BLE001  (any failure to write must still leave the table printed)
                failures.append(f"could not write {path!r}: {type(e).__name__}: {e}")
    return failures


def finish(args, journal: Journal | None, failures: list[str], code: int | None, done: int, total: int) -> int | None:
    """Tell the user what happened to the results; the exit code for failures and interrupts (else None)."""
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    if failures and journal:
        print(f"every finished cell is kept in {journal.path!r}", file=sys.stderr)
    if code is not None:
        where = ", ".join(p for p in (args.json, args.csv) if p)
        print(f"interrupted: {done} of {total} cells finished" +
              (f", written to {where} (marked partial); --resume continues" if where and done
               else ", nothing written" if where else ""), file=sys.stderr)
        return code
    if journal and not failures:
        journal.remove()
    elif journal:
        journal.close()
    return 1 if failures else None


def executor_for(args):
    return make_executor(args.executor, args.timeout, args.verbose, args.address, getattr(args, "concurrency", None))


# --- run -------------------------------------------------------------------------------------------
def reference_is_quick(spec: ModelSpec, batch: int, args) -> bool:
    """Whether the float64 NumPy row fits a default run: at most ~50 GFLOP of training work."""
    steps = 1 + args.warmup + args.steps * args.repeats
    return 3 * spec.flops * batch * steps <= 5e10


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_batches(models, batch_sizes: list[int], executor: str) -> None:
    """Refuse, before any cell starts, a batch whose float32 activations (forward alone) exceed this machine's
    memory: it could only become an out-of-memory error row. Under Ray the nodes are elsewhere: not checked."""
    memory = physical_memory()
    if executor != "local" or not memory:
        return
    for label, spec, _ in models:
        per_sample = sum(math.prod(i.out_shape) for i in spec.infos) + math.prod(spec.input_shape)
        for bs in batch_sizes:
            need = 4 * per_sample * bs
            if need > memory:
                raise UsageError(f"--batch-sizes {bs:,}: {escape(label)[:60]} needs {need / 2 ** 30:,.0f} GiB for one "
                                 f"batch's activations, more than this machine's {memory / 2 ** 30:,.0f} GiB")


@dataclass
class RunPlan:
    """What `run` will do, settled and checked before any cell starts."""

    models: list[tuple[str, ModelSpec, str | None]]
    batch_sizes: list[int]
    backends: list[str]
    devices: list[str]
    threads: list[int]
    optimizer: object
    journal: Journal | None
    finished: dict[str, dict]
    executor: object


def plan_run(args) -> RunPlan:
    """Every input checked, the outputs planned (journal locked), the executor started and its devices known."""
    from .backends.bench import peak_libraries, time_budget
    try:
        time_budget()  # read again in every cell: refused here, before any work
        peak_libraries()
    except ValueError as e:
        raise UsageError(str(e)) from None
    models = load_models(args.models, imported_weights(args))
    batch_sizes = list(dict.fromkeys(args.batch_sizes))  # 8 and 08 are one cell, run once
    check_batches(models, batch_sizes, args.executor)
    backends = checked_backends(args, default_backends())
    if args.baseline not in names():
        raise UsageError(f"unknown baseline {args.baseline!r} (known: {', '.join(names())})")
    optimizer = make_optimizer(args.optimizer, args.lr)
    journal, finished = plan_outputs(args, [f for _, _, f in models if f], "rows")
    executor = executor_for(args)
    try:
        have = executor.devices()
        devices = list(dict.fromkeys(canonical_device(d, have) for d in (args.devices or have)))
    except BaseException:
        executor.close()
        raise
    threads = list(dict.fromkeys(args.threads or [executor.default_threads(devices)]))
    return RunPlan(models, batch_sizes, backends, devices, threads, optimizer, journal, finished, executor)


def run_tasks(args, plan: RunPlan) -> list[Task]:
    """One measure task per (model, device, batch, threads, backend, compile mode); the reference only on the CPU,
    and without --backends only where it is quick."""
    opt_task = {"type": args.optimizer, "args": vars(plan.optimizer)}
    # --compile: the compiled path beside the eager one, so a compiler that is slower here shows as such
    modes = (False, True) if args.compile else (False,)
    imported = imported_weights(args)
    return [Task("measure", device=d, threads=t, backend=b, model_name=label, spec=spec.to_dict(), batch_size=bs,
                 optimizer=opt_task, steps=args.steps, repeats=args.repeats, warmup=args.warmup, compile=c,
                 **imported.fields(label))
            for label, spec, _ in plan.models for d in plan.devices for bs in plan.batch_sizes for t in plan.threads
            for b in plan.backends for c in modes
            if (not reference(b) or d == "cpu" and (args.backends or reference_is_quick(spec, bs, args)))
            and (not c or b in COMPILERS)]


def timed_sections(args, plan: RunPlan, tasks: list[Task]) -> list[Task]:
    """What each cell times: training, inference and latency, or inference and latency alone (--inference-only, or
    a backend that does not train); batch-1 latency once per model, backend, device, threads and compile mode,
    in the cell of the smallest batch."""
    smallest = min(plan.batch_sizes)

    def sections(t: Task) -> tuple[str, ...]:
        timed = SECTIONS if BACKENDS[t.backend].trains and not args.inference_only else SECTIONS[1:]
        return tuple(s for s in timed if s != "latency" or t.batch_size == smallest)
    return [replace(t, sections=sections(t)) for t in tasks]


def measure_peaks(plan: RunPlan) -> tuple[dict, int | None]:
    """Each device's GEMM peak ({(host, device): gemm_peak's record}), and the exit code if a signal stopped it."""
    try:
        with interruptible():
            return plan.executor.peaks(plan.devices, max(plan.threads)), None
    except KeyboardInterrupt:
        return {}, 130
    except Interrupted as e:
        return {}, e.code


def sweep_run(args, plan: RunPlan, tasks: list[Task]) -> tuple[list[dict], dict, int | None]:
    """The rows (with their ratios to the baseline), the devices' peaks, and the exit code if a signal stopped it."""
    peaks, code = measure_peaks(plan)
    by_label = {label: (spec, f) for label, spec, f in plan.models}

    def make_row(task: Task, result: dict) -> dict:
        spec, spec_file = by_label[task.model_name]
        return Row.measured(task, result, spec.params, spec.flops, spec_file, plan.executor.name, peaks).to_dict()

    rows = []
    if code is None:
        rows, code = sweep(tasks, make_row, plan.executor, plan.journal, plan.finished,
                           lambda t: f"{t.model_name} {t.backend} {t.device} b{t.batch_size} t{t.threads}",
                           quiet=args.quiet or not sys.stderr.isatty())
    else:
        plan.executor.close()
    add_ratios(rows, args.baseline)
    return rows, peaks, code


def write_run_outputs(args, plan: RunPlan, rows: list[dict], code: int | None, cells: int,
                      peaks: dict | None = None) -> list[str]:
    """--json, --csv and --plot, unless a signal came before any cell finished (then earlier files stay)."""
    payload = results_payload("rows", rows, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), host=socket.gethostname(),
                              host_cpu=cpu_name(), baseline=args.baseline, partial=code is not None, cells=cells,
                              peaks=[{"host": h, **p} for (h, _), p in (peaks or {}).items() if isinstance(p, dict)])
    from . import plots
    chart = plots.scaling_chart if len(plan.threads) > 1 else plots.throughput_chart
    return write_outputs([(args.json, lambda p: strict_json(payload) + "\n"),
                          (args.csv, lambda p: rows_to_csv(rows)),
                          (args.plot, lambda p: chart(rows, p))] if rows or code is None else [])


def print_run(args, plan: RunPlan, rows: list[dict], peaks: dict) -> None:
    """The tables (training, inference, and thread scaling with several counts), their notes, and what was timed."""
    tables = [render_table(rows, args.baseline)] * bool(training_rows(rows)) + [render_inference(rows)]
    print("\n\n".join(t for t in tables if t))
    if len(plan.threads) > 1:
        print("\n" + render_scaling(rows))
    for note in compile_notes(rows) + [f"{r['model']} {r['backend']} {r['device']} batch {r['batch_size']}: "
                                       f"{r['ray_node_note']} (ratios compare rows of one node only)"
                                       for r in rows if r.get("ray_node_note")]:
        print("note: " + escape(note))
    if args.compile and set(plan.backends) - set(COMPILERS):
        print(f"note: {', '.join(b for b in plan.backends if b not in COMPILERS)}: no compiler apart from the default "
              "path (Gluon is always hybridized, keras-jax always XLA; numpy, keras-torch: none)")
    trained = "" if args.inference_only else (f"{timed_counts(rows, args)}; optimizer {args.optimizer} "
                                               f"lr {plan.optimizer.lr:g}; ")
    print(f"\n{trained}threads {', '.join(map(str, plan.threads))}")
    for line in [inference_note(rows)] + [peak_line(d + (f" ({h[:8]})" if len({h for h, _ in peaks}) > 1 else ""), p)
                                          for (h, d), p in peaks.items()]:
        if line:
            print(line)


def exit_code(args, journal: Journal | None, failures: list[str], code: int | None, rows: list[dict],
              cells: int) -> int:
    """run and train: the interrupt's code, 1 when a file could not be written or the cells failed, else 0."""
    finished = finish(args, journal, failures, code, len(rows), cells)
    if finished is not None:
        return finished
    errors = sum("error" in r for r in rows)
    return 1 if errors and (args.strict or errors == len(rows)) else 0


def cmd_run(args) -> int:
    plan = plan_run(args)
    tasks = timed_sections(args, plan, run_tasks(args, plan))
    check_resume(args, plan.finished, tasks, plan.executor)
    rows, peaks, code = sweep_run(args, plan, tasks)
    failures = write_run_outputs(args, plan, rows, code, len(tasks), peaks)
    print_run(args, plan, rows, peaks)
    return exit_code(args, plan.journal, failures, code, rows, len(tasks))


def _span(values: list[int]) -> str:
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


def timed_counts(rows: list[dict], args) -> str:
    """What the rows really timed: --repeats and --steps are minimums that the time budget extends (a repeat too
    short to time grows its steps), so the counts come from the rows, not from the command line."""
    done = [r for r in rows if "error" not in r and isinstance(r.get("train_repeats"), int)
            and isinstance(r.get("train_steps"), int)]
    loss = f"loss after the first step and {args.warmup} warm-up step{'s' * (args.warmup != 1)}"
    if not done:
        return f"asked for {args.repeats} repeats x {args.steps} steps after {args.warmup} warm-up; {loss}"
    repeats, steps = [r["train_repeats"] for r in done], [r["train_steps"] for r in done]
    extended = max(repeats) > args.repeats or max(steps) > args.steps
    return (f"timed {_span(repeats)} repeats x {_span(steps)} steps{' per row' * (len(done) > 1)} after "
            f"{args.warmup} warm-up" + (f" (--repeats {args.repeats} and --steps {args.steps} are minimums: the time "
                                        "budget extends them)" if extended else "") + f"; {loss}")


# --- train -----------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .models.data import load
    imported = imported_weights(args)
    (label, spec, spec_file), = load_models([args.model], imported)
    if args.no_dropout:
        spec = spec.without_dropout()
    backends = checked_backends(args, default_backends(training=True))
    if args.data_dir is not None and not args.data_dir.strip():
        raise UsageError("--data-dir is empty (omit it for the default folder)")
    optimizer = make_optimizer(args.optimizer, args.lr)
    journal, finished = plan_outputs(args, [spec_file] if spec_file else [], "results")
    data = load(args.dataset, spec, args.data_dir)  # fails here, before any training, if the files are missing
    executor = executor_for(args)
    try:  # the devices the executor's machines have (a Ray cluster's GPU nodes too)
        have = executor.devices()
        devices = list(dict.fromkeys(canonical_device(d, have) for d in (args.devices or ["cpu"])))
    except BaseException:
        executor.close()
        raise
    threads = args.threads or executor.default_threads(devices)
    print(f"{spec.name} on {args.dataset}: {len(data.x_train):,} train / {len(data.x_test):,} test samples, "
          f"{args.epochs} epochs, batch {args.batch_size}, {args.optimizer} lr {optimizer.lr:g}", flush=True)
    if spec.has_dropout:
        print("note: the model trains with live dropout, which is random per framework: trajectories differ "
              "by design (use --no-dropout to compare them)", flush=True)
    tasks = [Task("train", device=d, threads=threads, backend=b, model_name=label, spec=spec.to_dict(),
                  batch_size=args.batch_size, optimizer={"type": args.optimizer, "args": vars(optimizer)},
                  dataset=args.dataset, epochs=args.epochs, target=args.target, data_dir=args.data_dir,
                  **imported.fields(label))
             for d in devices for b in backends if not (reference(b) and d != "cpu")]
    check_resume(args, finished, tasks, executor)

    def make_row(task: Task, result: dict) -> dict:
        return TrainRow.trained(task, result, spec.has_dropout, executor.name).to_dict()

    results, code = sweep(tasks, make_row, executor, journal, finished, lambda t: f"{t.backend} {t.device}",
                          quiet=args.quiet or not sys.stderr.isatty())
    payload = results_payload("results", results, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              host=socket.gethostname(), host_cpu=cpu_name(), partial=code is not None,
                              cells=len(tasks))
    curves = []  # CSV: one row per (framework, epoch); a framework that failed keeps one row, with its error
    for r in results:
        flat = {k: v for k, v in r.items() if not isinstance(v, list)}
        curves += [flat] if "error" in r else [flat | {"epoch": e + 1, **{
            k: r[k][e] for k in ("train_loss", "test_loss", "test_accuracy", "epoch_s")}} for e in range(len(r["train_loss"]))]
    from . import plots
    failures = write_outputs([
        (args.json, lambda p: strict_json(payload) + "\n"),
        (args.csv, lambda p: rows_to_csv(curves)),
        (args.plot, lambda p: plots.training_curves(
            results, p, f"{spec.name} on {args.dataset}, {args.optimizer}, batch {args.batch_size}"))]
        if results or code is None else [])  # interrupted before any cell finished: earlier files stay
    print(render_training(results, args.target))
    return exit_code(args, journal, failures, code, results, len(tasks))


# --- check -----------------------------------------------------------------------------------------
def cmd_check(args) -> int:
    from .backends.check import TOLERANCE
    imported = imported_weights(args)
    (label, spec, model_file), = load_models([args.model], imported)
    dropout = [i.name for i in spec.infos if getattr(i.layer, "rate", 0) > 0]
    if dropout:
        spec = spec.without_dropout()  # live dropout is random per framework: compare without it
    backends = checked_backends(args, check_backends())
    original, ran = [], ""
    if label in imported.arrays:  # an imported model: the source model itself, beside every port
        row, ran = original_row(model_file, spec, imported.arrays[label])
        original = [row]
    executor = executor_for(args)
    try:
        device = canonical_device(args.device, executor.devices())
    except BaseException:
        executor.close()
        raise
    threads = 1 if args.executor == "ray" else os.cpu_count() or 1  # under Ray: one CPU each, side by side
    tasks = [Task("check", device=device, threads=threads, backend=b, model_name=label,
                  spec=spec.to_dict(), steps=args.steps, compile=args.compile, **imported.fields(label))
             for b in backends]
    results, code = sweep(tasks, lambda t, r: {"backend": t.backend, **r}, executor, quiet=True)
    for r in results:
        if "bad_input" in r:
            raise UsageError(r["bad_input"])
    print(f"{spec.name} on {device} against the float64 NumPy oracle "
          f"(max abs diff / scale; tolerance {TOLERANCE:g}; weights after {args.steps} steps)")
    print(render_check(original + results))
    if ran:
        print(escape(ran))
    if dropout:
        print(f"not checked here: training-mode dropout ({', '.join(dropout)}), which is random per framework; "
              "these checks ran it at rate 0 (its inference-mode identity is covered by the logits). Its rate and "
              "rescaling are tested statistically in tests/test_equivalence.py.")
    if code is not None:
        print(f"interrupted: {len(results)} of {len(tasks)} frameworks checked", file=sys.stderr)
        return code
    return 1 if any("error" in r or not r["ok"] for r in original + results) else 0


# --- report ----------------------------------------------------------------------------------------
def load_results(path: str) -> dict:
    payload = read_results(path)
    if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
        raise UsageError(f"{short(path)} is not a results file of `compare.py run --json`")
    check_schema(payload, path)
    for i, r in enumerate(payload["rows"]):
        problem = Row.problem(r)
        if problem:
            raise UsageError(f"{short(path)}, row {i}{_row_name(r)}: {problem}")
    for key in ("host", "host_cpu"):
        if not isinstance(payload.get(key), (str, type(None))):
            raise UsageError(f"{short(path)}: {key!r} must be a string, got {echo(payload[key])}")
    return payload


def _row_name(r) -> str:
    if not isinstance(r, dict):
        return ""
    return f" ({escape(str(r.get('model')))[:40]} {escape(str(r.get('backend')))[:20]})"


def cmd_report(args) -> int:
    check_outputs({"--plot": args.plot}, args.files)
    check_plot(args.plot)
    rows, notes = [], []
    for path in distinct(args.files):
        payload = load_results(path)
        host = payload.get("host") or f"{payload.get('host_cpu') or '?'} ({os.path.basename(path)})"
        for r in payload["rows"]:
            rows.append({"host": host, "source": path, **{k: v for k, v in r.items() if k != "vs_baseline"}})
        if payload.get("partial"):
            cells = payload.get("cells")
            notes.append(f"{path} is partial: {len(payload['rows'])} of "
                         f"{cells if is_whole(cells, 0) else '?'} cells")
    if not rows:
        print("no rows in " + escape(", ".join(args.files)))
        return 0
    add_ratios(rows, args.baseline)
    tables = ([render_table(rows, args.baseline, markdown=args.markdown, show_machine=True)] * bool(training_rows(rows))
              + [render_inference(rows, markdown=args.markdown, show_machine=True)])
    print("\n\n".join(t for t in tables if t))
    if len({r.get("threads") for r in rows}) > 1:
        print("\n" + render_scaling(rows, markdown=args.markdown))
    machines = {}
    for r in rows:
        machines.setdefault(r["host"], set()).add(r.get("cpu_name") if r["device"] == "cpu" else r.get("device_name"))
    print("\n" + escape("; ".join(f"{h}: {', '.join(sorted(filter(None, n))) or '?'}" for h, n in machines.items())
                        + f". Ratios (x {args.baseline}) compare rows of one machine, device and settings only."))
    for n in compile_notes(rows) + notes:
        print("note: " + escape(n))
    peaks = {(r["host"], r["device"]): r["peak"] for r in rows if isinstance(r.get("peak"), dict)}
    for line in [inference_note(rows)] + [peak_line(f"{h}: {d}", p) for (h, d), p in peaks.items()]:
        if line:
            print(line)
    from . import plots
    failures = write_outputs([(args.plot, lambda p: plots.throughput_chart(rows, p))])
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    return 1 if failures else 0


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
    print(load_spec(args.model).summary())
    return 0


# --- export ----------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    """The ONNX file of a model: a spec's seeded initial weights, or the weights of the model file it came from."""
    from .model_files import require, write_onnx
    from .models import init_weights
    check_outputs({"--onnx": args.onnx}, [] if args.model in zoo.names() else [args.model])
    spec, weights = load_model(args.model)  # a bad model file is named before a missing package
    require([("onnx", "onnx")], "export --onnx")
    if weights is not None:
        if args.seed is not None:
            raise UsageError(f"--seed: {args.model!r} holds its own weights; --seed chooses a spec's initial ones")
        which = f"the weights of {args.model}"
    else:
        seed = args.seed or 0
        weights, which = init_weights(spec, seed), f"the spec's initial weights, seed {seed}"
    try:
        with uninterruptible():
            write_onnx(spec, weights, args.onnx)  # a layer ONNX cannot express: SpecError or BackendError, exit 2
    except OSError as e:
        print(f"error: could not write {args.onnx!r}: {escape(str(e))}", file=sys.stderr)
        return 1
    from .interop import OPSET
    print(escape(f"wrote {args.onnx}: {spec.name} with {which}; ONNX opset {OPSET}, input 'input' of shape "
                 f"(N, {', '.join(map(str, spec.input_shape))}) float32, N dynamic"))
    return 0


# --- parser ----------------------------------------------------------------------------------------
def executor_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: one cell at a time on this machine (default); ray: cells as Ray tasks")
    p.add_argument("--address", help="Ray cluster to join (auto, ray://host:port; default: start a local one)")
    p.add_argument("--verbose", action="store_true", help="show the frameworks' start-up output")
    return p


def sweep_options() -> argparse.ArgumentParser:
    """The options run and train share (a fresh parent for each: set_defaults would change a shared one's)."""
    p = argparse.ArgumentParser(add_help=False, parents=[executor_options()])
    p.add_argument("--backends", nargs="+", metavar="BACKEND",
                   help=f"any of {', '.join(names())} (default: every installed engine, for train "
                        "those that train, plus the numpy reference)")
    p.add_argument("--devices", nargs="+", metavar="DEVICE", help="cpu, gpu, gpu:N")
    p.add_argument("--optimizer", choices=("sgd", "adam"))
    p.add_argument("--lr", type=positive_float, help="learning rate (default: 0.01 for sgd, 0.001 for adam)")
    p.add_argument("--json", metavar="PATH", help="write all rows as JSON (atomically)")
    p.add_argument("--csv", metavar="PATH", help="write all rows as CSV (atomically)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: skip the cells its --json/--csv journal holds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--strict", action="store_true", help="exit 1 when any cell failed")
    return p


class Parser(argparse.ArgumentParser):
    """argparse with bad input as one line (no usage block), escaped and cut short like every other error."""

    def error(self, message: str):
        message = escape(message)
        if len(message) > 300:
            message = message[:297] + "..."
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="compare.py", description="Compare deep-learning frameworks on one spec. "
                                "Without a command: run the default comparison.")
    sub = p.add_subparsers(dest="command")

    sp = sub.add_parser("run", parents=[sweep_options()], help="time training and inference, one fresh process per cell")
    sp.add_argument("--models", nargs="+", default=["mlp", "lenet5"], metavar="MODEL",
                    help="zoo names, spec .json files or .keras/.onnx model files (default: mlp lenet5)")
    sp.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[64], metavar="N")
    sp.add_argument("--steps", type=positive_int, default=10, help="timed training steps per repeat")
    sp.add_argument("--repeats", type=positive_int, default=3, help="timed repeats (median and spread)")
    sp.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed steps after the first step")
    sp.add_argument("--threads", nargs="+", type=thread_count, metavar="N",
                    help="CPU threads for every framework (default: all cores; under Ray: the smallest node's); "
                         "several values: a scaling table")
    sp.add_argument("--compile", action="store_true",
                    help="also the compiled paths, beside eager: Keras with XLA, torch.compile (Gluon is always hybridized)")
    sp.add_argument("--baseline", default="torch", help="framework the ratio column divides by")
    sp.add_argument("--inference-only", action="store_true",
                    help="time inference and batch-1 latency only, no training (for deployment)")
    sp.add_argument("--concurrency", type=lambda t: whole_number(t, 1, MAX_THREADS, "a number of cells"),
                    help="with --executor ray: timing cells allowed at once on one node (default 1: parallel "
                         "timing corrupts numbers)")
    sp.add_argument("--timeout", type=timeout_seconds, default=600, help="seconds before a cell counts as hung")
    sp.add_argument("--plot", metavar="FILE", help="chart of training throughput (.png, .pdf, .svg...)")
    sp.set_defaults(func=cmd_run, optimizer="sgd")

    sp = sub.add_parser("check", parents=[executor_options()],
                        help="equivalence report of every framework against the NumPy oracle")
    sp.add_argument("model", help="zoo model name, spec .json file or .keras/.onnx model file")
    sp.add_argument("--backends", nargs="+", metavar="BACKEND")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--steps", type=positive_int, default=5, help="optimizer steps before comparing weights")
    sp.add_argument("--compile", action="store_true", help="check the compiled paths (XLA, torch.compile)")
    sp.add_argument("--timeout", type=timeout_seconds, default=1800, help="seconds before a framework counts as hung")
    sp.set_defaults(func=cmd_check)

    sp = sub.add_parser("train", parents=[sweep_options()],
                        help="train every framework on real data: accuracy, curves, time to accuracy "
                             "(default: digits_mlp on the bundled digits)")
    sp.add_argument("--model", default="digits_mlp",
                    help="zoo model name, spec .json file or .keras/.onnx model file (default: digits_mlp)")
    sp.add_argument("--dataset", default="digits", choices=DATASETS, help="default: digits (bundled, no download)")
    sp.add_argument("--epochs", type=positive_int, default=10)
    sp.add_argument("--batch-size", type=positive_int, default=32)
    sp.add_argument("--target", type=accuracy, default=0.95, help="test accuracy whose time-to-reach is reported")
    sp.add_argument("--no-dropout", action="store_true", help="set every dropout rate to 0 (comparable curves)")
    sp.add_argument("--data-dir", help="folder holding the dataset files (default: $NNCOMPARE_DATA or "
                                       "~/.cache/nncompare)")
    sp.add_argument("--threads", type=thread_count, help="default: all cores; under Ray: the smallest node's")
    sp.add_argument("--timeout", type=timeout_seconds, default=1800)
    sp.add_argument("--plot", metavar="FILE", help="loss and accuracy curves of every framework")
    sp.set_defaults(func=cmd_train, optimizer="adam")

    sp = sub.add_parser("report", help="merge result files (several machines) into one table")
    sp.add_argument("files", nargs="+", metavar="RESULTS.json", help="files written by `run --json`")
    sp.add_argument("--baseline", default="torch")
    sp.add_argument("--markdown", action="store_true", help="GitHub markdown tables")
    sp.add_argument("--plot", metavar="FILE", help="chart of training throughput per machine")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("list", help="zoo models, installed backends, devices")
    sp.set_defaults(func=cmd_list)
    sp = sub.add_parser("summary", help="layer table of a zoo model, spec JSON file or .keras/.onnx model file")
    sp.add_argument("model", help="zoo model name, spec .json file or .keras/.onnx model file")
    sp.set_defaults(func=cmd_summary)

    sp = sub.add_parser("export", help="write a model as an ONNX file (a spec with its seeded initial weights, a "
                                       "model file with its own)")
    sp.add_argument("model", help="zoo model name, spec .json file or .keras/.onnx model file")
    sp.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write (atomically)")
    sp.add_argument("--seed", type=nonnegative_int,
                    help="seed of a spec's initial weights (default 0: the weights run, train and check start from)")
    sp.set_defaults(func=cmd_export)
    return p


class _Stdout:
    """Standard output that records its first write error (a full disk, /dev/full, a reader that left) instead
    of raising it mid-command: the results files and journal are still settled, then main reports it."""

    def __init__(self, stream):
        self.stream, self.error = stream, None
        if stream is None:  # started with the descriptor closed (`>&-`): Python gives no stream at all
            self.stream = open(os.devnull, "w")
            self.error = OSError(errno.EBADF, "it is closed")

    def write(self, text: str) -> int:
        if self.error is None:
            try:
                return self.stream.write(text)
            except OSError as e:
                self.error = e
        return len(text)

    def flush(self) -> None:
        if self.error is None:
            try:
                self.stream.flush()
            except OSError as e:
                self.error = e

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    real, sys.stdout = sys.stdout, _Stdout(sys.stdout)
    real_err, sys.stderr = sys.stderr, _Stdout(sys.stderr)  # a closed stderr must not turn an error into a crash
    args = None
    try:
        try:
            with interruptible():  # SIGTERM outside a sweep: the same clean exit as Ctrl-C, the journal released
                args = parser.parse_args(argv)
                code = args.func(args)
        except (SpecError, BackendError, UsageError, DataError) as e:
            print(f"error: {escape(str(e))}", file=sys.stderr)  # one line, whatever a path or file held
            code = 2
        except KeyboardInterrupt:  # outside a sweep (loading, validating): nothing finished to keep
            print("interrupted", file=sys.stderr)
            code = 130
        except Interrupted as e:
            print("interrupted", file=sys.stderr)
            code = e.code
        finally:  # also on SystemExit (--help): argparse prints too
            for journal in getattr(args, "open_journals", ()):
                journal.close()
            if getattr(args, "imported", None) is not None:
                args.imported.close()
            sys.stdout.flush()
            out, sys.stdout = sys.stdout, real
            if out.error is not None and real is not None:
                try:  # what is still buffered would fail again at exit
                    os.dup2(os.open(os.devnull, os.O_WRONLY), real.fileno())
                except (OSError, ValueError):
                    pass
        if out.error is None:
            return code
        if isinstance(out.error, BrokenPipeError):  # `compare.py list | head`: the reader left; say nothing more
            return 141
        print(f"error: could not write to standard output: {out.error}", file=sys.stderr)
        return code or 1
    finally:
        sys.stderr.flush()
        sys.stderr = real_err


if __name__ == "__main__":
    sys.exit(main())
