"""Inference and batch-1 latency in `run`, the sections a cell times, and the machine's GEMM peak: which library
gives it and how close it comes to the CPU's theoretical FMA peak. Fake clocks and tiny specs on the numpy backend;
the runs through compare.py are marked slow. No timing assertions."""
import json
import os
from types import SimpleNamespace

import pytest

from nncompare import cli, report, rows
from nncompare.backends import SGD, bench, get_adapter
from nncompare.cell import Task
from nncompare.models import zoo

from .conftest import compare

TRAINING = ("train_samples_s", "train_spread", "train_runs", "train_repeats", "train_steps", "train_noisy",
            "train_page_faults_per_step", "train_gflops", "first_step_s", "loss", "loss_after_steps", "data")
LATENCY = ("latency_p50_ms", "latency_p99_ms", "latency_calls", "latency_first_call_s")


# --- sections --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sections", [[], ["latency", "infer"], ["train", "train"], "train", ["predict"], [1], None])
def test_sections_must_be_a_nonempty_ordered_subset_without_repeats(sections):
    with pytest.raises(ValueError, match="sections must be a non-empty list of train, infer, latency in that order"):
        Task("measure", sections=sections)
    with pytest.raises(ValueError, match="sections must be"):
        bench.check_sections(sections)


def test_sections_travel_as_a_list_and_define_the_cell():
    task = Task("measure", sections=["infer", "latency"])
    assert task.sections == ("infer", "latency")
    assert json.loads(task.to_json())["sections"] == ["infer", "latency"]
    assert Task.from_json(task.to_json()) == task
    assert Task("measure").sections == bench.SECTIONS == ("train", "infer", "latency")
    keys = {Task("measure", sections=s).key for s in (["train", "infer", "latency"], ["infer", "latency"], ["infer"])}
    assert len(keys) == 3  # --resume never takes an inference-only row for a full one


def test_latency_is_timed_once_per_model_backend_and_device_in_the_smallest_batch():
    def sections(*argv, backends=("numpy", "onnxruntime")):
        args = cli.build_parser().parse_args(["run", *argv])
        plan = SimpleNamespace(batch_sizes=[64, 8, 32])
        tasks = [Task("measure", backend=b, batch_size=bs) for b in backends for bs in plan.batch_sizes]
        return {(t.backend, t.batch_size): t.sections for t in cli.timed_sections(args, plan, tasks)}
    full = sections()
    assert full[("numpy", 8)] == ("train", "infer", "latency")
    assert full[("numpy", 64)] == full[("numpy", 32)] == ("train", "infer")
    # an engine that does not train gets inference rows without --inference-only
    assert full[("onnxruntime", 8)] == ("infer", "latency") and full[("onnxruntime", 64)] == ("infer",)
    only = sections("--inference-only")
    assert only[("numpy", 8)] == ("infer", "latency") and only[("numpy", 32)] == ("infer",)


# --- the cell --------------------------------------------------------------------------------------
def test_an_inference_only_cell_takes_no_step_sets_no_optimizer_and_times_latency(monkeypatch):
    cls = get_adapter("numpy")

    def refuse(*a, **k):
        raise AssertionError("an inference-only cell trained or set an optimizer")
    for method in ("set_optimizer", "train_batch", "train_step", "loss_and_grads"):
        monkeypatch.setattr(cls, method, refuse)
    result = bench.measure("numpy", zoo.get("perceptron"), "cpu", 4, steps=1, repeats=1, warmup=0,
                           optimizer=SGD(), threads=1, budget_s=0, sections=("infer", "latency"))
    assert not [k for k in TRAINING if k in result]
    assert result["infer_samples_s"] > 0 and result["first_infer_s"] > 0 and result["infer_gflops"] > 0
    assert result["latency_calls"] >= bench.LATENCY_MIN_CALLS == 200
    assert 0 < result["latency_p50_ms"] <= result["latency_p99_ms"]
    assert result["settings"]["infer_data"] == "host" and "data" not in result["settings"]


