"""Bring your own network: Keras, torch and ONNX models imported as specs compute what their source computes (the
oracle to 1e-5, the framework adapters to 1e-3 of scale); specs exported to ONNX compute what `predict` does; every
importer refuses what it cannot import exactly with one InteropError naming the layer or node."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from nncompare.backends import BackendError, get_adapter
from nncompare.backends.check import compare, sample_batch, scaled_diff
from nncompare.interop import InteropError
from nncompare.models import Activation, Dense, ModelSpec, Rescaling, SpecError, init_weights, zoo

from .conftest import ROOT, require
from .specs import ACTIVATION_SPECS, CNN_SPECS, EVERY_LAYER, GRAPHS

SPECS = {**{n: zoo.get(n) for n in zoo.names()}, **EVERY_LAYER, **GRAPHS,
         **{s.name: s for s in ACTIVATION_SPECS.values()}, **CNN_SPECS}
LARGE = {"mlp", "cifar_cnn", "resnet20", "inception_mini", "lenet5"}
CASES = [pytest.param(n, marks=pytest.mark.slow if n in LARGE else ()) for n in SPECS]
ORACLE_TOL, FRAMEWORK_TOL = 1e-5, 1e-3


@pytest.fixture(scope="module")
def oracle():
    return get_adapter("numpy")


def onnx_modules():
    require("onnxruntime")
    import onnx
    import onnxruntime
    return onnx, onnxruntime


def weights_with_state(spec: ModelSpec, seed: int = 1) -> dict:
    """Seeded weights whose biases and BatchNorm statistics are not the identity, so a slip in either shows."""
    w, rng = init_weights(spec, seed), np.random.default_rng(seed)
    for k, v in w.items():
        if k.endswith(("/bias", "/beta", "/moving_mean")):
            w[k] = rng.uniform(-0.5, 0.5, v.shape).astype(np.float32)
        elif k.endswith(("/gamma", "/moving_var")):
            w[k] = rng.uniform(0.5, 2.0, v.shape).astype(np.float32)
    return w


def inputs(shape: tuple, n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n,) + tuple(shape)).astype(np.float32)


def run_onnx(model, x: np.ndarray) -> np.ndarray:
    _, ort = onnx_modules()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def structure(spec: ModelSpec) -> list:
    """Each layer's name, resolved inputs and fields, pairs and default strides written out, padding as the cells
    it pads ("same" pads none for a 1x1 kernel: it is "valid" there), ceil_mode only where a window hangs past the
    padding (elsewhere it is floor mode, which to_onnx writes: docs/design.md trap 39), Rescaling's numbers as the
    float32 values ONNX holds."""
    out = []
    for info in spec.infos:
        d = {k: v for k, v in dataclasses.asdict(info.layer).items() if k not in ("name", "inputs")}
        if "padding" in d:
            d["padding"] = info.layer.pads(info.in_shape)
        if "ceil_mode" in d:
            d["ceil_mode"] = any(info.layer.overhang(info.in_shape))
        if isinstance(info.layer, Rescaling):
            d = {k: np.float32(v) for k, v in d.items()}
        for k in ("kernel_size", "pool_size", "strides"):
            if k in d:
                v = d[k] if d[k] is not None else d.get("pool_size")
                d[k] = (v, v) if isinstance(v, int) else tuple(v)
        out.append((info.name, type(info.layer).__name__, info.inputs, d))
    return out


def test_importing_interop_imports_no_framework():
    code = ("import sys, nncompare.interop\nprint(sorted(m for m in ('torch', 'tensorflow', 'keras', 'onnx', "
            "'onnxruntime', 'mxnet', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- to_onnx / from_onnx ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_to_onnx_computes_predict(name, oracle):
    onnx, _ = onnx_modules()
    from nncompare.interop import to_onnx
    spec = SPECS[name]
    w = weights_with_state(spec)
    model = to_onnx(spec, w)
    onnx.checker.check_model(model, full_check=True)
    x = inputs(spec.input_shape)
    assert scaled_diff(run_onnx(model, x), oracle.build(spec, weights=w).predict(x)) <= ORACLE_TOL


@pytest.mark.parametrize("name", CASES)
def test_from_onnx_inverts_to_onnx(name, oracle):
    onnx_modules()
    from nncompare.interop import from_onnx, to_onnx
    spec = SPECS[name]
    w = weights_with_state(spec)
    back, w2 = from_onnx(to_onnx(spec, w))
    x = inputs(spec.input_shape)
    assert np.array_equal(oracle.build(back, weights=w2).predict(x), oracle.build(spec, weights=w).predict(x))
    # the same layers, names and fields; a linear Activation is an ONNX Identity, which imports as nothing
    linear = {i.name for i in spec.infos if isinstance(i.layer, Activation) and i.layer.activation == "linear"}
    if not linear:
        assert structure(back) == structure(spec)
        assert all(np.array_equal(w2[k], np.asarray(w[k], np.float32)) for k in w)
    else:
        assert [s for s in structure(spec) if s[0] not in linear][:-1] == structure(back)[:-1]


# (H, W, pool, strides, padding): ceil_mode whose windows are floor mode's, with torch's last-window rule firing
# or not; a window hanging past the padding on both axes, on one; and one axis hanging over while the other's
# last window is dropped by the rule (no single ceil_mode attribute gives both)
CEIL_POOLS = [(4, 4, 2, 2, 1), (5, 6, 2, 3, 0), (4, 4, 2, 3, 1), (4, 4, 2, 3, 0), (4, 4, (2, 3), 2, 1),
              (4, 5, (3, 2), 2, 1), (4, 6, 2, 3, 0)]


@pytest.mark.parametrize("kind", ["max", "avg", "avg_include"])
@pytest.mark.parametrize("h,w,pool,strides,padding", CEIL_POOLS)
def test_to_onnx_ceil_mode_pools_compute_torchs_windows_and_pass_onnxs_shape_inference(oracle, kind, h, w, pool,
                                                                                         strides, padding):
    # docs/design.md trap 39: ONNX Runtime's ceil_mode is torch's, onnx's shape inference counts the dropped window
    onnx, _ = onnx_modules()
    from nncompare.interop import from_onnx, to_onnx
    from nncompare.models import AvgPool2D, Dense, Flatten, MaxPool2D
    layer = MaxPool2D(pool, strides, padding=padding, ceil_mode=True) if kind == "max" else \
        AvgPool2D(pool, strides, padding=padding, ceil_mode=True, count_include_pad=kind == "avg_include")
    spec = ModelSpec("ceil", (2, h, w), (layer, Flatten(), Dense(3)))
    wts = weights_with_state(spec)
    model = to_onnx(spec, wts)
    onnx.checker.check_model(model, full_check=True)
    x = inputs(spec.input_shape)
    want = oracle.build(spec, weights=wts).predict(x)
    assert scaled_diff(run_onnx(model, x), want) <= ORACLE_TOL
    back, w2 = from_onnx(model)
    assert scaled_diff(oracle.build(back, weights=w2).predict(x), want) <= ORACLE_TOL


def test_to_onnx_file_has_a_dynamic_batch_and_nchw_input(tmp_path):
    onnx, _ = onnx_modules()
    from nncompare.interop import OPSET, to_onnx
    from nncompare.interop.onnx_export import OPSET as WRITTEN
    spec = zoo.get("digits_cnn")
    path = tmp_path / "digits.onnx"
    to_onnx(spec, init_weights(spec, 0), path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert model.graph.input[0].name == "input" and dims == ["batch", 1, 8, 8]
    assert OPSET == WRITTEN and model.opset_import[0].version == OPSET
    for n in (1, 5):
        assert run_onnx(model, inputs(spec.input_shape, n)).shape == (n, 10)


def test_to_onnx_refuses_weights_that_do_not_fit():
    onnx_modules()
    from nncompare.interop import to_onnx
    spec = zoo.get("perceptron")
    with pytest.raises(InteropError, match=r"missing \['dense_0/bias'\]"):
        to_onnx(spec, {"dense_0/kernel": np.zeros((2, 1))})
    with pytest.raises(InteropError, match=r"weight 'dense_0/kernel': shape \(1, 2\), the spec needs \(2, 1\)"):
        to_onnx(spec, {"dense_0/kernel": np.zeros((1, 2)), "dense_0/bias": np.zeros(1)})


def _onnx_model(nodes, inits, in_shape, out_shape, opset=17):
    onnx, _ = onnx_modules()
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *in_shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", *out_shape])],
                              [numpy_helper.from_array(np.asarray(v, np.float32 if v.dtype.kind == "f" else v.dtype), k)
                               for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_from_onnx_reads_the_ops_of_exported_models(oracle):
    """Torch-style exports: Gemm with transB, MatMul + Add, Reshape [0, -1], ReduceMean, Sum, Softmax, SiLU and the
    erf form of GELU, SAME_UPPER auto_pad; the import computes what ONNX Runtime computes."""
    require("onnxruntime")
    from onnx import helper
    from nncompare.interop import from_onnx
    rng = np.random.default_rng(0)
    h = helper.make_node
    inits = {"cw": rng.standard_normal((4, 2, 3, 3)), "cb": rng.standard_normal(4), "shape": np.array([0, -1]),
             "g": rng.uniform(0.5, 2, 4), "b": rng.standard_normal(4), "m": rng.standard_normal(4),
             "v": rng.uniform(0.5, 2, 4), "w1": rng.standard_normal((5, 4 * 3 * 3)), "b1": rng.standard_normal(5),
             "w2": rng.standard_normal((9, 5)), "b2": rng.standard_normal(5), "sqrt2": np.array(np.sqrt(2)),
             "one": np.array(1.0), "half": np.array(0.5), "w3": rng.standard_normal((5, 3))}
    nodes = [h("Conv", ["x", "cw", "cb"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2]),
             h("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"], epsilon=1e-3),
             h("Sigmoid", ["bn"], ["s"]), h("Mul", ["bn", "s"], ["silu"]),
             h("MaxPool", ["silu"], ["mp"], kernel_shape=[2, 2], pads=[0, 0, 1, 1], strides=[1, 1]),
             h("Reshape", ["mp", "shape"], ["flat"]),
             h("Gemm", ["flat", "w1", "b1"], ["d1"], transB=1),
             h("Div", ["d1", "sqrt2"], ["q"]), h("Erf", ["q"], ["e"]), h("Add", ["e", "one"], ["a"]),
             h("Mul", ["d1", "a"], ["ma"]), h("Mul", ["ma", "half"], ["gelu"]),
             h("ReduceMean", ["silu"], ["gap"], axes=[2, 3], keepdims=0),
             h("Concat", ["gelu", "gap"], ["cat"], axis=1),
             h("MatMul", ["cat", "w2"], ["mm"]), h("Add", ["mm", "b2"], ["d2"]),
             h("Sum", ["d2", "d2", "gelu"], ["sum"]), h("Relu", ["sum"], ["r"]),
             h("Gemm", ["r", "w3"], ["d3"]), h("Softmax", ["d3"], ["y"], axis=1)]
    model = _onnx_model(nodes, inits, (2, 5, 6), (3,))
    spec, w = from_onnx(model)
    kinds = [type(l).__name__ for l in spec.layers]
    assert kinds == ["Conv2D", "BatchNorm", "Activation", "MaxPool2D", "Flatten", "Dense", "Activation",
                     "GlobalAveragePooling2D", "Concatenate", "Dense", "Add", "Activation", "Dense", "Activation"]
    assert [l.activation for l in spec.layers if isinstance(l, Activation)] == ["silu", "gelu", "relu", "softmax"]
    assert spec.layers[0].padding == "same" and spec.layers[3].padding == "same" and spec.layers[1].momentum == 0.9
    x = inputs((2, 5, 6))
    assert scaled_diff(oracle.build(spec, weights=w).predict(x), run_onnx(model, x)) <= ORACLE_TOL


@pytest.mark.parametrize("case,message", [
    ("loop", r"node 0 \(loop, Loop\): op Loop is not supported \(supported: .*Gemm"),
    ("pads", r"node 0 \(pool, MaxPool\): field 'padding': padding .* is more than half the pool 2x2 on a side"),
    ("reshape", r"node 0 \(reshape, Reshape\): reshape to \[0, 2, 36\]: only a flatten"),
    ("hard_sigmoid", r"node 0 \(hs, HardSigmoid\): alpha 0.2, beta 0.5: the spec's hard_sigmoid is relu6"),
    ("grouped", r"node 0 \(conv, Conv\): weight of shape \(2, 1, 3, 3\) in 3 groups does not fit 2 input"),
])
def test_from_onnx_refuses_what_it_cannot_import_exactly(case, message):
    require("onnxruntime")
    from onnx import TensorProto, helper
    from nncompare.interop import from_onnx
    h, w = helper.make_node, {"w": np.ones((2, 2, 3, 3)), "w2": np.ones((2, 1, 3, 3))}
    nodes = {
        "loop": [h("Loop", ["n", "", "x"], ["y"], name="loop",
                   body=helper.make_graph([], "body", [], []))],
        "pads": [h("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[2, 2], pads=[0, 0, 2, 0])],
        "reshape": [h("Reshape", ["x", "s"], ["y"], name="reshape")],
        "hard_sigmoid": [h("HardSigmoid", ["x"], ["y"], name="hs", alpha=0.2)],  # Keras 2's (trap 28)
        "grouped": [h("Conv", ["x", "w2"], ["y"], name="conv", group=3, pads=[1, 1, 1, 1])],
    }[case]
    inits = {**w, "s": np.array([0, 2, 36]), "n": np.array(1)}
    onnx, _ = onnx_modules()
    graph = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(v.astype(np.float32 if v.dtype.kind == "f" else v.dtype), k)
                               for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InteropError, match=message) as e:
        from_onnx(model)
    assert isinstance(e.value, SpecError) and "\n" not in str(e.value)


def test_from_onnx_names_a_file_that_is_not_onnx(tmp_path):
    onnx_modules()
    from nncompare.interop import from_onnx
    bad = tmp_path / "model.onnx"
    bad.write_text("not a protobuf")
    with pytest.raises(InteropError, match=r"model\.onnx: cannot read an ONNX model"):
        from_onnx(bad)


# --- the onnxruntime backend -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["every_kind", "residual_conv", "branches_same_pools", "dense_bn_sigmoid_head",
                                  "efficientnet_mini", "pools_ceil_and_pads", "squeeze_excite", "grouped_dilated_convs"])
def test_onnxruntime_backend_matches_the_oracle(name, oracle):
    require("onnxruntime")
    spec = SPECS[name]
    w = weights_with_state(spec)
    report = compare(get_adapter("onnxruntime"), oracle, spec, checks=("logits",), weights=w)
    assert report.ok(), report.describe("logits")
    net, ref = get_adapter("onnxruntime").build(spec, weights=w), oracle.build(spec, weights=w)
    x = inputs(spec.input_shape)
    got, want = net.layer_outputs(x), ref.layer_outputs(x)
    assert set(got) == set(want) and all(scaled_diff(got[k], want[k]) <= ORACLE_TOL for k in want)
    assert scaled_diff(net.predict(x), ref.predict(x)) <= ORACLE_TOL


def test_onnxruntime_backend_reexports_on_set_weights_and_does_not_train():
    require("onnxruntime")
    adapter = get_adapter("onnxruntime")
    spec = zoo.get("digits_mlp")
    net = adapter.build(spec)
    x, y = sample_batch(spec, 4)
    before = net.predict(x)
    w = net.get_weights()
    w["dense_1/bias"] = w["dense_1/bias"] + 1.0
    net.set_weights(w)
    assert np.allclose(net.logits(x), get_adapter("numpy").build(spec, weights=w).logits(x), atol=1e-5)
    assert not np.allclose(net.predict(x), before)
    for call in (lambda: net.train_step(x, y), lambda: net.loss_and_grads(x, y), lambda: net.fit(x, y)):
        with pytest.raises(BackendError, match="runs inference only: it does not train"):
            call()
    loss, accuracy = net.evaluate(x, y)
    assert np.isfinite(loss) and 0 <= accuracy <= 1
    adapter.set_threads(1)
    try:
        assert adapter.build(spec).settings["intra_op_threads"] == 1
    finally:
        adapter._threads = None
    with pytest.raises(BackendError, match="inputs: shape"):
        net.predict(np.zeros((2, 3)))


def test_onnxruntime_leaves_its_default_pinned_pool_where_the_count_is_its_default(monkeypatch):
    """ONNX Runtime pins its intra-op threads to cores only when left at 0 (one per physical core)."""
    require("onnxruntime")
    adapter = get_adapter("onnxruntime")
    from nncompare.backends import onnxruntime_backend as ort_backend
    from nncompare.backends.base import cpu_processors, physical_cores
    two_threads_per_core = "".join(f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i // 2}\n\n"
                                   for i in range(8))
    assert physical_cores(cpu_processors(two_threads_per_core)) == 4
    assert physical_cores(cpu_processors("processor\t: 0\nmodel name\t: x\n\n")) is None  # no core ids: unknown
    monkeypatch.setattr(ort_backend, "default_intra_op_threads", lambda: 4)
    spec = ModelSpec("tiny", (3,), (Dense(2),))
    try:
        for asked, given in ((4, 0), (3, 3), (8, 8)):
            adapter.set_threads(asked)
            net = adapter.build(spec)
            assert net._options.intra_op_num_threads == given
            assert str(net.settings["intra_op_threads"]).startswith(str(given))
    finally:
        adapter._threads = None


# --- from_torch --------------------------------------------------------------------------------------
def torch_modules():
    require("torch")
    import torch
    from torch import nn
    import torch.nn.functional as F

    def stats(bn):
        """Random running statistics and affine parameters: an identity BatchNorm would hide a slip."""
        g = torch.Generator().manual_seed(bn.num_features)
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1, generator=g)
            bn.running_var.uniform_(0.5, 2, generator=g)
            if bn.affine:
                bn.weight.uniform_(0.5, 1.5, generator=g)
                bn.bias.uniform_(-0.5, 0.5, generator=g)
        return bn

    class Block(nn.Module):
        """A ResNet basic block; the shortcut projects when the shape changes."""

        def __init__(self, c, o, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(c, o, 3, stride, 1, bias=False)
            self.bn1 = stats(nn.BatchNorm2d(o, momentum=0.2, eps=1e-3))
            self.conv2 = nn.Conv2d(o, o, 3, 1, "same", bias=False)
            self.bn2 = stats(nn.BatchNorm2d(o))
            self.short = (nn.Sequential(nn.Conv2d(c, o, 1, stride, bias=False), stats(nn.BatchNorm2d(o)))
                          if stride != 1 or c != o else nn.Identity())

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += self.short(x)
            return out.relu()

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.b1, self.b2 = Block(8, 8, 1), Block(8, 16, 2)
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 5)

        def forward(self, x):
            x = F.max_pool2d(self.stem(x), 3, 2, 1)
            return self.fc(torch.flatten(self.pool(self.b2(self.b1(x))), 1))

    class Branches(nn.Module):
        """Inception-style branches joined by torch.cat, a view-flatten, BatchNorm1d, a softmax head."""

        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 4, (3, 2), padding="same")
            self.p = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
            self.m = nn.MaxPool2d(2, ceil_mode=True)  # on 5 x 7: the spec's "same" (the odd cell bottom/right)
            self.act, self.bn = nn.GELU(approximate="tanh"), stats(nn.BatchNorm1d(7 * 3 * 4))
            self.fc, self.drop, self.head = nn.Linear(7 * 3 * 4 + 7, 3), nn.Dropout(0.3), nn.Softmax(dim=1)

        def forward(self, x):
            y = torch.cat([self.a(x), F.silu(self.b(self.p(x)))], dim=1)
            z = self.m(self.act(y))
            z = self.bn(z.view(z.size(0), -1))
            return self.head(self.fc(self.drop(torch.cat([z, y.mean([2, 3])], 1))))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.1), nn.Linear(8, 8), nn.ELU(),
                                     stats(nn.BatchNorm1d(8, affine=False)), nn.Linear(8, 8), nn.Softplus(),
                                     nn.Tanh(), nn.Linear(8, 1), nn.Sigmoid())

        def forward(self, x):
            return self.net(x)

    class Mobile(nn.Module):
        """MobileNetV3's vocabulary: ZeroPad2d and a depthwise conv with multiplier 2, a grouped dilated conv with
        uneven padding, squeeze-and-excitation (adaptive pooling to 1, 1x1 convs, hardsigmoid, a product),
        hardswish, relu6, F.pad, ceil_mode pools (count_include_pad, torch's default), adaptive pooling, elu(0.5)."""

        def __init__(self):
            super().__init__()
            self.pad, self.dw, self.bn = nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(4, 8, 3, 2, groups=4, bias=False), \
                stats(nn.BatchNorm2d(8))
            self.act, self.gd = nn.Hardswish(), nn.Conv2d(8, 8, 3, padding=(2, 1), dilation=(2, 1), groups=2)
            self.squeeze, self.reduce, self.expand = nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
            self.gate, self.avg, self.max = nn.Hardsigmoid(), nn.AvgPool2d(3, 2, 1, ceil_mode=True), \
                nn.MaxPool2d(2, 2, ceil_mode=True)
            self.bins, self.elu, self.fc = nn.AdaptiveAvgPool2d((3, 2)), nn.ELU(0.5), nn.Linear(8 * 3 * 2 + 8 * 9, 5)

        def forward(self, x):
            x = self.act(self.bn(self.dw(self.pad(x))))
            y = F.relu6(self.gd(x))
            y = y * self.gate(self.expand(F.relu(self.reduce(self.squeeze(y)))))
            a = self.bins(self.avg(F.pad(y, (1, 0, 0, 1))))
            return self.fc(self.elu(torch.cat([torch.flatten(a, 1), torch.flatten(self.max(y), 1)], 1)))

    torch.manual_seed(0)
    return torch, {"resnet": (ResNet(), (3, 9, 9)), "branches": (Branches(), (2, 5, 7)), "mlp": (MLP(), (6,)),
                   "mobile": (Mobile(), (4, 11, 10))}


def torch_output(torch, module, x):
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # torch pads a copy: fine
@pytest.mark.parametrize("name", ["resnet", "branches", "mlp", "mobile"])
def test_from_torch_computes_what_the_module_computes(name, oracle):
    torch, modules = torch_modules()
    from nncompare.interop import from_torch
    module, shape = modules[name]
    module.train()
    spec, w = from_torch(module, shape)
    assert all(m.training for m in module.modules())  # its modes are restored
    x = inputs(shape, 4)
    ref = torch_output(torch, module, x)
    assert scaled_diff(oracle.build(spec, weights=w).predict(x), ref) <= ORACLE_TOL
    assert scaled_diff(get_adapter("torch").build(spec, weights=w).predict(x), ref) <= FRAMEWORK_TOL


def test_from_torch_carries_names_momentum_and_padding():
    _, modules = torch_modules()
    from nncompare.interop import from_torch
    spec, _ = from_torch(*modules["resnet"])
    layers = {l.name: l for l in spec.layers}
    assert layers["b1_bn1"].momentum == pytest.approx(0.8) and layers["b1_bn1"].epsilon == 1e-3  # 1 - torch's
    assert layers["b1_bn2"].momentum == pytest.approx(0.9) and layers["b1_bn2"].epsilon == 1e-5
    assert layers["b1_conv2"].padding == "same" and layers["b1_conv1"].padding == 1
    assert layers["max_pool2d"].padding == "same" and type(layers["pool"]).__name__ == "GlobalAveragePooling2D"
    assert layers["add"].inputs == ("b1_bn2", "max_pool2d") and spec.output_shape == (5,)
    spec, _ = from_torch(*modules["branches"])
    assert [l.name for l in spec.layers][-3:] == ["drop", "fc", "head"] and spec.head == "softmax"


@pytest.mark.parametrize("case,message", [
    ("lstm", r"node 'lstm' \(call_module LSTM\): module LSTM is not supported \(supported: .*Conv2d"),
    ("reflect", r"node 'conv' \(call_module Conv2d\): padding_mode 'reflect'"),
    ("divisor", r"node 'pool' \(call_module AvgPool2d\): dilation, return_indices and divisor_override"),
    ("hardtanh", r"node 'clip' \(call_module Hardtanh\): module Hardtanh is not supported"),
    ("momentum", r"node 'bn' \(call_module BatchNorm1d\): momentum None"),
    ("scaled", r"node 'mul' \(call_function mul\): a product with a constant is not supported"),
    ("constant", r"node 'add' \(call_function add\): an argument 1 is not a tensor"),
    ("reshape", r"node 'view' \(call_method view\): reshape to \('batch', 2, 16\)"),
    ("bad_shape", r"does not run on inputs of shape \(N, 3, 4, 4\)"),
    ("batch_branch", r"torch\.fx cannot trace it: symbolically traced variables cannot be used as inputs to control"),
    ("channels_last", r"node 'conv' \(call_module Conv2d\): reads a channels-last image"),
    ("hooked", r"node 'conv' \(call_module Conv2d\): forward hooks run around the module"),
    # Hugging Face ConvNeXt's final LayerNorm: past the spec's floor, so it cannot compute the same everywhere
    ("epsilon", r"^torch module One: norm: field 'epsilon': must be at least 1e-06 .*got 1e-12$"),
])
def test_from_torch_refuses_what_it_cannot_import_exactly(case, message):
    torch_modules()
    from torch import nn
    from nncompare.interop import from_torch

    class Wrap(nn.Module):
        def __init__(self, **mods):
            super().__init__()
            for k, v in mods.items():
                setattr(self, k, v)

    class LSTM(Wrap):
        def forward(self, x):
            return self.lstm(x)[0]

    class One(Wrap):
        def forward(self, x):
            return next(iter(self.children()))(x)

    class AddOne(nn.Module):
        def forward(self, x):
            return x + 1

    class Reshape(nn.Module):
        def forward(self, x):
            return x.view(x.size(0), 2, 16)

    class Double(nn.Module):
        def forward(self, x):
            return x * 2

    class BatchBranch(nn.Module):  # a graph for one batch size only
        def forward(self, x):
            return x.relu() if x.shape[0] > 1 else x

    class ChannelsLast(Wrap):
        def forward(self, x):
            return self.conv(x.permute(0, 2, 3, 1))

    hooked = One(conv=nn.Conv2d(2, 2, 3))
    hooked.conv.register_forward_hook(lambda m, i, o: o * 2)

    module, shape = {
        "lstm": (LSTM(lstm=nn.LSTM(4, 4)), (4,)),
        "reflect": (One(conv=nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")), (2, 8, 8)),
        "divisor": (One(pool=nn.AvgPool2d(3, 1, 1, divisor_override=4)), (2, 6, 6)),
        "hardtanh": (One(clip=nn.Hardtanh(-1, 1)), (4,)),  # only (0, 6) is relu6
        "momentum": (One(bn=nn.BatchNorm1d(4, momentum=None)), (4,)),
        "scaled": (Double(), (4,)),
        "constant": (AddOne(), (4,)),
        "reshape": (Reshape(), (2, 4, 4)),
        "bad_shape": (One(conv=nn.Conv2d(2, 2, 3)), (3, 4, 4)),
        "batch_branch": (BatchBranch(), (4,)),
        "channels_last": (ChannelsLast(conv=nn.Conv2d(4, 2, 1)), (4, 4, 4)),
        "hooked": (hooked, (2, 4, 4)),
        "epsilon": (One(norm=nn.LayerNorm(4, eps=1e-12)), (4,)),
    }[case]
    with pytest.raises(InteropError, match=message) as e:
        from_torch(module, shape)
    assert "\n" not in str(e.value)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_torch_same_padding_is_the_specs_for_odd_and_even_kernels(oracle):
    """torch's padding="same" (stride 1) pads k - 1 cells with the odd one after: TensorFlow's split."""
    torch, _ = torch_modules()
    from torch import nn
    from nncompare.interop import from_torch
    for k in ((2, 3), (4, 4), (3, 1)):
        module = nn.Sequential(nn.Conv2d(2, 3, k, padding="same"), nn.Flatten())
        spec, w = from_torch(module, (2, 5, 6))
        assert spec.layers[0].padding == "same"
        x = inputs((2, 5, 6))
        assert scaled_diff(oracle.build(spec, weights=w).predict(x), torch_output(torch, module, x)) <= ORACLE_TOL


def shape_driven_modules():
    """Modules written as real networks are: code that reads sizes (a channel check, TensorFlow-style "same" padding
    computed from the input size, a reshape to x.shape[:2]), a Conv2d subclass, an average pool whose one window
    covers the input, a channels-last block (permute, LayerNorm and Linear per position, a layer scale parameter,
    permute back), LayerNorm of a flat tensor."""
    torch, _ = torch_modules()
    from torch import nn
    import torch.nn.functional as F

    class Depthwise(nn.Conv2d):  # Hugging Face's EfficientNet depthwise convolution: only __init__ differs
        def __init__(self, c):
            super().__init__(c, c, 3, groups=c, bias=False)

    class Sized(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.dw = nn.Conv2d(3, 4, 3, stride=2), Depthwise(4)
            self.pool, self.fc = nn.AvgPool2d(64, ceil_mode=True), nn.Linear(4, 3)

        def forward(self, x):
            if x.shape[1] != 3:
                raise ValueError("three channels")
            h, w = x.shape[-2:]
            pad_h, pad_w = max(3 - (2 if h % 2 == 0 else h % 2), 0), max(3 - (2 if w % 2 == 0 else w % 2), 0)
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), "constant", 0.0)
            x = self.dw(F.pad(self.conv(x), (1, 1, 1, 1)))
            x = F.pad(x, (0, 0, 0, 0))  # nothing to pad: the identity
            x = self.pool(x)
            return self.fc(x.reshape(x.shape[:2]))

    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 4, 3, padding=1), nn.LayerNorm(4, eps=1e-5)
            self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)
            self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))
            self.head_norm, self.fc = nn.LayerNorm(4), nn.Linear(4, 2)

        def forward(self, x):
            c = self.conv(x)
            y = self.down(F.gelu(self.up(self.norm(c.permute(0, 2, 3, 1)))))
            x = c + (self.scale * y).permute(0, 3, 1, 2)
            return self.fc(self.head_norm(x.mean([2, 3])))

    torch.manual_seed(0)
    return torch, {"sized": (Sized(), (3, 9, 8)), "channels_last": (ChannelsLast(), (3, 5, 6))}


