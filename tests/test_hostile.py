"""Hostile inputs to the command line: corrupted or foreign --resume material, an
interrupt before the first cell, absurd timeouts, report rows of the wrong type, one file under two spellings,
a head hidden behind Dropout, Ctrl-C while Python loads the tool."""
import json
import os
import socket
import subprocess
import sys

import pytest

from nncompare import devices, executors, files
from nncompare.cell import Task

from .conftest import ROOT, compare as cli, interruptible

FAST = ["--steps", "1", "--repeats", "1", "--warmup", "0", "--quiet", "--backends", "numpy", "--threads", "1"]


class RecordingExecutor:
    """Runs nothing: records which tasks a sweep hands it and answers each with a plain row."""

    name = "local"

    def __init__(self):
        self.ran = []

    def run(self, tasks, done):
        for j, t in enumerate(tasks):
            self.ran.append(t)
            done(j, {"train_samples_s": 1.0, "host": socket.gethostname()})

    def close(self):
        pass


def make_row(task, result):
    return {"model": task.model_name, "backend": task.backend, "device": task.device,
            "batch_size": task.batch_size, "threads": task.threads, **result}


def test_resume_runs_again_the_cells_whose_finished_row_is_corrupted_or_from_another_host():
    tasks = [Task("measure", backend="numpy", model_name=m, batch_size=8) for m in "abcde"]
    good = {**make_row(tasks[0], {"train_samples_s": 5.0, "host": socket.gethostname()}), "cell": tasks[0].key}
    finished = {tasks[0].key: good, tasks[1].key: {}, tasks[2].key: {"model": 5},
                tasks[3].key: {**good, "model": "b"},  # another cell's row under this key
                tasks[4].key: {**make_row(tasks[4], {"train_samples_s": 1e9}), "host": "some-other-machine"}}
    ex = RecordingExecutor()
    rows, code = executors.sweep(tasks, make_row, ex, finished=finished, quiet=True)
    assert code is None and [t.model_name for t in ex.ran] == ["b", "c", "d", "e"]
    assert rows[0] is good and [r["model"] for r in rows] == list("abcde")


def test_a_journal_with_undecodable_bytes_keeps_its_good_lines(tmp_path):
    path = tmp_path / "r.json.journal"
    path.write_bytes(b'\xff\xfe garbage\n' + json.dumps({"cell": "k", "row": {"model": "m"}}).encode()
                     + b'\n{"cell": "x", "row": {"model": "\xe9"}}\n')
    assert files.Journal(str(path)).read() == {"k": {"model": "m"}}
    out = cli("run", "--models", "perceptron", *FAST, "--json", str(tmp_path / "r.json"), timeout=60)
    assert out.returncode == 2 and "--resume" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_resume_with_another_command_line_refuses_before_any_cell_runs(tmp_path):
    path, log = tmp_path / "r.json", tmp_path / "cells.log"
    first = cli("run", "--models", "perceptron", *FAST, "--json", str(path))
    assert first.returncode == 0, first.stderr
    before = path.read_text()
    out = cli("run", "--models", "perceptron", *FAST, "--json", str(path), "--resume", "--batch-sizes", "8",
              env={"NNCOMPARE_CELL_LOG": str(log)})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "1 finished cell this command line does not run (perceptron numpy cpu batch 64)" in out.stderr
    assert path.read_text() == before and not log.exists()


