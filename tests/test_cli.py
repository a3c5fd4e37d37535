"""compare.py: list, summary and bad input (one line, exit code 2, no traceback)."""
import subprocess
import sys

import pytest

from .conftest import ROOT


def cli(*args):
    return subprocess.run([sys.executable, "compare.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_list_shows_models_backends_and_devices():
    out = cli("list")
    assert out.returncode == 0, out.stderr
    assert "lenet5" in out.stdout and "61,706" in out.stdout
    for backend in ("numpy", "keras", "torch", "mxnet"):
        assert backend in out.stdout
    assert "cpu" in out.stdout


def test_summary_of_a_zoo_model_and_a_json_file(tmp_path):
    from nncompare.models import zoo
    path = tmp_path / "m.json"
    zoo.get("mlp").save(path)
    for target in ("mlp", str(path)):
        out = cli("summary", target)
        assert out.returncode == 0, out.stderr
        assert "dense_0 (Dense)" in out.stdout and "235,146" in out.stdout


@pytest.mark.parametrize("content,message", [
    ("not json", "not JSON"),
    ('{"name": "m", "input_shape": [3], "layers": [{"type": "dense", "units": 0}]}',
     "layer 0 (dense_0): field 'units'"),
    ('{"name": "m", "input_shape": [3], "layers": [{"type": "lstm"}]}', "unknown layer kind 'lstm'"),
])
def test_bad_spec_files_give_one_line_and_exit_2(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    out = cli("summary", str(path))
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_unknown_model_exits_2():
    out = cli("summary", "resnet9000")
    assert out.returncode == 2 and "unknown model 'resnet9000'" in out.stderr
