"""The lazy registry: no framework imported by models/backends, clear errors for unknown or missing backends."""
import importlib.util
import subprocess
import sys

import pytest

import backends
from backends import BackendError, available_backends, get_adapter

from .conftest import ROOT

FRAMEWORK_MODULES = ("tensorflow", "keras", "torch", "mxnet")


def test_importing_models_and_backends_imports_no_framework():
    code = ("import sys, models, backends, compare\n"
            "backends.available_backends(); backends.get_adapter('numpy'); models.zoo.get('lenet5').summary()\n"
            f"print(sorted(m for m in {FRAMEWORK_MODULES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_available_backends_reports_every_backend():
    info = available_backends()
    assert set(info) == {"numpy", "keras", "torch", "mxnet"}
    assert info["numpy"]["installed"] and info["numpy"]["version"]


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(BackendError, match=r"unknown backend 'jax' \(known: numpy, keras, torch, mxnet\)"):
        get_adapter("jax")


def test_missing_framework_names_the_install_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mxnet" else real(name, *a))
    assert available_backends()["mxnet"] == {"installed": False, "version": None}
    with pytest.raises(BackendError, match=r"backend 'mxnet' is not installed: pip install 'nncompare\[mxnet\]'"):
        get_adapter("mxnet")


@pytest.mark.parametrize("device", ["tpu", "gpu:x", ""])
def test_bad_device_names_are_rejected(device):
    from backends import parse_device
    with pytest.raises(BackendError, match="unknown device"):
        parse_device(device)
