"""The NumPy oracle: gradients against finite differences, optimizers against their formulas."""
import copy
import dataclasses
import gc
import math
import re
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

from nncompare.backends import Adam, SGD, get_adapter
from nncompare.backends.check import sample_batch
from nncompare.models import (INPUT, Add, AvgPool2D, Conv2D, Dense, Flatten, GlobalAveragePooling2D, LayerNormalization,
                              MaxPool2D, ModelSpec, Multiply, Normalization, Rescaling, zoo)

from .gradcheck import max_relative_fd_error
from .randspec import random_graph_spec
from .specs import ACTIVATION_SPECS, CNN_SPECS, EVERY_LAYER, GRAPHS

NumpyAdapter = get_adapter("numpy")


def batch(spec, n=4, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + spec.input_shape).astype(np.float32)
    return x, rng.integers(0, max(spec.num_classes, 2), n)


def perturbed(spec):
    """An oracle whose BatchNorm statistics and biases are not at their trivial initial values."""
    net = NumpyAdapter.build(spec, seed=3)
    rng = np.random.default_rng(4)
    w = {k: v + (rng.uniform(0.1, 0.5, v.shape) if "var" in k or "gamma" in k else
                 0.1 * rng.standard_normal(v.shape)) for k, v in net.get_weights().items()}
    net.set_weights(w)
    return net


@pytest.mark.parametrize("name", sorted(EVERY_LAYER))
def test_gradients_match_finite_differences_for_every_layer_kind(name):
    spec = EVERY_LAYER[name]
    net = perturbed(spec)
    assert max_relative_fd_error(net, *batch(spec)) < 1e-6


HEAVY = ("mobilenet_mini", "efficientnet_mini", "inception_mini", "resnet20")


# the four deepest zoo models take 1-3 s each: the slow lane checks them
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in zoo.names()])
def test_gradients_match_finite_differences_for_zoo_models(name):
    spec = zoo.get(name).without_dropout()
    if name in ("resnet20", "inception_mini", "mobilenet_mini", "efficientnet_mini"):
        # the same layers on an 8x8 input keep the check to seconds
        spec = dataclasses.replace(spec, input_shape=(3, 8, 8))
    net = perturbed(spec)
    small = name in ("cifar_cnn", "resnet20")  # many weights at float64: sample a few per tensor
    x, y = batch(spec, n=2 if small else 4)
    assert max_relative_fd_error(net, x, y, per_param=2 if small else 12) < 1e-6


def test_loss_is_mean_softmax_cross_entropy():
    spec = zoo.get("digits_mlp")
    net = NumpyAdapter.build(spec)
    x, y = batch(spec, n=6)
    z = net.forward(x).astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = -np.log(p[np.arange(6), y]).mean()
    assert net.loss_and_grads(x, y)[0] == pytest.approx(expected, rel=1e-12)


def test_sigmoid_head_uses_binary_cross_entropy_and_predict_applies_it():
    spec = zoo.get("perceptron")
    net = NumpyAdapter.build(spec)
    x, y = np.array([[1.0, -2.0], [0.5, 0.5]], np.float32), np.array([1, 0])
    z = net.forward(x)[:, 0]
    p = 1 / (1 + np.exp(-z))
    assert net.loss_and_grads(x, y)[0] == pytest.approx(-(np.log(p[0]) + np.log(1 - p[1])) / 2, rel=1e-12)
    np.testing.assert_allclose(net.predict(x)[:, 0], p, rtol=1e-6)


def test_sgd_momentum_follows_its_formula():
    spec = zoo.get("digits_mlp")
    net = NumpyAdapter.build(spec, optimizer=SGD(lr=0.1, momentum=0.9))
    x, y = batch(spec)
    w0 = net.get_weights()
    _, g1 = net.loss_and_grads(x, y)
    net.train_step(x, y)
    _, g2 = net.loss_and_grads(x, y)
    net.train_step(x, y)
    for k in g1:  # v1 = g1, v2 = 0.9 g1 + g2, w2 = w0 - lr (v1 + v2)
        np.testing.assert_allclose(net.w[k], w0[k] - 0.1 * (g1[k] + 0.9 * g1[k] + g2[k]), atol=1e-6)


