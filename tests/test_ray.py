"""The Ray executor on a local 2-CPU Ray cluster (one per module: Ray starts slowly): the same rows as the local
executor, crash and hang rows as locally, timing cells never overlapping on a node, a clear error without Ray."""
import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT, require

# the fast lane (-m 'not slow') leaves out this file's real processes and clusters
pytestmark = pytest.mark.slow

FAST = ["--steps", "1", "--repeats", "1", "--warmup", "0", "--quiet", "--threads", "1"]
NODE = {"node_id", "node_ip"}  # what a Ray row adds: the node it ran on


@pytest.fixture(scope="module")
def address():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'nncompare[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def run(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "compare.py", "run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def test_a_ray_sweep_gives_the_rows_of_the_local_executor(tmp_path, address):
    require("torch")
    sweep = ["--models", "perceptron", "digits_mlp", "--backends", "numpy", "torch", "--batch-sizes", "8", "16",
             *FAST]
    exact = {"NNCOMPARE_TIME_BUDGET": "0"}  # exactly the minimum steps: the final loss is reproducible
    local = run(*sweep, "--json", str(tmp_path / "local.json"), env=exact)
    assert local.returncode == 0, local.stderr
    remote = run(*sweep, "--executor", "ray", "--address", address, "--json", str(tmp_path / "ray.json"), env=exact)
    assert remote.returncode == 0, remote.stderr
    assert "Traceback" not in remote.stderr
    rows = {name: json.loads((tmp_path / f"{name}.json").read_text())["rows"] for name in ("local", "ray")}
    assert len(rows["ray"]) == len(rows["local"]) == 8
    for a, b in zip(rows["local"], rows["ray"]):
        assert a.keys() | NODE == b.keys() and "error" not in b
        assert (a["model"], a["backend"], a["batch_size"]) == (b["model"], b["backend"], b["batch_size"])
        assert f"{a['loss']:.6f}" == f"{b['loss']:.6f}", (a["model"], a["backend"], a["batch_size"])
        assert (a["executor"], b["executor"]) == ("local", "ray")
        assert b["host"] and b["cpu_name"] and b["gemm_peak_gflops"] > 0
    spans = sorted((r["cell_start"], r["cell_end"]) for r in rows["ray"])
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))  # one timing cell at a time


def test_ray_training_cells_learn_exactly_as_local_ones(tmp_path, address):
    require("torch")
    args = ["train", "--backends", "numpy", "torch", "--epochs", "1", "--threads", "1", "--quiet"]
    results = {}
    for name, extra in (("local", []), ("ray", ["--executor", "ray", "--address", address])):
        out = subprocess.run([sys.executable, "compare.py", *args, *extra, "--json", str(tmp_path / f"{name}.json")],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())["results"]
    for a, b in zip(results["local"], results["ray"], strict=True):
        assert a.keys() | NODE == b.keys() and a["backend"] == b["backend"] and "error" not in b
        for key in ("train_loss", "test_loss", "test_accuracy"):
            assert [f"{v:.6f}" for v in a[key]] == [f"{v:.6f}" for v in b[key]], (a["backend"], key)


@pytest.mark.parametrize("fault,message", [("crash", "killed by signal"), ("hang", "timed out after 8 s")])
def test_a_crashing_or_hanging_cell_under_ray_is_an_error_row(tmp_path, address, fault, message):
    path = tmp_path / "r.json"
    out = run("--models", "perceptron", "digits_mlp", "--backends", "numpy", *FAST, "--timeout", "8",
              "--executor", "ray", "--address", address, "--json", str(path),
              env={"NNCOMPARE_FAULT": f"numpy:perceptron:{fault}"})
    assert out.returncode == 0, out.stderr
    rows = {r["model"]: r for r in json.loads(path.read_text())["rows"]}
    assert message in rows["perceptron"]["error"]
    assert "error" not in rows["digits_mlp"] and rows["digits_mlp"]["train_samples_s"] > 0


def test_without_ray_the_error_names_the_extra(tmp_path):
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')")
    out = run("--models", "perceptron", "--backends", "numpy", *FAST, "--executor", "ray",
              env={"PYTHONPATH": str(tmp_path)}, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "pip install 'nncompare[ray]'" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_sigterm_under_ray_keeps_finished_cells_and_ends_the_running_one(tmp_path, address):
    from .test_interrupts import alive, wait_for
    import signal
    path, log = tmp_path / "r.json", tmp_path / "cells.log"
    proc = subprocess.Popen(
        [sys.executable, "compare.py", "run", "--models", "perceptron", "digits_mlp", "--backends", "numpy", *FAST,
         "--executor", "ray", "--address", address, "--json", str(path)], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, NNCOMPARE_FAULT="numpy:digits_mlp:hang", NNCOMPARE_CELL_LOG=str(log)))
    wait_for(lambda: log.exists() and "digits_mlp" in log.read_text(), what="the hanging cell")
    cell = int(next(l for l in log.read_text().splitlines() if "digits_mlp" in l).split()[-1])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err
    payload = json.loads(path.read_text())
    assert payload["partial"] is True and [r["model"] for r in payload["rows"]] == ["perceptron"]
    wait_for(lambda: not alive(cell), timeout=30, what="the cell to die with its Ray worker")


@pytest.mark.parametrize("address,message", [("127.0.0.1:1", "cannot reach the Ray cluster at '127.0.0.1:1'"),
                                             ("nonsense", "expected auto, HOST:PORT or ray://HOST:PORT")])
def test_a_wrong_address_is_one_line_in_seconds_not_minutes_of_retries(address, message):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'nncompare[ray]')")
    out = run("--models", "perceptron", "--backends", "numpy", *FAST, "--executor", "ray", "--address", address,
              timeout=60)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,message", [
    (["run", "--concurrency", "4"], "--concurrency needs --executor ray"),
    (["check", "perceptron", "--executor", "ray", "--concurrency", "2"], "unrecognized arguments: --concurrency 2"),
    (["train", "--executor", "ray", "--concurrency", "2"], "unrecognized arguments: --concurrency 2")])
def test_an_option_that_does_nothing_with_the_executor_is_refused(args, message):
    out = subprocess.run([sys.executable, "compare.py", *args, "--backends", "numpy"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