def test_a_cell_times_only_the_sections_it_is_given():
    def cell(*sections):
        return bench.measure("numpy", zoo.get("perceptron"), "cpu", 4, steps=1, repeats=1, warmup=1,
                             optimizer=SGD(), threads=1, budget_s=0, sections=sections)
    every = cell("train", "infer", "latency")
    assert all(k in every for k in TRAINING + LATENCY) and every["infer_samples_s"] > 0
    train = cell("train")
    assert all(k in train for k in TRAINING) and not [k for k in LATENCY + ("infer_samples_s",) if k in train]
    latency = cell("latency")
    assert all(k in latency for k in LATENCY) and not [k for k in TRAINING + ("infer_samples_s",) if k in latency]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_latency_is_the_median_and_99th_percentile_of_single_calls():
    clock = FakeClock()
    seconds = [0.001] * 195 + [0.002, 0.003, 0.004, 0.005, 0.1]  # a tail: 5 slow calls of 200

    def call(i):
        clock.now += seconds[i % len(seconds)]
    r = bench.timed_calls(call, budget_s=0, clock=clock)
    assert r["calls"] == 200 and r["p50_s"] == pytest.approx(0.001)
    assert r["p99_s"] == pytest.approx(0.004)  # nearest rank: the 198th of 200, a call that happened
    assert r["p99_s"] >= r["p50_s"]
    more = bench.timed_calls(call, budget_s=1.0, clock=clock)  # calls go on while the budget lasts
    assert 500 < more["calls"] < 1000


def test_under_turns_a_latency_turn_is_a_block_of_calls_answered_at_its_median(monkeypatch):
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    monkeypatch.setattr(bench, "_TURNS", None)
    monkeypatch.setenv(bench.TURNS_VARIABLE, f"{go_r},{done_w}")
    os.write(go_w, b"xxx")
    os.close(go_w)  # three turns, then the driver has its blocks
    clock = FakeClock()

    def call(i):
        clock.now += 0.004 if i % 3 else 0.001  # median 4 ms, whatever the block's length
    r = bench.timed_calls(call, budget_s=0, clock=clock)
    answers = os.read(done_r, 1000).decode().split()
    assert answers[0] == "ready" and len(answers) == 4
    assert [float(a) for a in answers[1:]] == pytest.approx([250.0] * 3)  # 1 / 4 ms: calls/s at the median
    assert r["calls"] >= 3 * 13  # each block lasted at least MIN_REPEAT_S (50 ms)
    assert bench.Turns.from_env() is None  # the turns are over for the rest of the process
    os.close(go_r), os.close(done_r), os.close(done_w)


# --- the peak --------------------------------------------------------------------------------------
def test_the_peak_is_the_fastest_library_and_records_every_candidate():
    clock = FakeClock()

    def library(version, seconds):
        def setup(n, gpu, threads):
            def run():
                clock.now += seconds
            return version, run
        return setup

    def broken(n, gpu, threads):
        raise RuntimeError("no BLAS")

    def skipped(n, gpu, threads):
        raise bench.Skipped("cannot set its threads")
    peak = bench.gemm_peak("cpu", threads=2, n=1000, pause_s=0, clock=clock, libraries={
        "numpy": library("numpy 2.4.6", 2.0), "torch": library("torch 2.13.0", 0.5), "broken": broken,
        "jax": skipped, "slow": library("slow 0.1", 4.0)})
    assert peak["library"] == "torch 2.13.0" and peak["gflops"] == pytest.approx(4.0)  # 2 n^3 / 0.5 s
    assert peak["candidates"]["numpy 2.4.6"] == pytest.approx(1.0)
    assert peak["candidates"]["slow 0.1"] == pytest.approx(0.5)
    assert peak["candidates"]["broken"] == "failed: RuntimeError: no BLAS"
    assert peak["candidates"]["jax"] == "not timed: cannot set its threads"
    assert peak["device"] == "cpu" and peak["n"] == 1000 and peak["threads"] == 2 and "theoretical" in peak
    assert bench.best_candidate({"a": "failed", "b": float("nan")}) == (None, None)


