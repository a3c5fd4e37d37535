"""PyTorch-specific behaviour: the fused canonical BatchNorm, memory formats, pre-placed batches, the graph
module and its converters, torch's defaults that differ from the spec's (leaky_relu slope, GELU form), the CNN
vocabulary's traps (depthwise layout, ceil_mode's last window, count_include_pad, asymmetric pads)."""

import numpy as np
import pytest

from nncompare.backends import SGD, get_adapter
from nncompare.backends.check import TOLERANCE, compare, dict_diff, sample_batch, scaled_diff
from nncompare.models.spec import (Activation, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D, Dense, Flatten,
                                   GlobalAveragePooling2D, LayerNormalization, MaxPool2D, ModelSpec)

from .conftest import require


@pytest.fixture(scope="module")
def torch_cls():
    require("torch")
    return get_adapter("torch")


def residual_spec() -> ModelSpec:
    """A projection-shortcut residual block and an inception-style concat, ending in global average pooling."""
    return ModelSpec("residual", (3, 9, 9), (
        Conv2D(4, 3, padding="same", use_bias=False, name="c1"), BatchNorm(name="bn1"), Activation("relu", name="r1"),
        Conv2D(4, 3, strides=2, padding="same", name="c2"),
        Conv2D(4, 1, strides=2, use_bias=False, inputs=("input",), name="proj"),
        Add(inputs=("c2", "proj"), name="add"),
        Conv2D(2, 1, name="b1"), AvgPool2D(2, 1, padding="same", inputs=("add",), name="b2"),
        Concatenate(inputs=("b1", "b2"), name="cat"), Activation("silu", name="act"),
        GlobalAveragePooling2D(name="gap"), Dense(5, activation="softmax", name="out")))


def test_residual_graph_matches_the_oracle_and_reports_every_node(torch_cls):
    spec = residual_spec()
    report = compare(torch_cls, get_adapter("numpy"), spec)
    assert report.ok(), report.diffs
    x, _ = sample_batch(spec)
    outs = torch_cls.build(spec).layer_outputs(x)
    assert list(outs) == [i.name for i in spec.logits_infos()]  # topological order, head dropped
    assert outs["cat"].shape == (8, 6, 5, 5) and outs["gap"].shape == (8, 6)
    ref = get_adapter("numpy").build(spec).layer_outputs(x)
    for name, v in outs.items():
        assert scaled_diff(v, ref[name]) <= TOLERANCE, name


def test_graph_keeps_only_values_later_nodes_need(torch_cls):
    net = torch_cls.build(residual_spec())
    g = net.native
    free = dict(zip(g.names, g.free))
    assert free["proj"] == ["input"] and free["add"] == ["c2", "proj"] and free["cat"] == ["b1", "b2"]
    assert free["b1"] == [] and free["b2"] == ["add"]  # "add" feeds both branches: dropped after the last
    x = sample_batch(residual_spec())[0]
    assert list(g.walk(net._tensor(x))) == ["out"]


def test_a_plain_chain_runs_as_one_flat_module_list_with_the_walks_numbers(torch_cls):
    """A chain (each node on the one before) skips the walk's name bookkeeping and the (Dense, activation)
    wrappers, as nn.Sequential would; a graph with branches keeps the walk."""
    import torch
    from nncompare.models import zoo
    spec = zoo.get("lenet5")
    net = torch_cls.build(spec)
    chain = net.native.chain
    assert chain is not None and not any(isinstance(m, torch.nn.Sequential) for m in chain)
    assert sum(isinstance(m, torch.nn.ReLU) for m in chain) == 4  # 2 conv + 2 hidden Dense activations
    x = net._tensor(sample_batch(spec)[0])
    with torch.no_grad():
        assert torch.equal(net.native(x), net.native.walk(x)[net.native.names[-1]])
    assert torch_cls.build(residual_spec()).native.chain is None


def test_layer_names_that_are_module_dict_attributes_still_build(torch_cls):
    spec = ModelSpec("names", (4,), (Dense(3, name="keys"), Dense(3, name="to"), Add(inputs=("keys", "to"), name="update"),
                                     Dense(2, name="training")))
    report = compare(torch_cls, get_adapter("numpy"), spec, checks=("logits", "grads"))
    assert report.ok(), report.diffs


