"""Spec -> ONNX, written with onnx.helper node by node so every op has the spec's meaning: TensorFlow "same" as
explicit asymmetric pads, average pooling excluding padded cells, BatchNorm in inference form.

CONVERTERS maps each layer kind to the function that emits its nodes (the converter-table pattern of the
backends). Tensors are named after the layers that compute them, initializers after the canonical weight keys
("<layer>/<param>"), the graph input "input"; helper tensors are "<layer>/<what>".
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..backends.base import converter
from ..models import (INPUT, Activation, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D, Dense, Dropout, Flatten,
                      GlobalAveragePooling2D, MaxPool2D, ModelSpec, parse_activation)

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

    def weight(self, layer: str, param: str) -> str:
        key = f"{layer}/{param}"
        return self.init(key, self.weights[key])

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
    (pt, pb), (pl, pr) = info.layer.pads(info.in_shape)
    w = [g.weight(info.name, "kernel")] + ([g.weight(info.name, "bias")] if info.layer.use_bias else [])
    kh, kw = g.weights[f"{info.name}/kernel"].shape[2:]
    _core(g, info, "Conv", [inputs[0], *w], kernel_shape=[int(kh), int(kw)], strides=list(_pair(info.layer.strides)),
          pads=[pt, pl, pb, pr])


def _pool(g, info, inputs):
    (k, s), ((pt, pb), (pl, pr)) = info.layer.window(), info.layer.pads(info.in_shape)
    attrs = dict(kernel_shape=list(k), strides=list(s), pads=[pt, pl, pb, pr])
    if isinstance(info.layer, AvgPool2D):
        attrs["count_include_pad"] = 0  # the spec's average excludes padded cells (TensorFlow's "same")
    g.node("MaxPool" if isinstance(info.layer, MaxPool2D) else "AveragePool", [inputs[0]], info.name, info.name,
           **attrs)


def _global_pool(g, info, inputs):
    pooled = g.node("GlobalAveragePool", [inputs[0]], f"{info.name}/pooled", info.name)
    g.node("Flatten", [pooled], info.name, f"{info.name}/flatten", axis=1)


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


def build(spec: ModelSpec, weights: dict, infos=None, outputs: tuple[str, ...] | None = None) -> onnx.ModelProto:
    """The ONNX model of `infos` (default: every layer, the head included); its outputs are `outputs` (default:
    the last layer)."""
    weights = check_weights(spec, weights)
    infos = spec.infos if infos is None else infos
    g = _Graph(weights)
    for info in infos:
        converter(CONVERTERS, info, "ONNX export", InteropError)(g, info, info.inputs)
    shapes = {i.name: i.out_shape for i in infos}
    outputs = (infos[-1].name,) if outputs is None else outputs
    graph = helper.make_graph(g.nodes, spec.name, [_value_info(INPUT, spec.input_shape)],
                              [_value_info(n, shapes[n]) for n in outputs], g.initializers)
    opsets = [helper.make_opsetid("", OPSET)]
    from .. import __version__
    model = helper.make_model(graph, opset_imports=opsets, producer_name="nncompare", producer_version=__version__,
                              ir_version=helper.find_min_ir_version_for(opsets))
    if sum(w.nbytes for w in weights.values()) < PROTO_LIMIT:  # larger: checked from its file (external data)
        onnx.checker.check_model(model)
    return model