def test_the_peak_libraries_can_be_chosen_and_a_bad_choice_is_refused_before_any_work(monkeypatch):
    monkeypatch.setenv("NNCOMPARE_PEAK_LIBRARIES", " torch, numpy ")
    assert bench.peak_libraries() == ["torch", "numpy"]
    monkeypatch.delenv("NNCOMPARE_PEAK_LIBRARIES")
    assert bench.peak_libraries() == ["numpy", "torch", "jax", "tensorflow"]
    out = compare("run", "--models", "perceptron", "--backends", "numpy",
                  env={"NNCOMPARE_PEAK_LIBRARIES": "numpy,blas"}, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "NNCOMPARE_PEAK_LIBRARIES must name some of numpy, torch, jax, tensorflow, got 'numpy,blas'" in out.stderr


INTEL = "\n\n".join(f"processor\t: {i}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nphysical id\t: 0\n"
                    f"core id\t\t: {i % 4}\ncpu MHz\t\t: 2000.000\nflags\t\t: fpu sse avx fma avx2 avx512f"
                    for i in range(8))  # 4 cores, 2 hyperthreads each


def test_the_theoretical_fma_peak_counts_cores_units_lanes_and_clock():
    t = bench.cpu_fma_peak(threads=8, cpuinfo=INTEL, max_khz="0")
    assert (t["cores"], t["fma_units"], t["lanes"], t["ghz"]) == (4, 2, 16, 2.0)  # hyperthreads share a core's units
    assert t["gflops"] == pytest.approx(4 * 2 * 16 * 2 * 2.0) and "2 FMA units per core" in t["assumed"]
    assert bench.cpu_fma_peak(threads=1, cpuinfo=INTEL, max_khz="0")["gflops"] == pytest.approx(128.0)
    boost = bench.cpu_fma_peak(threads=8, cpuinfo=INTEL, max_khz="3500000")
    assert boost["ghz"] == 3.5 and "cpuinfo_max_freq" in boost["clock"]
    zen4 = INTEL.replace("GenuineIntel", "AuthenticAMD").replace("cpu family\t: 6", "cpu family\t: 25")
    assert bench.cpu_fma_peak(threads=8, cpuinfo=zen4, max_khz="0")["lanes"] == 8  # 512-bit FMAs on 256-bit units
    assert bench.cpu_fma_peak(cpuinfo=INTEL.replace("cpu MHz", "bogomips"), max_khz="0") is None  # no clock
    assert bench.cpu_fma_peak(cpuinfo="processor\t: 0\nFeatures\t: neon\ncpu MHz\t: 2000", max_khz="0") is None


# --- rows and the report ---------------------------------------------------------------------------
PEAK = {"gflops": 200.0, "library": "torch 2.13.0", "device": "cpu", "n": 2048, "threads": 2,
        "candidates": {"numpy 1.26.4": 190.0, "torch 2.13.0": 200.0, "jax": "not timed: x"},
        "theoretical": {"gflops": 166.0, "cores": 2, "fma_units": 2, "lanes": 8, "ghz": 2.6, "clock": "cpu MHz",
                        "assumed": "2 FMA units per core"}}
SETTINGS = {"model": "mlp", "device": "cpu", "threads": 2, "optimizer": "sgd", "lr": 0.01, "steps": 10,
            "repeats": 3, "warmup": 2, "compile": False, "host": "vm", "cpu_name": "Some CPU"}


def run_row(backend, batch, sections, **values):
    return {"backend": backend, "batch_size": batch, **SETTINGS, "sections": list(sections),
            "version": f"{backend} 1.0", "path": "eager", **values}


def test_a_measured_row_records_the_peak_its_library_and_both_shares():
    task = Task("measure", backend="numpy", model_name="mlp", batch_size=8, sections=("infer", "latency"),
                optimizer={"type": "sgd", "args": {"lr": 0.01, "momentum": 0.9}})
    result = {"host": "vm", "infer_samples_s": 1000.0, "infer_gflops": 20.0, "latency_p50_ms": 0.1,
              "latency_p99_ms": 0.3, "latency_calls": 250}
    row = rows.Row.measured(task, result, 3, 9, None, "local", {("vm", "cpu"): PEAK}).to_dict()
    assert row["sections"] == ["infer", "latency"] and row["peak"] == PEAK and row["gemm_peak_gflops"] == 200.0
    assert row["infer_peak_pct"] == pytest.approx(10.0) and "peak_pct" not in row and "train_samples_s" not in row
    assert rows.Row.problem(row) is None  # an inference-only row is a whole row
    assert rows.Row.problem({**row, "latency_p99_ms": 0.05}) == "its latency_p99_ms is below its latency_p50_ms"
    assert "'sections'" in rows.Row.problem({**row, "sections": ["latency", "infer"]})
    assert "'peak'" in rows.Row.problem({**row, "peak": 3})
    bare = {k: v for k, v in row.items() if k not in ("infer_samples_s", "latency_p50_ms")}
    assert rows.Row.problem(bare).startswith("neither 'error' nor 'train_samples_s'")


def test_the_tables_show_inference_per_batch_latency_and_who_does_not_train():
    table_rows = [
        run_row("torch", 8, ("train", "infer", "latency"), train_samples_s=900.0, infer_samples_s=5000.0,
                infer_spread=0.02, latency_p50_ms=0.0412, latency_p99_ms=0.25, latency_calls=4321, peak=PEAK),
        run_row("torch", 64, ("train", "infer"), train_samples_s=2000.0, infer_samples_s=30000.0),
        run_row("onnxruntime", 8, ("infer", "latency"), infer_samples_s=9000.0, latency_p50_ms=0.02,
                latency_p99_ms=0.031, latency_calls=5000),
        run_row("onnxruntime", 64, ("infer",), infer_samples_s=60000.0),
        run_row("keras", 8, ("infer", "latency"), infer_samples_s=700.0, latency_p50_ms=1.5, latency_p99_ms=150.0,
                latency_calls=200)]
    training = report.render_table(table_rows, "torch").splitlines()
    (ort,) = [l for l in training if "onnxruntime" in l and " 8 " in l]
    assert "does not train" in ort
    assert not [l for l in training if "keras" in l]  # an inference-only cell of a framework that trains
    inference = report.render_inference(table_rows).splitlines()
    assert inference[0].startswith("Inference") and "Batch 8 samples/s" in inference[1]
    assert "Batch 64 samples/s" in inference[1] and "Batch 1 p50 ms" in inference[1]
    (torch,) = [l for l in inference if " torch 1.0 " in l]
    assert "5,000 ±2%" in torch and "30,000" in torch and " 0.0412 " in torch and " 0.25 " in torch
    assert "4,321" in torch
    (keras,) = [l for l in inference if " keras 1.0 " in l]
    assert " 150 " in keras and keras.split()[-1] == "200"
    note = report.inference_note(table_rows)
    assert "batch-1 latency: 200-5,000 single calls" in note and "batch-8 cell" in note
    assert "onnxruntime: inference only (does not train)" in note and "--inference-only" in note
    line = report.peak_line("cpu", PEAK)
    assert line.startswith("cpu GEMM peak 200 GFLOP/s: torch 2.13.0, fp32 2048x2048")
    assert "numpy 1.26.4 190" in line and "jax not timed: x" in line
    assert "Theoretical fp32 FMA peak 166 GFLOP/s = 2 cores x 2 FMA units x 8 lanes x 2 x 2.60 GHz" in line
    assert "measured 120 % of it" in line
    hostile = {**PEAK, "library": "\x1b[2J", "candidates": {"a": [1]}, "theoretical": {"gflops": "x"}}
    assert "\x1b" not in report.peak_line("cpu", hostile) and report.peak_line("cpu", {"gflops": None}) == ""


def test_old_results_files_still_load(tmp_path):
    old = {"model": "mlp", "backend": "torch", "device": "cpu", "batch_size": 64, "threads": 2,
           "train_samples_s": 900.0, "train_spread": 0.01, "infer_samples_s": 2000.0, "gemm_peak_gflops": 60.0,
           "peak_pct": 1.5, "loss": 0.5, "version": "torch 2.0", "path": "eager"}  # schema 1: no sections, no peak
    assert rows.Row.problem(old) is None
    for schema in (None, 1, 2):
        payload = {"host": "h", "rows": [old], **({"schema": schema} if schema else {})}
        path = tmp_path / f"r{schema}.json"
        path.write_text(json.dumps(payload))
        assert cli.load_results(str(path))["rows"] == [old]
    table = report.render_inference([old])
    assert "2,000" in table and table.splitlines()[-1].split()[-3:] == ["-", "-", "-"]  # no latency then


@pytest.mark.slow
def test_run_inference_only_writes_latency_rows_that_report_reads_back(tmp_path):
    path = tmp_path / "r.json"
    out = compare("run", "--models", "perceptron", "--backends", "numpy", "--batch-sizes", "16", "4",
                  "--inference-only", "--steps", "1", "--repeats", "1", "--warmup", "0", "--threads", "1",
                  "--quiet", "--json", str(path), env={"NNCOMPARE_PEAK_LIBRARIES": "numpy,torch"}, timeout=180)
    assert out.returncode == 0, out.stderr
    payload = json.loads(path.read_text())
    assert payload["schema"] == rows.SCHEMA_VERSION == 2
    (peak,) = payload["peaks"]
    assert peak["host"] and peak["gflops"] > 0 and peak["candidates"][peak["library"]] == peak["gflops"]
    assert [k.split()[0] for k in peak["candidates"]] == ["numpy", "torch"][:len(peak["candidates"])]
    by_batch = {r["batch_size"]: r for r in payload["rows"]}
    assert by_batch[4]["sections"] == ["infer", "latency"] and by_batch[16]["sections"] == ["infer"]
    for r in by_batch.values():
        assert not [k for k in TRAINING if k in r] and r["infer_samples_s"] > 0 and r["peak"]["library"]
    assert 0 < by_batch[4]["latency_p50_ms"] <= by_batch[4]["latency_p99_ms"]
    assert by_batch[4]["latency_calls"] >= 200 and "latency_p50_ms" not in by_batch[16]
    assert "Train samples/s" not in out.stdout and "Batch 1 p50 ms" in out.stdout
    assert "GEMM peak" in out.stdout and "batch-1 latency" in out.stdout
    shown = compare("report", str(path), timeout=120)
    assert shown.returncode == 0 and "Batch 1 p50 ms" in shown.stdout and "GEMM peak" in shown.stdout, shown.stderr
