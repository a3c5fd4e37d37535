"""Spec -> ONNX, written with onnx.helper node by node so every op has the spec's meaning: TensorFlow "same" as
explicit asymmetric pads, average pooling with the spec's divisor, torch's ceil_mode as ONNX Runtime runs it and
onnx's shape inference agrees, BatchNorm in inference form.

CONVERTERS maps each layer kind to the function that emits its nodes (the converter-table pattern of the
backends). Tensors are named after the layers that compute them, initializers after the canonical weight keys
("<layer>/<param>"), the graph input "input"; helper tensors are "<layer>/<what>".
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..backends.base import converter
from ..models import (INPUT, Activation, AdaptiveAvgPool2D, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D, Dense,
                      Dropout, Flatten, GlobalAveragePooling2D, LayerNormalization, MaxPool2D, ModelSpec, Multiply,
                      Normalization, Rescaling, ZeroPadding2D, adaptive_bins, parse_activation)
from ..models.spec import NORMALIZATION_EPSILON

from ._common import InteropError

# Opset 20 has Gelu (exact and tanh) as one op; SiLU has none before 24 and is written x * Sigmoid(x).
OPSET = 20
BATCH = "batch"  # the dynamic batch axis
PROTO_LIMIT = 2 ** 31 - 2 ** 24  # protobuf's 2 GiB, less room for the graph: larger weights go to a .data file


class _Graph:
    """The nodes and initializers being emitted, and the weights they read."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self.nodes: list = []
        self.initializers: list = []
        self.weights = weights

    def init(self, name: str, value) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def weight(self, layer: str, param: str, shape: tuple | None = None) -> str:
        """The canonical weight as an initializer named after its key (reshaped to `shape` to broadcast)."""
        key = f"{layer}/{param}"
        value = self.weights[key]
        return self.init(key, value if shape is None else value.reshape(shape))

    def ints(self, name: str, value) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output


def activation(g: _Graph, act: str, x: str, out: str, name: str) -> str:
    """Emit act(x) as `out`; a node named `name` computes it (linear: an Identity)."""
    kind, alpha = parse_activation(act)
    if kind == "silu":
        s = g.node("Sigmoid", [x], f"{name}/sigmoid", f"{name}/sigmoid")
        return g.node("Mul", [x, s], out, name)
    if kind in ("gelu", "gelu_tanh"):
        return g.node("Gelu", [x], out, name, approximate="tanh" if kind == "gelu_tanh" else "none")
    if kind == "relu6":
        return g.node("Clip", [x, g.init(f"{name}/min", 0.0), g.init(f"{name}/max", 6.0)], out, name)
    if kind in ("hard_sigmoid", "hard_swish"):  # relu6(x + 3) / 6 (docs/design.md trap 28): alpha 1/6, beta 1/2
        return g.node("HardSigmoid" if kind == "hard_sigmoid" else "HardSwish", [x], out, name,
                      **({"alpha": 1 / 6, "beta": 0.5} if kind == "hard_sigmoid" else {}))
    op = {"linear": "Identity", "relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softplus": "Softplus",
          "softmax": "Softmax", "leaky_relu": "LeakyRelu", "elu": "Elu"}[kind]
    attrs = {"axis": 1} if kind == "softmax" else {"alpha": float(alpha)} if alpha is not None else {}
    return g.node(op, [x], out, name, **attrs)


def _core(g: _Graph, info, op: str, inputs: list[str], **attrs) -> None:
    """A Dense's or Conv2D's own op, then its activation in a node named "<layer>/<activation>" (which an importer
    folds back into the layer)."""
    act = info.layer.activation
    if parse_activation(act)[0] == "linear":
        g.node(op, inputs, info.name, info.name, **attrs)
        return
    pre = g.node(op, inputs, f"{info.name}/linear", info.name, **attrs)
    activation(g, act, pre, info.name, f"{info.name}/{parse_activation(act)[0]}")


def _dense(g, info, inputs):
    _core(g, info, "Gemm", [inputs[0], g.weight(info.name, "kernel"), g.weight(info.name, "bias")])


def _conv(g, info, inputs):
    layer = info.layer
    (pt, pb), (pl, pr) = layer.pads(info.in_shape)
    w = [g.weight(info.name, "kernel")] + ([g.weight(info.name, "bias")] if layer.use_bias else [])
    kh, kw = g.weights[f"{info.name}/kernel"].shape[2:]
    _core(g, info, "Conv", [inputs[0], *w], kernel_shape=[int(kh), int(kw)], strides=list(_pair(layer.strides)),
          pads=[pt, pl, pb, pr], group=int(layer.groups), dilations=list(_pair(layer.dilation)))


