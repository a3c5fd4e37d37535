"""ONNX -> spec: the ops to_onnx writes and the common ones of exported models, each mapped only where it has the
spec's meaning; every other op, attribute or pattern is one InteropError naming the node."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..models import (INPUT, Activation, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D, Dense, Dropout, Flatten,
                      GlobalAveragePooling2D, MaxPool2D, same_padding)

from ._common import Builder, InteropError, Value, leaky, supported

ACTIVATIONS = ("Relu", "Sigmoid", "Tanh", "Softmax", "LeakyRelu", "Elu", "Softplus", "Gelu")
SUPPORTED = ("Gemm", "MatMul", "Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "Flatten",
             "Reshape", "BatchNormalization", "Add", "Sum", "Concat", "Dropout", "Identity", "Constant",
             "Mul (x * Sigmoid(x) only)", "Div (in GELU's erf form only)") + ACTIVATIONS


def _load(path_or_model) -> onnx.ModelProto:
    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    if not isinstance(path_or_model, (str, Path)):
        raise InteropError(f"from_onnx: expected a path or an onnx.ModelProto, got {type(path_or_model).__name__}")
    try:
        return onnx.load(str(path_or_model))
    except Exception as e:  # a missing file, or bytes that are no ONNX protobuf
        raise InteropError(f"{path_or_model}: cannot read an ONNX model: {str(e).splitlines()[0][:200]}") from None


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _f32(v) -> float:
    """An ONNX float (attributes and ratios are float32) as the shortest decimal with that float32 value: 0.99,
    not 0.9900000095367432, so a spec's fields come back as written."""
    return float(str(np.float32(v)))


def _decoded(v):
    return v.decode() if isinstance(v, bytes) else v


def _int_pair(v) -> int | tuple[int, int]:
    v = tuple(int(x) for x in v)
    return v[0] if v[0] == v[1] else v


