"""One test per trap of docs/design.md ("Traps between frameworks"), on the native objects where the trap lives."""
import subprocess
import sys

import numpy as np
import pytest

from nncompare.backends import Adam, BackendError, SGD, get_adapter
from nncompare.backends.bench import tool_env
from nncompare.backends.check import TOLERANCE, compare, dict_diff, sample_batch, scaled_diff
from nncompare.models import (Activation, AvgPool2D, BatchNorm, Conv2D, Dense, Flatten, MaxPool2D, ModelSpec,
                             init_weights, zoo)

from .conftest import FRAMEWORKS, ROOT, require
from .specs import POOL_CASES, pool_case


def build(backend, spec, **kw):
    require(backend)
    return get_adapter(backend).build(spec, **kw)


def test_trap1_kernel_layouts_are_translated():
    spec = ModelSpec("k", (2, 5, 5), (Conv2D(3, (2, 3)), Flatten(), Dense(4)))
    w = init_weights(spec, 1)
    torch_net = build("torch", spec, weights=w)
    conv, linear = torch_net.native.nodes["conv2d_0"], torch_net.native.nodes["dense_2"]
    assert np.array_equal(conv.weight.detach().numpy(), w["conv2d_0/kernel"])                  # OIHW
    assert np.array_equal(linear.weight.detach().numpy(), w["dense_2/kernel"].T)               # (out, in)
    mx_net = build("mxnet", spec, weights=w)
    assert np.array_equal(mx_net.native.node2.weight.data().asnumpy(), w["dense_2/kernel"].T)  # (out, in)
    keras_net = build("keras", spec, weights=w)
    keras_conv = keras_net.native.get_layer("conv2d_0").kernel.numpy()
    assert np.array_equal(keras_conv, w["conv2d_0/kernel"].transpose(2, 3, 1, 0))             # HWIO


def test_trap2_keras_is_channels_last_and_permutes_the_first_dense_rows():
    spec = ModelSpec("f", (3, 2, 2), (Flatten(), Dense(2)))
    w = init_weights(spec, 2)
    net = build("keras", spec, weights=w)
    import keras  # loaded by the build (with its engine chosen)
    # the model itself is channels-last from its input on: canonical NCHW batches are transposed on the host,
    # outside the timed graph, and no layer of the model transposes them
    assert tuple(net.native.input.shape[1:]) == (2, 2, 3)
    assert tuple(net.native.get_layer("flatten_0").input.shape[1:]) == (2, 2, 3)
    assert not any(isinstance(layer, keras.layers.Permute) for layer in net.native.layers)
    x_dev, _ = net.to_device(sample_batch(spec, 3)[0], np.zeros(3, np.int64))
    assert tuple(x_dev.shape) == (3, 2, 2, 3)
    native = net.native.get_layer("dense_1").kernel.numpy()
    # row r of Keras' kernel is flat position r in (H, W, C) order, i.e. canonical (C, H, W) index c*4 + h*2 + w
    hwc_to_chw = [c * 4 + h * 2 + x for h in range(2) for x in range(2) for c in range(3)]
    assert np.array_equal(native, w["dense_1/kernel"][hwc_to_chw])
    x = sample_batch(spec, 3)[0]
    oracle = get_adapter("numpy").build(spec, weights=w)
    assert scaled_diff(net.logits(x), oracle.logits(x)) <= TOLERANCE


@pytest.mark.parametrize("backend", FRAMEWORKS)
@pytest.mark.parametrize("size,stride", [(6, 2), (7, 2), (8, 3)])
def test_trap3_same_padding_puts_the_odd_pixel_bottom_right(backend, size, stride):
    spec = ModelSpec("p", (1, size, size), (Conv2D(2, 4, strides=stride, padding="same"),))
    net, oracle = build(backend, spec), get_adapter("numpy").build(spec)
    x = sample_batch(spec, 2)[0]
    assert scaled_diff(net.logits(x), oracle.logits(x)) <= TOLERANCE


@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_trap4_pooling_floors_odd_sizes(backend):
    spec = ModelSpec("pool", (2, 7, 9), (MaxPool2D(2), MaxPool2D(2, strides=1)))
    net = build(backend, spec)
    out = net.logits(sample_batch(spec, 2)[0])
    assert out.shape == (2, 2, 2, 3)
    assert scaled_diff(out, get_adapter("numpy").build(spec).logits(sample_batch(spec, 2)[0])) <= TOLERANCE
    with pytest.raises(BackendError, match="no trainable parameters"):
        net.train_step(*sample_batch(spec, 2))


