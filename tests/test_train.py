"""compare.py train on the real digits: every framework learns the same, from the same weights and batch order."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nncompare import cli as compare

from .conftest import FRAMEWORKS, ROOT, compare as compare_py, require

# the fast lane (-m 'not slow') leaves out this file's real processes and clusters
pytestmark = pytest.mark.slow


def train(*args, timeout=900):
    return compare_py("train", "--quiet", *args, timeout=timeout)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    for b in FRAMEWORKS:
        require(b)
    out_dir = tmp_path_factory.mktemp("train")
    out = train("--model", "digits_mlp", "--dataset", "digits", "--json", str(out_dir / "t.json"),
                "--csv", str(out_dir / "t.csv"), "--plot", str(out_dir / "t.png"))
    assert out.returncode == 0, out.stdout + out.stderr
    return out, json.loads((out_dir / "t.json").read_text())["results"], out_dir


def test_every_framework_reaches_95_percent_on_digits(digits_run):
    _, results, _ = digits_run
    assert {r["backend"] for r in results} == set(compare.default_backends(training=True)) >= set(FRAMEWORKS) | {"numpy"}
    for r in results:
        assert "error" not in r, r
        assert r["final_accuracy"] >= 0.95, (r["backend"], r["test_accuracy"])
        assert r["time_to_target_s"] is not None and r["epochs_to_target"] <= len(r["train_loss"])


def test_without_dropout_the_per_epoch_losses_agree(digits_run):
    _, results, _ = digits_run
    reference = next(r for r in results if r["backend"] == "numpy")
    for r in results:
        for key in ("train_loss", "test_loss"):
            np.testing.assert_allclose(r[key], reference[key], rtol=1e-3, err_msg=f"{r['backend']} {key}")


def test_train_writes_table_csv_and_plot(digits_run):
    out, results, out_dir = digits_run
    assert "Final accuracy" in out.stdout and "Time to 95%" in out.stdout
    lines = (out_dir / "t.csv").read_text().splitlines()
    assert len(lines) == 1 + len(results) * len(results[0]["train_loss"]) and "test_accuracy" in lines[0]
    assert (out_dir / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_live_dropout_is_reported(tmp_path):
    from nncompare.models import Dense, Dropout, ModelSpec
    path = tmp_path / "dropout.json"
    ModelSpec("dropout_mlp", (64,), (Dense(32, activation="relu"), Dropout(0.5), Dense(10))).save(path)
    out = train("--model", str(path), "--dataset", "digits", "--epochs", "1", "--backends", "numpy",
                "--json", str(tmp_path / "live.json"))
    assert out.returncode == 0, out.stderr
    assert "live dropout" in out.stdout
    assert json.loads((tmp_path / "live.json").read_text())["results"][0]["dropout"] is True
    out = train("--model", str(path), "--dataset", "digits", "--epochs", "1", "--backends", "numpy", "--no-dropout",
                "--json", str(tmp_path / "off.json"))
    assert out.returncode == 0 and "live dropout" not in out.stdout
    assert json.loads((tmp_path / "off.json").read_text())["results"][0]["dropout"] is False


@pytest.mark.parametrize("args,message", [
    (["--model", "digits_mlp", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--model", "lenet5", "--dataset", "digits"], "expects (1, 28, 28)"),
    (["--model", "digits_mlp", "--dataset", "digits", "--epochs", "0"], "must be a positive integer"),
    (["--model", "digits_mlp", "--dataset", "digits", "--target", "95"], "--target: must be an accuracy in (0, 1]"),
])
def test_train_bad_input_exits_2(args, message):
    out = train(*args, timeout=120)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_missing_dataset_files_say_where_to_put_them(tmp_path):
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", (
        "import sys; from nncompare import cli as compare; import nncompare.models.data as d; d.MIRRORS['mnist'] = 'http://127.0.0.1:9/'; "
        f"sys.exit(compare.main(['train', '--model', 'lenet5', '--dataset', 'mnist', '--data-dir', {str(tmp_path)!r}]))")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "put the file there" in out.stderr and "Traceback" not in out.stderr