def _pool(g, info, inputs):
    layer, x = info.layer, inputs[0]
    (k, s), ((pt, pb), (pl, pr)) = layer.window(), layer.pads(info.in_shape)
    eh, ew = layer.overhang(info.in_shape)
    spans = [info.in_shape[1] + pt + pb - k[0], info.in_shape[2] + pl + pr - k[1]]
    # ONNX Runtime drops a ceil_mode window that would start in the after-padding, as torch does, but onnx's shape
    # inference does not (docs/design.md trap 39): ceil_mode=1 only where both agree with the spec. Without an
    # overhang the spec's windows are floor mode's; with one, the overhang is padding after that neither average
    # counts (count_include_pad: the spec's own pads as a Pad node before it, which the average counts).
    ceil = bool(eh or ew) and list(layer.output_hw(info.in_shape)) == [-(-n // st) + 1 for n, st in zip(spans, s)]
    if (eh or ew) and not ceil:
        if isinstance(layer, AvgPool2D) and layer.count_include_pad and any((pt, pb, pl, pr)):
            x = g.node("Pad", [x, g.ints(f"{info.name}/pads", [0, 0, pt, pl, 0, 0, pb, pr])], f"{info.name}/padded",
                       f"{info.name}/pad", mode="constant")
            (pt, pb), (pl, pr) = (0, 0), (0, 0)
        pb, pr = pb + eh, pr + ew
    attrs = dict(kernel_shape=list(k), strides=list(s), pads=[pt, pl, pb, pr], ceil_mode=int(ceil))
    if isinstance(layer, AvgPool2D):
        attrs["count_include_pad"] = int(layer.count_include_pad and (ceil or not (eh or ew)))
    g.node("MaxPool" if isinstance(layer, MaxPool2D) else "AveragePool", [x], info.name, info.name, **attrs)


def _global_pool(g, info, inputs):
    if info.layer.keepdims:
        g.node("GlobalAveragePool", [inputs[0]], info.name, info.name)
        return
    pooled = g.node("GlobalAveragePool", [inputs[0]], f"{info.name}/pooled", info.name)
    g.node("Flatten", [pooled], info.name, f"{info.name}/flatten", axis=1)


def _zero_padding(g, info, inputs):
    (t, b), (l, r) = info.layer.pads()
    g.node("Pad", [inputs[0], g.ints(f"{info.name}/pads", [0, 0, t, l, 0, 0, b, r])], info.name, info.name,
           mode="constant")


def _adaptive_pool(g, info, inputs):
    """Products with averaging matrices, torch's bins as rows: (oh, H) @ x @ (W, ow)."""
    (_, h, w), (_, oh, ow) = info.in_shape, info.out_shape
    rows, cols = _averaging(h, oh), _averaging(w, ow).T
    pooled = g.node("MatMul", [g.init(f"{info.name}/rows", rows), inputs[0]], f"{info.name}/rows_pooled",
                    f"{info.name}/rows_pooled")
    g.node("MatMul", [pooled, g.init(f"{info.name}/cols", cols)], info.name, info.name)


def _averaging(size: int, out: int) -> np.ndarray:
    m = np.zeros((out, size), np.float32)
    for i, (a, b) in enumerate(adaptive_bins(size, out)):
        m[i, a:b] = 1 / (b - a)
    return m


def _multiply(g, info, inputs):
    gate = Multiply.gate(info.in_shapes)
    inputs = list(inputs)
    if gate is not None and len(info.in_shapes[gate]) == 1:  # a flat (N, C) gate broadcast as (N, C, 1, 1)
        inputs[gate] = g.node("Unsqueeze", [inputs[gate], g.ints(f"{info.name}/axes", [2, 3])],
                              f"{info.name}/gate", f"{info.name}/gate")
    x = inputs[0]
    for k, other in enumerate(inputs[1:], 1):  # a chain of Muls, the intermediate ones named "<layer>/mul<k>"
        last = k == len(inputs) - 1
        x = g.node("Mul", [x, other], info.name if last else f"{info.name}/mul{k}",
                   info.name if last else f"{info.name}/mul{k}")


def _rescaling(g, info, inputs):
    layer = info.layer
    if not layer.offset:
        g.node("Mul", [inputs[0], g.init(f"{info.name}/scale", layer.scale)], info.name, info.name)
        return
    scaled = g.node("Mul", [inputs[0], g.init(f"{info.name}/scale", layer.scale)], f"{info.name}/scaled",
                    f"{info.name}/scale")
    g.node("Add", [scaled, g.init(f"{info.name}/offset", layer.offset)], info.name, info.name)


def _broadcast(info) -> tuple:
    """The shape a per-channel weight (C,) takes to broadcast over the layer's input: (C, 1, 1) for an image."""
    return (-1, 1, 1) if len(info.in_shape) == 3 else (-1,)


def _normalization(g, info, inputs):
    """(x - mean) / Max(Sqrt(variance), 1e-7), the statistics reshaped to broadcast over an image."""
    n, shape = info.name, _broadcast(info)
    mean, var = g.weight(n, "mean", shape), g.weight(n, "variance", shape)
    scale = g.node("Max", [g.node("Sqrt", [var], f"{n}/sqrt", f"{n}/sqrt"), g.init(f"{n}/epsilon",
                                                                                  NORMALIZATION_EPSILON)],
                   f"{n}/scale", f"{n}/scale")
    g.node("Div", [g.node("Sub", [inputs[0], mean], f"{n}/centered", f"{n}/centered"), scale], n, n)


def _layernorm(g, info, inputs):
    """ONNX's LayerNormalization normalizes every axis from its own on: an image goes channels-last around it."""
    n, eps = info.name, float(info.layer.epsilon)
    params = [g.weight(n, "gamma"), g.weight(n, "beta")]
    if len(info.in_shape) == 1:
        g.node("LayerNormalization", [inputs[0], *params], n, n, axis=-1, epsilon=eps)
        return
    nhwc = g.node("Transpose", [inputs[0]], f"{n}/nhwc", f"{n}/nhwc", perm=[0, 2, 3, 1])
    normed = g.node("LayerNormalization", [nhwc, *params], f"{n}/normalized", n, axis=-1, epsilon=eps)
    g.node("Transpose", [normed], n, f"{n}/nchw", perm=[0, 3, 1, 2])


def _batchnorm(g, info, inputs):
    params = [g.weight(info.name, p) for p in ("gamma", "beta", "moving_mean", "moving_var")]
    # ONNX's momentum weighs the old running value, as the spec's does: carried for a round trip
    g.node("BatchNormalization", [inputs[0], *params], info.name, info.name, epsilon=float(info.layer.epsilon),
           momentum=float(info.layer.momentum))


def _dropout(g, info, inputs):
    ratio = g.init(f"{info.name}/ratio", np.float32(info.layer.rate))  # inference: an identity that keeps its rate
    g.node("Dropout", [inputs[0], ratio], info.name, info.name)


CONVERTERS = {
    Dense: _dense,
    Conv2D: _conv,
    MaxPool2D: _pool,
    AvgPool2D: _pool,
    GlobalAveragePooling2D: _global_pool,
    Flatten: lambda g, info, inputs: g.node("Flatten", [inputs[0]], info.name, info.name, axis=1),  # C, H, W order
    Activation: lambda g, info, inputs: activation(g, info.layer.activation, inputs[0], info.name, info.name),
    Dropout: _dropout,
    BatchNorm: _batchnorm,
    Add: lambda g, info, inputs: g.node("Add" if len(inputs) == 2 else "Sum", list(inputs), info.name, info.name),
    Concatenate: lambda g, info, inputs: g.node("Concat", list(inputs), info.name, info.name, axis=1),
    ZeroPadding2D: _zero_padding,
    AdaptiveAvgPool2D: _adaptive_pool,
    Multiply: _multiply,
    Rescaling: _rescaling,
    Normalization: _normalization,
    LayerNormalization: _layernorm,
}


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _value_info(name: str, shape: tuple):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH, *shape])


