"""Result rows: the typed record of one finished cell (`run` rows, `train` results), built in one place, and the
checks `report` and --resume make on rows read back from a results file."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from .backends.bench import SECTIONS, check_sections
from .errors import UsageError
from .files import short
from .report import escape

if TYPE_CHECKING:
    from .cell import Task

# The "schema" of a results file. A file without it (written before the key existed) holds version-1 rows.
# 2: a run row may time inference alone (no train_samples_s), which version 1 reads as broken.
SCHEMA_VERSION = 2


class _Absent:
    """A field the row does not have (None is a value: a measurement that could not be made)."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


# --- field checks ----------------------------------------------------------------------------------
def is_number(v) -> bool:
    """A finite JSON number (Python's json reads NaN and 1e400 as floats; runs never write them)."""
    return (isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2 ** 63
            or isinstance(v, float) and math.isfinite(v))


def is_whole(v, least: int) -> bool:
    return is_number(v) and (isinstance(v, int) or v.is_integer()) and v >= least


def _at_least_0(v) -> bool:
    return is_number(v) and v >= 0


def _numbers(v) -> bool:
    return isinstance(v, list) and all(x is None or is_number(x) for x in v)


def echo(value) -> str:
    """A bad value as it reads in the file, cut short (a container is described, never dumped whole)."""
    if isinstance(value, (list, dict)) and len(value) > 8:
        return f"{'an object' if isinstance(value, dict) else 'a list'} of {len(value):,} items"
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError):
        text = repr(value)
    return text[:60] + ("..." if len(text) > 60 else "")


NAME = ("a string", lambda v: isinstance(v, str) and v != "")
TEXT = ("a string", lambda v: isinstance(v, str))
TEXT_OR_NULL = ("a string or null", lambda v: v is None or isinstance(v, str))
COUNT = ("a whole number >= 1", lambda v: is_whole(v, 1))
COUNT_OR_NULL = ("a whole number >= 1 or null", lambda v: v is None or is_whole(v, 1))
SETTING_COUNT = ("a whole number >= 0 or null", lambda v: v is None or is_whole(v, 0))
AMOUNT = ("a number >= 0", _at_least_0)
AMOUNT_OR_NULL = ("a number >= 0 or null", lambda v: v is None or _at_least_0(v))
NUMBER_OR_NULL = ("a number or null", lambda v: v is None or is_number(v))
NUMBERS = ("a list of numbers", _numbers)
FLAG = ("true or false", lambda v: isinstance(v, bool))
OBJECT = ("an object", lambda v: isinstance(v, dict))
OBJECT_OR_NULL = ("an object or null", lambda v: v is None or isinstance(v, dict))


def _sections(v) -> bool:
    try:
        return isinstance(v, list) and bool(check_sections(v))
    except ValueError:
        return False


SECTION_LIST = (f"a list of {', '.join(SECTIONS)} in that order", _sections)


def _field(check: tuple[str, Any] | None = None):
    """A row field, absent until set; `check` is (what it must be, test) for a row read back from a file."""
    return field(default=ABSENT, metadata={"check": check} if check else {})


# --- records ---------------------------------------------------------------------------------------
@dataclass
class _Record:
    """Fields in the order a row is written; keys the schema does not know (a newer cell's) kept in `extra`."""

    NEEDED: ClassVar[tuple[str, ...]] = ()
    RESULTS: ClassVar[tuple[str, ...]] = ()  # a row without an error has at least one of these

    extra: dict = field(default_factory=dict)

    @classmethod
    def checks(cls) -> dict[str, tuple[str, Any]]:
        """{field: (what it must be, test)}: the fields `report` and --resume read; the others are not checked."""
        return {f.name: f.metadata["check"] for f in fields(cls) if "check" in f.metadata}

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]

    @classmethod
    def problem(cls, r) -> str | None:
        """Why `r` (a row read back from a file) is not a usable row of this kind; None when it is."""
        if not isinstance(r, dict):
            return "not an object"
        for key in cls.NEEDED:
            if key not in r:
                return f"no field {key!r}"
        if "error" not in r and not any(k in r for k in cls.RESULTS):
            return f"neither 'error' nor {' nor '.join(map(repr, cls.RESULTS))}"
        checks = cls.checks()
        for key, value in r.items():
            what, ok = checks.get(key, (None, None))
            if what and not ok(value):
                return f"field {escape(key)[:40]!r}: expected {what}, got {echo(value)}"
        return None

    @classmethod
    def from_dict(cls, r: dict):
        """The record of a row read back from a file; a ValueError naming the problem when it is not one."""
        problem = cls.problem(r)
        if problem:
            raise ValueError(problem)
        known = set(cls.names())
        return cls(**{k: v for k, v in r.items() if k in known}, extra={k: v for k, v in r.items() if k not in known})

    def update(self, values: dict) -> None:
        """Set every value of `values`: known fields by name, the rest into `extra`."""
        known = set(self.names())
        for k, v in values.items():
            if k in known:
                setattr(self, k, v)
            else:
                self.extra[k] = v

    def get(self, name: str, default=None):
        value = getattr(self, name, ABSENT) if name in self.names() else self.extra.get(name, ABSENT)
        return default if value is ABSENT else value

    def to_dict(self) -> dict:
        """The row as written: its fields in schema order, then the extra keys."""
        out = {n: v for n in self.names() if (v := getattr(self, n)) is not ABSENT}
        out.update(self.extra)
        return out