@pytest.mark.parametrize("name", ["sized", "channels_last"])
def test_from_torch_traces_code_that_reads_sizes_and_channels_last_blocks(name, oracle):
    torch, modules = shape_driven_modules()
    from nncompare.interop import from_torch
    module, shape = modules[name]
    spec, w = from_torch(module, shape)
    kinds = [type(l).__name__ for l in spec.layers]
    if name == "sized":  # the size-derived pads are plain numbers; the zero pad is gone; one window: global pooling
        assert kinds == ["ZeroPadding2D", "Conv2D", "ZeroPadding2D", "Conv2D", "GlobalAveragePooling2D", "Dense"]
        assert spec.layers[0].padding == ((1, 1), (0, 1)) and spec.layers[3].groups == 4
    else:  # Linear per position is a 1x1 convolution, the layer scale a depthwise one
        assert kinds == ["Conv2D", "LayerNormalization", "Conv2D", "Activation", "Conv2D", "Conv2D", "Add",
                         "GlobalAveragePooling2D", "LayerNormalization", "Dense"]
        assert spec.layers[5].groups == 4 and spec.layers[5].kernel_size == 1
    x = inputs(shape, 4)
    ref = torch_output(torch, module, x)
    assert scaled_diff(oracle.build(spec, weights=w).predict(x), ref) <= ORACLE_TOL
    assert scaled_diff(get_adapter("torch").build(spec, weights=w).predict(x), ref) <= FRAMEWORK_TOL


