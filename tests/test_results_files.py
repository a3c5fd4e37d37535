"""Results files and numbers: outputs refused before any work, never a link or special file replaced,
the umask kept, strict JSON, table still printed when writing fails; bad numbers; same-named models; train."""
import json
import os
import stat
import subprocess
import sys

import pytest

from nncompare import cli, files

from .conftest import ROOT, compare as run, require

FAST = ["--steps", "1", "--repeats", "1", "--warmup", "0", "--quiet", "--backends", "numpy", "--threads", "1"]


def one_line_exit_2(out, message):
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def bad_outputs(tmp):
    spec = tmp / "m.json"
    from nncompare.models import zoo
    zoo.get("perceptron").save(spec)
    (tmp / "old.json").write_text("precious")
    os.symlink(tmp / "old.json", tmp / "link.json")
    os.mkfifo(tmp / "fifo.json")
    (tmp / "dir.json").mkdir()
    (tmp / "r.json.journal").write_text('{"cell": "k", "row": {"model": "m"}}\n')
    return [
        (["--json", f"{tmp}/a.json", "--csv", f"{tmp}/a.json"], "it is also the --json output"),
        (["--json", f"{tmp}/a.json", "--plot", f"{tmp}/./a.json"], "it is also the --json output"),
        (["--models", str(spec), "--json", str(spec)], "it is also the input"),
        (["--json", f"{tmp}/link.json"], "it is a symbolic link"),
        (["--csv", "/dev/null"], "will not write over '/dev/null': it is not a regular file"),
        (["--json", f"{tmp}/fifo.json"], "it is not a regular file"),
        (["--json", f"{tmp}/dir.json"], "is a directory"),
        (["--plot", f"{tmp}/chart.txt"], "unsupported file type .txt"),
        (["--plot", f"{tmp}/chart"], "unsupported file type (no extension)"),
        (["--json", f"{tmp}/r.json"], "holds the finished cells of an interrupted run: continue it with --resume"),
        (["--json", ""], "--json path is empty"),
        (["--plot", " "], "--plot path is empty"),
        (["--json", f"{tmp}/c.json", "--csv", f"{tmp}/c.json.journal"], "(journal): it is also the --csv output"),
        (["--json", f"{tmp}/d.json", "--csv", f"{tmp}/d.csv", "--plot", f"{tmp}/d.csv.journal"],
         "(--csv journal): it is also the --plot output"),
    ] + ([(["--json", "/proc/r.json"], "cannot write '/proc/r.json'")] if os.path.isdir("/proc/self") else [])


def test_bad_outputs_are_refused_before_any_cell_runs(tmp_path):
    log = tmp_path / "cells.log"
    for args, message in bad_outputs(tmp_path):
        out = run("run", "--models", "perceptron", *FAST, *args, env={"NNCOMPARE_CELL_LOG": str(log)}, timeout=60)
        one_line_exit_2(out, message)
    assert not log.exists()  # not one cell ran
    assert (tmp_path / "old.json").read_text() == "precious" and os.path.islink(tmp_path / "link.json")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo.json").st_mode)


def test_plot_without_matplotlib_is_refused_up_front(tmp_path):
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')")
    out = run("run", "--models", "perceptron", *FAST, "--plot", str(tmp_path / "p.png"),
              env={"PYTHONPATH": str(tmp_path)}, timeout=60)
    one_line_exit_2(out, "needs matplotlib: pip install 'nncompare[plot]'")


