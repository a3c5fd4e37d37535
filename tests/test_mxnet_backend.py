"""MXNet-specific behaviour: pre-placed per-batch NDArrays, the graph block, GELU's form, TF "same" pools, the CNN
vocabulary's traps (depthwise layout, the 'full' pooling convention, count_include_pad, asymmetric pads,
hard_sigmoid's defaults, clip's gradient at its bounds, adaptive bins)."""

import numpy as np
import pytest

from nncompare.backends import SGD, get_adapter
from nncompare.backends.check import compare, sample_batch
from nncompare.models.spec import (LAYER_KINDS, Activation, AdaptiveAvgPool2D, Add, AvgPool2D, BatchNorm, Concatenate,
                                   Conv2D, Dense, Flatten, GlobalAveragePooling2D, LayerNormalization, MaxPool2D,
                                   ModelSpec, ZeroPadding2D)

from .conftest import require
from .specs import pool_case


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


@pytest.mark.parametrize("pool", [MaxPool2D, AvgPool2D])
@pytest.mark.parametrize("k, s", [(3, 1), (2, 2), (3, 2), (4, 3)])  # symmetric and asymmetric pads
def test_same_pools_match_the_oracle(mxnet, pool, k, s):
    spec = ModelSpec("p", (2, 7, 8), (Conv2D(3, 1), pool(k, s, padding="same"), Flatten(), Dense(3)))
    report = compare(mxnet, get_adapter("numpy"), spec, checks=("logits", "grads"))
    assert report.ok(), report.diffs


@pytest.mark.parametrize("layer, shape", [(MaxPool2D(3, 2, padding="same"), (2, 8, 10)),
                                          (MaxPool2D(2, 2, padding="same"), (2, 7, 9)),
                                          (MaxPool2D(3, 2, ceil_mode=True), (2, 8, 10)),
                                          (MaxPool2D(2, 3, ceil_mode=True), (2, 8, 10))])
def test_max_pools_padded_only_after_the_input_use_the_full_convention_without_a_pad(mxnet, layer, shape):
    """A max pool whose padding and overhang lie only after the input (TF's "same" at stride 2 on an even side, a
    ceil_mode window) is MXNet's 'full' convention as it is, with no Pad op, and still computes the spec's."""
    from mxnet.gluon import nn
    spec = ModelSpec("p", shape, (Conv2D(3, 1), layer, Flatten(), Dense(3)))
    net = mxnet.build(spec)
    pool = net.native.node1
    assert isinstance(pool, nn.MaxPool2D) and pool._kwargs["pooling_convention"] == "full", pool
    report = compare(mxnet, get_adapter("numpy"), spec, checks=("logits", "grads"))
    assert report.ok(), report.diffs


def test_global_average_pooling_is_mxnet_global_pool(mxnet):
    """MXNet's mean over (2, 3) took 5x as long as its global pooling: the adapter pools, keepdims or not."""
    for keepdims in (False, True):
        spec = ModelSpec("g", (3, 5, 6), (Conv2D(4, 1), GlobalAveragePooling2D(keepdims=keepdims)))
        x = sample_batch(spec, 3)[0]
        np.testing.assert_allclose(mxnet.build(spec).logits(x), _oracle(spec, x), rtol=1e-5, atol=1e-6)


def test_depthwise_and_grouped_kernels_keep_the_canonical_layout_trap33(mxnet):
    """Depthwise with multiplier 2: filter f reads input channel f // 2; groups 2 of 4 channels: filter f reads
    channels 2f and 2f + 1. The native weight is the canonical (filters, in // groups, kh, kw) kernel."""
    x = sample_batch(ModelSpec("x", (4, 3, 3), (Flatten(),)), 2)[0]
    depthwise = ModelSpec("dw", (4, 3, 3), (Conv2D(8, 1, groups=4, use_bias=False, name="c"),))
    k = np.arange(1, 9, dtype=np.float32).reshape(8, 1, 1, 1)
    net = mxnet.build(depthwise, weights={"c/kernel": k})
    assert net._params["c/kernel"][0].shape == (8, 1, 1, 1)
    np.testing.assert_allclose(net.logits(x), k[:, 0, 0, 0][None, :, None, None] * np.repeat(x, 2, axis=1),
                               rtol=1e-6)
    grouped = ModelSpec("g", (4, 3, 3), (Conv2D(2, 1, groups=2, use_bias=False, name="c"),))
    k = np.array([1, 10, 100, 1000], np.float32).reshape(2, 2, 1, 1)
    got = mxnet.build(grouped, weights={"c/kernel": k}).logits(x)
    np.testing.assert_allclose(got, np.stack([x[:, 0] + 10 * x[:, 1], 100 * x[:, 2] + 1000 * x[:, 3]], 1),
                               rtol=1e-6)


def test_full_pooling_convention_keeps_the_window_torch_drops_trap29(mxnet):
    """MXNet's 'full' (ceil) convention gives 1 + ceil((8 + 2 - 3) / 3) = 4 windows where torch's ceil_mode, the
    spec's, drops the 4th (it would start in the padding): the adapter pads and floors instead."""
    from mxnet import nd
    spec, x, expect = pool_case("ceil_last_window_dropped_max")
    full = nd.Pooling(nd.array(x), kernel=(1, 3), stride=(1, 3), pad=(0, 1), pool_type="max",
                      pooling_convention="full")
    assert full.shape[-1] == 4 and expect.shape[-1] == spec.output_shape[-1] == 3