# --- from_keras --------------------------------------------------------------------------------------
def keras_module():
    require("keras")
    get_adapter("keras")  # chooses Keras' engine (TensorFlow) before keras is first imported
    import keras
    return keras


def keras_models(keras):
    L = keras.layers
    keras.utils.set_random_seed(0)
    i = keras.Input((7, 6, 3))
    a = L.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="c1")(i)
    b = L.Conv2D(4, (1, 3), strides=2, padding="same", use_bias=False, name="c2")(i)
    b = L.BatchNormalization(scale=False, name="bn_img")(b)
    s = L.LeakyReLU(name="lrelu")(L.Add(name="sum")([a, b]))
    c = L.Concatenate(name="cat")([L.MaxPooling2D(2, strides=1, padding="same")(s), L.Activation("gelu")(s)])
    p = L.AveragePooling2D(3, strides=2, padding="same")(s)
    f = L.Concatenate(name="flat_cat")([L.Flatten()(c), L.Flatten()(p), L.GlobalAveragePooling2D()(c)])
    f = L.Dropout(0.3)(L.BatchNormalization(center=False, momentum=0.9, epsilon=1e-4, name="bn_flat")(f))
    f = L.LayerNormalization(epsilon=1e-4, name="ln_flat")(f)  # gamma and beta in the flattened (H, W, C) order
    o = L.Softmax(name="head")(L.Dense(3, name="logits")(L.Dense(6, activation="swish", name="fc")(f)))
    functional = keras.Model(i, o, name="functional_net")
    sequential = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(3, 3, activation="elu"), L.ReLU(negative_slope=0.1),
                                   L.MaxPooling2D(), L.Flatten(), L.BatchNormalization(),
                                   L.Dense(5, activation="tanh"), L.Dense(1, activation="sigmoid")], name="seq_net")
    mlp = keras.Sequential([keras.Input((5,)), L.Dense(7, activation="gelu"), L.ELU(), L.Identity(),
                            L.Dense(4, activation="softmax")], name="mlp")
    rng = np.random.default_rng(1)
    for model in (functional, sequential):
        for layer in model.layers:
            if isinstance(layer, L.LayerNormalization):
                for v in (layer.gamma, layer.beta):
                    v.assign(rng.uniform(0.5, 2.0, v.shape))
            if isinstance(layer, L.BatchNormalization):
                for v in (layer.moving_mean, layer.moving_variance, layer.gamma, layer.beta):
                    if v is not None:
                        v.assign(rng.uniform(0.5, 2.0, v.shape))
    return {"functional": functional, "sequential": sequential, "mlp": mlp}