def test_adam_first_step_moves_each_weight_by_lr_in_the_gradient_sign():
    spec = zoo.get("digits_mlp")
    net = NumpyAdapter.build(spec, optimizer=Adam(lr=0.01))
    x, y = batch(spec)
    w0 = net.get_weights()
    _, g = net.loss_and_grads(x, y)
    net.train_step(x, y)
    for k in g:  # m_hat = g, v_hat = g^2: the step is lr * g / (|g| + eps)
        np.testing.assert_allclose(net.w[k], w0[k] - 0.01 * g[k] / (np.abs(g[k]) + 1e-8), atol=1e-6)


def test_batchnorm_moving_statistics_use_keras_momentum_and_biased_variance():
    spec = EVERY_LAYER["dense_bn_sigmoid_head"]
    net = NumpyAdapter.build(spec, optimizer=SGD(lr=0.0))
    x, y = batch(spec, n=8)
    h = np.tanh(x @ net.w["dense_0/kernel"] + net.w["dense_0/bias"])
    net.train_step(x, y)
    np.testing.assert_allclose(net.w["batchnorm_2/moving_mean"], 0.01 * h.mean(0), atol=1e-12)
    np.testing.assert_allclose(net.w["batchnorm_2/moving_var"], 0.99 + 0.01 * h.var(0), atol=1e-12)


def test_fit_reduces_the_loss_and_is_deterministic():
    spec = zoo.get("digits_mlp")
    x, y = batch(spec, n=64)
    runs = [NumpyAdapter.build(spec, optimizer=Adam(lr=0.01)).fit(x, y, epochs=5, batch_size=16) for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0]["loss"][-1] < 0.5 * runs[0]["loss"][0]


def test_numpy_backend_refuses_gpu():
    from nncompare.backends import BackendError
    with pytest.raises(BackendError, match="cpu only"):
        NumpyAdapter.build(zoo.get("perceptron"), device="gpu")


# --- graphs and the new layer kinds -----------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ACTIVATION_SPECS))
def test_gradients_match_finite_differences_for_every_activation(name):
    spec = ACTIVATION_SPECS[name]
    assert max_relative_fd_error(perturbed(spec), *batch(spec)) < 1e-6


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_gradients_match_finite_differences_for_graphs(name):
    spec = GRAPHS[name]
    assert max_relative_fd_error(perturbed(spec), *batch(spec), per_param=20) < 1e-6


def test_fan_out_gradients_are_summed():
    """s = a + a: d loss / d a doubles, so a's kernel gradient is twice that of a spec with 2 * a's output."""
    twice = ModelSpec("t", (3,), (Dense(2, name="a"), Add(name="s", inputs=("a", "a")), Dense(2, name="o")))
    net = NumpyAdapter.build(twice, seed=1)
    x, y = batch(twice)
    _, g = net.loss_and_grads(x, y)
    h = x @ net.w["a/kernel"] + net.w["a/bias"]
    z = 2 * h @ net.w["o/kernel"] + net.w["o/bias"]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    dz = p / len(y)
    np.testing.assert_allclose(g["o/kernel"], (2 * h).T @ dz, atol=1e-6)
    np.testing.assert_allclose(g["a/kernel"], x.T.astype(np.float64) @ (2 * dz @ net.w["o/kernel"].T), atol=1e-6)


def _pool_outputs(layer, x):
    spec = ModelSpec("p", x.shape[1:], (layer, GlobalAveragePooling2D(), Dense(2)))
    return NumpyAdapter.build(spec).layer_outputs(x)[spec.infos[0].name]


def test_same_average_pooling_excludes_padded_cells():
    """TensorFlow's "same" average: a corner window of a ones image averages to 1, not 4/9 (count_include_pad)."""
    x = np.ones((1, 1, 4, 4), np.float32)
    np.testing.assert_allclose(_pool_outputs(AvgPool2D(3, strides=1, padding="same"), x), 1.0)
    x = np.arange(25, dtype=np.float32).reshape(1, 1, 5, 5)
    out = _pool_outputs(AvgPool2D(2, strides=2, padding="same"), x)  # pads (0, 1): bottom/right
    assert out.shape == (1, 1, 3, 3)
    assert out[0, 0, 0, 0] == pytest.approx((0 + 1 + 5 + 6) / 4)
    assert out[0, 0, 2, 2] == pytest.approx(24.0)  # a window with one real cell
    assert out[0, 0, 0, 2] == pytest.approx((4 + 9) / 2)


