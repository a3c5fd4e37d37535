"""MXNet-specific behaviour: pre-placed per-batch NDArrays, the graph block, GELU's form, TF "same" pools."""
import math

import numpy as np
import pytest

from nncompare.backends import SGD, get_adapter
from nncompare.backends.check import compare, sample_batch
from nncompare.models.spec import (LAYER_KINDS, Activation, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D, Dense,
                                   Flatten, GlobalAveragePooling2D, MaxPool2D, ModelSpec)

from .conftest import require


@pytest.fixture(scope="module")
def mxnet():
    require("mxnet")
    return get_adapter("mxnet")


def _oracle(spec, x):
    return get_adapter("numpy").build(spec).logits(x)


def residual_spec() -> ModelSpec:
    """A projection-shortcut residual block and an inception-style concat, ending in global average pooling."""
    return ModelSpec("residual", (3, 9, 9), (
        Conv2D(4, 3, padding="same", use_bias=False, name="c1"), BatchNorm(name="bn1"), Activation("relu", name="r1"),
        Conv2D(4, 3, strides=2, padding="same", name="c2"),
        Conv2D(4, 1, strides=2, use_bias=False, inputs=("input",), name="proj"),
        Add(inputs=("c2", "proj"), name="add"),
        Conv2D(2, 1, name="b1"), MaxPool2D(3, 1, padding="same", inputs=("add",), name="b2"),
        Concatenate(inputs=("b1", "b2"), name="cat"), Activation("silu", name="act"),
        GlobalAveragePooling2D(name="gap"), Dense(5, activation="softmax", name="out")))


def test_every_layer_kind_has_a_converter(mxnet):
    from nncompare.backends.mxnet_backend import CONVERTERS
    assert set(LAYER_KINDS.values()) <= set(CONVERTERS)


def test_residual_graph_matches_the_oracle_and_reports_every_node(mxnet):
    spec = residual_spec()
    report = compare(mxnet, get_adapter("numpy"), spec)
    assert report.ok(), report.diffs
    x, _ = sample_batch(spec)
    outs = mxnet.build(spec).layer_outputs(x)
    assert list(outs) == [i.name for i in spec.logits_infos()]  # topological order, head dropped
    assert outs["cat"].shape == (8, 6, 5, 5) and outs["gap"].shape == (8, 6)


def test_weights_bind_by_canonical_key_without_bias_when_use_bias_is_false(mxnet):
    spec = residual_spec()
    first, second = mxnet.build(spec, seed=0), mxnet.build(spec, seed=1)  # second model: new global MXNet names
    assert "c1/bias" not in second.get_weights() and "proj/bias" not in second.get_weights()
    second.set_weights(first.get_weights())
    x, _ = sample_batch(spec)
    np.testing.assert_array_equal(second.logits(x), first.logits(x))


def test_to_device_batches_train_exactly_like_numpy_batches(mxnet):
    from mxnet import nd
    spec = residual_spec()
    batches = [sample_batch(spec, 8, seed) for seed in range(3)]
    host, placed = (mxnet.build(spec, optimizer=SGD(0.1, 0.9)) for _ in range(2))
    device_batches = [placed.to_device(x, y) for x, y in batches]  # one NDArray pair per batch (trap 14)
    for x, y in device_batches:
        assert isinstance(x, nd.NDArray) and x.context == placed.ctx and x.shape == (8,) + spec.input_shape
    batches[0][0][:] = 0  # to_device copied: the NDArrays do not alias the host arrays
    assert float(nd.abs(device_batches[0][0]).sum().asscalar()) > 0
    batches[0] = sample_batch(spec, 8, 0)
    host_losses = [float(host.train_batch(x, y)) for x, y in batches]
    placed_losses = [float(placed.train_batch(x, y)) for x, y in device_batches]
    assert host_losses == placed_losses
    for k, w in host.get_weights().items():
        np.testing.assert_array_equal(placed.get_weights()[k], w, err_msg=k)


def test_settings_record_hybridization_and_thread_configuration(mxnet, monkeypatch):
    """The OpenMP count is what MXNet runs, as it read its variables at load (and the engine worker's own
    setting where that counts): changing the variables later changes neither."""
    net = mxnet.build(residual_spec())
    s = net.settings
    assert s["hybridize"] == {"static_alloc": True, "static_shape": True}
    assert s["cpu_worker_threads"] == 1 and s["kvstore"] is None
    assert s["omp_threads"] == net.omp_threads >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(s["omp_threads"] + 2))
    monkeypatch.setenv("MXNET_OMP_MAX_THREADS", str(s["omp_threads"] + 1))
    assert net.settings["omp_threads"] == s["omp_threads"]
    assert net.settings["omp_threads_fixed_at_load"] == s["omp_threads_fixed_at_load"]


def _gelu_erf(x):
    return np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.ravel()]).reshape(x.shape)


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("kind, formula", [("gelu", _gelu_erf), ("gelu_tanh", _gelu_tanh)])
def test_gelu_forms_trap18(mxnet, kind, formula):
    """MXNet's LeakyReLU(act_type='gelu') is the exact erf form; the tanh form differs by up to ~5e-4."""
    spec = ModelSpec("g", (41,), (Activation(kind),))
    x = np.linspace(-5, 5, 41, dtype=np.float32)[None]
    got = mxnet.build(spec).logits(x).astype(np.float64)
    other = _gelu_tanh if formula is _gelu_erf else _gelu_erf
    assert np.abs(got - formula(x.astype(np.float64))).max() < 2e-6
    assert np.abs(got - other(x.astype(np.float64))).max() > 1e-4


def test_same_pools_with_asymmetric_pads_trap17(mxnet):
    """TF "same" on 3x3 with a 2x2/2 pool pads one row/column at the bottom/right only: the average divides by
    the real cells under each window, and the max never picks a padded cell (all inputs negative)."""
    x = -np.arange(1, 10, dtype=np.float32).reshape(1, 1, 3, 3)
    avg = mxnet.build(ModelSpec("a", (1, 3, 3), (AvgPool2D(2, padding="same"),))).logits(x)
    np.testing.assert_allclose(avg[0, 0], [[-3, -4.5], [-7.5, -9]])
    mx_ = mxnet.build(ModelSpec("m", (1, 3, 3), (MaxPool2D(2, padding="same"),))).logits(x)
    np.testing.assert_array_equal(mx_[0, 0], [[-1, -3], [-7, -9]])


@pytest.mark.parametrize("pool", [MaxPool2D, AvgPool2D])
@pytest.mark.parametrize("k, s", [(3, 1), (2, 2), (3, 2), (4, 3)])  # symmetric and asymmetric pads
def test_same_pools_match_the_oracle(mxnet, pool, k, s):
    spec = ModelSpec("p", (2, 7, 8), (Conv2D(3, 1), pool(k, s, padding="same"), Flatten(), Dense(3)))
    report = compare(mxnet, get_adapter("numpy"), spec, checks=("logits", "grads"))
    assert report.ok(), report.diffs