@dataclass
class Row(_Record):
    """One `run` cell: its configuration, where and when it ran, what it measured (or its error)."""

    NEEDED: ClassVar[tuple[str, ...]] = ("model", "backend", "device", "batch_size", "threads")
    RESULTS: ClassVar[tuple[str, ...]] = ("train_samples_s", "infer_samples_s", "latency_p50_ms")

    # the configuration
    model: str = _field(NAME)
    backend: str = _field(NAME)
    device: str = _field(NAME)
    batch_size: int = _field(COUNT)
    threads: int = _field(COUNT)
    optimizer: str | None = _field(TEXT_OR_NULL)
    lr: float | None = _field(NUMBER_OR_NULL)
    steps: int | None = _field(SETTING_COUNT)
    repeats: int | None = _field(SETTING_COUNT)
    warmup: int | None = _field(SETTING_COUNT)
    compile: bool = _field(FLAG)
    sections: list = _field(SECTION_LIST)  # what the cell timed; absent (older rows): training and inference
    model_params: int = _field()
    model_flops: int = _field()
    spec_file: str = _field()
    executor: str = _field()
    error: str = _field(TEXT)
    # where and when it ran
    host: str | None = _field(TEXT_OR_NULL)
    cpu_name: str | None = _field(TEXT_OR_NULL)
    cell_start: float = _field()
    cell_end: float = _field()
    # what it measured (backends/bench.py, measure)
    version: str | None = _field(TEXT_OR_NULL)
    device_name: str | None = _field(TEXT_OR_NULL)
    path: str | None = _field(TEXT_OR_NULL)
    import_s: float = _field()
    build_s: float = _field()
    first_step_s: float | None = _field(AMOUNT_OR_NULL)
    train_samples_s: float = _field(AMOUNT)
    train_spread: float | None = _field(AMOUNT_OR_NULL)
    train_runs: list = _field()
    train_repeats: int = _field(COUNT)
    train_steps: int = _field(COUNT)
    train_noisy: bool = _field()
    train_page_faults_per_step: float | None = _field()
    infer_samples_s: float | None = _field(AMOUNT_OR_NULL)
    infer_spread: float | None = _field(AMOUNT_OR_NULL)
    infer_repeats: int = _field()
    infer_steps: int = _field()
    infer_noisy: bool = _field()
    first_infer_s: float | None = _field(AMOUNT_OR_NULL)
    infer_gflops: float | None = _field(AMOUNT_OR_NULL)
    latency_first_call_s: float | None = _field(AMOUNT_OR_NULL)
    latency_p50_ms: float | None = _field(AMOUNT_OR_NULL)  # batch-1 predict, host NumPy in and out
    latency_p99_ms: float | None = _field(AMOUNT_OR_NULL)
    latency_calls: int = _field(COUNT)
    noisy: bool = _field()
    data: str = _field()
    settings: dict = _field(OBJECT)
    train_gflops: float | None = _field(AMOUNT_OR_NULL)
    host_rss_mb: float | None = _field(AMOUNT_OR_NULL)
    device_mem_mb: float | None = _field(AMOUNT_OR_NULL)
    loss: float | None = _field(NUMBER_OR_NULL)
    loss_after_steps: int = _field()
    cell_in_process: int = _field()
    node_id: str = _field()  # the Ray node it ran on (Ray executor only)
    node_ip: str = _field()
    # the driver's
    gemm_peak_gflops: float | None = _field(AMOUNT_OR_NULL)
    peak: dict | None = _field(OBJECT_OR_NULL)  # backends.bench.gemm_peak: the library that gave it, the others
    peak_pct: float | None = _field(AMOUNT_OR_NULL)
    infer_peak_pct: float | None = _field(AMOUNT_OR_NULL)
    cell: str = _field()
    vs_baseline: float = _field()
    source: str | None = _field(TEXT_OR_NULL)  # the file a row merged by `report` came from

    @classmethod
    def problem(cls, r) -> str | None:
        problem = super().problem(r)
        if problem or "error" in r:
            return problem
        if is_number(r.get("latency_p50_ms")) and is_number(r.get("latency_p99_ms")) \
                and r["latency_p99_ms"] < r["latency_p50_ms"]:
            return "its latency_p99_ms is below its latency_p50_ms"
        return None

    @classmethod
    def measured(cls, task: Task, result: dict, params: int, flops: int, spec_file: str | None, executor: str,
                 peaks: dict[tuple[str, str], dict | float | None]) -> "Row":
        """The row of a finished "measure" task: its settings, then the cell's result, then the device's peak (a
        gemm_peak record, or its GFLOP/s alone) and the share of it each throughput reached."""
        row = cls(model=task.model_name, backend=task.backend, device=task.device, batch_size=task.batch_size,
                  threads=task.threads, optimizer=task.optimizer["type"], lr=task.optimizer["args"]["lr"],
                  steps=task.steps, repeats=task.repeats, warmup=task.warmup, compile=task.compile,
                  sections=list(task.sections), model_params=params, model_flops=flops,
                  spec_file=spec_file or ABSENT, executor=executor)
        row.update({k: v for k, v in result.items() if k != "bad_input"})
        found = peaks.get((row.get("node_id") or row.get("host"), task.device))
        if isinstance(found, dict):
            row.peak = found
            found = found.get("gflops")
        row.gemm_peak_gflops = peak = found
        if row.get("train_gflops") and peak:
            row.peak_pct = 100 * row.train_gflops / peak
        if row.get("infer_gflops") and peak:
            row.infer_peak_pct = 100 * row.infer_gflops / peak
        return row


