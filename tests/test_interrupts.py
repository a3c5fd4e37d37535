"""Real signals to a real `compare.py run`: Ctrl-C and SIGTERM keep every finished cell (a partial file, exit
130/143, the running cell killed with its parent); a sweep killed outright resumes without re-running a cell."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, interruptible

# the fast lane (-m 'not slow') leaves out this file's real processes and clusters
pytestmark = pytest.mark.slow

FAST = ["--steps", "1", "--repeats", "1", "--warmup", "0", "--quiet", "--backends", "numpy", "--threads", "1"]


def children(pid: int) -> list[int]:
    out = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat_file.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, timeout=120, what=""):
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def journal_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def start(tmp_path, *args, env=None):
    log = tmp_path / "started.log"
    proc = subprocess.Popen([sys.executable, "compare.py", "run", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible,
                            env=dict(os.environ, NNCOMPARE_CELL_LOG=str(log), **(env or {})))
    return proc, log


def hung_cell(proc, log, model) -> int:
    """Wait until the cell of `model` has started, and return its pid."""
    def started():
        assert proc.poll() is None, proc.communicate()
        return log.exists() and f" {model} " in log.read_text()
    wait_for(started, what=f"the {model} cell")
    wait_for(lambda: children(proc.pid), what="the cell process")
    (cell,) = children(proc.pid)
    return cell


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_keeps_finished_cells_and_kills_the_running_one(tmp_path, signum, code):
    path = tmp_path / "r.json"
    proc, log = start(tmp_path, "--models", "perceptron", "digits_mlp", "residual_mlp", *FAST, "--json", str(path),
                      "--csv", str(tmp_path / "r.csv"), env={"NNCOMPARE_FAULT": "numpy:digits_mlp:hang"})
    cell = hung_cell(proc, log, "digits_mlp")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "interrupted: 1 of 3 cells finished" in err and "--resume" in err
    payload = json.loads(path.read_text())
    assert payload["partial"] is True and payload["cells"] == 3
    assert [r["model"] for r in payload["rows"]] == ["perceptron"] and "error" not in payload["rows"][0]
    assert (tmp_path / "r.csv").read_text().count("\n") == 2
    assert "perceptron" in out  # the table of what finished
    assert not alive(cell)
    assert journal_lines(tmp_path / "r.json.journal") == 1  # kept for --resume


def test_a_killed_sweep_resumes_without_rerunning_finished_cells(tmp_path):
    path = tmp_path / "r.json"
    journal = tmp_path / "r.json.journal"
    sweep = ["--models", "perceptron", "digits_mlp", "--batch-sizes", "8", "16", *FAST, "--json", str(path)]
    proc, log = start(tmp_path, *sweep, env={"NNCOMPARE_FAULT": "numpy:digits_mlp:hang"})
    cell = hung_cell(proc, log, "digits_mlp")
    assert journal_lines(journal) == 2  # perceptron at batch 8 and 16
    proc.kill()  # SIGKILL: no cleanup in the parent at all
    proc.communicate(timeout=60)
    wait_for(lambda: not alive(cell), timeout=30, what="the orphaned cell to die (PR_SET_PDEATHSIG)")
    assert not path.exists()

    refused = subprocess.run([sys.executable, "compare.py", "run", *sweep], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "--resume" in refused.stderr  # never silently thrown away

    log2 = tmp_path / "resumed.log"
    out = subprocess.run([sys.executable, "compare.py", "run", *sweep, "--resume"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, NNCOMPARE_CELL_LOG=str(log2)))
    assert out.returncode == 0, out.stderr
    ran = [line.split()[1:4] for line in log2.read_text().splitlines() if line.startswith("measure")]
    assert ran == [["digits_mlp", "numpy", "8"], ["digits_mlp", "numpy", "16"]]
    payload = json.loads(path.read_text())
    assert payload["partial"] is False
    assert [(r["model"], r["batch_size"]) for r in payload["rows"]] == [
        ("perceptron", 8), ("perceptron", 16), ("digits_mlp", 8), ("digits_mlp", 16)]
    assert all("error" not in r for r in payload["rows"]) and not journal.exists()

    # another setting is another cell: nothing is reused across configurations, and the finished cells of the
    # other configuration are never thrown away by a --resume that cannot continue them
    log3 = tmp_path / "other.log"
    before = path.read_text()
    out = subprocess.run([sys.executable, "compare.py", "run", *sweep, "--resume", "--optimizer", "adam"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, NNCOMPARE_CELL_LOG=str(log3)))
    assert out.returncode == 2 and "4 finished cells this command line does not run" in out.stderr, out.stderr
    assert not log3.exists() and path.read_text() == before


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_before_the_sweep_exits_cleanly_and_leaves_no_journal(tmp_path, signum, code):
    """train holds its journal while it fetches the dataset: a signal there is a clean exit, not a traceback
    (SIGTERM) nor an empty journal left beside the results."""
    import socket
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # accepts, never answers: the download hangs
    url = f"http://127.0.0.1:{server.getsockname()[1]}/"
    path = tmp_path / "t.json"
    proc = subprocess.Popen([sys.executable, "-c", (
        "import sys; from nncompare import cli; import nncompare.models.data as d; "
        f"d.MIRRORS['mnist'] = {url!r}; sys.exit(cli.main(['train', '--model', 'lenet5', '--dataset', 'mnist', "
        f"'--data-dir', {str(tmp_path / 'data')!r}, '--backends', 'numpy', '--json', {str(path)!r}]))")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    try:
        wait_for(lambda: (tmp_path / "t.json.journal").exists(), what="the journal")
        server.settimeout(60)
        conn, _ = server.accept()  # the download has started
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        conn.close()
    finally:
        server.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code and "Traceback" not in err and "interrupted" in err, err
    assert not (tmp_path / "t.json.journal").exists() and not path.exists()


def test_closed_standard_streams_are_an_exit_code_not_a_crash():
    out = subprocess.run(f"{sys.executable} compare.py list >&-", shell=True, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "could not write to standard output" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run(f"{sys.executable} compare.py summary nope 2>&-", shell=True, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
