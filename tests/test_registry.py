"""The lazy registry: no framework imported by models/backends, clear errors for unknown or missing backends."""
import importlib.util
import subprocess
import sys

import pytest

from nncompare import backends
from nncompare.backends import BackendError, available_backends, get_adapter

from .conftest import ROOT, require

FRAMEWORK_MODULES = ("tensorflow", "keras", "torch", "mxnet")


def test_importing_models_and_backends_imports_no_framework():
    code = ("import sys\nfrom nncompare import models, backends, cli, cell, runner, executors, rows, report\n"
            "backends.available_backends(); backends.get_adapter('numpy'); models.zoo.get('lenet5').summary()\n"
            f"print(sorted(m for m in {FRAMEWORK_MODULES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_available_backends_reports_every_backend():
    info = available_backends()
    assert set(info) == {"numpy", "keras", "keras-jax", "keras-torch", "torch", "mxnet", "onnxruntime"}
    assert info["numpy"]["installed"] and info["numpy"]["version"]


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(BackendError, match=r"unknown backend 'jax' \(known: numpy, keras, keras-jax, keras-torch, torch, mxnet, onnxruntime\)"):
        get_adapter("jax")


def test_missing_framework_names_the_install_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mxnet" else real(name, *a))
    assert available_backends()["mxnet"] == {"installed": False, "version": None}
    with pytest.raises(BackendError, match=r"backend 'mxnet' is not installed \(missing: mxnet\): "
                                           r"pip install 'nncompare\[mxnet\]'"):
        get_adapter("mxnet")


def test_a_partly_installed_backend_names_the_missing_package_and_the_extra(monkeypatch):
    """keras is there but not the engine keras-jax runs on: one line naming jax and the extra that brings it."""
    require("keras-jax")
    real = importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec",
                        lambda name, *a: None if name == "jax" else real(name, *a))
    assert not available_backends()["keras-jax"]["installed"]
    with pytest.raises(BackendError, match=r"^backend 'keras-jax' is not installed \(missing: jax\): "
                                           r"pip install 'nncompare\[jax\]'"):
        backends.check_backend("keras-jax")


def test_every_backend_name_list_derives_from_the_descriptors():
    from nncompare.backends import BACKENDS, COMPILERS, frameworks, names
    from .conftest import FRAMEWORKS
    assert names() == list(BACKENDS)
    assert set(frameworks()) == {b for b in BACKENDS if b != "numpy" and BACKENDS[b].trains} >= {"torch", "keras"}
    assert set(FRAMEWORKS) <= set(frameworks()) and COMPILERS == {"keras": "XLA (jit_compile)", "torch": "torch.compile"}
    for b in BACKENDS.values():
        assert b.module.startswith("nncompare.backends.") and b.requires and b.framework
        assert (b.extra is None) == b.reference  # only the oracle comes with the core install


@pytest.mark.parametrize("device", ["tpu", "gpu:x", ""])
def test_bad_device_names_are_rejected(device):
    from nncompare.backends import parse_device
    with pytest.raises(BackendError, match="unknown device"):
        parse_device(device)


def test_the_api_imports_from_a_folder_with_its_own_models_package(tmp_path):
    """One installed namespace: a user's own `models` package neither shadows nor is shadowed by ours."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("MINE = True\n")
    code = ("import models; assert models.MINE\n"
            "from nncompare.backends import get_adapter\nfrom nncompare.models import zoo\n"
            "net = get_adapter('numpy').build(zoo.get('perceptron'))\nprint(net.predict([[0.0] * 2]).shape)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)  # a checkout on the path, as on a machine where nothing is installed
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 1)"
