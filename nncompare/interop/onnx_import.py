"""ONNX -> spec: the ops to_onnx writes and the common ones of exported models, each mapped only where it has the
spec's meaning; every other op, attribute or pattern is one InteropError naming the node."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..models import (INPUT, Activation, AdaptiveAvgPool2D, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D, Dense,
                      Dropout, Flatten, GlobalAveragePooling2D, LayerNormalization, MaxPool2D, Multiply,
                      Normalization, Rescaling, ZeroPadding2D, adaptive_bins, same_padding)
from ..models.spec import NORMALIZATION_EPSILON

from ._common import Builder, InteropError, Value, leaky, supported

ACTIVATIONS = ("Relu", "Sigmoid", "Tanh", "Softmax", "LeakyRelu", "Elu", "Softplus", "Gelu", "Clip", "HardSigmoid",
               "HardSwish")
SUPPORTED = ("Gemm", "MatMul", "Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "Flatten",
             "Reshape", "BatchNormalization", "Add", "Sum", "Concat", "Dropout", "Identity", "Constant", "Mul", "Pad",
             "Unsqueeze (a flat gate to (N, C, 1, 1))", "LayerNormalization", "Transpose (around LayerNormalization)",
             "Sub, Div, Sqrt, Max (as Normalization writes them)", "Div (in GELU's erf form)") + ACTIVATIONS


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
        self.made: dict[str, tuple] = {}  # constant folded from constants -> (op, its inputs)
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
            alpha = _f32(a.get("alpha", 1.0))
            return ("elu" if alpha == 1.0 else f"elu({alpha!r})"), [i], node.output[0]
        if op == "Clip":
            low, high = (self.consts.get(n) if n else None for n in (list(node.input[1:]) + ["", ""])[:2])
            low, high = (a.get("min") if low is None else low), (a.get("max") if high is None else high)
            if low is None or high is None or float(low) != 0.0 or float(high) != 6.0:
                self.refuse(i, "only Clip to [0, 6] (relu6) is supported")
            return "relu6", [i], node.output[0]
        if op == "HardSigmoid":  # the spec's is relu6(x + 3) / 6 (docs/design.md trap 28): alpha 1/6, beta 1/2
            if np.float32(a.get("alpha", 0.2)) != np.float32(1 / 6) or np.float32(a.get("beta", 0.5)) != 0.5:
                self.refuse(i, f"alpha {a.get('alpha', 0.2):g}, beta {a.get('beta', 0.5):g}: the spec's hard_sigmoid "
                               f"is relu6(x + 3) / 6 (alpha 1/6, beta 1/2)")
            return "hard_sigmoid", [i], node.output[0]
        if op == "HardSwish":
            return "hard_swish", [i], node.output[0]
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
        if node.input[0] in self.consts:
            self.adaptive(i, node, self.image(i, node.input[1], "MatMul"))
            return
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

    def padding(self, i: int, x: Value, k: tuple, s: tuple, p: tuple, conv: bool = True) -> str | int | tuple:
        """The spec padding with exactly these pads: "valid", "same" (TensorFlow's split for the window extent k),
        one int, or ((top, bottom), (left, right))."""
        t, l, b, r = p
        if p == (0, 0, 0, 0):
            return "valid"
        if ((t, b), (l, r)) == (same_padding(x.shape[1], k[0], s[0]), same_padding(x.shape[2], k[1], s[1])):
            return "same"
        return t if t == l == b == r else ((t, b), (l, r))

    def op_Conv(self, i, node, a):
        x = self.image(i, node.input[0], "Conv")
        w = self.const(i, node.input[1], "weight")
        groups, dilation = int(a.get("group", 1)), tuple(int(d) for d in a.get("dilations", (1, 1)))
        if w.ndim != 4 or x.shape[0] % groups or w.shape[0] % groups or w.shape[1] * groups != x.shape[0]:
            self.refuse(i, f"weight of shape {w.shape} in {groups} groups does not fit {x.shape[0]} input channels")
        k, s = tuple(w.shape[2:]), tuple(a.get("strides", (1, 1)))
        extent = tuple((kk - 1) * d + 1 for kk, d in zip(k, dilation))
        padding = self.padding(i, x, extent, s, self.pads(i, a, x, extent, s))
        bias = len(node.input) > 2 and node.input[2]
        act, end = self.fused(i, node.output[0], 4)
        layer = Conv2D(int(w.shape[0]), _int_pair(k), _int_pair(s), padding, act, use_bias=bool(bias),
                       groups=groups, dilation=_int_pair(dilation), name=self.layer_name(i))
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
        ceil = bool(a.get("ceil_mode", 0))
        padding = self.padding(i, x, k, s, p)
        if ceil and padding == "same":  # ONNX Runtime's ceil_mode is torch's (docs/design.md trap 29)
            padding = ((p[0], p[2]), (p[1], p[3]))
        include = kind is AvgPool2D and bool(a.get("count_include_pad", 0)) and any(p)
        extra = {"count_include_pad": include} if kind is AvgPool2D else {}
        if not ceil and not include and (p[2] > k[0] // 2 or p[3] > k[1] // 2):
            padding, ceil = self.ceil_overhang(x, kind, k, s, p), True
        layer = kind(_int_pair(k), None if s == k else _int_pair(s), padding=padding, ceil_mode=ceil,
                     name=self.layer_name(i), **extra)
        self.values[node.output[0]] = self.b.add(layer, [x], where=self.where(i))

    @staticmethod
    def ceil_overhang(x: Value, kind, k: tuple, s: tuple, p: tuple):
        """Pads after more than half the window, which neither max nor an average without count_include_pad reads:
        a ceil_mode pool whose windows hang over the padding by the rest, if there is one (as to_onnx writes such a
        pool where onnx's shape inference would count ceil_mode's windows otherwise: docs/design.md trap 39)."""
        t, l, b, r = p
        for pb in range(min(b, k[0] // 2), -1, -1):
            for pr in range(min(r, k[1] // 2), -1, -1):
                layer = kind(k, s, padding=((t, pb), (l, pr)), ceil_mode=True)
                try:
                    fits = layer.overhang(x.shape) == (b - pb, r - pr) and layer.check(x.shape)
                except Exception:  # the spec's own refusal of this reading: try the next
                    continue
                if fits:
                    return (t, pb), (l, pr)
        return (t, b), (l, r)  # refused by the spec when added, naming the pads

    def op_MaxPool(self, i, node, a):
        self.pool(i, node, a, MaxPool2D)

    def op_AveragePool(self, i, node, a):
        self.pool(i, node, a, AvgPool2D)

    def global_pool(self, i, node, kept: bool) -> None:
        """A (N, C, 1, 1) result read only through flattening ops is the spec's (C,), else kept as an image."""
        x = self.image(i, node.input[0], node.op_type)
        users = self.consumers.get(node.output[0], [])
        image = kept and users and any(self.graph.node[j].op_type not in ("Flatten", "Reshape") for j in users)
        v = self.b.add(GlobalAveragePooling2D(keepdims=bool(image), name=self.layer_name(i)), [x],
                       where=self.where(i))
        self.alias(node, v, kept and not image)

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

    def scalar(self, name: str) -> float | None:
        c = self.consts.get(name)
        return float(c.reshape(())) if c is not None and c.size == 1 else None

    def op_Mul(self, i, node, a):
        consts = [n for n in node.input if n in self.consts]
        if consts:  # x * scale (+ offset): Rescaling
            x, scale = self.value(i, next(n for n in node.input if n not in self.consts)), self.scalar(consts[0])
            if len(consts) != 1 or scale is None:
                self.refuse(i, "a product with a constant is supported only with a scalar (Rescaling)")
            out, offset, last = node.output[0], 0.0, i
            j = self.sole_consumer(out)
            if j is not None and self.graph.node[j].op_type == "Add":
                other = [n for n in self.graph.node[j].input if n != out]
                if len(other) == 1 and self.scalar(other[0]) is not None:
                    offset, out, last = self.scalar(other[0]), self.graph.node[j].output[0], j
                    self.done.add(j)
            layer = Rescaling(_f32(scale), _f32(offset), name=self.layer_name(last))
            v = self.b.add(layer, [x], where=self.where(i))
            self.values[out] = Value(v.name, v.shape, kept=x.kept)
            return
        names, out, last = list(node.input), node.output[0], i
        while True:  # to_onnx writes a Multiply of n inputs as Muls named "<layer>/mul<k>", the last "<layer>"
            j = self.sole_consumer(out)
            nxt = self.graph.node[j] if j is not None else None
            if nxt is None or nxt.op_type != "Mul" or not self.graph.node[last].name.startswith(nxt.name + "/mul") \
                    or nxt.input[0] != out:
                break
            names.append(nxt.input[1])
            out, last = nxt.output[0], j
            self.done.add(j)
        xs = [self.value(i, n) for n in names]
        shapes = [(x.shape[0], 1, 1) if x.kept else x.shape for x in xs]
        if len({x.kept for x in xs}) > 1 and len(xs) == 2:  # an image and a kept (N, C, 1, 1) gate: the gate (C,)
            shapes = [x.shape for x in xs]
        elif any(x.kept for x in xs):
            self.refuse(i, "multiplies pooled (N, C, 1, 1) tensors with each other; only as a per-channel gate")
        if Multiply.gate(shapes) is None and len(set(shapes)) != 1:
            self.refuse(i, f"multiplies shapes {', '.join(str(('N',) + sh) for sh in shapes)}; only equal shapes or "
                           f"an image and a per-channel (N, C) or (N, C, 1, 1) gate")
        self.values[out] = self.b.add(Multiply(name=self.layer_name(last)), xs, where=self.where(i))

    def op_Unsqueeze(self, i, node, a):
        axes = self.const(i, node.input[1], "axes") if len(node.input) > 1 else np.asarray(a.get("axes", ()))
        v = self.value(i, node.input[0])
        if len(v.shape) != 1 or v.kept or sorted(int(x) % 4 for x in axes.reshape(-1)) != [2, 3]:
            self.refuse(i, "only a flat (N, C) tensor unsqueezed to (N, C, 1, 1) (axes 2, 3) is supported")
        self.alias(node, v, kept=True)

    def op_Pad(self, i, node, a):
        x = self.image(i, node.input[0], "Pad")
        pads = self.const(i, node.input[1], "pads").reshape(-1) if len(node.input) > 1 else np.asarray(a["pads"])
        value = self.scalar(node.input[2]) if len(node.input) > 2 and node.input[2] else a.get("value", 0.0)
        if _decoded(a.get("mode", "constant")) != "constant" or value != 0 or len(pads) != 8 \
                or any(pads[[0, 1, 4, 5]]) or (len(node.input) > 3 and node.input[3]) or min(pads) < 0:
            self.refuse(i, "only zero padding of the spatial axes (top, left, bottom, right >= 0) is a ZeroPadding2D")
        t, l, b, r = (int(pads[n]) for n in (2, 3, 6, 7))
        layer = ZeroPadding2D(((t, b), (l, r)), name=self.layer_name(i))
        self.values[node.output[0]] = self.b.add(layer, [x], where=self.where(i))

    def fold(self, i, node, fn) -> bool:
        """A node of constants only: its value becomes a constant (provenance kept for Normalization)."""
        if not all(n in self.consts for n in node.input):
            return False
        self.consts[node.output[0]] = fn(*(self.consts[n] for n in node.input))
        self.made[node.output[0]] = (node.op_type, list(node.input))
        return True

    def op_Sqrt(self, i, node, a):
        if not self.fold(i, node, np.sqrt):
            self.refuse(i, "Sqrt is supported only of a constant (a Normalization's variance)")

    def op_Max(self, i, node, a):
        if not self.fold(i, node, lambda *v: functools.reduce(np.maximum, v)):
            self.refuse(i, "Max is supported only of constants (a Normalization's scale)")

    def op_Sub(self, i, node, a):
        """(x - mean) / Max(Sqrt(variance), 1e-7): Normalization, as to_onnx writes it."""
        j = self.sole_consumer(node.output[0])
        div = self.graph.node[j] if j is not None else None
        made = self.made.get(div.input[1]) if div is not None and div.op_type == "Div" else None
        sqrt = self.made.get(made[1][0]) if made and made[0] == "Max" and len(made[1]) == 2 else None
        x = self.value(i, node.input[0])
        if sqrt is None or sqrt[0] != "Sqrt" or node.input[1] not in self.consts or div.input[0] != node.output[0] \
                or self.scalar(made[1][1]) is None or np.float32(self.scalar(made[1][1])) != \
                np.float32(NORMALIZATION_EPSILON) or x.kept:
            self.refuse(i, "Sub is supported only as a Normalization: (x - mean) / Max(Sqrt(variance), 1e-7)")
        mean, var = self.consts[node.input[1]], self.consts[sqrt[1][0]]
        if mean.size != x.shape[0] or var.size != x.shape[0]:
            self.refuse(i, f"mean and variance of {mean.size} and {var.size} values for {x.shape[0]} channels")
        self.done.add(j)
        layer = Normalization(name=self.layer_name(j))
        self.values[div.output[0]] = self.b.add(layer, [x], {"mean": mean.reshape(-1), "variance": var.reshape(-1)},
                                                self.where(i))

    def layernorm(self, i, node, a, x: Value, out: str, name_at: int) -> None:
        if len(node.input) < 2 or a.get("stash_type", 1) != 1:
            self.refuse(i, "LayerNormalization needs a scale and float32 statistics")
        self.unused(i, node.output[1:])
        gamma = self.const(i, node.input[1], "scale")
        beta = self.const(i, node.input[2], "bias") if len(node.input) > 2 and node.input[2] else np.zeros(1)
        c = x.shape[0]
        if gamma.size != c or beta.size not in (1, c):
            self.refuse(i, f"scale and bias of {gamma.size} and {beta.size} values for {c} channels")
        layer = LayerNormalization(epsilon=_f32(a.get("epsilon", 1e-5)), name=self.layer_name(name_at))
        w = {"gamma": gamma.reshape(-1), "beta": np.broadcast_to(beta.reshape(-1), (c,))}
        self.values[out] = self.b.add(layer, [x], w, self.where(i))

    def op_LayerNormalization(self, i, node, a):
        x = self.flat(i, node.input[0], "LayerNormalization (of an image: between Transposes to channels-last)")
        if a.get("axis", -1) % 2 != 1:
            self.refuse(i, f"normalizes from axis {a.get('axis')}; the spec's runs over the features (axis 1)")
        self.layernorm(i, node, a, x, node.output[0], i)

    def op_Transpose(self, i, node, a):
        """Transpose to channels-last, LayerNormalization over the last axis, Transpose back: over the channels."""
        x = self.image(i, node.input[0], "Transpose")
        j = self.sole_consumer(node.output[0])
        ln = self.graph.node[j] if j is not None else None
        k = self.sole_consumer(ln.output[0]) if ln is not None and ln.op_type == "LayerNormalization" else None
        back = self.graph.node[k] if k is not None else None
        if list(a.get("perm", ())) != [0, 2, 3, 1] or back is None or back.op_type != "Transpose" \
                or list(_attrs(back).get("perm", ())) != [0, 3, 1, 2] or _attrs(ln).get("axis", -1) % 4 != 3 \
                or ln.input[0] != node.output[0]:
            self.refuse(i, "Transpose is supported only to channels-last around a LayerNormalization over the last "
                           "axis and back")
        self.done.update((j, k))
        self.layernorm(j, ln, _attrs(ln), x, back.output[0], j)

    def adaptive(self, i, node, x: Value) -> None:
        """MatMul(rows, x) then MatMul(., cols), torch's adaptive bins as averaging matrices: AdaptiveAvgPool2D."""
        rows = self.consts[node.input[0]]
        j = self.sole_consumer(node.output[0])
        nxt = self.graph.node[j] if j is not None else None
        cols = self.consts.get(nxt.input[1]) if nxt is not None and nxt.op_type == "MatMul" \
            and nxt.input[0] == node.output[0] else None
        _, h, w = x.shape
        if rows.ndim != 2 or cols is None or cols.ndim != 2 or rows.shape[1] != h or cols.shape[0] != w \
                or not np.array_equal(rows, _averaging(h, rows.shape[0])) \
                or not np.array_equal(cols.T, _averaging(w, cols.shape[1])):
            self.refuse(i, "a product of an image with constants is supported only as torch's adaptive average "
                           "pooling (averaging matrices over its bins, rows then columns)")
        self.done.add(j)
        layer = AdaptiveAvgPool2D(_int_pair((rows.shape[0], cols.shape[1])), name=self.layer_name(j))
        self.values[nxt.output[0]] = self.b.add(layer, [x], where=self.where(i))


def _averaging(size: int, out: int) -> np.ndarray:
    m = np.zeros((out, size), np.float32)
    for i, (a, b) in enumerate(adaptive_bins(size, out)):
        m[i, a:b] = 1 / (b - a)
    return m


def from_onnx(path_or_model):
    model = _load(path_or_model)
    source = f"ONNX model {model.graph.name!r}" if not isinstance(path_or_model, (str, Path)) else str(path_or_model)
    return _Importer(model, source).run()