def test_an_interrupt_before_the_first_cell_leaves_earlier_results_alone(tmp_path):
    import signal
    import time
    path = tmp_path / "r.json"
    path.write_text("earlier results\n")
    log = tmp_path / "cells.log"
    proc = subprocess.Popen([sys.executable, "compare.py", "run", "--models", "perceptron", *FAST, "--json",
                             str(path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible, env=dict(os.environ, NNCOMPARE_CELL_LOG=str(log),
                                                               NNCOMPARE_FAULT="numpy:perceptron:hang"))
    end = time.time() + 120
    while not (log.exists() and "measure perceptron" in log.read_text()):
        assert proc.poll() is None and time.time() < end, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted: 0 of 1 cells finished, nothing written" in err
    assert path.read_text() == "earlier results\n" and not (tmp_path / "r.json.journal").exists()


@pytest.mark.parametrize("command", [["run", "--models", "perceptron", *FAST], ["check", "perceptron"],
                                     ["train", "--backends", "numpy"]])
def test_a_timeout_too_large_for_the_clock_is_bad_input(command):
    out = cli(*command, "--timeout", "1e10", timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "--timeout" in out.stderr and "at most" in out.stderr


@pytest.mark.slow
def test_one_file_under_two_spellings_counts_once(tmp_path):
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps({"name": "tiny", "input_shape": [4], "layers": [{"type": "dense", "units": 2}]}))
    results, log = tmp_path / "r.json", tmp_path / "cells.log"
    out = cli("run", "--models", str(spec), os.path.join(str(tmp_path), ".", "tiny.json"), *FAST,
              "--json", str(results), env={"NNCOMPARE_CELL_LOG": str(log)})
    assert out.returncode == 0, out.stderr
    rows = json.loads(results.read_text())["rows"]
    assert [r["model"] for r in rows] == ["tiny"] and log.read_text().count("measure tiny") == 1
    twice = cli("report", str(results), os.path.join(str(tmp_path), "..", tmp_path.name, "r.json"))
    assert twice.returncode == 0, twice.stderr
    # one line in the training table and one in the inference table: the file read twice would double both
    assert len([line for line in twice.stdout.splitlines() if " tiny " in line]) == 2, twice.stdout


@pytest.mark.parametrize("entry", [["compare.py", "list"], ["-c", "import sys, nncompare; sys.exit(nncompare.main(['list']))"]])
def test_ctrl_c_while_the_tool_is_still_loading_exits_130_without_a_traceback(tmp_path, entry):
    # a module the CLI imports raises KeyboardInterrupt as it loads: what a Ctrl-C at that moment does
    (tmp_path / "tabulate.py").write_text("raise KeyboardInterrupt\n")
    out = subprocess.run([sys.executable, *entry], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)])))
    assert out.returncode == 130 and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("budget", ["nan", "-5", "inf", "soon"])
def test_a_time_budget_that_is_not_a_duration_is_bad_input(budget, tmp_path):
    log = tmp_path / "cells.log"
    out = cli("run", "--models", "perceptron", *FAST, env={"NNCOMPARE_TIME_BUDGET": budget,
                                                            "NNCOMPARE_CELL_LOG": str(log)}, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "NNCOMPARE_TIME_BUDGET" in out.stderr and repr(budget) in out.stderr and not log.exists()


def test_train_csv_keeps_the_error_of_a_framework_that_failed(tmp_path):
    path = tmp_path / "t.csv"
    out = cli("train", "--backends", "numpy", "--epochs", "1", "--quiet", "--csv", str(path),
              env={"NNCOMPARE_FAULT": "numpy:digits_mlp:crash"}, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    import csv
    rows = list(csv.DictReader(path.open()))
    assert [r["backend"] for r in rows] == ["numpy"] and rows[0]["error"], rows


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_standard_output_that_cannot_be_written_loses_no_results(tmp_path):
    path = tmp_path / "r.json"
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "compare.py", "run", "--models", "perceptron", *FAST, "--json",
                              str(path)], cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "could not write to standard output" in out.stderr
    assert [r["model"] for r in json.loads(path.read_text())["rows"]] == ["perceptron"]
    assert not (tmp_path / "r.json.journal").exists()


@pytest.mark.parametrize("command", [["run", "--models", "perceptron", *FAST], ["train", "--backends", "numpy"]])
def test_a_command_line_with_no_cell_to_run_is_bad_input(command, monkeypatch, capsys, tmp_path):
    from nncompare import cli as compare
    monkeypatch.setattr(devices, "available_devices", lambda: ["cpu", "gpu:0"])
    code = compare.main([*command, "--devices", "gpu:0", "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "nothing to run: the numpy reference runs on the CPU only" in err, err
    assert list(tmp_path.iterdir()) == []  # no results, no journal


def test_one_batch_size_written_twice_is_one_cell(tmp_path):
    log = tmp_path / "cells.log"
    out = cli("run", "--models", "perceptron", *FAST, "--batch-sizes", "8", "08", " 8", env={"NNCOMPARE_CELL_LOG": str(log)})
    assert out.returncode == 0, out.stderr
    assert [l.split()[3] for l in log.read_text().splitlines() if l.startswith("measure")] == ["8"]
