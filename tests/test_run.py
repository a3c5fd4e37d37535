"""compare.py run/check: option parsing, bad input before any work, cell isolation, atomic result files.

No timing assertions: speed is measured by compare.py and benchmarks/, not by tests.
"""
import json
import re
import sys

import pytest

from nncompare import cell, cli as compare, files, report, runner

from .conftest import compare as cli, require

# the fast lane (-m 'not slow') leaves out this file's real processes and clusters
pytestmark = pytest.mark.slow

FAST = ["--steps", "1", "--repeats", "1", "--warmup", "0", "--quiet", "--backends", "numpy"]


def test_parser_defaults_are_the_documented_comparison():
    args = compare.build_parser().parse_args(["run"])
    assert args.models == ["mlp", "lenet5"] and args.batch_sizes == [64]
    assert args.steps > 0 and args.repeats >= 3 and args.optimizer == "sgd" and args.baseline == "torch"
    args = compare.build_parser().parse_args(
        ["run", "--models", "lenet5", "x.json", "--batch-sizes", "32", "128", "--optimizer", "adam",
         "--threads", "1", "--json", "r.json", "--csv", "r.csv", "--quiet"])
    assert args.models == ["lenet5", "x.json"] and args.batch_sizes == [32, 128]
    assert args.optimizer == "adam" and args.threads == [1] and args.json == "r.json" and args.quiet