def test_same_max_pooling_ignores_padded_cells():
    x = -1 - np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)  # all negative: a zero pad would win
    out = _pool_outputs(MaxPool2D(3, strides=2, padding="same"), x)  # pads (0, 1)
    np.testing.assert_array_equal(out[0, 0], [[-1, -3], [-9, -11]])


def test_conv_without_bias_has_no_bias_weight():
    spec = ModelSpec("c", (1, 4, 4), (Conv2D(2, 3, use_bias=False), GlobalAveragePooling2D(), Dense(2)))
    net = NumpyAdapter.build(spec)
    assert "conv2d_0/bias" not in net.get_weights()
    assert set(net.loss_and_grads(*batch(spec))[1]) == set(spec.trainable_keys())


def test_global_average_pooling_is_the_spatial_mean():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    spec = ModelSpec("g", (3, 4, 5), (GlobalAveragePooling2D(name="g"), Dense(2)))
    np.testing.assert_allclose(NumpyAdapter.build(spec).layer_outputs(x)["g"], x.mean(axis=(2, 3)), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_layer_outputs_are_in_topological_order_with_inferred_shapes(name):
    spec = GRAPHS[name]
    outs = NumpyAdapter.build(spec).layer_outputs(np.zeros((2,) + spec.input_shape, np.float32))
    assert list(outs) == [i.name for i in spec.logits_infos()]
    assert INPUT not in outs
    for info in spec.logits_infos():
        assert outs[info.name].shape == (2,) + info.out_shape


def test_activation_values_at_known_points():
    from nncompare.backends.numpy_backend import act_forward
    x = np.array([-2.0, 0.0, 1.0])
    np.testing.assert_allclose(act_forward("leaky_relu", x), [-0.4, 0, 1])  # Keras' 0.2, not torch's 0.01
    np.testing.assert_allclose(act_forward("leaky_relu(0.01)", x), [-0.02, 0, 1])
    np.testing.assert_allclose(act_forward("elu", x), [np.exp(-2) - 1, 0, 1])
    np.testing.assert_allclose(act_forward("softplus", x), np.log1p(np.exp(x)))
    np.testing.assert_allclose(act_forward("silu", x), x / (1 + np.exp(-x)))
    np.testing.assert_allclose(act_forward("gelu", np.array([1.0])), [0.8413447460685429])   # x * Phi(x)
    np.testing.assert_allclose(act_forward("gelu_tanh", np.array([1.0])), [0.8411919906082768])  # differs: a trap


@pytest.mark.parametrize("start", range(0, 50, 10))
def test_gradients_match_finite_differences_for_random_graphs(start):
    """Weights perturbed off zero so no unit sits exactly on a kink (a bias-only border of a padded conv)."""
    for seed in range(start, start + 10):
        spec = random_graph_spec(seed)
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((4,) + spec.input_shape)
        y = rng.integers(0, max(spec.num_classes, 2), 4)
        assert max_relative_fd_error(perturbed(spec), x, y, per_param=4) < 1e-6, spec.name


def test_first_divergence_names_the_first_node_in_topological_order():
    from nncompare.backends.check import first_divergence
    spec = GRAPHS["branches_same_pools"]
    oracle, net = NumpyAdapter.build(spec), NumpyAdapter.build(spec)
    net.w["b3/kernel"] = net.w["b3/kernel"] + 0.5  # b3 and everything downstream of it diverge

    class Reversed:  # a backend whose layer_outputs come in another order
        def layer_outputs(self, x):
            return dict(reversed(list(net.layer_outputs(x).items())))

    x, _ = batch(spec)
    assert first_divergence(net, oracle, x) == "b3"
    assert first_divergence(Reversed(), oracle, x) == "b3"
    assert first_divergence(oracle, oracle, x) is None


# --- the standard CNN families' vocabulary --------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CNN_SPECS))
def test_gradients_match_finite_differences_for_the_cnn_vocabulary(name):
    """Groups, dilation, explicit pads, ceil_mode, count_include_pad, ZeroPadding2D, adaptive pooling, keepdims,
    Multiply (gates of both shapes, either side), Rescaling, Normalization, LayerNormalization, new activations."""
    spec = CNN_SPECS[name]
    assert max_relative_fd_error(perturbed(spec), *batch(spec), per_param=20) < 1e-6


def test_new_activation_values_at_known_points():
    from nncompare.backends.numpy_backend import act_forward
    x = np.array([-4.0, -3.0, -1.5, 0.0, 1.5, 3.0, 4.0, 6.0, 7.0])
    np.testing.assert_allclose(act_forward("relu6", x), [0, 0, 0, 0, 1.5, 3, 4, 6, 6])
    # relu6(x + 3) / 6 (Keras 3, torch): not Keras 2's clip(0.2 x + 0.5, 0, 1), which gives 0.2 at -1.5
    np.testing.assert_allclose(act_forward("hard_sigmoid", x), [0, 0, 0.25, 0.5, 0.75, 1, 1, 1, 1])
    np.testing.assert_allclose(act_forward("hard_swish", x), x * np.array([0, 0, 0.25, 0.5, 0.75, 1, 1, 1, 1]))
    np.testing.assert_allclose(act_forward("elu(0.5)", np.array([-2.0, 1.0])), [0.5 * np.expm1(-2), 1])


def test_activation_gradients_at_the_kinks_take_the_outer_piece():
    from nncompare.backends.numpy_backend import act_backward, act_forward
    x = np.array([-3.0, 0.0, 3.0, 6.0])

    def grad(a):
        return act_backward(a, x, act_forward(a, x), np.ones_like(x))
    np.testing.assert_array_equal(grad("relu6"), [0, 0, 1, 0])
    np.testing.assert_array_equal(grad("hard_sigmoid"), [0, 1 / 6, 0, 0])
    np.testing.assert_array_equal(grad("hard_swish"), [0, 0.5, 1, 1])


def test_global_average_pooling_keepdims_gives_c_1_1():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32).astype(np.float64)
    spec = ModelSpec("g", (3, 4, 5), (GlobalAveragePooling2D(keepdims=True, name="g"), Flatten(), Dense(2)))
    assert spec.infos[0].out_shape == (3, 1, 1)
    np.testing.assert_allclose(NumpyAdapter.build(spec).layer_outputs(x)["g"], x.mean(axis=(2, 3), keepdims=True))


