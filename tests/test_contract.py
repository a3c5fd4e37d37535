"""The adapter contract is declared once, in the base class: public methods check their arguments there, once,
and call each backend's private implementation."""
from __future__ import annotations

import pytest

from nncompare.backends import Adapter, BackendError, get_adapter
from nncompare.backends.check import sample_batch
from nncompare.models import zoo

from .conftest import FRAMEWORKS, require

PUBLIC = ("set_weights", "loss_and_grads", "set_optimizer", "to_device", "train_batch", "set_threads", "train_step",
          "fit", "predict", "evaluate", "build")
IN_PROCESS = ["numpy", *FRAMEWORKS, "onnxruntime"]


@pytest.mark.parametrize("backend", IN_PROCESS)
def test_backends_implement_the_private_half_only(backend):
    require(backend)
    cls = get_adapter(backend)
    overridden = [m for m in PUBLIC if any(m in k.__dict__ for k in cls.__mro__ if k is not Adapter
                                           and issubclass(k, Adapter))]
    assert not overridden, f"{backend} overrides the checked public methods {overridden}"


@pytest.mark.parametrize("backend", [b for b in IN_PROCESS if b != "onnxruntime"])
def test_arguments_are_checked_once(backend, monkeypatch):
    """set_weights checked the weights twice in torch and MXNet when subclass methods were wrapped by name."""
    require(backend)
    spec = zoo.get("digits_mlp")
    net = get_adapter(backend).build(spec)
    calls = []
    real = Adapter._check_weights
    monkeypatch.setattr(Adapter, "_check_weights", lambda self, w: calls.append(1) or real(self, w))
    net.set_weights(net.get_weights())
    assert len(calls) == 1


@pytest.mark.parametrize("backend", IN_PROCESS)
def test_the_timers_hooks_are_there_with_defaults(backend):
    require(backend)
    net = get_adapter(backend).build(zoo.get("perceptron"))
    assert isinstance(net.settings, dict) and isinstance(net.thread_choices(2), list)
    x, y = sample_batch(net.spec, 4)
    if backend == "onnxruntime":
        with pytest.raises(BackendError, match="inference only"):
            net.train_batch(*net.to_device(x, y))
        return
    loss = float(net.train_batch(*net.to_device(x, y)))  # the timer's unchecked call on to_device's tensors
    assert loss > 0


def test_a_thread_count_fixed_at_load_is_one_clear_error():
    net = get_adapter("numpy").build(zoo.get("perceptron"))
    assert net.thread_choices(2) == []
    with pytest.raises(BackendError, match="numpy: its operator thread count cannot change after it loaded"):
        net.use_threads(1)


@pytest.mark.parametrize("spelling,stored", [(" cpu", "cpu"), ("CPU", "cpu"), ("cpu:00", "cpu"), ("cpu:0", "cpu")])
def test_a_device_is_stored_under_its_canonical_name(spelling, stored):
    assert get_adapter("numpy").build(zoo.get("perceptron"), device=spelling).device == stored


@pytest.mark.parametrize("spelling", ["gpu:\u0661", "cpu:\u0660", "gpu:123456789", "cpu:1", "tpu"])
def test_odd_device_digits_are_refused(spelling):
    from nncompare.backends import parse_device
    with pytest.raises(BackendError, match="unknown device"):
        parse_device(spelling)


def test_loading_a_spec_from_a_fifo_or_device_never_blocks(tmp_path):
    """The API's ModelSpec.load, not only the command line: a FIFO or /dev/zero is one SpecError at once."""
    import os
    import threading

    from nncompare.models import ModelSpec, SpecError
    fifo = tmp_path / "spec.json"
    os.mkfifo(fifo)
    errors = []

    def load(path):
        try:
            ModelSpec.load(path)
        except SpecError as e:
            errors.append(str(e))
    for path in (fifo, "/dev/zero"):
        t = threading.Thread(target=load, args=(path,), daemon=True)
        t.start()
        t.join(timeout=10)
        assert not t.is_alive(), f"ModelSpec.load({path}) blocked"
    assert len(errors) == 2 and all("not a regular file" in e for e in errors), errors