def keras_output(model, x):
    return model.predict(x.transpose(0, 2, 3, 1) if x.ndim == 4 else x, verbose=0)


@pytest.mark.parametrize("name", ["functional", "sequential", "mlp"])
def test_from_keras_computes_what_the_model_computes(name, oracle):
    keras = keras_module()
    from nncompare.interop import from_keras
    model = keras_models(keras)[name]
    spec, w = from_keras(model)
    x = inputs(spec.input_shape, 4)
    ref = keras_output(model, x)
    assert scaled_diff(oracle.build(spec, weights=w).predict(x), ref) <= ORACLE_TOL
    assert scaled_diff(get_adapter("keras").build(spec, weights=w).predict(x), ref) <= FRAMEWORK_TOL


def test_from_keras_converts_layouts_and_folds_what_is_foldable():
    keras = keras_module()
    from nncompare.interop import from_keras
    models = keras_models(keras)
    spec, w = from_keras(models["functional"])
    layers = {l.name: l for l in spec.layers}
    assert spec.input_shape == (3, 7, 6) and spec.name == "functional_net"
    c1 = models["functional"].get_layer("c1").kernel.numpy()
    assert np.array_equal(w["c1/kernel"], c1.transpose(3, 2, 0, 1))  # HWIO -> OIHW
    assert layers["c1"].activation == "relu" and layers["lrelu"].activation == "leaky_relu(0.3)"  # Keras' 0.3
    assert np.array_equal(w["bn_img/gamma"], np.ones(4)) and not w["bn_flat/beta"].any()
    assert layers["bn_flat"].momentum == 0.9 and layers["bn_flat"].epsilon == 1e-4
    assert layers["fc"].activation == "silu" and layers["head"].activation == "softmax" and spec.head == "softmax"
    mlp = from_keras(models["mlp"])[0]
    assert "input_layer" not in layers and [type(l).__name__ for l in mlp.layers] == ["Dense", "Activation", "Dense"]