@pytest.mark.parametrize("args,message", [
    (["run", "--models", "resnet9000"], "unknown model 'resnet9000'"),
    (["run", "--backends", "jax"], "unknown backend 'jax'"),
    (["run", "--devices", "tpu"], "unknown device 'tpu'"),
    (["run", "--devices", "gpu:3"], "device 'gpu:3' is not available on this machine (devices: cpu"),
    (["run", "--json", "/nonexistent/dir/r.json"], "cannot write '/nonexistent/dir/r.json'"),
    (["run", "--baseline", "caffe"], "unknown baseline 'caffe'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    out = cli(*args, timeout=60)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("option,value", [("--batch-sizes", "0"), ("--steps", "-1"), ("--repeats", "x")])
def test_non_positive_counts_are_rejected_with_exit_2(option, value):
    out = cli("run", option, value, timeout=60)
    assert out.returncode == 2 and "must be a positive integer" in out.stderr


def test_cells_write_json_and_csv_atomically(tmp_path):
    out = cli("run", "--models", "perceptron", "digits_mlp", *FAST, "--json", str(tmp_path / "r.json"),
              "--csv", str(tmp_path / "r.csv"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["model"], r["backend"]) for r in rows] == [("perceptron", "numpy"), ("digits_mlp", "numpy")]
    for r in rows:
        assert "error" not in r and r["train_samples_s"] > 0 and r["infer_samples_s"] > 0
        assert r["threads"] >= 1 and r["path"] == "float64 reference" and r["loss"] > 0
    csv_lines = (tmp_path / "r.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and "train_samples_s" in csv_lines[0]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left
    assert "digits_mlp" in out.stdout and "Train samples/s" in out.stdout


def started_cells(log) -> dict[str, int]:
    """model -> pid of the process that ran its cell, from NNCOMPARE_CELL_LOG."""
    return {line.split()[1]: int(line.split()[-1]) for line in log.read_text().splitlines()
            if line.startswith("measure ")}


@pytest.mark.parametrize("fault", ["crash", "hang"])
def test_a_crashing_or_hanging_cell_keeps_every_other_row(tmp_path, fault):
    path, log = tmp_path / "r.json", tmp_path / "cells.log"
    out = cli("run", "--models", "perceptron", "digits_mlp", "residual_mlp", *FAST, "--timeout", "20",
              "--json", str(path), env={"NNCOMPARE_FAULT": f"numpy:digits_mlp:{fault}", "NNCOMPARE_CELL_LOG": str(log)})
    assert out.returncode == 0, out.stderr
    rows = {r["model"]: r for r in json.loads(path.read_text())["rows"]}
    assert "signal" in rows["digits_mlp"]["error"] if fault == "crash" else "timed out" in rows["digits_mlp"]["error"]
    for model in ("perceptron", "residual_mlp"):  # the cells before and after it, in the same framework
        assert "error" not in rows[model] and rows[model]["train_samples_s"] > 0
    pids = started_cells(log)
    # the framework's process ran the cells up to the failure; the rest went on in a fresh one
    assert pids["perceptron"] == pids["digits_mlp"] != pids["residual_mlp"]
    assert rows["perceptron"]["cell_in_process"] == 0 and rows["residual_mlp"]["cell_in_process"] == 0
    assert "ERROR" in out.stdout


def test_a_frameworks_cpu_timing_cells_share_one_process_and_say_so(tmp_path):
    path, log = tmp_path / "r.json", tmp_path / "cells.log"
    out = cli("run", "--models", "perceptron", "digits_mlp", *FAST, "--batch-sizes", "8", "16", "--json", str(path),
              env={"NNCOMPARE_CELL_LOG": str(log)})
    assert out.returncode == 0, out.stderr
    rows = json.loads(path.read_text())["rows"]
    assert [(r["model"], r["batch_size"], r["cell_in_process"]) for r in rows] == [
        ("perceptron", 8, 0), ("perceptron", 16, 1), ("digits_mlp", 8, 2), ("digits_mlp", 16, 3)]
    assert len(set(started_cells(log).values())) == 1
    assert rows[0]["host_rss_mb"] > 0 and all(r["cell_end"] >= r["cell_start"] for r in rows)
    # a later cell's peak is its own where the kernel can reset it (tested below), else not reported
    assert all(r["host_rss_mb"] is None or r["host_rss_mb"] > 0 for r in rows)
    assert [r["cell_start"] for r in rows] == sorted(r["cell_start"] for r in rows)


def test_process_groups_share_only_cpu_timing_cells_of_one_framework_and_thread_count():
    def task(backend, device="cpu", threads=2, kind="measure", compile=False):
        return cell.Task(kind, device=device, threads=threads, backend=backend, compile=compile)
    tasks = [task("torch"), task("mxnet"), task("torch", threads=1), task("torch"), task("torch", device="gpu:0"),
             task("torch", device="gpu:0"), task("torch", kind="check"), task("torch", kind="check"),
             task("mxnet"), task("torch", compile=True)]
    assert runner.process_groups(tasks) == [[0, 3], [1, 8], [2], [4], [5], [6], [7], [9]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak memory is reset through /proc (Linux)")
def test_peak_memory_restarts_for_each_cell_of_a_shared_process():
    import numpy as np
    import resource
    if not cell._reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak memory (/proc/self/clear_refs)")
    block = np.ones(300 * 2**20 // 8)  # 300 MB touched
    del block
    high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert cell._reset_peak_rss()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < high - 200 * 1024  # KiB


def test_write_atomic_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        files.write_atomic(str(path), Boom())
    assert path.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_ratios_divide_by_the_baseline_of_the_same_cell():
    rows = [{"model": "m", "device": "cpu", "batch_size": 8, "backend": "torch", "train_samples_s": 100.0},
            {"model": "m", "device": "cpu", "batch_size": 8, "backend": "keras", "train_samples_s": 50.0},
            {"model": "m", "device": "cpu", "batch_size": 16, "backend": "keras", "train_samples_s": 80.0}]
    report.add_ratios(rows, "torch")
    assert rows[0]["vs_baseline"] == 1.0 and rows[1]["vs_baseline"] == 0.5 and "vs_baseline" not in rows[2]


def test_compiled_rows_are_compared_with_their_eager_twin_and_a_slower_compiler_is_named():
    base = {"model": "m", "device": "cpu", "batch_size": 8, "threads": 2}
    rows = [{**base, "backend": "torch", "compile": False, "path": "eager", "train_samples_s": 100.0},
            {**base, "backend": "torch", "compile": True, "path": "torch.compile", "train_samples_s": 80.0},
            {**base, "backend": "keras", "compile": False, "path": "tf.function graph", "train_samples_s": 50.0},
            {**base, "backend": "keras", "compile": True, "path": "tf.function + XLA", "train_samples_s": 75.0},
            {**base, "backend": "mxnet", "compile": False, "path": "hybridized", "train_samples_s": 70.0}]
    notes = report.compile_notes(rows)
    assert notes == ["torch.compile is SLOWER than eager for m torch cpu batch 8: 80 vs 100 training samples/s (x0.80)",
                     "tf.function + XLA beats tf.function graph for m keras cpu batch 8: 75 vs 50 training samples/s "
                     "(x1.50)"]
    report.add_ratios(rows, "torch")  # compiled rows divide by compiled torch, eager by eager
    assert [r.get("vs_baseline") for r in rows] == [1.0, 1.0, 0.5, 75 / 80, 0.7]


def test_run_compile_times_the_compiled_path_beside_eager(tmp_path):
    require("torch")
    path = tmp_path / "r.json"
    out = cli("run", "--models", "perceptron", "--steps", "1", "--repeats", "1", "--warmup", "0", "--quiet",
              "--backends", "torch", "numpy", "--compile", "--json", str(path), timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = json.loads(path.read_text())["rows"]
    assert [(r["backend"], r["compile"]) for r in rows] == [("torch", False), ("torch", True), ("numpy", False)]
    assert [r["path"] for r in rows[:2]] == ["eager", "torch.compile"] and "error" not in rows[1], rows[1]
    assert re.search(r"note: torch.compile (is SLOWER than|beats) eager for perceptron torch cpu batch 64", out.stdout)
    assert "numpy: no compiler apart from the default path" in out.stdout


@pytest.mark.parametrize("backend", ["torch"])
def test_check_prints_the_report_and_exits_0_when_equivalent(backend):
    require(backend)
    out = cli("check", "digits_cnn", "--backends", backend)
    assert out.returncode == 0, out.stdout + out.stderr
    assert backend in out.stdout and "ok" in out.stdout and "Adam weights" in out.stdout


def test_check_says_what_it_did_not_check_when_the_model_has_dropout(tmp_path):
    require("torch")
    from nncompare.models import Dense, Dropout, ModelSpec
    spec = tmp_path / "drop.json"
    ModelSpec("drop", (6,), (Dense(5, activation="relu"), Dropout(0.4), Dense(3))).save(spec)
    out = cli("check", str(spec), "--backends", "torch")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "not checked here: training-mode dropout (dropout_1)" in out.stdout
    assert "not checked here" not in cli("check", "digits_mlp", "--backends", "torch").stdout


def test_check_of_the_compiled_paths_agrees_with_the_oracle():
    for backend in ("torch", "keras"):
        require(backend)
    out = cli("check", "digits_mlp", "--backends", "torch", "keras", "--compile")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(" ok") == 2


def test_check_runs_each_framework_in_its_own_quiet_cell(tmp_path):
    for backend in ("torch", "keras"):
        require(backend)
    log = tmp_path / "cells.log"
    out = cli("check", "digits_mlp", "--backends", "keras", "torch", env={"NNCOMPARE_CELL_LOG": str(log)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert [l.split()[:3] for l in log.read_text().splitlines()] == [
        ["check", "digits_mlp", "keras"], ["check", "digits_mlp", "torch"]]
    assert out.stderr == ""  # TensorFlow's start-up lines stay in the cell (shown with --verbose)
    assert out.stdout.count(" ok") == 2


def test_a_crashing_check_cell_is_a_failed_row():
    out = cli("check", "digits_mlp", "--backends", "numpy", env={"NNCOMPARE_FAULT": "numpy:digits_mlp:crash"})
    assert out.returncode == 1 and "ERROR: killed by signal" in out.stdout and "Traceback" not in out.stderr


def test_several_thread_counts_give_a_scaling_table_and_line_chart(tmp_path):
    out = cli("run", "--models", "perceptron", *FAST, "--threads", "1", "2", "--json", str(tmp_path / "r.json"),
              "--plot", str(tmp_path / "scaling.svg"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["threads"] for r in rows] == [1, 2] and all("error" not in r for r in rows)
    assert "Training samples/s by thread count" in out.stdout and "2 threads" in out.stdout
    assert "<svg" in (tmp_path / "scaling.svg").read_text()