@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_trap5_batchnorm_momentum_weighs_the_old_value_and_variance_is_biased(backend):
    spec = ModelSpec("bn", (3,), (BatchNorm(momentum=0.9, epsilon=1e-5), Dense(2)))
    net = build(backend, spec, optimizer=SGD(lr=0.0))
    x, y = sample_batch(spec, 4)
    net.train_step(x, y)
    w = net.get_weights()
    np.testing.assert_allclose(w["batchnorm_0/moving_mean"], 0.1 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(w["batchnorm_0/moving_var"], 0.9 + 0.1 * x.var(0), rtol=1e-5)  # ddof=0


@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_trap7_loss_is_a_batch_mean(backend):
    spec = zoo.get("digits_mlp")
    net, oracle = build(backend, spec, optimizer=SGD(lr=0.1)), get_adapter("numpy").build(spec, optimizer=SGD(lr=0.1))
    for n in (1, 7, 32):  # a mean makes the step size independent of the batch size
        x, y = sample_batch(spec, n, seed=n)
        net.train_step(x, y)
        oracle.train_step(x, y)
    assert dict_diff(net.get_weights(), oracle.get_weights())[0] <= TOLERANCE


@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_trap8_adam_epsilon_is_added_after_bias_correction(backend):
    # with a large epsilon, Keras' and MXNet's stock Adam (epsilon before correction) are visibly off
    spec = zoo.get("digits_mlp")
    opt = Adam(lr=0.01, epsilon=0.1)
    net, oracle = build(backend, spec, optimizer=opt), get_adapter("numpy").build(spec, optimizer=opt)
    for i in range(3):
        batch = sample_batch(spec, 16, seed=i)
        net.train_step(*batch)
        oracle.train_step(*batch)
    assert dict_diff(net.get_weights(), oracle.get_weights())[0] <= TOLERANCE


def test_trap10_every_framework_gets_the_same_thread_count():
    env = tool_env(3)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "MXNET_OMP_MAX_THREADS"):
        assert env[var] == "3"
    assert "MXNET_CPU_WORKER_NTHREADS" not in env  # trap 13: one engine worker, N OpenMP threads


def test_trap11_mxnet_weights_map_by_position_not_by_global_names():
    spec = zoo.get("lenet5")
    first = build("mxnet", spec, seed=0)
    second = build("mxnet", spec, seed=1)  # MXNet names its parameters with global counters: conv2_, conv3_ ...
    names = [p.name for p in second.native.collect_params().values()]
    assert not any(n.startswith("hybridsequential0_") for n in names)
    expected = init_weights(spec, 1)
    got = second.get_weights()
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    assert not np.array_equal(first.get_weights()["dense_5/kernel"], got["dense_5/kernel"])


def test_trap11_mxnet_dense_does_not_flatten_and_softmax_works():
    spec = ModelSpec("s", (6,), (Dense(4, activation="softmax"), Dense(3, activation="softmax")))
    net, oracle = build("mxnet", spec), get_adapter("numpy").build(spec)
    x = sample_batch(spec, 5)[0]
    assert scaled_diff(net.predict(x), oracle.predict(x)) <= TOLERANCE
    np.testing.assert_allclose(net.predict(x).sum(1), 1, rtol=1e-6)


@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_trap17_average_pooling_excludes_padded_cells(backend):
    # 5x5, pool 2 stride 2 "same": TF pads one column/row at the bottom/right; the corner window holds one
    # real cell, so its average is that cell's value (including the pads would divide it by 4).
    spec = ModelSpec("avg", (1, 5, 5), (AvgPool2D(2, padding="same"),))
    x = np.arange(25, dtype=np.float32).reshape(1, 1, 5, 5) + 1
    out = build(backend, spec).logits(x)
    assert out.shape == (1, 1, 3, 3)
    assert out[0, 0, 2, 2] == pytest.approx(25.0)
    assert out[0, 0, 0, 2] == pytest.approx((5 + 10) / 2)
    # 3x3, pool 2 stride 2: one padded row/column at the bottom/right only; max never picks a padded cell
    x = -np.arange(1, 10, dtype=np.float32).reshape(1, 1, 3, 3)
    avg = build(backend, ModelSpec("a", (1, 3, 3), (AvgPool2D(2, padding="same"),))).logits(x)
    np.testing.assert_allclose(avg[0, 0], [[-3, -4.5], [-7.5, -9]])
    top = build(backend, ModelSpec("m", (1, 3, 3), (MaxPool2D(2, padding="same"),))).logits(x)
    np.testing.assert_array_equal(top[0, 0], [[-1, -3], [-7, -9]])


@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_trap18_gelu_exact_and_tanh_forms_are_named_apart(backend):
    spec_exact = ModelSpec("g", (7,), (Activation("gelu"),))
    spec_tanh = ModelSpec("g", (7,), (Activation("gelu_tanh"),))
    x = np.linspace(-3, 3, 7, dtype=np.float32).reshape(1, 7) * 1.7
    exact, approx = build(backend, spec_exact).logits(x), build(backend, spec_tanh).logits(x)
    from math import erf, sqrt
    ref = np.array([[v * 0.5 * (1 + erf(v / sqrt(2))) for v in x[0].astype(np.float64)]])
    assert np.abs(exact - ref).max() < 1e-5
    assert np.abs(approx - ref).max() > 1e-4  # the tanh form is a different function: never silently swapped
    oracle = get_adapter("numpy").build(spec_tanh)
    assert np.abs(approx - oracle.logits(x)).max() < 1e-5