def test_from_keras_folds_stochastic_depth_for_inference(oracle):
    """A Dropout with a noise_shape (per-sample stochastic depth) is the identity at inference: folded away, where a
    plain Dropout stays a Dropout."""
    keras = keras_module()
    from nncompare.interop import from_keras
    L = keras.layers
    i = keras.Input((5, 5, 3))
    a = L.Conv2D(3, 3, padding="same", name="conv")(i)
    s = L.Add(name="sum")([i, L.Dropout(0.5, noise_shape=(None, 1, 1, 1), name="drop")(a)])
    model = keras.Model(i, L.Dense(2, name="out")(L.Dropout(0.3, name="plain")(L.Flatten()(s))))
    spec, w = from_keras(model)
    assert [type(l).__name__ for l in spec.layers] == ["Conv2D", "Add", "Flatten", "Dropout", "Dense"]
    assert spec.layers[1].inputs == ("input", "conv") and spec.layers[3].rate == 0.3
    x = inputs(spec.input_shape)
    assert scaled_diff(oracle.build(spec, weights=w).predict(x), keras_output(model, x)) <= ORACLE_TOL


def test_from_keras_reads_keras_ops_dense_per_position_and_layer_scale(oracle):
    """keras.ops on Keras tensors (MobileNetV3's relu6(x + 3) * (1 / 6), a difference, products and sums of two
    tensors), a Dense on an image (ConvNeXt's pointwise convolutions: a 1x1 Conv2D) and ConvNeXt's LayerScale (a
    depthwise 1x1 Conv2D)."""
    keras = keras_module()
    from keras.src.applications.convnext import LayerScale
    from nncompare.interop import from_keras
    L = keras.layers
    i = keras.Input((5, 4, 3))
    c = L.Conv2D(4, 3, padding="same", name="conv")(i)
    gate = L.ReLU(6.0, name="relu6")(c + 3.0) * (1.0 / 6.0)
    d = LayerScale(0.5, 6, name="scale")(L.Dense(6, activation="gelu", name="per_position")(c - 1.5))
    m = L.Conv2D(4, 1, name="back")(d) * gate
    model = keras.Model(i, L.Dense(3, name="out")(L.GlobalAveragePooling2D(name="gap")(m + c)))
    model.get_layer("scale").gamma.assign(np.linspace(0.5, 2.0, 6))
    spec, w = from_keras(model)
    kinds = sorted(type(l).__name__ for l in spec.layers)
    assert kinds == sorted(["Conv2D", "Rescaling", "Activation", "Rescaling", "Rescaling", "Conv2D", "Conv2D", "Conv2D",
                            "Multiply", "Add", "GlobalAveragePooling2D", "Dense"])
    layers = {l.name: l for l in spec.layers}
    assert layers["per_position"].kernel_size == 1 and layers["per_position"].activation == "gelu"
    assert layers["scale"].groups == 6 and np.array_equal(w["scale/kernel"].reshape(-1), np.linspace(0.5, 2.0, 6,
                                                                                                      dtype=np.float32))
    assert sorted((l.scale, l.offset) for l in spec.layers if type(l).__name__ == "Rescaling") == \
        [(1 / 6, 0.0), (1.0, -1.5), (1.0, 3.0)]
    x = inputs(spec.input_shape)
    assert scaled_diff(oracle.build(spec, weights=w).predict(x), keras_output(model, x)) <= ORACLE_TOL