class _Importer:
    def __init__(self, model: onnx.ModelProto, source: str):
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.b = Builder(source)
        self.consts = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.values: dict[str, Value] = {}
        self.done: set[int] = set()  # nodes folded into an earlier one
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.graph.node):
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(i)
        self.outputs = {o.name for o in self.graph.output}

    # --- helpers ---------------------------------------------------------------------------------
    def where(self, i: int) -> str:
        node = self.graph.node[i]
        return f"node {i} ({node.name or node.op_type}, {node.op_type})"

    def refuse(self, i: int, why: str):
        raise InteropError(f"{self.b.source}: {self.where(i)}: {why}")

    def value(self, i: int, name: str) -> Value:
        if name in self.values:
            return self.values[name]
        what = "a constant" if name in self.consts else "not computed by an earlier node"
        self.refuse(i, f"input {name!r} is {what}; it must be a tensor computed from the model input")

    def const(self, i: int, name: str, what: str) -> np.ndarray:
        if name not in self.consts:
            self.refuse(i, f"its {what} ({name!r}) must be a constant (an initializer), not computed at run time")
        return self.consts[name]

    def rank(self, i: int, name: str) -> int:
        """The tensor's rank in the ONNX graph, batch axis included."""
        v = self.value(i, name)
        return len(v.shape) + 1 + 2 * v.kept

    def sole_consumer(self, tensor: str) -> int | None:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None

    def layer_name(self, i: int) -> str:
        node = self.graph.node[i]
        return self.b.name(node.name.lstrip("/"), f"{node.op_type.lower()}_{i}")

    def unused(self, i: int, outputs) -> None:
        for name in outputs:
            if name and (name in self.consumers or name in self.outputs):
                self.refuse(i, f"its optional output {name!r} is used; only the first output is supported")

    # --- activations -----------------------------------------------------------------------------
    def activation_at(self, i: int, rank: int | None = None) -> tuple[str, list[int], str] | None:
        """(spec activation, the nodes computing it, their output) if node i starts an activation, else None;
        `rank`: its input's, where that is not computed yet (an activation folded into its layer)."""
        node, a = self.graph.node[i], _attrs(self.graph.node[i])
        op = node.op_type
        if op == "Sigmoid":
            j = self.sole_consumer(node.output[0])
            if j is not None:
                mul = self.graph.node[j]
                if mul.op_type == "Mul" and sorted(mul.input) == sorted([node.input[0], node.output[0]]):
                    return "silu", [i, j], mul.output[0]
            return "sigmoid", [i], node.output[0]
        if op in ("Relu", "Tanh", "Softplus"):
            return op.lower(), [i], node.output[0]
        if op == "LeakyRelu":
            return leaky(_f32(a.get("alpha", 0.01))), [i], node.output[0]
        if op == "Elu":
            if a.get("alpha", 1.0) != 1.0:
                self.refuse(i, f"alpha {a['alpha']}: the spec's elu has alpha 1")
            return "elu", [i], node.output[0]
        if op == "Gelu":
            approx = _decoded(a.get("approximate", "none"))
            return ("gelu_tanh" if approx == "tanh" else "gelu"), [i], node.output[0]
        if op == "Softmax":
            rank = self.rank(i, node.input[0]) if rank is None else rank
            axis = a.get("axis", -1 if self.opset >= 13 else 1)
            if rank == 4 and self.opset < 13:
                self.refuse(i, f"opset {self.opset} softmax flattens from its axis; the spec's runs over channels only")
            if axis % rank != 1:
                self.refuse(i, f"softmax over axis {axis} of a rank-{rank} tensor; the spec's runs over axis 1")
            return "softmax", [i], node.output[0]
        if op == "Div":
            return self.erf_gelu_at(i)
        return None

    def erf_gelu_at(self, i: int) -> tuple[str, list[int], str] | None:
        """Exact GELU as older opsets write it (torch's exporter): Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)), 0.5)."""
        x, nodes, t = self.graph.node[i].input[0], [i], self.graph.node[i].output[0]
        for op, other in (("Div", math.sqrt(2)), ("Erf", None), ("Add", 1.0), ("Mul", x), ("Mul", 0.5)):
            j = i if op == "Div" else self.sole_consumer(t)
            node = self.graph.node[j] if j is not None else None
            if node is None or node.op_type != op or (op != "Div" and t not in node.input):
                return None
            rest = [n for n in node.input if n != t] if op != "Div" else node.input[1:]
            if isinstance(other, str):
                if rest != [other]:
                    return None
            elif other is not None:
                c = self.consts.get(rest[0]) if len(rest) == 1 else None
                if c is None or c.size != 1 or not math.isclose(float(c.reshape(())), other, rel_tol=1e-7):
                    return None
            if op != "Div":
                nodes.append(j)
            t = node.output[0]
        return "gelu", nodes, t

    def fused(self, i: int, out: str, rank: int) -> tuple[str, str]:
        """The activation a Dense/Conv node i folds in (to_onnx names it "<node>/..."), and the tensor after it."""
        users, prefix = self.consumers.get(out, []), self.graph.node[i].name + "/"
        if not users or out in self.outputs or not self.graph.node[i].name \
                or not self.graph.node[users[0]].name.startswith(prefix):
            return "linear", out
        found = self.activation_at(users[0], rank)
        if found is None or sorted(users) != sorted(set(users) & set(found[1])):  # SiLU: x feeds Sigmoid and Mul
            return "linear", out
        act, nodes, end = found
        self.done.update(nodes)
        return act, end

    # --- nodes -----------------------------------------------------------------------------------
    def run(self) -> tuple:
        inputs = [t for t in self.graph.input if t.name not in self.consts]
        if len(inputs) != 1 or len(self.graph.output) != 1:
            raise InteropError(f"{self.b.source}: has {len(inputs)} inputs and {len(self.graph.output)} outputs; "
                               f"a spec has one of each")
        dims = inputs[0].type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
        if len(shape) not in (2, 4) or any(s is None or s <= 0 for s in shape[1:]):
            raise InteropError(f"{self.b.source}: input {inputs[0].name!r} has shape "
                               f"{tuple('?' if s is None else s for s in shape)}; the spec needs (N, C, H, W) or "
                               f"(N, features) with every size but the batch fixed")
        if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise InteropError(f"{self.b.source}: input {inputs[0].name!r} is not float32")
        self.values[inputs[0].name] = Value(INPUT, shape[1:])
        for i, node in enumerate(self.graph.node):
            if i in self.done:
                continue
            if node.domain not in ("", "ai.onnx"):
                self.refuse(i, f"operator domain {node.domain!r} is not supported (only the standard ONNX domain)")
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None:
                found = self.activation_at(i) if node.op_type in ACTIVATIONS + ("Div",) else None
                if found is None:
                    self.refuse(i, f"op {node.op_type} is not supported (supported: {supported(SUPPORTED)})")
                act, nodes, end = found
                self.done.update(nodes)
                x = self.value(i, node.input[0])
                v = self.b.add(Activation(act, name=self.layer_name(nodes[-1])), [x], where=self.where(i))
                self.values[end] = Value(v.name, v.shape, kept=x.kept)
                continue
            handler(i, node, _attrs(node))
        out = self.values.get(self.graph.output[0].name)
        if out is None:
            raise InteropError(f"{self.b.source}: its output {self.graph.output[0].name!r} is not computed from its "
                               f"input")
        if out.kept:
            raise InteropError(f"{self.b.source}: its output is a pooled (N, C, 1, 1) image; the spec's global "
                               f"pooling gives (N, C): add a Flatten")
        return self.b.spec(self.graph.name or "onnx_model", shape[1:], out)

    def alias(self, node, v: Value, kept: bool | None = None) -> None:
        self.values[node.output[0]] = v if kept is None else Value(v.name, v.shape, v.perm, kept)

    def op_Constant(self, i, node, a):
        if "value" in a:
            self.consts[node.output[0]] = numpy_helper.to_array(a["value"])
        elif set(a) & {"value_float", "value_floats", "value_int", "value_ints"}:
            self.consts[node.output[0]] = np.asarray(next(iter(a.values())))
        else:
            self.refuse(i, f"a constant of kind {', '.join(a)} is not supported")

    def op_Identity(self, i, node, a):
        if node.input[0] in self.consts:
            self.consts[node.output[0]] = self.consts[node.input[0]]
        else:
            self.alias(node, self.value(i, node.input[0]))

    def flat(self, i: int, name: str, what: str) -> Value:
        v = self.value(i, name)
        if len(v.shape) != 1 or v.kept:
            self.refuse(i, f"{what} needs a flat (N, features) input, got {('N',) + v.shape}")
        return v

    def dense(self, i, x: Value, kernel: np.ndarray, bias: np.ndarray, out: str) -> None:
        if kernel.ndim != 2 or kernel.shape[0] != x.shape[0]:
            self.refuse(i, f"weight of shape {kernel.shape} does not map {x.shape[0]} features")
        try:
            bias = np.broadcast_to(np.asarray(bias, np.float32), (kernel.shape[1],))
        except ValueError:
            self.refuse(i, f"bias of shape {np.shape(bias)} does not fit {kernel.shape[1]} outputs")
        act, end = self.fused(i, out, 2)
        layer = Dense(int(kernel.shape[1]), activation=act, name=self.layer_name(i))
        self.values[end] = self.b.add(layer, [x], {"kernel": kernel, "bias": bias}, self.where(i))

    def op_Gemm(self, i, node, a):
        x = self.flat(i, node.input[0], "Gemm")
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or (a.get("beta", 1.0) != 1.0 and len(node.input) > 2):
            self.refuse(i, "only Gemm with transA=0, alpha=1 and beta=1 is a Dense layer")
        w = self.const(i, node.input[1], "weight")
        kernel = w.T if a.get("transB", 0) else w
        bias = self.const(i, node.input[2], "bias") if len(node.input) > 2 and node.input[2] else np.zeros(1)
        self.dense(i, x, kernel, bias, node.output[0])

    def op_MatMul(self, i, node, a):
        x = self.flat(i, node.input[0], "MatMul")
        kernel, out, bias = self.const(i, node.input[1], "weight"), node.output[0], np.zeros(1)
        j = self.sole_consumer(out)
        if j is not None and self.graph.node[j].op_type == "Add":
            other = [n for n in self.graph.node[j].input if n != out]
            if len(other) == 1 and other[0] in self.consts and self.consts[other[0]].size == kernel.shape[-1]:
                bias, out = self.consts[other[0]].reshape(-1), self.graph.node[j].output[0]
                self.done.add(j)
        self.dense(i, x, kernel, bias, out)

    def image(self, i: int, name: str, what: str) -> Value:
        v = self.value(i, name)
        if len(v.shape) != 3 or v.kept:
            shape = ("N",) + ((v.shape[0], 1, 1) if v.kept else v.shape)
            self.refuse(i, f"{what} needs an (N, C, H, W) image input, got {shape}")
        return v

    def pads(self, i: int, a: dict, x: Value, k: tuple, s: tuple) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) from pads or auto_pad."""
        auto = _decoded(a.get("auto_pad", "NOTSET"))
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            (t, b), (l, r) = same_padding(x.shape[1], k[0], s[0]), same_padding(x.shape[2], k[1], s[1])
            return (t, l, b, r) if auto == "SAME_UPPER" else (b, r, t, l)
        if auto not in ("NOTSET", "VALID"):
            self.refuse(i, f"auto_pad {auto!r} is not supported")
        p = tuple(int(v) for v in a.get("pads", (0, 0, 0, 0))) if auto == "NOTSET" else (0, 0, 0, 0)
        return p

    def padding(self, i: int, x: Value, k: tuple, s: tuple, p: tuple, conv: bool) -> str | int:
        """The spec padding with exactly these pads, or an InteropError."""
        t, l, b, r = p
        if p == (0, 0, 0, 0):
            return "valid"
        if ((t, b), (l, r)) == (same_padding(x.shape[1], k[0], s[0]), same_padding(x.shape[2], k[1], s[1])):
            return "same"
        if conv and t == l == b == r:
            return t
        self.refuse(i, f"pads {list(p)} (top, left, bottom, right) are neither symmetric{'' if conv else ' zero'} "
                       f"nor TensorFlow's 'same' split {list(same_padding(x.shape[1], k[0], s[0]))}, "
                       f"{list(same_padding(x.shape[2], k[1], s[1]))} for this input")

    def op_Conv(self, i, node, a):
        x = self.image(i, node.input[0], "Conv")
        w = self.const(i, node.input[1], "weight")
        if a.get("group", 1) != 1 or any(d != 1 for d in a.get("dilations", (1, 1))):
            self.refuse(i, f"group {a.get('group', 1)}, dilations {list(a.get('dilations', (1, 1)))}: only an "
                           f"ungrouped, undilated convolution is a Conv2D")
        if w.ndim != 4 or w.shape[1] != x.shape[0]:
            self.refuse(i, f"weight of shape {w.shape} does not fit {x.shape[0]} input channels")
        k, s = tuple(w.shape[2:]), tuple(a.get("strides", (1, 1)))
        padding = self.padding(i, x, k, s, self.pads(i, a, x, k, s), conv=True)
        bias = len(node.input) > 2 and node.input[2]
        act, end = self.fused(i, node.output[0], 4)
        layer = Conv2D(int(w.shape[0]), _int_pair(k), _int_pair(s), padding, act, use_bias=bool(bias),
                       name=self.layer_name(i))
        weights = {"kernel": w} | ({"bias": self.const(i, node.input[2], "bias")} if bias else {})
        self.values[end] = self.b.add(layer, [x], weights, self.where(i))

    def pool(self, i, node, a, kind):
        x = self.image(i, node.input[0], node.op_type)
        self.unused(i, node.output[1:])
        k = tuple(a["kernel_shape"])
        s = tuple(a.get("strides", (1, 1)))
        if any(d != 1 for d in a.get("dilations", (1, 1))) or a.get("storage_order", 0):
            self.refuse(i, "dilated pooling (or column-major indices) is not supported")
        p = self.pads(i, a, x, k, s)
        padding = self.padding(i, x, k, s, p, conv=False)
        if a.get("ceil_mode", 0):
            floor = [(x.shape[1 + d] + p[d] + p[d + 2] - k[d]) // s[d] + 1 for d in (0, 1)]
            ceil = [-(-(x.shape[1 + d] + p[d] + p[d + 2] - k[d]) // s[d]) + 1 for d in (0, 1)]
            if floor != ceil:
                self.refuse(i, "ceil_mode=1 gives a size the spec's floor (valid) or TensorFlow (same) rule does not")
        if kind is AvgPool2D and padding == "same" and a.get("count_include_pad", 0):
            self.refuse(i, "count_include_pad=1 averages padded zeros; the spec's 'same' average excludes them")
        layer = kind(_int_pair(k), None if s == k else _int_pair(s), padding=padding, name=self.layer_name(i))
        self.values[node.output[0]] = self.b.add(layer, [x], where=self.where(i))

    def op_MaxPool(self, i, node, a):
        self.pool(i, node, a, MaxPool2D)

    def op_AveragePool(self, i, node, a):
        self.pool(i, node, a, AvgPool2D)

    def global_pool(self, i, node, kept: bool) -> None:
        x = self.image(i, node.input[0], node.op_type)
        v = self.b.add(GlobalAveragePooling2D(name=self.layer_name(i)), [x], where=self.where(i))
        self.alias(node, v, kept)

    def op_GlobalAveragePool(self, i, node, a):
        self.global_pool(i, node, kept=True)

    def op_ReduceMean(self, i, node, a):
        axes = a.get("axes")
        if len(node.input) > 1 and node.input[1]:
            axes = self.const(i, node.input[1], "axes")
        if axes is None or sorted(int(x) % 4 for x in axes) != [2, 3]:
            self.refuse(i, f"a mean over axes {None if axes is None else list(axes)}; only the spatial mean (axes 2, "
                           f"3 of an image) is a global average pooling")
        self.global_pool(i, node, kept=bool(a.get("keepdims", 1)))

    def to_flat(self, i, node) -> None:
        v = self.value(i, node.input[0])
        if len(v.shape) == 1:
            self.alias(node, v, kept=False)
        else:
            self.values[node.output[0]] = self.b.add(Flatten(name=self.layer_name(i)), [v], where=self.where(i))

    def op_Flatten(self, i, node, a):
        if a.get("axis", 1) % self.rank(i, node.input[0]) != 1:
            self.refuse(i, f"flattens from axis {a.get('axis')}; only a flatten from axis 1 (keeping the batch) is")
        self.to_flat(i, node)

    def op_Reshape(self, i, node, a):
        v = self.value(i, node.input[0])
        target = [int(t) for t in self.const(i, node.input[1], "target shape").reshape(-1)]
        size = int(np.prod(v.shape))
        keep_batch = (a.get("allowzero", 0) == 0 and target[:1] == [0]) or target[:1] == [-1]
        if len(target) != 2 or not keep_batch or target[1] not in (-1, size) or target == [-1, -1]:
            self.refuse(i, f"reshape to {target}: only a flatten to (batch, {size}) ([0, -1] or [-1, {size}]) is "
                           f"supported")
        self.to_flat(i, node)

    def op_BatchNormalization(self, i, node, a):
        x = self.value(i, node.input[0])
        self.unused(i, node.output[1:])
        if a.get("training_mode", 0):
            self.refuse(i, "training_mode=1 normalizes by the batch's statistics; only inference form is a BatchNorm")
        gamma, beta, mean, var = (self.const(i, n, what)
                                  for n, what in zip(node.input[1:5], ("scale", "bias", "mean", "var")))
        layer = BatchNorm(momentum=_f32(a.get("momentum", 0.9)), epsilon=_f32(a.get("epsilon", 1e-5)),
                          name=self.layer_name(i))
        w = {"gamma": gamma, "beta": beta, "moving_mean": mean, "moving_var": var}
        self.alias(node, self.b.add(layer, [x], w, self.where(i)), x.kept)

    def merge(self, i, node, layer) -> None:
        xs = [self.value(i, n) for n in node.input]
        if len({x.kept for x in xs}) != 1:
            self.refuse(i, "mixes pooled (N, C, 1, 1) and other tensors (broadcasting is not supported)")
        if isinstance(layer, Add) and len({x.shape for x in xs}) != 1:
            self.refuse(i, f"adds shapes {', '.join(str(x.shape) for x in xs)}; only equal shapes (no broadcasting)")
        self.alias(node, self.b.add(layer, xs, where=self.where(i)), xs[0].kept)

    def op_Add(self, i, node, a):
        self.merge(i, node, Add(name=self.layer_name(i)))

    def op_Sum(self, i, node, a):
        if len(node.input) == 1:
            self.alias(node, self.value(i, node.input[0]))
        else:
            self.merge(i, node, Add(name=self.layer_name(i)))

    def op_Concat(self, i, node, a):
        if a["axis"] % self.rank(i, node.input[0]) != 1:
            self.refuse(i, f"concatenates along axis {a['axis']}; the spec's Concatenate joins axis 1 (channels)")
        self.merge(i, node, Concatenate(name=self.layer_name(i)))

    def op_Dropout(self, i, node, a):
        x = self.value(i, node.input[0])
        self.unused(i, node.output[1:])
        rate = a.get("ratio", 0.5)
        if len(node.input) > 1 and node.input[1]:
            rate = float(self.const(i, node.input[1], "ratio"))
        if len(node.input) > 2 and node.input[2] and bool(self.const(i, node.input[2], "training_mode")):
            self.refuse(i, "training_mode=true drops values at inference")
        self.alias(node, self.b.add(Dropout(_f32(rate), name=self.layer_name(i)), [x], where=self.where(i)), x.kept)

    def op_Mul(self, i, node, a):
        self.refuse(i, "op Mul is supported only as x * Sigmoid(x) (SiLU)")


def from_onnx(path_or_model):
    model = _load(path_or_model)
    source = f"ONNX model {model.graph.name!r}" if not isinstance(path_or_model, (str, Path)) else str(path_or_model)
    return _Importer(model, source).run()