@pytest.mark.parametrize("gate_shape,gate_first", [((3,), False), ((3, 1, 1), False), ((3,), True),
                                                   ((3, 1, 1), True)])
def test_multiply_broadcasts_a_per_channel_gate_over_the_image(gate_shape, gate_first):
    gate = GlobalAveragePooling2D(keepdims=len(gate_shape) == 3, name="gate", inputs=(INPUT,))
    inputs = ("gate", "input") if gate_first else ("input", "gate")
    spec = ModelSpec("m", (3, 4, 5), (gate, Multiply(name="mul", inputs=inputs), Flatten(), Dense(2)))
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32).astype(np.float64)
    assert spec.infos[1].out_shape == (3, 4, 5)
    np.testing.assert_allclose(NumpyAdapter.build(spec).layer_outputs(x)["mul"],
                               x * x.mean(axis=(2, 3), keepdims=True))
    assert max_relative_fd_error(perturbed(spec), x, [0, 1]) < 1e-6


def test_multiply_of_equal_shapes_is_the_elementwise_product_even_with_a_node_read_twice():
    spec = ModelSpec("m", (4,), (Dense(4, name="a"), Dense(4, name="b", inputs=(INPUT,)),
                                 Multiply(name="m", inputs=("a", "b", "a")), Dense(2)))
    net = perturbed(spec)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32).astype(np.float64)
    outs = net.layer_outputs(x)
    np.testing.assert_allclose(outs["m"], outs["a"] ** 2 * outs["b"])
    assert max_relative_fd_error(net, x, [0, 1, 1]) < 1e-6


def test_rescaling_normalization_and_layernorm_follow_their_formulas():
    spec = ModelSpec("n", (3, 2, 2), (Rescaling(0.5, offset=2.0, name="r"), Normalization(name="n"),
                                      LayerNormalization(epsilon=1e-3, name="ln"), Flatten(), Dense(2)))
    net = perturbed(spec)
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 2)).astype(np.float32).astype(np.float64)
    w = dict(net.w)
    w["n/variance"] = np.array([4.0, 0.0, 1e-16])  # a variance of 0 (or below 1e-14) divides by 1e-7: Keras 3's floor
    net.set_weights(w)
    outs = net.layer_outputs(x)
    r = x * 0.5 + 2.0
    np.testing.assert_allclose(outs["r"], r)
    n = (r - w["n/mean"][None, :, None, None]) / np.array([2.0, 1e-7, 1e-7])[None, :, None, None]
    np.testing.assert_allclose(outs["n"], n)
    mean, var = n.mean(axis=1, keepdims=True), n.var(axis=1, keepdims=True)  # over channels, per position
    ln = (n - mean) / np.sqrt(var + 1e-3) * w["ln/gamma"][None, :, None, None] + w["ln/beta"][None, :, None, None]
    np.testing.assert_allclose(outs["ln"], ln)