def test_weights_bind_by_canonical_key_without_bias_when_use_bias_is_false(torch_cls):
    spec = residual_spec()
    first, second = torch_cls.build(spec, seed=0), torch_cls.build(spec, seed=1)
    w = first.get_weights()
    assert list(w) == list(spec.param_shapes())
    assert "c1/bias" not in w and "proj/bias" not in w and "c2/bias" in w
    assert second.native.nodes["c1"].bias is None
    np.testing.assert_array_equal(second.native.nodes["out"].weight.detach().numpy(), second.get_weights()["out/kernel"].T)
    second.set_weights(w)
    x, _ = sample_batch(spec)
    np.testing.assert_array_equal(second.logits(x), first.logits(x))


def test_batchnorm_moving_statistics_have_the_canonical_meaning_trap16(torch_cls):
    """After several training steps the moving mean/variance equal the oracle's: momentum on the OLD value and
    the BIASED batch variance. Batches of 4 flat samples make the unbiased variance 4/3 larger: visible."""
    spec = ModelSpec("bn", (6,), (Dense(5, name="d"), BatchNorm(momentum=0.8, epsilon=1e-3, name="bn"),
                                  Activation("relu"), Dense(3, name="o")))
    net = torch_cls.build(spec, optimizer=SGD(0.05, 0.9))
    oracle = get_adapter("numpy").build(spec, optimizer=SGD(0.05, 0.9))
    for seed in range(5):
        x, y = sample_batch(spec, 4, seed)
        x *= 1 + seed  # a different scale per batch: the statistics move a lot every step
        net.train_step(x, y)
        oracle.train_step(x, y)
    got, ref = net.get_weights(), oracle.get_weights()
    for key in ("bn/moving_mean", "bn/moving_var"):
        assert scaled_diff(got[key], ref[key]) <= TOLERANCE, key
    assert np.abs(ref["bn/moving_var"] - 1).min() > 0.1  # far from its start: the test can see a wrong update


def test_batchnorm_moving_variance_of_a_constant_channel_is_zero_not_negative(torch_cls):
    """The variance comes back as 1/invstd^2 - eps: for a constant (dead) channel and eps=0.3 that rounds to
    -3e-8, which another framework's set_weights would refuse as a negative variance."""
    spec = ModelSpec("bn", (2,), (BatchNorm(momentum=0.0, epsilon=0.3, name="bn"), Dense(2, name="o")))
    net = torch_cls.build(spec)
    x = np.array([[0.0, 1.0], [0.0, 2.0], [0.0, 4.0]], np.float32)  # channel 0 is constant
    net.train_step(x, np.array([0, 1, 0]))
    var = net.get_weights()["bn/moving_var"]
    assert var[0] == 0 and var[1] == pytest.approx(np.var([1.0, 2.0, 4.0]), rel=1e-5)
    get_adapter("numpy").build(spec, weights=net.get_weights())  # a valid weight dict


def test_batchnorm_inference_uses_the_moving_statistics(torch_cls):
    spec = ModelSpec("bn", (2, 3, 3), (BatchNorm(epsilon=1e-2, name="bn"),))
    w = {"bn/gamma": np.array([1.0, 2.0], np.float32), "bn/beta": np.array([0.0, -1.0], np.float32),
         "bn/moving_mean": np.array([0.5, -0.5], np.float32), "bn/moving_var": np.array([4.0, 0.25], np.float32)}
    net = torch_cls.build(spec, weights=w)
    x = sample_batch(spec, 3)[0]
    expect = (x - w["bn/moving_mean"][:, None, None]) / np.sqrt(w["bn/moving_var"][:, None, None] + 1e-2) \
        * w["bn/gamma"][:, None, None] + w["bn/beta"][:, None, None]
    np.testing.assert_allclose(net.logits(x), expect, rtol=1e-5, atol=1e-6)