def test_from_keras_refuses_a_keras_op_it_cannot_map():
    keras = keras_module()
    from nncompare.interop import from_keras
    i = keras.Input((4,))
    model = keras.Model(i, keras.layers.Dense(2)(keras.ops.exp(i)))
    with pytest.raises(InteropError, match=r"layer 'exp' \(Exp\): the operation keras\.ops\.exp on 1 tensors"):
        from_keras(model)


def test_from_keras_reads_a_keras_file(tmp_path, oracle):
    keras = keras_module()
    from nncompare.interop import from_keras
    model = keras_models(keras)["sequential"]
    model.save(tmp_path / "seq.keras")
    spec, w = from_keras(tmp_path / "seq.keras")
    x = inputs(spec.input_shape)
    assert scaled_diff(oracle.build(spec, weights=w).predict(x), keras_output(model, x)) <= ORACLE_TOL
    with pytest.raises(InteropError, match=r"missing\.keras: cannot load a Keras model"):
        from_keras(tmp_path / "missing.keras")


def test_from_keras_walks_a_sequential_nested_in_the_model(oracle):
    """ConvNeXt's stem: a Sequential (convolution, then LayerNormalization at ConvNeXt's 1e-6) inside a model."""
    keras = keras_module()
    from nncompare.interop import from_keras
    L = keras.layers
    i = keras.Input((6, 6, 3))
    stem = keras.Sequential([L.Conv2D(4, 2, strides=2, name="stem_conv"),
                             L.LayerNormalization(epsilon=1e-6, name="stem_norm")], name="stem")
    model = keras.Model(i, L.Dense(2, name="out")(L.GlobalAveragePooling2D(name="gap")(stem(i))))
    rng = np.random.default_rng(3)
    norm = stem.get_layer("stem_norm")
    norm.gamma.assign(rng.uniform(0.5, 1.5, 4))
    norm.beta.assign(rng.uniform(-0.3, 0.3, 4))
    spec, w = from_keras(model)
    assert [l.name for l in spec.layers] == ["stem_conv", "stem_norm", "gap", "out"]
    assert spec.layers[1].epsilon == 1e-6
    x = inputs(spec.input_shape)
    assert scaled_diff(oracle.build(spec, weights=w).predict(x), keras_output(model, x)) <= ORACLE_TOL