def test_normalization_statistics_are_weights_that_never_train():
    from nncompare.models import init_weights
    spec = ModelSpec("n", (3,), (Normalization(name="n"), Dense(2, name="d")))
    assert list(spec.param_shapes()) == ["n/mean", "n/variance", "d/kernel", "d/bias"]
    assert spec.trainable_keys() == ["d/kernel", "d/bias"] and spec.trainable_params == 8
    w0 = init_weights(spec)
    assert (w0["n/mean"] == 0).all() and (w0["n/variance"] == 1).all()
    net = perturbed(spec)
    before = net.get_weights()
    x = np.random.default_rng(0).standard_normal((4, 3))
    assert set(net.loss_and_grads(x, [0, 1, 0, 1])[1]) == {"d/kernel", "d/bias"}
    net.set_optimizer(SGD(lr=0.5))
    net.train_step(x, [0, 1, 0, 1])
    after = net.get_weights()
    assert (after["n/mean"] == before["n/mean"]).all() and (after["n/variance"] == before["n/variance"]).all()
    assert not (after["d/kernel"] == before["d/kernel"]).all()


# --- what the oracle needs ------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent


def _core_dependencies() -> set[str]:
    """The import names of pyproject's core dependencies (numpy>=1.24 -> numpy)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    return {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower().replace("-", "_")
            for d in re.findall(r'"([^"]+)"', block)}


def test_the_oracle_needs_nothing_but_the_declared_core_dependencies():
    # `pip install nncompare` without extras: the oracle imported scipy, which nothing declared
    deps = _core_dependencies()
    assert "numpy" in deps
    script = f"""
import importlib.abc, sys
allowed = set(sys.stdlib_module_names) | {{"nncompare"}} | set({sorted(deps)!r})
class Undeclared(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in allowed:
            raise ModuleNotFoundError(f"undeclared import: {{name}}")
sys.meta_path.insert(0, Undeclared())
sys.path.insert(0, {str(ROOT)!r})
import numpy as np
from nncompare.backends import Adam, get_adapter
from nncompare.models import Activation, Conv2D, Dense, Flatten, ModelSpec
spec = ModelSpec("m", (1, 4, 4), (Conv2D(2, 3, activation="gelu"), Flatten(), Dense(4, activation="silu"),
                                  Activation("softplus"), Dense(1, activation="sigmoid")))
net = get_adapter("numpy").build(spec, optimizer=Adam())
x = np.random.default_rng(0).standard_normal((3, 1, 4, 4)).astype(np.float32)
net.predict(x); net.loss_and_grads(x, [0, 1, 1]); net.train_step(x, [0, 1, 1])
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd="/")
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


@pytest.mark.parametrize("x", [np.linspace(-40, 40, 2001), np.array([-800.0, 800.0, 0.0, 1e-300, -1e-300])])
def test_the_oracles_own_erf_and_sigmoid_are_float64_exact(x):
    from nncompare.backends.numpy_backend import erf, expit
    ref_erf = np.array([math.erf(v) for v in x])
    ref_sigmoid = np.array([1 / (1 + math.exp(-v)) if v > -700 else math.exp(v) for v in x])
    assert np.abs(erf(x) - ref_erf).max() <= 2.3e-16
    assert (np.abs(expit(x) - ref_sigmoid) <= 4.5e-16 * np.maximum(ref_sigmoid, 1e-300)).all()


def test_the_oracle_and_its_copies_are_freed_without_the_cyclic_collector():
    """check.py deep-copies the oracle 17 times a step: a reference cycle kept each copy's weights until the
    cyclic collector ran (ResNet50's check grew by 9 GB)."""
    oracle = get_adapter("numpy").build(zoo.get("lenet5"), optimizer=SGD(lr=0.1, momentum=0.9))
    oracle.train_step(*sample_batch(zoo.get("lenet5"), 2))
    twin = copy.deepcopy(oracle)
    refs = [weakref.ref(oracle), weakref.ref(twin)]
    gc.disable()
    try:
        del oracle, twin
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()