def test_hard_sigmoid_defaults_are_not_the_spec_form_trap28(mxnet):
    """MXNet's hard_sigmoid defaults to alpha 0.2, beta 0.5 (Keras 2's); the spec's is relu6(x + 3) / 6."""
    from mxnet import nd
    x = np.array([[-7.0, -4.0, -2.0, -0.5, 0.5, 2.0, 4.0, 7.0]], np.float32)
    hs = np.clip(x + 3, 0, 6) / 6
    assert np.abs(nd.hard_sigmoid(nd.array(x)).asnumpy() - hs).max() > 0.05
    for act, expect in (("hard_sigmoid", hs), ("hard_swish", x * hs), ("relu6", np.clip(x, 0, 6))):
        got = mxnet.build(ModelSpec("a", (8,), (Activation(act),))).logits(x)
        np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7, err_msg=act)


def test_relu6_gradient_is_zero_at_its_kinks(mxnet):
    """MXNet's clip passes the gradient at its bounds; relu6's is 0 at 0 (as relu's) and at 6. A zero-padded
    border with a zero bias sits exactly on the kink at 0."""
    from mxnet import autograd, nd
    from nncompare.backends.mxnet_backend import _activation
    x = nd.array([-1.0, 0.0, 3.0, 6.0, 7.0])
    x.attach_grad()
    with autograd.record():
        y = nd.clip(x, 0, 6)
    y.backward()
    assert x.grad.asnumpy().tolist() == [0, 1, 1, 1, 0]  # the trap
    block = _activation("relu6")
    with autograd.record():
        y = block(x)
    y.backward()
    assert y.asnumpy().tolist() == [0, 0, 3, 6, 6] and x.grad.asnumpy().tolist() == [0, 0, 1, 0, 0]
    spec = ModelSpec("r6", (1, 4, 3), (ZeroPadding2D(1), Conv2D(2, 1, activation="relu6"), Flatten(), Dense(2)))
    report = compare(mxnet, get_adapter("numpy"), spec, checks=("grads",))
    assert report.ok(), report.diffs


@pytest.mark.parametrize("size", [(2, 3), (5, 7), (4, 4), (1, 1)])
def test_adaptive_pooling_uses_torch_bins(mxnet, size):
    """contrib.AdaptiveAvgPooling2D's bins are torch's [floor(i H / oh), ceil((i + 1) H / oh)), for outputs
    smaller and larger than the 5x6 input."""
    spec = ModelSpec("ad", (2, 5, 6), (AdaptiveAvgPool2D(size), Flatten(), Dense(3)))
    report = compare(mxnet, get_adapter("numpy"), spec, checks=("logits", "grads"))
    assert report.ok(), report.diffs


@pytest.mark.parametrize("shape", [(1, 3, 4), (1,)])
def test_layernorm_over_one_channel_is_exactly_beta_with_no_gamma_gradient(mxnet, shape):
    spec = ModelSpec("ln", shape, (LayerNormalization(epsilon=1e-5, name="ln"), Flatten(), Dense(2, name="o")))
    w = get_adapter("numpy").build(spec).get_weights() | {"ln/gamma": np.array([1.5], np.float32),
                                                          "ln/beta": np.array([0.25], np.float32)}
    net = mxnet.build(spec, weights=w)
    x, y = sample_batch(spec, 4)
    x = x * 100 + 3
    assert np.array_equal(net.layer_outputs(x)["ln"], np.full((4,) + shape, 0.25, np.float32))
    assert np.array_equal(net.loss_and_grads(x, y)[1]["ln/gamma"], [0.0])


def test_hard_sigmoid_beside_its_input_in_a_sum_has_the_oracle_gradients_trap38(mxnet):
    """Hybridized, MXNet's hard_sigmoid backward writes its input gradient over its output gradient even when
    another node reads that gradient too: in a + hard_sigmoid(f(a)) the direct path to a got the masked gradient.
    The adapter composes hard_sigmoid from relu6."""
    from mxnet import autograd, gluon, nd

    class Sum(gluon.HybridBlock):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.w = self.params.get("w", shape=(4, 4))

        def hybrid_forward(self, F, x, r, w):
            a = F.dot(x, w)
            return F.sum((a + F.hard_sigmoid(F.dot(a, w), alpha=1 / 6, beta=0.5)) * r)

    rng = np.random.default_rng(0)
    x, r, w = (rng.standard_normal(s).astype(np.float32) for s in ((3, 4), (3, 4), (4, 4)))
    grads = []
    for hybridize in (False, True):
        net = Sum()
        net.initialize()
        net.w.set_data(nd.array(w))
        if hybridize:
            net.hybridize()
        with autograd.record():
            loss = net(nd.array(x), nd.array(r))
        loss.backward()
        grads.append(net.w.grad().asnumpy())
    assert np.abs(grads[1] - grads[0]).max() > 0.1 * np.abs(grads[0]).max()  # the trap
    for act in ("hard_sigmoid", "hard_swish"):
        spec = ModelSpec("hs", (4,), (Dense(4, name="a"), Dense(4, activation=act, name="b"),
                                      Add(inputs=("a", "b"), name="s"), Dense(2, name="o")))
        report = compare(mxnet, get_adapter("numpy"), spec, checks=("grads",))
        assert report.ok(), (act, report.diffs)