def test_channels_last_gives_the_same_numbers(torch_cls, monkeypatch):
    from nncompare.backends import torch_backend
    import torch
    spec = residual_spec()
    batches = [sample_batch(spec, 8, seed) for seed in range(3)]
    nets = {}
    for fmt in (False, True):
        monkeypatch.setitem(torch_backend.CHANNELS_LAST, "cpu", fmt)
        nets[fmt] = torch_cls.build(spec, optimizer=SGD(0.05, 0.9))
    cl, plain = nets[True], nets[False]
    assert cl.settings["memory_format"] == "channels_last" and plain.settings["memory_format"] == "contiguous"
    assert cl.native.nodes["c1"].weight.is_contiguous(memory_format=torch.channels_last)
    assert cl.to_device(*batches[0])[0].is_contiguous(memory_format=torch.channels_last)
    x, y = batches[0]
    assert scaled_diff(cl.logits(x), plain.logits(x)) <= 1e-6
    outs, ref = cl.layer_outputs(x), plain.layer_outputs(x)
    assert all(scaled_diff(outs[k], ref[k]) <= 1e-6 for k in ref)
    assert dict_diff(cl.loss_and_grads(x, y)[1], plain.loss_and_grads(x, y)[1])[0] <= 1e-6
    losses = [[net.train_step(bx, by) for bx, by in batches] for net in (cl, plain)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert dict_diff(cl.get_weights(), plain.get_weights())[0] <= 1e-5


def test_to_device_batches_train_exactly_like_numpy_batches(torch_cls):
    import torch
    spec = residual_spec()
    batches = [sample_batch(spec, 8, seed) for seed in range(3)]
    host, placed = (torch_cls.build(spec, optimizer=SGD(0.1, 0.9)) for _ in range(2))
    device_batches = [placed.to_device(x, y) for x, y in batches]
    for x, y in device_batches:
        assert isinstance(x, torch.Tensor) and x.device == placed.dev and x.shape == (8,) + spec.input_shape
        assert isinstance(y, torch.Tensor) and y.device == placed.dev
    batches[0][0][:] = 0  # to_device copied: the tensors do not alias the host arrays
    assert float(device_batches[0][0].abs().sum()) > 0
    batches[0] = sample_batch(spec, 8, 0)
    host_losses = [float(host._train_batch(x, y)) for x, y in batches]
    placed_losses = [float(placed._train_batch(x, y)) for x, y in device_batches]
    assert host_losses == placed_losses
    for k, w in host.get_weights().items():
        np.testing.assert_array_equal(placed.get_weights()[k], w, err_msg=k)


def test_to_device_refuses_a_misshaped_batch(torch_cls):
    from nncompare.backends import BackendError
    net = torch_cls.build(residual_spec())
    with pytest.raises(BackendError, match="does not match the spec.s input_shape"):
        net.to_device(np.zeros((2, 3, 8, 8), np.float32), np.zeros(2, np.int64))


def test_settings_record_the_performance_choices(torch_cls):
    import torch
    s = torch_cls.build(residual_spec()).settings
    assert s["bn"] == "native_batch_norm" and s["cudnn_benchmark"] is False  # no cuDNN on the CPU
    assert s["memory_format"] in ("channels_last", "contiguous") and s["threads"] == torch.get_num_threads()


def test_leaky_relu_uses_the_spec_slope_not_torch_default(torch_cls):
    """Plain "leaky_relu" means slope 0.2 (Keras 3); torch's nn.LeakyReLU defaults to 0.01."""
    x = np.array([[-10.0, -1.0, 0.0, 2.0]], np.float32)
    for act, slope in (("leaky_relu", 0.2), ("leaky_relu(0.05)", 0.05)):
        out = torch_cls.build(ModelSpec("l", (4,), (Activation(act),))).logits(x)
        np.testing.assert_allclose(out, np.where(x > 0, x, slope * x), rtol=1e-6)


@pytest.mark.parametrize("pool", [MaxPool2D, AvgPool2D])
@pytest.mark.parametrize("k, s", [(3, 1), (2, 2), (3, 2), (4, 3)])  # symmetric and asymmetric pads
def test_same_pools_match_the_oracle(torch_cls, pool, k, s):
    spec = ModelSpec("p", (2, 7, 8), (Conv2D(3, 1), pool(k, s, padding="same"), Flatten(), Dense(3)))
    report = compare(torch_cls, get_adapter("numpy"), spec, checks=("logits", "grads"))
    assert report.ok(), report.diffs


@pytest.mark.slow  # torch.compile takes seconds
def test_compiled_graph_matches_the_oracle(torch_cls):
    """torch.compile of the graph module: inference and one training step agree with the oracle."""
    spec = ModelSpec("cg", (2, 6, 6), (
        Conv2D(3, 3, padding="same", name="a"), Conv2D(3, 1, inputs=("input",), name="b"),
        Add(inputs=("a", "b"), name="s"), Concatenate(inputs=("s", "a"), name="c"),
        GlobalAveragePooling2D(name="g"), Dense(3, name="o")))
    x, y = sample_batch(spec)
    net = torch_cls.build(spec, optimizer=SGD(0.1, 0.9), compile=True)
    oracle = get_adapter("numpy").build(spec, optimizer=SGD(0.1, 0.9))
    assert net.execution_path == "torch.compile"
    assert scaled_diff(net.logits(x), oracle.logits(x)) <= TOLERANCE
    assert scaled_diff(net.train_step(x, y), oracle.train_step(x, y)) <= TOLERANCE
    assert dict_diff(net.get_weights(), oracle.get_weights())[0] <= TOLERANCE


def test_depthwise_and_grouped_kernels_keep_the_canonical_layout_trap33(torch_cls):
    """Depthwise with multiplier 2: filter f reads input channel f // 2; groups 2 of 4 channels: filter f reads
    channels 2f and 2f + 1. The native weight is the canonical (filters, in // groups, kh, kw) kernel."""
    x = sample_batch(ModelSpec("x", (4, 3, 3), (Flatten(),)), 2)[0]
    depthwise = ModelSpec("dw", (4, 3, 3), (Conv2D(8, 1, groups=4, use_bias=False, name="c"),))
    k = np.arange(1, 9, dtype=np.float32).reshape(8, 1, 1, 1)
    net = torch_cls.build(depthwise, weights={"c/kernel": k})
    assert tuple(net.native.nodes["c"].weight.shape) == (8, 1, 1, 1)
    np.testing.assert_allclose(net.logits(x), k[:, 0, 0, 0][None, :, None, None] * np.repeat(x, 2, axis=1),
                               rtol=1e-6)
    grouped = ModelSpec("g", (4, 3, 3), (Conv2D(2, 1, groups=2, use_bias=False, name="c"),))
    k = np.array([1, 10, 100, 1000], np.float32).reshape(2, 2, 1, 1)
    got = torch_cls.build(grouped, weights={"c/kernel": k}).logits(x)
    np.testing.assert_allclose(got, np.stack([x[:, 0] + 10 * x[:, 1], 100 * x[:, 2] + 1000 * x[:, 3]], 1),
                               rtol=1e-6)


def test_hard_sigmoid_hard_swish_and_relu6_are_the_spec_forms_trap28(torch_cls):
    """hard_sigmoid is relu6(x + 3) / 6 (Keras 2's and MXNet's default is clip(0.2 x + 0.5, 0, 1))."""
    x = np.array([[-7.0, -4.0, -2.0, -0.5, 0.5, 2.0, 4.0, 7.0]], np.float32)
    hs = np.clip(x + 3, 0, 6) / 6
    for act, expect in (("hard_sigmoid", hs), ("hard_swish", x * hs), ("relu6", np.clip(x, 0, 6))):
        got = torch_cls.build(ModelSpec("a", (8,), (Activation(act),))).logits(x)
        np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7, err_msg=act)
    assert np.abs(hs - np.clip(0.2 * x + 0.5, 0, 1)).max() > 0.05


@pytest.mark.parametrize("shape", [(1, 3, 4), (1,)])
def test_layernorm_over_one_channel_is_exactly_beta_with_no_gamma_gradient(torch_cls, shape):
    """x - mean is exactly 0 over one channel: the output is beta and gamma's gradient 0, exactly (torch's fused
    layer_norm gives gamma a gradient of rounding noise there, ~2e-3 at inputs ~100, which Adam makes a step)."""
    spec = ModelSpec("ln", shape, (LayerNormalization(epsilon=1e-5, name="ln"), Flatten(), Dense(2, name="o")))
    w = get_adapter("numpy").build(spec).get_weights() | {"ln/gamma": np.array([1.5], np.float32),
                                                          "ln/beta": np.array([0.25], np.float32)}
    net = torch_cls.build(spec, weights=w)
    x, y = sample_batch(spec, 4)
    x = x * 100 + 3
    assert np.array_equal(net.layer_outputs(x)["ln"], np.full((4,) + shape, 0.25, np.float32))
    assert np.array_equal(net.loss_and_grads(x, y)[1]["ln/gamma"], [0.0])