@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_trap20_leaky_relu_slope_is_the_specs_not_the_frameworks_default(backend):
    x = np.array([[-10.0, -1.0, 2.0]], dtype=np.float32)
    plain = build(backend, ModelSpec("l", (3,), (Activation("leaky_relu"),))).logits(x)
    assert np.allclose(plain, [[-2.0, -0.2, 2.0]])  # 0.2, Keras' default; torch's default would give -0.1
    sloped = build(backend, ModelSpec("l", (3,), (Activation("leaky_relu(0.05)"),))).logits(x)
    assert np.allclose(sloped, [[-0.5, -0.05, 2.0]])


@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_trap22_binary_cross_entropy_gradient_at_a_logit_of_exactly_zero(backend):
    spec = ModelSpec("b", (3,), (Dense(1),))
    weights = {"dense_0/kernel": np.zeros((3, 1), np.float32), "dense_0/bias": np.zeros(1, np.float32)}
    x = np.ones((8, 3), np.float32)
    y = np.array([1, 0, 0, 1, 0, 0, 1, 0])
    loss, grads = build(backend, spec, weights=weights).loss_and_grads(x, y)
    assert loss == pytest.approx(np.log(2), rel=1e-6)
    assert grads["dense_0/bias"] == pytest.approx([0.5 - y.mean()], abs=1e-7)  # sigmoid(0) - y, averaged
    assert np.allclose(grads["dense_0/kernel"], 0.5 - y.mean(), atol=1e-7)


@pytest.mark.parametrize("name", sorted(POOL_CASES))
@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_pool_windows_and_divisors_by_hand_trap29_trap30(backend, name):
    """torch's ceil_mode drops a last window that would start in the padding; count_include_pad counts padded
    cells but never a ceil_mode overhang; asymmetric pads: every framework against outputs worked out by hand."""
    spec, x, expect = pool_case(name)
    assert spec.output_shape == expect.shape[1:]
    np.testing.assert_allclose(get_adapter("numpy").build(spec).logits(x), expect, rtol=1e-6)
    np.testing.assert_allclose(build(backend, spec).logits(x), expect, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(POOL_CASES))
@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_pool_gradients_match_the_oracle(backend, name):
    layer, width, _ = POOL_CASES[name]
    spec = ModelSpec("p", (2, 5, width), (Conv2D(3, 1), layer, Flatten(), Dense(3)))
    require(backend)
    report = compare(get_adapter(backend), get_adapter("numpy"), spec, checks=("logits", "grads"))
    assert report.ok(), report.diffs


KINK_GRADS_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import numpy as np
from nncompare.backends import get_adapter
from nncompare.backends.bench import batch_pool
from nncompare.models import zoo
spec = zoo.get("mobilenet_mini")
x, y = batch_pool(spec, 32)[0]
np.savez({out!r}, **get_adapter({backend!r}).build(spec).loss_and_grads(x, y)[1])
"""


@pytest.mark.slow
def test_trap40_a_relu6_kink_beside_a_batchnorm_mean_is_rounding_not_a_mismatch(tmp_path, monkeypatch):
    """The first batch of `compare.py run --models mobilenet_mini --batch-sizes 32` puts one relu6 input 2.5e-7
    from the kink at 0: every framework's gradients are the oracle's with that one element's gradient passed or
    blocked, nothing else."""
    from nncompare.backends import numpy_backend
    from nncompare.backends.bench import batch_pool

    spec = zoo.get("mobilenet_mini")
    x, y = batch_pool(spec, 32)[0]
    oracle = get_adapter("numpy").build(spec)
    outs = oracle.walk(x, training=True)[1]
    relu6 = {n.name: outs[n.info.inputs[0]] for n in oracle.nodes
             if isinstance(n, numpy_backend.ActivationNode) and n.layer.activation == "relu6"}
    node = min(relu6, key=lambda n: np.abs(relu6[n]).min())
    at = np.unravel_index(np.argmin(np.abs(relu6[node])), relu6[node].shape)
    assert 0 < relu6[node][at] < 1e-6  # float64: the gradient passes there; float32 rounds it either side of 0
    passed = oracle.loss_and_grads(x, y)[1]
    backward = numpy_backend.ActivationNode.backward

    def blocking(self, w, cache, dy, grads):
        if self.name == node:
            dy = dy.copy()
            dy[at] = 0.0
        return backward(self, w, cache, dy, grads)

    monkeypatch.setattr(numpy_backend.ActivationNode, "backward", blocking)
    blocked = oracle.loss_and_grads(x, y)[1]
    monkeypatch.undo()
    assert dict_diff(blocked, passed)[0] > 1e-3  # one element moves every kernel gradient before it
    grads = {backend: build(backend, spec).loss_and_grads(x, y)[1] for backend in FRAMEWORKS}
    for backend in ("keras-jax", "keras-torch"):  # Keras hosts one engine per process
        require(backend)
        out = tmp_path / f"{backend}.npz"
        script = KINK_GRADS_SCRIPT.format(root=str(ROOT), out=str(out), backend=backend)
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        grads[backend] = dict(np.load(out))
    for backend, g in grads.items():
        sides = {"passes": dict_diff(g, passed)[0], "blocks": dict_diff(g, blocked)[0]}
        assert min(sides.values()) < TOLERANCE, (backend, sides)