def test_new_files_get_the_umask_and_replaced_files_keep_their_mode(tmp_path):
    old = os.umask(0o027)
    try:
        files.write_atomic(str(tmp_path / "new.json"), "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == 0o640
    kept = tmp_path / "kept.json"
    kept.write_text("old")
    os.chmod(kept, 0o604)
    files.write_atomic(str(kept), b"new")
    assert kept.read_text() == "new" and stat.S_IMODE(os.stat(kept).st_mode) == 0o604


def test_the_final_write_never_replaces_a_special_file_or_link(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "target", tmp_path / "link")
    for name in ("fifo", "link"):
        with pytest.raises(OSError, match="will not write over"):
            files.write_atomic(str(tmp_path / name), "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link"]  # no temporary left, no target made


def test_a_failed_write_at_the_end_still_prints_the_table_and_says_where(tmp_path, monkeypatch, capsys):
    real = cli.write_atomic

    def failing(path, data):
        if path.endswith(".json"):
            raise OSError(28, "No space left on device")
        real(path, data)
    monkeypatch.setattr(cli, "write_atomic", failing)
    code = cli.main(["run", "--models", "perceptron", *FAST, "--json", str(tmp_path / "r.json"),
                     "--csv", str(tmp_path / "r.csv")])
    out = capsys.readouterr()
    assert code == 1
    assert "perceptron" in out.out and "Train samples/s" in out.out  # the table
    assert f"could not write '{tmp_path / 'r.json'}'" in out.err and "No space left" in out.err
    assert "r.json.journal" in out.err  # where the finished cells still are
    assert len(json.loads((tmp_path / "r.json.journal").read_text().splitlines()[0])["row"]) > 5
    assert (tmp_path / "r.csv").read_text().count("\n") == 2


@pytest.mark.parametrize("option", ["--timeout", "--lr"])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "-inf", "x"])
def test_timeout_and_lr_must_be_finite_and_positive(option, value):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["run", f"{option}={value}"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", f"{option}={value}"])


def test_json_is_strict_even_when_the_loss_diverges(tmp_path):
    path = tmp_path / "r.json"
    # the row's loss is taken after the first step and the warm-up: give the huge step time to blow up
    out = run("run", "--models", "digits_mlp", *FAST, "--warmup", "30", "--lr", "1e6", "--json", str(path))
    assert out.returncode == 0, out.stderr

    def reject(name):
        raise ValueError(f"bare {name} in JSON")
    row = json.loads(path.read_text(), parse_constant=reject)["rows"][0]
    assert row["loss"] is None  # NaN or inf written as null
    assert files.strict_json({"a": [float("nan"), float("inf"), 1.5]}, indent=None) == '{"a": [null, null, 1.5]}'


def test_two_specs_with_one_name_stay_two_models(tmp_path):
    from nncompare.models import Dense, ModelSpec
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    ModelSpec("twin", (4,), (Dense(3),)).save(a)
    ModelSpec("twin", (4,), (Dense(8, activation="relu"), Dense(3))).save(b)
    out = run("run", "--models", str(a), str(b), *FAST, "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["model"] for r in rows] == [f"twin ({a})", f"twin ({b})"]
    assert [r["model_params"] for r in rows] == [15, 67] and [r["spec_file"] for r in rows] == [str(a), str(b)]


def test_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen([sys.executable, "compare.py", "list"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head` leaving before the output comes
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and err == b"", err


def test_train_without_arguments_trains_a_small_model_on_digits(tmp_path):
    args = cli.build_parser().parse_args(["train"])
    assert (args.model, args.dataset, args.optimizer) == ("digits_mlp", "digits", "adam")
    out = run("train", "--backends", "numpy", "--epochs", "2")
    assert out.returncode == 0, out.stderr
    assert "digits_mlp on digits" in out.stdout and "Final accuracy" in out.stdout


@pytest.mark.slow
def test_train_fails_when_every_framework_failed_and_with_strict_when_one_did(tmp_path):
    require("torch")
    crash = {"NNCOMPARE_FAULT": "numpy:digits_mlp:crash"}
    out = run("train", "--backends", "numpy", "--epochs", "1", "--quiet", env=crash)
    assert out.returncode == 1 and "ERROR" in out.stdout
    two = ["--backends", "numpy", "torch", "--epochs", "1", "--quiet"]
    assert run("train", *two, env=crash).returncode == 0
    out = run("train", *two, "--strict", "--json", str(tmp_path / "t.json"), env=crash)
    assert out.returncode == 1
    results = json.loads((tmp_path / "t.json").read_text())["results"]
    assert "error" in results[0] and results[1]["final_accuracy"] > 0.5


@pytest.mark.slow
def test_a_second_run_on_the_same_results_is_refused_while_the_first_holds_them(tmp_path):
    import signal
    import time
    from .conftest import interruptible
    path, log = tmp_path / "r.json", tmp_path / "cells.log"
    csv = tmp_path / "r.csv"
    first = subprocess.Popen([sys.executable, "compare.py", "run", "--models", "perceptron", *FAST, "--json", str(path),
                              "--csv", str(csv)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=interruptible, env=dict(os.environ, NNCOMPARE_CELL_LOG=str(log),
                                                                NNCOMPARE_FAULT="numpy:perceptron:hang"))
    try:
        end = time.time() + 120
        while not (log.exists() and "measure perceptron" in log.read_text()):
            assert first.poll() is None and time.time() < end, first.communicate()
            time.sleep(0.2)
        second = run("run", "--models", "digits_mlp", *FAST, "--json", str(path), timeout=60)
        one_line_exit_2(second, "another run is writing these results")
        second = run("run", "--models", "digits_mlp", *FAST, "--json", str(tmp_path / "b.json"), "--csv", str(csv),
                     timeout=60)
        one_line_exit_2(second, "another run is writing these results")
        assert not (tmp_path / "b.json.journal").exists()
        second = run("run", "--models", "digits_mlp", *FAST, "--json", str(tmp_path / "r.json.journal"), timeout=60)
        one_line_exit_2(second, f"a running compare.py holds '{tmp_path / 'r.json.journal'}'")
        assert log.read_text().count("measure") == 1  # the second run started no cell
        # the lock dies with its holder, even killed outright: a journal with no finished cell blocks nothing
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
        third = run("run", "--models", "perceptron", *FAST, "--json", str(path), "--csv", str(csv), timeout=120)
        assert third.returncode == 0, third.stderr
        assert json.loads(path.read_text())["rows"][0]["model"] == "perceptron"
        assert not (tmp_path / "r.json.journal").exists() and not (tmp_path / "r.csv.journal").exists()
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()


def test_a_journal_is_locked_by_whoever_opened_it(tmp_path):
    path = str(tmp_path / "r.json.journal")
    one, two = files.Journal(path), files.Journal(path)
    one.open()
    with pytest.raises(files.UsageError, match="another run is writing these results"):
        two.open()
    one.append("k", {"model": "m"})
    one.remove()  # finished: the journal goes, and with it the lock
    two.open()
    two.close()  # nothing was written: an empty journal is not left behind
    assert not os.path.exists(path)


def test_a_line_cut_short_by_a_crash_does_not_swallow_the_next_row(tmp_path):
    path = tmp_path / "r.json.journal"
    path.write_text(json.dumps({"cell": "a", "row": {"model": "m"}}) + '\n{"cell": "b", "row": {"mod')
    journal = files.Journal(str(path))
    journal.open()
    journal.fresh = False  # --resume
    journal.append("c", {"model": "n"})
    journal.close()
    assert files.Journal(str(path)).read() == {"a": {"model": "m"}, "c": {"model": "n"}}
    assert path.read_text().endswith('"n"}}\n') and path.read_text().count("\n") == 2


def test_a_journal_of_hostile_lines_keeps_its_good_ones(tmp_path):
    path = tmp_path / "r.json.journal"
    good = json.dumps({"cell": "k", "row": {"model": "m"}})
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n" + '{"cell": "x", "row": {"n": 1' + "0" * 400 + "}}\n"
                    + good + "\n")
    assert files.Journal(str(path)).read() == {"k": {"model": "m"}}


@pytest.mark.parametrize("length", [250, 300])
def test_a_results_name_too_long_for_the_file_system_is_bad_input(tmp_path, length):
    log = tmp_path / "cells.log"
    out = run("run", "--models", "perceptron", *FAST, "--json", str(tmp_path / ("r" * (length - 5) + ".json")),
              env={"NNCOMPARE_CELL_LOG": str(log)}, timeout=60)
    one_line_exit_2(out, "bytes, longer than the 255 this file system allows")
    assert not log.exists() and len(out.stderr) < 400


def test_a_results_name_at_the_limit_is_written(tmp_path):
    path = tmp_path / ("r" * (255 - len(".json.journal")) + ".json")  # the journal's name is the longest
    out = run("run", "--models", "perceptron", *FAST, "--json", str(path), timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(path.read_text())["rows"][0]["model"] == "perceptron"


@pytest.mark.slow
def test_resume_runs_again_the_cells_whose_rows_are_not_valid(tmp_path):
    path, log = tmp_path / "r.json", tmp_path / "cells.log"
    sizes = ["--batch-sizes", "8", "16", "32"]
    out = run("run", "--models", "perceptron", *FAST, *sizes, "--json", str(path))
    assert out.returncode == 0, out.stderr
    payload = json.loads(path.read_text())
    payload["rows"][0]["train_samples_s"] = "fast"  # would crash the table
    payload["rows"][1]["train_samples_s"] = -1e12   # a forged number no run writes
    path.write_text(json.dumps(payload))
    out = run("run", "--models", "perceptron", *FAST, *sizes, "--json", str(path), "--resume",
              env={"NNCOMPARE_CELL_LOG": str(log)})
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "2 finished rows" in out.stderr and "their cells run again" in out.stderr
    ran = [l.split()[3] for l in log.read_text().splitlines() if l.startswith("measure")]
    assert ran == ["8", "16"]  # batch 32's row was kept
    rows = json.loads(path.read_text())["rows"]
    assert [r["batch_size"] for r in rows] == [8, 16, 32] and all(r["train_samples_s"] > 0 for r in rows)
    assert rows[2] == payload["rows"][2] and not (tmp_path / "r.json.journal").exists()


@pytest.mark.slow
def test_train_resume_reruns_a_corrupted_result_and_shows_a_diverged_one(tmp_path):
    path, log = tmp_path / "t.json", tmp_path / "cells.log"
    args = ["train", "--backends", "numpy", "--epochs", "2", "--quiet", "--json", str(path)]
    assert run(*args).returncode == 0
    payload = json.loads(path.read_text())
    good = payload["results"][0]
    payload["results"] = [{**good, "train_loss": [None, None], "final_accuracy": None}]  # NaN is written as null
    path.write_text(json.dumps(payload))
    out = run(*args, "--resume", env={"NNCOMPARE_CELL_LOG": str(log)})
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert not log.exists() and "- / " in out.stdout  # kept, shown with its gaps
    payload["results"] = [{**good, "test_loss": [0.5]}]  # lists of different lengths
    path.write_text(json.dumps(payload))
    out = run(*args, "--resume", env={"NNCOMPARE_CELL_LOG": str(log)})
    assert out.returncode == 0 and "1 finished row" in out.stderr, out.stderr
    assert log.read_text().count("train digits_mlp numpy") == 1
    assert json.loads(path.read_text())["results"][0]["test_loss"] == good["test_loss"]


@pytest.mark.slow
def test_the_footer_says_what_was_timed_and_after_how_many_steps_the_loss_is(tmp_path):
    path = tmp_path / "r.json"
    out = run("run", "--models", "perceptron", "digits_mlp", *FAST, "--json", str(path),
              env={"NNCOMPARE_TIME_BUDGET": "0.3"})
    assert out.returncode == 0, out.stderr
    rows = json.loads(path.read_text())["rows"]

    def span(key):
        low, high = min(r[key] for r in rows), max(r[key] for r in rows)
        return f"{low:,}" if low == high else f"{low:,}-{high:,}"
    assert max(r["train_steps"] for r in rows) > 1  # the budget extended the one step asked for
    assert f"timed {span('train_repeats')} repeats x {span('train_steps')} steps per row" in out.stdout
    assert "--repeats 1 and --steps 1 are minimums" in out.stdout
    assert "loss after the first step and 0 warm-up steps" in out.stdout
    assert all(r["loss_after_steps"] == 1 for r in rows)
    assert "1 repeats x 1 steps" not in out.stdout


@pytest.mark.slow
def test_run_exits_1_when_every_cell_failed(tmp_path):
    crash = {"NNCOMPARE_FAULT": "numpy:perceptron:crash"}
    out = run("run", "--models", "perceptron", *FAST, "--json", str(tmp_path / "r.json"), env=crash)
    assert out.returncode == 1 and "ERROR" in out.stdout and "Traceback" not in out.stderr, out.stderr
    assert "asked for 1 repeats x 1 steps" in out.stdout  # no row says what was timed
    both = run("run", "--models", "perceptron", "digits_mlp", *FAST, env=crash)
    assert both.returncode == 0 and "ERROR" in both.stdout
    assert run("run", "--models", "perceptron", "digits_mlp", *FAST, "--strict", env=crash).returncode == 1


@pytest.mark.slow
def test_a_journal_that_cannot_be_appended_to_loses_no_results(tmp_path, monkeypatch, capsys):
    def full(self, key, row):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(files.Journal, "append", full)
    code = cli.main(["run", "--models", "perceptron", "digits_mlp", *FAST, "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 0 and err.count("cannot append to the journal") == 1, err
    assert [r["model"] for r in json.loads((tmp_path / "r.json").read_text())["rows"]] == ["perceptron", "digits_mlp"]
