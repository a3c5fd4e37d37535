"""The Ray executor on simulated multi-node clusters (ray.cluster_utils: several raylets on this machine, one CPU
each, the head with none): lost and joining nodes, a lost head, per-node peaks and placement, cluster devices
(a GPU faked with a logical resource), Ctrl-C, and connecting to what is not a usable Ray endpoint."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from .conftest import ROOT, require
from .test_interrupts import alive, journal_lines, wait_for

pytestmark = pytest.mark.slow
FAST = ["--steps", "1", "--repeats", "1", "--warmup", "0", "--quiet"]


def start_cluster(**head):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'nncompare[ray]')")
    from ray.cluster_utils import Cluster
    del ray
    return Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **head})


def compare(*args, env=None, **kw):
    """compare.py ARGS with `env` over this process's environment (a None value removes that variable)."""
    full = {k: v for k, v in dict(os.environ, **(env or {})).items() if v is not None}
    return subprocess.Popen([sys.executable, "compare.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_lines(path, kind="measure"):
    return [l.split() for l in path.read_text().splitlines() if l.startswith(kind)] if path.exists() else []


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (0 CPUs, a Ray Client port), node A (1 CPU), node G (1 CPU, a logical GPU, its own cell log)."""
    gpu_log = tmp_path_factory.mktemp("gpu") / "cells.log"
    c = start_cluster(ray_client_server_port=(port := free_port()))
    c.client_port = port
    try:
        a = c.add_node(num_cpus=1)
        g = c.add_node(num_cpus=1, num_gpus=1, env_vars={"NNCOMPARE_CELL_LOG": str(gpu_log)})
        c.wait_for_nodes()
        c.a, c.g, c.gpu_log = a.node_id, g.node_id, gpu_log
        yield c
    finally:
        c.shutdown()


def test_a_sweep_outlives_a_lost_node_and_uses_one_that_joins(tmp_path):
    """One node, whose perceptron cell hangs; a node joins and takes the other cells; the first node dies: its
    cell runs again on the new one. The threads default to the nodes' 1 CPU, not the driver's cores."""
    c = start_cluster()
    try:
        a = c.add_node(num_cpus=1, env_vars={"NNCOMPARE_FAULT": "numpy:perceptron:hang"})
        c.wait_for_nodes()
        path, log = tmp_path / "r.json", tmp_path / "cells.log"
        proc = compare("run", "--models", "perceptron", "digits_mlp", "--backends", "numpy", "--batch-sizes", "8", "16",
                       *FAST, "--timeout", "300", "--executor", "ray", "--address", c.address, "--json", str(path),
                       env={"NNCOMPARE_CELL_LOG": str(log)})
        wait_for(lambda: any(l[1] == "perceptron" for l in log_lines(log)) or proc.poll() is not None,
                 what="the hanging cell")
        assert proc.poll() is None, proc.communicate()
        b = c.add_node(num_cpus=1)
        wait_for(lambda: journal_lines(tmp_path / "r.json.journal") == 3, what="the other cells, on the new node")
        c.remove_node(a, allow_graceful=False)
        out, err = proc.communicate(timeout=180)
    finally:
        c.shutdown()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert out.startswith("Model"), out[:2000]  # nothing of Ray's (a dead raylet's log) ahead of the table
    rows = json.loads(path.read_text())["rows"]
    assert [(r["model"], r["batch_size"]) for r in rows] == [("perceptron", 8), ("perceptron", 16),
                                                            ("digits_mlp", 8), ("digits_mlp", 16)]
    assert all("error" not in r and r["node_id"] == b.node_id and r["threads"] == 1 for r in rows), rows
    assert "retried on another node" in rows[0]["ray_node_note"] and a.node_id[:8] in rows[0]["ray_node_note"]
    assert not any("ray_node_note" in r for r in rows[1:])
    assert "retried on another node" in out  # the table's note
    peaks = log_lines(log, "peak")
    assert len(peaks) == 2 and {p[-2] for p in peaks} == {"1"}, peaks  # A, then B when it joined; none on the head
    assert rows[0]["gemm_peak_gflops"] and len({r["gemm_peak_gflops"] for r in rows}) == 1


@pytest.mark.parametrize("kill", ["raylet", "worker"])
def test_a_lost_cell_runs_again_on_another_node(tmp_path, kill):
    """Node A's cell hangs; A's raylet and that cell's Ray worker are killed, or the worker alone. The cell runs
    again on B, never on A again: a dead A gets no cell at all though the GCS declares it dead only ~15 s later,
    a live A (its worker crashed) gets the other cells, and the row's note names the first run's loss."""
    c = start_cluster()
    from ray._private import ray_constants
    try:
        logs = {name: tmp_path / f"{name}.log" for name in "ab"}
        a = c.add_node(num_cpus=1, env_vars={"NNCOMPARE_FAULT": "numpy:perceptron:hang",
                                             "NNCOMPARE_CELL_LOG": str(logs["a"])})
        b = c.add_node(num_cpus=1, env_vars={"NNCOMPARE_CELL_LOG": str(logs["b"])})
        c.wait_for_nodes()
        path = tmp_path / "r.json"
        proc = compare("run", "--models", "perceptron", "digits_mlp", "--backends", "numpy", "--batch-sizes", "8",
                       "16", *FAST, "--timeout", "90", "--executor", "ray", "--address", c.address, "--json",
                       str(path))
        wait_for(lambda: any(l[1] == "perceptron" for l in log_lines(logs["a"])) or proc.poll() is not None,
                 what="the hanging cell on A")
        assert proc.poll() is None, proc.communicate()
        cell = int(next(l for l in log_lines(logs["a"]) if l[1] == "perceptron")[-1])
        if kill == "raylet":
            os.kill(a.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid, signal.SIGKILL)
        os.kill(int(open(f"/proc/{cell}/stat").read().rsplit(")", 1)[1].split()[1]), signal.SIGKILL)  # its worker
        out, err = proc.communicate(timeout=300)
    finally:
        c.shutdown()
    assert proc.returncode == 0 and "Traceback" not in err, err
    rows = json.loads(path.read_text())["rows"]
    where = [(r["model"], r["batch_size"], r["node_id"][:8], r.get("ray_node_note"), r.get("error")) for r in rows]
    assert len(rows) == 4 and not any("error" in r for r in rows), where
    noted = [r for r in rows if "ray_node_note" in r]
    assert len(noted) == 1 and noted[0]["node_id"] == b.node_id, where  # no other cell was sent to a dead A
    note = noted[0]["ray_node_note"]
    assert "retried on another node" in note and a.node_id[:8] in note
    assert ("NodeDiedError" if kill == "raylet" else "WorkerCrashedError") in note, note  # not a later try's loss
    if kill == "raylet":
        assert len(log_lines(logs["a"])) == 1  # nothing ran on A after its loss


def test_losing_the_head_writes_the_finished_cells_and_exits_1(tmp_path):
    c = start_cluster()
    try:
        c.add_node(num_cpus=1, env_vars={"NNCOMPARE_FAULT": "numpy:digits_mlp:hang"})
        c.wait_for_nodes()
        path = tmp_path / "r.json"
        proc = compare("run", "--models", "perceptron", "digits_mlp", "--backends", "numpy", *FAST, "--timeout",
                       "300", "--executor", "ray", "--address", c.address, "--json", str(path))
        wait_for(lambda: journal_lines(tmp_path / "r.json.journal") == 1 or proc.poll() is not None,
                 what="the first cell")
        c.remove_node(c.head_node, allow_graceful=False)
        started = time.time()
        out, err = proc.communicate(timeout=120)
        took = time.time() - started
    finally:
        c.shutdown()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert took < 30 and "lost the Ray cluster's head node" in err, (took, err)
    payload = json.loads(path.read_text())
    assert payload["partial"] is True and [r["model"] for r in payload["rows"]] == ["perceptron"]


def test_rows_name_their_node_and_ratio_groups_share_one(tmp_path, cluster):
    require("torch")
    path = tmp_path / "r.json"
    proc = compare("run", "--models", "perceptron", "digits_mlp", "--backends", "numpy", "torch", "--batch-sizes",
                   "8", "16", "--devices", "cpu", *FAST, "--executor", "ray", "--address", cluster.address,
                   "--json", str(path))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "Traceback" not in err, err
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 8 and not any("error" in r for r in rows)
    nodes = {}
    for r in rows:
        assert r["host"] == socket.gethostname() and r["node_ip"] and r["node_id"] in (cluster.a, cluster.g)
        nodes.setdefault((r["model"], r["batch_size"]), set()).add(r["node_id"])
        assert r["vs_baseline"] > 0 and r["threads"] == 1
    assert all(len(n) == 1 for n in nodes.values()), nodes  # each ratio's rows from one node
    assert len(set().union(*nodes.values())) == 2  # and both nodes worked
    peak = {}
    for r in rows:  # each node's own peak, the same one for all its rows
        assert peak.setdefault(r["node_id"], r["gemm_peak_gflops"]) == r["gemm_peak_gflops"] > 0
    assert len(set(peak.values())) == 2


def test_check_and_train_use_the_clusters_gpu(tmp_path, cluster):
    """The driver has no GPU; node G has a logical one. The cells crash at once (a test fault), so no CUDA is
    needed: what counts is that they were accepted and placed on G."""
    require("torch")
    out, err = compare("check", "perceptron", "--backends", "torch", "--device", "gpu", "--executor", "ray",
                       "--address", cluster.address, env={"NNCOMPARE_FAULT": "torch:perceptron:crash"}
                       ).communicate(timeout=300)
    assert "not available" not in err and "Traceback" not in err, err
    assert "killed by signal 6" in out
    assert [l[:3] for l in log_lines(cluster.gpu_log, "check")] == [["check", "perceptron", "torch"]]
    path = tmp_path / "t.json"
    proc = compare("train", "--backends", "torch", "--devices", "gpu", "--epochs", "1", "--quiet", "--executor", "ray",
                   "--address", cluster.address, "--json", str(path), env={"NNCOMPARE_FAULT": "torch:digits_mlp:crash"})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "not available" not in err and "Traceback" not in err, err
    (row,) = json.loads(path.read_text())["results"]
    assert row["device"] == "gpu:0" and row["node_id"] == cluster.g and "killed by signal 6" in row["error"]


def test_ctrl_c_under_ray_always_exits_130_with_the_partial_file(tmp_path, cluster):
    for trial in range(3):
        path, log = tmp_path / f"r{trial}.json", tmp_path / f"cells{trial}.log"
        proc = compare("run", "--models", "perceptron", "digits_mlp", "--backends", "numpy", "--devices", "cpu",
                       *FAST, "--executor", "ray", "--address", cluster.address, "--json", str(path),
                       env={"NNCOMPARE_FAULT": "numpy:digits_mlp:hang", "NNCOMPARE_CELL_LOG": str(log)})
        wait_for(lambda: any(l[1] == "digits_mlp" for l in log_lines(log))
                 and journal_lines(tmp_path / f"r{trial}.json.journal") == 1 or proc.poll() is not None,
                 what="the first row and the hanging cell")
        cell = int(next(l for l in log_lines(log) if l[1] == "digits_mlp")[-1])
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "Traceback" not in err, (trial, err)
        payload = json.loads(path.read_text())
        assert payload["partial"] is True and [r["model"] for r in payload["rows"]] == ["perceptron"]
        wait_for(lambda: not alive(cell), timeout=30, what="the cell to be killed")


def _one_line_in_seconds(address, what, env=None, limit=20):
    started = time.time()
    out, err = compare("run", "--models", "perceptron", "--backends", "numpy", *FAST, "--executor", "ray",
                       "--address", address, env=env).communicate(timeout=120)
    assert what in err and len(err.strip().splitlines()) == 1 and not out, (out[-2000:], err)
    assert time.time() - started < limit


def test_the_wrong_one_of_rays_two_ports_is_named(cluster):
    client = cluster.client_port
    host = cluster.address.rpartition(":")[0]
    _one_line_in_seconds(f"{host}:{client}", f"is a Ray Client port: write it as ray://{host}:{client}")
    _one_line_in_seconds(f"ray://{cluster.address}", "is a Ray cluster's main (GCS) port")


def test_an_endpoint_that_is_not_ray_fails_in_seconds():
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'nncompare[ray]')")
    http = subprocess.Popen([sys.executable, "-m", "http.server", str(port := free_port()), "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections, never answers
    try:
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, timeout=30, what="the HTTP server")
        _one_line_in_seconds(f"127.0.0.1:{port}", "is not a Ray cluster (GCS) endpoint")
        _one_line_in_seconds(f"127.0.0.1:{silent.getsockname()[1]}", "did not answer within 5 s")
    finally:
        http.kill()
        http.wait()
        silent.close()


TOKEN_CLUSTER = textwrap.dedent("""
    import sys
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    print(c.address, flush=True)
    sys.stdin.read()
    c.shutdown()
""")


def test_a_cluster_that_wants_a_token_says_so(tmp_path):
    """Ray turns on token login for a cluster started with RAY_AUTH_MODE=token (the token in ~/.ray/auth_token)."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'nncompare[ray]')")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a" * 64)
    home = {"HOME": str(tmp_path), "RAY_AUTH_MODE": None}  # a local Ray run earlier in this process sets it
    head = subprocess.Popen([sys.executable, "-c", TOKEN_CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, **{**home, "RAY_AUTH_MODE": "token"}))
    try:
        address = head.stdout.readline().strip()
        assert address, "the token cluster did not start"
        _one_line_in_seconds(address, "requires token authentication: run with RAY_AUTH_MODE=token", env=home)
        out, err = compare("run", "--models", "perceptron", "--backends", "numpy", *FAST, "--threads", "1",
                           "--executor", "ray", "--address", address,
                           env={**home, "RAY_AUTH_MODE": "token"}).communicate(timeout=120)
        assert "token" not in err and "no live Ray node offers 1 CPU" in out, err  # it connects: a head, no CPU
    finally:
        head.stdin.close()
        head.wait(timeout=60)