@pytest.mark.parametrize("case,message", [
    ("lambda", r"layer 'double' \(Lambda\): layer type Lambda is not supported \(supported: .*Conv2D"),
    ("relu4", r"layer 'relu4' \(ReLU\): threshold, and max_value other than 6 \(relu6\), are not supported"),
    ("output_order", r"its output is a flattened channels-last image"),
    ("activation", r"layer 'dense' \(Dense\): activation 'selu' is not supported"),
    ("nested", r"layer 'block' \(Sequential\): its layer 'double' \(Lambda\): layer type Lambda is not supported"),
])
def test_from_keras_refuses_what_it_cannot_import_exactly(case, message):
    keras = keras_module()
    from nncompare.interop import from_keras
    L = keras.layers
    stack = {
        "lambda": [keras.Input((4,)), L.Lambda(lambda t: 2 * t, name="double"), L.Dense(2)],
        "relu4": [keras.Input((4,)), L.ReLU(max_value=4, name="relu4")],
        "output_order": [keras.Input((2, 2, 3)), L.Flatten()],
        "activation": [keras.Input((4,)), L.Dense(2, activation="selu", name="dense")],
        "nested": [keras.Input((4,)), keras.Sequential([L.Dense(3), L.Lambda(lambda t: 2 * t, name="double")],
                                                       name="block"), L.Dense(2)],
    }[case]
    with pytest.raises(InteropError, match=message) as e:
        from_keras(keras.Sequential(stack))
    assert "\n" not in str(e.value)


# --- imported models in every framework ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "keras", "mxnet", "onnxruntime"])
def test_an_imported_network_runs_alike_in_every_framework(backend):
    """The torch ResNet, imported, predicts what torch predicts in each adapter (1e-3 of scale)."""
    torch, modules = torch_modules()
    require(backend)
    from nncompare.interop import from_torch
    module, shape = modules["resnet"]
    spec, w = from_torch(module, shape)
    x = inputs(shape, 4)
    got = get_adapter(backend).build(spec, weights=w).predict(x)
    assert scaled_diff(got, torch_output(torch, module, x)) <= FRAMEWORK_TOL