_CURVES = ("train_loss", "test_loss", "test_accuracy", "epoch_s")


@dataclass
class TrainRow(_Record):
    """One `train` cell: its configuration, where and when it ran, its per-epoch curves (or its error)."""

    NEEDED: ClassVar[tuple[str, ...]] = ("backend", "device")
    RESULTS: ClassVar[tuple[str, ...]] = ("train_loss",)

    model: str = _field(NAME)
    dataset: str = _field()
    backend: str = _field(NAME)
    device: str = _field(NAME)
    epochs: int = _field(COUNT)
    batch_size: int = _field(COUNT)
    optimizer: str | None = _field(TEXT_OR_NULL)
    lr: float | None = _field(NUMBER_OR_NULL)
    threads: int = _field(COUNT)
    dropout: bool = _field()
    executor: str = _field()
    error: str = _field(TEXT)
    host: str = _field()
    cpu_name: str = _field()
    cell_start: float = _field()
    cell_end: float = _field()
    # what it measured (backends/bench.py, train_run)
    version: str | None = _field(TEXT_OR_NULL)
    device_name: str | None = _field(TEXT_OR_NULL)
    path: str | None = _field(TEXT_OR_NULL)
    train_loss: list = _field(NUMBERS)
    test_loss: list = _field(NUMBERS)
    test_accuracy: list = _field(NUMBERS)
    epoch_s: list = _field(NUMBERS)
    time_to_target_s: float | None = _field(NUMBER_OR_NULL)
    epochs_to_target: int | None = _field(COUNT_OR_NULL)
    train_s: float = _field(AMOUNT)
    final_accuracy: float | None = _field(NUMBER_OR_NULL)
    node_id: str = _field()  # the Ray node it ran on (Ray executor only)
    node_ip: str = _field()
    cell: str = _field()

    @classmethod
    def problem(cls, r) -> str | None:
        problem = super().problem(r)
        if problem or "error" in r:
            return problem
        for key in (*_CURVES, "train_s"):
            if key not in r:
                return f"no field {key!r}"
        if len({len(r[k]) for k in _CURVES}) > 1 or not r["train_loss"]:
            return "its per-epoch lists are empty or of different lengths"
        return None

    @classmethod
    def trained(cls, task: Task, result: dict, dropout: bool, executor: str) -> "TrainRow":
        """The row of a finished "train" task: its settings, then the cell's result."""
        row = cls(model=task.model_name, dataset=task.dataset, backend=task.backend, device=task.device,
                  epochs=task.epochs, batch_size=task.batch_size, optimizer=task.optimizer["type"],
                  lr=task.optimizer["args"]["lr"], threads=task.threads, dropout=dropout, executor=executor)
        row.update({k: v for k, v in result.items() if k != "bad_input"})
        return row


# --- results files ---------------------------------------------------------------------------------
def results_payload(rows_key: str, rows: list[dict], **about) -> dict:
    """A results file's JSON object: its schema version, what the run was, then its rows."""
    return {"schema": SCHEMA_VERSION, **about, rows_key: rows}


def check_schema(payload: dict, path: str) -> None:
    """Refuse a results file whose schema this version cannot read (a file without one holds version 1)."""
    version = payload.get("schema", 1)
    if not is_whole(version, 1) or version > SCHEMA_VERSION:
        raise UsageError(f"{short(path)}: schema {echo(version)} is not one this nncompare reads (1 to "
                         f"{SCHEMA_VERSION}): it was written by a later version")
