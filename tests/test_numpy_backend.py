"""The NumPy oracle: gradients against finite differences, optimizers against their formulas."""
import numpy as np
import pytest

from nncompare.backends import Adam, SGD, get_adapter
from nncompare.models import zoo

from .gradcheck import max_relative_fd_error
from .specs import EVERY_LAYER

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


@pytest.mark.parametrize("name", [n for n in zoo.names()])
def test_gradients_match_finite_differences_for_zoo_models(name):
    spec = zoo.get(name).without_dropout()
    net = perturbed(spec)
    small = name == "cifar_cnn"  # 1.1M params at float64: sample a few weights per tensor
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