def check_weights(spec: ModelSpec, weights) -> dict[str, np.ndarray]:
    """The weights as float32 arrays in the spec's key order, or an InteropError naming what does not fit."""
    shapes = spec.param_shapes()
    if not hasattr(weights, "keys"):
        raise InteropError(f"weights: must be a dict of canonical key -> array, got {type(weights).__name__}")
    missing, extra = [k for k in shapes if k not in weights], [k for k in weights if k not in shapes]
    if missing or extra:
        raise InteropError(f"weights do not fit model {spec.name!r}: missing {missing[:3]}, unexpected {extra[:3]}")
    out = {}
    for k, shape in shapes.items():
        a = np.asarray(weights[k], np.float32)
        if a.shape != tuple(shape):
            raise InteropError(f"weight {k!r}: shape {a.shape}, the spec needs {tuple(shape)}")
        if not np.isfinite(a).all():
            raise InteropError(f"weight {k!r}: not finite in float32")
        out[k] = a
    return out


def build(spec: ModelSpec, weights: dict, infos=None, outputs: tuple[str, ...] | None = None,
          head: str | None = None) -> onnx.ModelProto:
    """The ONNX model of `infos` (default: every layer, the head included); its outputs are `outputs` (default:
    the last layer), then, where `head` names one, the spec's head activation applied to the last of `infos`."""
    weights = check_weights(spec, weights)
    infos = spec.infos if infos is None else infos
    g = _Graph(weights)
    for info in infos:
        converter(CONVERTERS, info, "ONNX export", InteropError)(g, info, info.inputs)
    shapes = {i.name: i.out_shape for i in infos}
    outputs = (infos[-1].name,) if outputs is None else outputs
    if head is not None and spec.head is not None:
        activation(g, spec.head, infos[-1].name, head, head)
        shapes[head] = infos[-1].out_shape
        outputs = (*outputs, head)
    graph = helper.make_graph(g.nodes, spec.name, [_value_info(INPUT, spec.input_shape)],
                              [_value_info(n, shapes[n]) for n in outputs], g.initializers)
    opsets = [helper.make_opsetid("", OPSET)]
    from .. import __version__
    model = helper.make_model(graph, opset_imports=opsets, producer_name="nncompare", producer_version=__version__,
                              ir_version=helper.find_min_ir_version_for(opsets))
    if sum(w.nbytes for w in weights.values()) < PROTO_LIMIT:  # larger: checked from its file (external data)
        onnx.checker.check_model(model)
    return model
