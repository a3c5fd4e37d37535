"""torch nn.Module -> spec, through torch.fx symbolic tracing.

torch.fx rather than torch.export: fx keeps each torch.nn layer as one call_module node holding the module itself
(its padding, ceil_mode, momentum, eps, weights and dotted name), where export lowers the model to ATen ops
(batch norm as _native_batch_norm_legit_no_training, linear as addmm) whose layer attributes would have to be
pieced back together. fx's shape propagation (one run on a small batch) gives every tensor's shape.

The tracer runs the module on a sample batch beside the symbolic trace, so a traced tensor's sizes other than the
batch are plain ints: code that checks or pads by them (Hugging Face's channel checks, TensorFlow-style "same"
padding computed from the input size) traces as it runs for that input shape, which is the spec's fixed input shape.
The batch size stays symbolic, so a branch on it is refused as plain fx refuses it. A subclass of a torch.nn layer
that inherits its forward unchanged (Hugging Face's depthwise Conv2d) is read as that layer.
"""
from __future__ import annotations

import decimal
import math
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

import dataclasses

from ..models import (INPUT, Activation, AdaptiveAvgPool2D, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D, Dense,
                      Dropout, Flatten, GlobalAveragePooling2D, LayerNormalization, MaxPool2D, Multiply, ZeroPadding2D,
                      same_padding)

from ._common import Builder, InteropError, Value, is_tf_same, leaky, supported

_BATCH = object()  # x.size(0) / x.shape[0]: the batch size, allowed only in a flattening view/reshape
_SAMPLE_BATCH = 2
_VALUE, _BATCHED = "nncompare_value", "nncompare_batched"  # node.meta keys while tracing


class _Shape(tuple):
    """x.size() / x.shape of a traced tensor: its sizes, the first being the batch."""


class _Param:
    """A parameter or buffer the graph reads directly (get_attr): usable only where a layer takes it as its weight
    (F.layer_norm's weight and bias, a per-channel scale)."""

    def __init__(self, target: str, value: np.ndarray):
        self.target, self.value = target, value


class _Proxy(fx.Proxy):
    """A traced tensor whose sizes other than the batch are plain ints (those of its value on the sample batch)."""

    def __getattr__(self, k):
        if k in ("shape", "size", "dim", "ndim"):
            sizes = self.tracer.sizes(self)
            if sizes is not None:
                if k == "shape":
                    return sizes
                if k == "ndim":
                    return len(sizes)
                if k == "dim":
                    return lambda: len(sizes)
                return lambda dim=None: sizes if dim is None else sizes[dim]
        return super().__getattr__(k)


class _Tracer(fx.Tracer):
    """fx's tracer, each node also run on the sample batch (its value kept in node.meta while tracing); a module
    that computes what a supported torch.nn layer computes is a leaf."""

    def __init__(self, sample):
        super().__init__()
        self.sample, self.placed, self.running = sample, 0, False

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or _layer_class(m) is not None

    # while a node runs on real values, module calls and attribute reads inside it are plain Python again
    def call_module(self, m, forward, args, kwargs):
        return forward(*args, **kwargs) if self.running else super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self.running else super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, *rest, **more):
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        found = []
        fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
        proxy.node.meta[_BATCHED] = kind == "placeholder" or any(p.node.meta.get(_BATCHED) for p in found)
        proxy.node.meta[_VALUE] = self.value(kind, target, args, kwargs, found)
        return proxy

    def value(self, kind, target, args, kwargs, found):
        """The node's value on the sample batch; None where it cannot be computed (plain fx then decides)."""
        if kind == "placeholder":  # the first is the input; others (optional arguments) have no sample value
            self.placed += 1
            return self.sample if self.placed == 1 else None
        if any(p.node.meta.get(_VALUE) is None for p in found):
            return None
        real = lambda a: a.node.meta[_VALUE] if isinstance(a, fx.Proxy) else a  # noqa: E731
        args, kwargs = fx.node.map_aggregate(args, real), fx.node.map_aggregate(kwargs, real)
        self.running = True
        try:
            with torch.no_grad():
                if kind == "get_attr":
                    obj = self.root
                    for part in target.split("."):
                        obj = getattr(obj, part)
                    return obj
                if kind == "call_module":
                    return self.root.get_submodule(target)(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                return target(*args, **kwargs)
        except Exception:  # the op fails on real values too: the traced module will not run, which ShapeProp says
            return None
        finally:
            self.running = False

    def sizes(self, proxy) -> tuple | None:
        """A traced tensor's sizes: ints, and the batch (for a tensor computed from the input) as x.size(0)."""
        value = proxy.node.meta.get(_VALUE)
        if not isinstance(value, torch.Tensor):
            return None
        sizes = list(value.shape)
        if proxy.node.meta.get(_BATCHED) and sizes:
            sizes[0] = self.create_proxy("call_method", "size", (proxy, 0), {})
        return tuple(sizes)


# the torch.nn layers the walk reads (a subclass before its base: ReLU6 is a Hardtanh)
_LAYER_CLASSES = (nn.Linear, nn.LayerNorm, nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.ZeroPad2d,
                  nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Flatten, nn.Identity, nn.Softmax, nn.ReLU, nn.ReLU6,
                  nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.SiLU, nn.Hardsigmoid, nn.Hardswish, nn.GELU, nn.LeakyReLU,
                  nn.ELU, nn.Softplus)


def _layer_class(m: nn.Module) -> type | None:
    """The torch.nn layer class whose computation `m` is: its own, or the one a subclass inherits forward (and a
    convolution's _conv_forward) from unchanged; None for any other module."""
    t = type(m)
    for cls in _LAYER_CLASSES:
        if isinstance(m, cls) and t.forward is cls.forward \
                and getattr(t, "_conv_forward", None) is getattr(cls, "_conv_forward", None):
            return cls
    return None


def _act_module(m: nn.Module) -> str | None:
    """The spec activation an activation module computes, None for a module that is no activation."""
    t = _layer_class(m)
    names = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.SiLU: "silu", nn.ReLU6: "relu6",
             nn.Hardsigmoid: "hard_sigmoid", nn.Hardswish: "hard_swish"}
    if t in names:
        return names[t]
    if t is nn.Hardtanh and (m.min_val, m.max_val) == (0.0, 6.0):
        return "relu6"
    if t is nn.GELU:
        return "gelu_tanh" if m.approximate == "tanh" else "gelu"
    if t is nn.LeakyReLU:
        return _leaky(m.negative_slope)
    if t is nn.ELU:
        return _elu(m.alpha)
    if t is nn.Softplus:
        return _softplus(m.beta, m.threshold)
    return None


class _Refused(Exception):
    """Raised inside the walk; from_torch adds the node's name and type."""


def _leaky(slope) -> str:
    if not slope >= 0:
        raise _Refused(f"negative_slope {slope}: the spec's leaky_relu slope is >= 0")
    return leaky(slope)


def _elu(alpha) -> str:
    if not alpha >= 0:
        raise _Refused(f"alpha {alpha}: the spec's elu alpha is >= 0")
    return "elu" if float(alpha) == 1.0 else f"elu({float(alpha)!r})"


def _softplus(beta, threshold) -> str:
    # above `threshold` torch returns x itself: from 20 on that is softplus to float32's last bit
    if beta != 1 or threshold < 20:
        raise _Refused(f"beta {beta}, threshold {threshold}: the spec's softplus is beta 1 (threshold >= 20)")
    return "softplus"


# functions (and tensor methods, by name) that are one activation: their parameter names after the input
_FUNCTIONS = {
    F.relu: ("relu", ()), torch.relu: ("relu", ()), "relu": ("relu", ()), "relu_": ("relu", ()),
    torch.sigmoid: ("sigmoid", ()), F.sigmoid: ("sigmoid", ()), "sigmoid": ("sigmoid", ()),
    torch.tanh: ("tanh", ()), F.tanh: ("tanh", ()), "tanh": ("tanh", ()),
    F.silu: ("silu", ()), F.gelu: ("gelu", ("approximate",)), F.elu: ("elu", ("alpha",)),
    F.leaky_relu: ("leaky_relu", ("negative_slope",)), F.softplus: ("softplus", ("beta", "threshold")),
    F.relu6: ("relu6", ()), F.hardsigmoid: ("hard_sigmoid", ()), F.hardswish: ("hard_swish", ()),
}
_DEFAULTS = {"approximate": "none", "alpha": 1.0, "negative_slope": 0.01, "beta": 1.0, "threshold": 20.0}
_SOFTMAX = (F.softmax, torch.softmax, "softmax")
_ADD = (operator.add, operator.iadd, torch.add, "add", "add_")
_CAT = (torch.cat, torch.concat, torch.concatenate)
_FLATTEN = (torch.flatten, "flatten")
_MEAN = (torch.mean, "mean")
_VIEW = ("view", "reshape", torch.reshape)
_MUL = (operator.mul, operator.imul, torch.mul, "mul", "mul_")
_NAMES = {getattr(f, "__name__", str(f))
          for f in (*_FUNCTIONS, *_SOFTMAX, *_ADD, *_CAT, *_FLATTEN, *_MEAN, *_VIEW, *_MUL)}
SUPPORTED_MODULES = ("Linear", "LayerNorm", "Conv2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "ZeroPad2d",
                     "BatchNorm1d", "BatchNorm2d", "ReLU", "ReLU6", "Hardtanh(0, 6)", "Hardsigmoid", "Hardswish",
                     "Sigmoid", "Tanh", "Softmax", "GELU", "SiLU", "ELU", "Softplus", "LeakyReLU", "Flatten", "Dropout",
                     "Identity")
SUPPORTED_FUNCTIONS = tuple(sorted(_NAMES | {"max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "dropout",
                                              "pad", "size", "shape", "contiguous",
                                              "stochastic_depth (torchvision, inference)", "layer_norm",
                                              "permute (to channels-last and back)"}))


def _arg(node: fx.Node, index: int, name: str, default):
    """Argument `name` of a call: keyword, else position `index`, else `default`."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


class _Walk:
    def __init__(self, gm: fx.GraphModule, input_shape: tuple, source: str):
        self.gm, self.b = gm, Builder(source)
        self.env: dict[fx.Node, object] = {}
        self.input_shape = input_shape
        self.pooled: dict[str, fx.Node] = {}  # a kept (N, C, 1, 1) global pooling's layer -> its fx node

    # --- values ----------------------------------------------------------------------------------
    def tensor(self, a, last: bool = False) -> Value:
        """The Value of argument `a`; a channels-last image only where the caller reads one (`last`)."""
        v = self.env.get(a) if isinstance(a, fx.Node) else None
        if isinstance(v, _Param):
            raise _Refused(f"reads the parameter or buffer {v.target!r} directly; only nn layers "
                           f"({supported(SUPPORTED_MODULES)}), F.layer_norm and a per-channel scale take weights")
        if not isinstance(v, Value):
            raise _Refused(f"an argument {a!r} is not a tensor computed from the input (constants and parameters "
                           f"used directly are not supported)")
        if v.last and not last:
            raise _Refused("reads a channels-last image (after permute(0, 2, 3, 1)); there only elementwise layers, "
                           "Linear and LayerNorm over the channels, a per-channel scale and the permute back are "
                           "supported")
        return v

    def param(self, a, what: str) -> np.ndarray | None:
        """A weight given as an argument: None stays None, a parameter read by get_attr its value."""
        if a is None:
            return None
        v = self.env.get(a) if isinstance(a, fx.Node) else None
        if not isinstance(v, _Param):
            raise _Refused(f"its {what} is not a parameter of the module")
        return v.value

    @staticmethod
    def shape(node: fx.Node) -> tuple:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()

    def layer(self, node, layer_cls, inputs, weights=None, **fields) -> Value:
        name = self.b.name(node.name, layer_cls.kind)
        return self.b.add(layer_cls(**fields, name=name), inputs, weights, node.name)

    def keep(self, v: Value, like: Value) -> Value:
        return Value(v.name, v.shape, kept=like.kept, last=like.last)

    def activation(self, node, x: Value, act: str) -> Value:
        return self.keep(self.layer(node, Activation, [x], activation=act), x)

    def image(self, x: Value, what: str) -> Value:
        if x.kept and x.name in self.pooled and len(self.pooled[x.name].users) == 1:
            # a global pooling kept (N, C, 1, 1) and read only as an image (squeeze-and-excitation): keepdims
            k = next(k for k, layer in enumerate(self.b.layers) if layer.name == x.name)
            self.b.layers[k] = dataclasses.replace(self.b.layers[k], keepdims=True)
            return Value(x.name, (x.shape[0], 1, 1))
        if len(x.shape) != 3 or x.kept:
            shape = (x.shape[0], 1, 1) if x.kept else x.shape
            raise _Refused(f"{what} needs an (N, C, H, W) image, got (N, {', '.join(map(str, shape))})")
        return x

    # --- the walk --------------------------------------------------------------------------------
    def run(self, name: str):
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise InteropError(f"{self.b.source}: forward takes {len(placeholders)} tensors; a spec has one input")
        out = None
        for node in self.gm.graph.nodes:
            try:
                if node.op == "placeholder":
                    self.env[node] = Value(INPUT, self.input_shape)
                elif node.op == "output":
                    out = self.tensor(node.args[0])
                elif node.op == "get_attr":
                    value = self.gm
                    for part in node.target.split("."):
                        value = getattr(value, part)
                    if not isinstance(value, torch.Tensor):
                        raise _Refused(f"reads the attribute {node.target!r}, which is no tensor")
                    self.env[node] = _Param(node.target, value.detach().cpu().numpy())
                elif node.op == "call_module":
                    self.env[node] = self.module(node, self.gm.get_submodule(node.target))
                else:
                    self.env[node] = self.call(node, node.target)
            except _Refused as e:
                what = (type(self.gm.get_submodule(node.target)).__name__ if node.op == "call_module"
                        else getattr(node.target, "__name__", str(node.target)))
                raise InteropError(f"{self.b.source}: node {node.name!r} ({node.op} {what}): {e}") from None
        if out.kept or out.last:
            kind = "channels-last" if out.last else "pooled (N, C, 1, 1)"
            raise InteropError(f"{self.b.source}: its output is a {kind} image; the spec's output is a flat (N, C) or "
                               f"an (N, C, H, W) image")
        return self.b.spec(name, self.input_shape, out)

    # --- modules ---------------------------------------------------------------------------------
    def module(self, node, m: nn.Module):
        x = self.tensor(node.args[0], last=True) if node.args else None
        t = _layer_class(m) or type(m)
        if m._forward_hooks or m._forward_pre_hooks:
            raise _Refused("forward hooks run around the module; a module with hooks is not supported")
        act = _act_module(m)
        if x is not None and x.last and act is None and t not in (nn.Dropout, nn.Identity, nn.Linear, nn.LayerNorm):
            self.tensor(node.args[0])  # refused: a channels-last image
        if t is nn.LayerNorm:
            return self.layernorm(node, x, m.normalized_shape, m.weight, m.bias, m.eps)
        if act is not None:
            return self.activation(node, x, act)
        if t is nn.Softmax:
            return self.softmax(node, x, m.dim)
        if t is nn.Identity:
            return x
        if t is nn.Dropout:
            return self.dropout(node, x, m.p)
        if t is nn.Flatten:
            return self.flatten(node, x, m.start_dim, m.end_dim)
        if t is nn.Linear:
            return self.linear(node, x, m)
        if t is nn.Conv2d:
            return self.conv(node, x, m)
        if t in (nn.MaxPool2d, nn.AvgPool2d):
            avg = t is nn.AvgPool2d
            return self.pool(node, x, avg, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                             dilation=1 if avg else m.dilation, indices=False if avg else m.return_indices,
                             include_pad=m.count_include_pad if avg else False,
                             divisor=m.divisor_override if avg else None)
        if t is nn.AdaptiveAvgPool2d:
            return self.adaptive(node, x, m.output_size)
        if t is nn.ZeroPad2d:
            left, right, top, bottom = m.padding
            return self.layer(node, ZeroPadding2D, [self.image(x, "ZeroPad2d")],
                              padding=((int(top), int(bottom)), (int(left), int(right))))
        if t in (nn.BatchNorm1d, nn.BatchNorm2d):
            return self.batchnorm(node, x, m)
        raise _Refused(f"module {t.__name__} is not supported (supported: {supported(SUPPORTED_MODULES)})")

    def linear(self, node, x, m: nn.Linear):
        if x.last:  # over the channels of each position: a 1x1 convolution
            weights = {"kernel": m.weight.detach().cpu().numpy()[:, :, None, None]}
            if m.bias is not None:
                weights["bias"] = m.bias.detach().cpu().numpy()
            v = self.layer(node, Conv2D, [x], weights, filters=int(m.out_features), kernel_size=1,
                           use_bias=m.bias is not None)
            return self.keep(v, x)
        if len(x.shape) != 1 or x.kept:
            raise _Refused(f"Linear on a tensor of shape (N, {', '.join(map(str, x.shape))}) applies to its last "
                           f"axis; the spec's Dense needs a flat (N, features) input")
        w = m.weight.detach().cpu().numpy()
        bias = m.bias.detach().cpu().numpy() if m.bias is not None else np.zeros(w.shape[0], np.float32)
        return self.layer(node, Dense, [x], {"kernel": w.T, "bias": bias}, units=int(w.shape[0]))

    def conv(self, node, x, m: nn.Conv2d):
        x = self.image(x, "Conv2d")
        if m.padding_mode != "zeros":
            raise _Refused(f"padding_mode {m.padding_mode!r}: only zero padding is a Conv2D")
        (kh, kw), (sh, sw), (dh, dw), (_, h, w) = m.kernel_size, m.stride, m.dilation, x.shape
        eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
        if m.padding == "valid":
            p = (0, 0)
        elif m.padding == "same":  # stride 1 only (torch's rule): the dilated extent - 1 cells, the odd one after
            p = ("same", "same")
        else:
            p = tuple(m.padding)
        if p == ("same", "same") or p[0] == p[1]:
            padding = "same" if p[0] == "same" else ("valid" if p[0] == 0 else int(p[0]))
        elif same_padding(h, eh, sh) == (p[0], p[0]) and same_padding(w, ew, sw) == (p[1], p[1]):
            padding = "same"
        else:
            padding = ((int(p[0]), int(p[0])), (int(p[1]), int(p[1])))
        weights = {"kernel": m.weight.detach().cpu().numpy()}
        if m.bias is not None:
            weights["bias"] = m.bias.detach().cpu().numpy()
        return self.layer(node, Conv2D, [x], weights, filters=int(m.out_channels),
                          kernel_size=kh if kh == kw else (kh, kw), strides=sh if sh == sw else (sh, sw),
                          padding=padding, use_bias=m.bias is not None, groups=int(m.groups),
                          dilation=dh if dh == dw else (dh, dw))

    def pool(self, node, x, avg: bool, kernel, stride, padding, ceil_mode, dilation=1, indices=False,
             include_pad=True, divisor=None):
        x = self.image(x, "pooling")
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        k, p = pair(kernel), pair(padding)
        s = k if stride is None or stride == [] or stride == () else pair(stride)
        if pair(dilation) != (1, 1) or indices or divisor is not None:
            raise _Refused("dilation, return_indices and divisor_override are not supported")
        out = self.shape(node)[2:]
        if avg and tuple(out) == (1, 1) and p == (0, 0) and k[0] >= x.shape[1] and k[1] >= x.shape[2] \
                and k != tuple(x.shape[1:]):
            # one window larger than the whole input (Hugging Face EfficientNet's AvgPool2d(1280, ceil_mode=True)
            # after 7x7 or smaller): without padding it averages every cell, whatever count_include_pad says
            return self.gap(node, x, kept=True)
        modes = []
        for d in (0, 1):
            size = x.shape[1 + d]
            axis = set()
            if p[d] == 0 and out[d] == (size - k[d]) // s[d] + 1:
                axis.add("valid")
            if is_tf_same(size, k[d], s[d], p[d], out[d]):
                axis.add("same")
            modes.append(axis)
        both = modes[0] & modes[1]
        # torch's own meaning otherwise: symmetric pads, its ceil_mode, count_include_pad (the spec's)
        mode = "valid" if "valid" in both else "same" if both else (p[0] if p[0] == p[1] else ((p[0], p[0]),
                                                                                             (p[1], p[1])))
        ceil = bool(ceil_mode) and not both
        extra = {"count_include_pad": bool(include_pad) and any(p)} if avg else {}
        return self.layer(node, AvgPool2D if avg else MaxPool2D, [x], pool_size=k[0] if k[0] == k[1] else k,
                          strides=None if s == k else (s[0] if s[0] == s[1] else s), padding=mode, ceil_mode=ceil,
                          **extra)

    def adaptive(self, node, x, size):
        x = self.image(x, "adaptive pooling")
        if size in (1, (1, 1), [1, 1]):
            return self.gap(node, x, kept=True)
        size = (size, size) if isinstance(size, int) else tuple(size)
        size = tuple(x.shape[1 + d] if n is None else int(n) for d, n in enumerate(size))
        return self.layer(node, AdaptiveAvgPool2D, [x], output_size=size[0] if size[0] == size[1] else size)

    def gap(self, node, x, kept: bool) -> Value:
        v = self.layer(node, GlobalAveragePooling2D, [x])
        if kept:
            self.pooled[v.name] = node
        return Value(v.name, v.shape, kept=kept)

    def batchnorm(self, node, x, m):
        flat = len(x.shape) == 1 and not x.kept
        if len(self.shape(node)) not in (2, 4) or (_layer_class(m) is nn.BatchNorm1d) != flat:
            raise _Refused(f"{type(m).__name__} on a tensor of shape {self.shape(node)} is not supported")
        if not m.track_running_stats or m.running_mean is None:
            raise _Refused("track_running_stats=False normalizes by the batch at inference; the spec's uses "
                           "moving statistics")
        if m.momentum is None or not 0 < m.momentum <= 1:
            raise _Refused(f"momentum {m.momentum}: the spec's moving average needs a momentum in (0, 1]")
        c = m.num_features
        w = {"gamma": m.weight.detach().cpu().numpy() if m.affine else np.ones(c),
             "beta": m.bias.detach().cpu().numpy() if m.affine else np.zeros(c),
             "moving_mean": m.running_mean.detach().cpu().numpy(), "moving_var": m.running_var.detach().cpu().numpy()}
        # torch's momentum weighs the new batch value, the spec's (Keras') the old moving one; 1 - 0.9997 as the
        # decimal 0.0003, not 0.00029999999999996696
        momentum = float(1 - decimal.Decimal(repr(float(m.momentum))))
        v = self.layer(node, BatchNorm, [x], w, momentum=momentum, epsilon=float(m.eps))
        return self.keep(v, x)

    def layernorm(self, node, x: Value, shape, weight, bias, eps) -> Value:
        """LayerNorm over the channels: of a flat (N, C) tensor or of a channels-last image at each position."""
        c = x.shape[0]
        if tuple(shape) != (c,) or not ((len(x.shape) == 1 and not x.kept) or x.last):
            raise _Refused(f"normalizes over the last {tuple(shape)} of a tensor of shape (N, "
                           f"{', '.join(map(str, x.shape))}){' kept channels-first' if len(x.shape) == 3 else ''}; "
                           f"only over the channels (a flat input, or an image permuted channels-last) is supported")
        as_array = lambda t, fill: np.full(c, fill, np.float32) if t is None else (  # noqa: E731
            t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t)
        w = {"gamma": as_array(weight, 1.0), "beta": as_array(bias, 0.0)}
        return self.keep(self.layer(node, LayerNormalization, [x], w, epsilon=float(eps)), x)

    def permute(self, node) -> Value:
        x = self.tensor(node.args[0], last=True)
        if node.target is torch.permute:
            dims = _arg(node, 1, "dims", ())
        else:  # x.permute(0, 2, 3, 1), x.permute((0, 2, 3, 1)) or x.permute(dims=...)
            dims = node.kwargs.get("dims", node.args[1:])
            dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        dims = tuple(int(d) % len(dims) for d in dims)
        if len(x.shape) == 3 and not x.kept and dims == ((0, 3, 1, 2) if x.last else (0, 2, 3, 1)):
            return Value(x.name, x.shape, last=not x.last)
        raise _Refused(f"permute to {dims}: only an image to channels-last (0, 2, 3, 1) and back (0, 3, 1, 2), "
                       f"around layers that act per position, is supported")

    def softmax(self, node, x, dim):
        rank = len(self.shape(node))
        if dim is None or dim % rank != 1:
            raise _Refused(f"softmax over dim {dim}; the spec's runs over dim 1 (channels or features)")
        return self.activation(node, x, "softmax")

    def dropout(self, node, x, p):
        return self.keep(self.layer(node, Dropout, [x], rate=float(p)), x)

    def flatten(self, node, x, start, end):
        rank = len(self.shape(node.args[0])) if isinstance(node.args[0], fx.Node) else 0
        if start % rank != 1 or end % rank != rank - 1:
            raise _Refused(f"flattens dims {start}..{end}; only a flatten from dim 1 to the last (keeping the "
                           f"batch) is supported")
        return self.to_flat(node, x)

    def to_flat(self, node, x):
        if len(x.shape) == 1:
            return Value(x.name, x.shape)
        return self.layer(node, Flatten, [x])  # torch's NCHW flatten order is the spec's C, H, W

    # --- functions and methods -------------------------------------------------------------------
    def call(self, node, target):
        if target in _FUNCTIONS:
            act, params = _FUNCTIONS[target]
            x = self.tensor(node.args[0], last=True)
            values = [_arg(node, 1 + j, p, _DEFAULTS[p]) for j, p in enumerate(params)]
            if act == "gelu":
                act = "gelu_tanh" if values[0] == "tanh" else "gelu"
            elif act == "elu":
                act = _elu(values[0])
            elif act == "leaky_relu":
                act = _leaky(values[0])
            elif act == "softplus":
                act = _softplus(*values)
            return self.activation(node, x, act)
        if target in _SOFTMAX:
            return self.softmax(node, self.tensor(node.args[0]), _arg(node, 1, "dim", None))
        if target in _ADD:
            if _arg(node, 2, "alpha", 1) != 1:
                raise _Refused("add with alpha != 1 is not supported")
            return self.merge(node, list(node.args[:2]), Add)
        if target in _MUL:
            return self.multiply(node, list(node.args[:2]))
        if target is F.pad:
            return self.pad(node)
        if target in _CAT:
            tensors, dim = _arg(node, 0, "tensors", ()), _arg(node, 1, "dim", 0)
            if len(tensors) < 2:
                return self.tensor(tensors[0] if tensors else None)
            if dim % len(self.shape(node)) != 1:
                raise _Refused(f"concatenates along dim {dim}; the spec's Concatenate joins dim 1 (channels)")
            return self.merge(node, list(tensors), Concatenate)
        if target in _FLATTEN:
            return self.flatten(node, self.tensor(node.args[0]), _arg(node, 1, "start_dim", 0),
                                _arg(node, 2, "end_dim", -1))
        if target in _MEAN:
            x = self.tensor(node.args[0])
            dims = _arg(node, 1, "dim", None)
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            if len(x.shape) != 3 or x.kept or sorted(d % 4 for d in dims) != [2, 3]:
                raise _Refused(f"a mean over dims {dims}; only the spatial mean (dims 2, 3 of an image) is a global "
                               f"average pooling")
            return self.gap(node, x, kept=bool(_arg(node, 2, "keepdim", False)))
        if target in _VIEW:
            return self.view(node)
        if target is F.dropout:
            return self.dropout(node, self.tensor(node.args[0], last=True), _arg(node, 1, "p", 0.5))
        if target is F.layer_norm:
            return self.layernorm(node, self.tensor(node.args[0], last=True), _arg(node, 1, "normalized_shape", ()),
                                  self.param(_arg(node, 2, "weight", None), "weight"),
                                  self.param(_arg(node, 3, "bias", None), "bias"), _arg(node, 4, "eps", 1e-5))
        if target in ("permute", torch.permute):
            return self.permute(node)
        if target in (F.max_pool2d, F.avg_pool2d):
            avg = target is F.avg_pool2d
            kernel = _arg(node, 1, "kernel_size", None)
            stride, padding = _arg(node, 2, "stride", None), _arg(node, 3, "padding", 0)
            if avg:
                return self.pool(node, self.tensor(node.args[0]), True, kernel, stride, padding,
                                 _arg(node, 4, "ceil_mode", False),
                                 include_pad=_arg(node, 5, "count_include_pad", True),
                                 divisor=_arg(node, 6, "divisor_override", None))
            return self.pool(node, self.tensor(node.args[0]), False, kernel, stride, padding,
                             _arg(node, 5, "ceil_mode", False), dilation=_arg(node, 4, "dilation", 1),
                             indices=_arg(node, 6, "return_indices", False))
        if target is F.adaptive_avg_pool2d:
            return self.adaptive(node, self.tensor(node.args[0]), _arg(node, 1, "output_size", None))
        if target == "contiguous":
            return self.tensor(node.args[0], last=True)
        if getattr(target, "__name__", None) == "stochastic_depth" \
                and "torchvision" in getattr(target, "__module__", ""):
            # torchvision.ops.stochastic_depth(input, p, mode, training), fx-wrapped: the identity in inference
            if _arg(node, 3, "training", True) is not False:
                raise _Refused("stochastic depth in training mode drops whole samples at random")
            return self.tensor(node.args[0], last=True)
        if target == "size" or (target is getattr and node.args[1] == "shape"):
            self.tensor(node.args[0])
            full = _Shape((_BATCH,) + tuple(self.shape(node.args[0])[1:]))
            dim = _arg(node, 1, "dim", None) if target == "size" else None
            return full if dim is None else full[dim]
        if target is operator.getitem and isinstance(self.env.get(node.args[0]), _Shape):
            return self.env[node.args[0]][node.args[1]]
        name = getattr(target, "__name__", str(target))
        raise _Refused(f"{'method' if node.op == 'call_method' else 'function'} {name} is not supported "
                       f"(supported: {supported(SUPPORTED_FUNCTIONS)})")

    def merge(self, node, args: list, kind) -> Value:
        xs = [self.tensor(a, last=kind is Add) for a in args]
        shapes = [self.shape(a) for a in args]
        if len({(x.kept, x.last) for x in xs}) != 1 or (kind is Add and len(set(shapes)) != 1):
            raise _Refused(f"{'adds' if kind is Add else 'joins'} shapes {', '.join(map(str, shapes))}; broadcasting "
                           f"is not supported")
        return self.keep(self.layer(node, kind, xs), xs[0])

    def multiply(self, node, args: list) -> Value:
        params = [a for a in args if isinstance(a, fx.Node) and isinstance(self.env.get(a), _Param)]
        if len(params) == 1 and len(args) == 2:  # a per-channel scale (ConvNeXt's layer scale): a depthwise 1x1 conv
            p = self.env[params[0]]
            x = self.tensor(next(a for a in args if a is not params[0]), last=True)
            c = x.shape[0]
            if len(x.shape) != 3 or x.kept or p.value.shape != ((c,) if x.last else (c, 1, 1)):
                raise _Refused(f"a product with the parameter {p.target!r} of shape {p.value.shape}: only a "
                               f"per-channel scale of an image ((C,) channels-last, (C, 1, 1) channels-first)")
            v = self.layer(node, Conv2D, [x], {"kernel": p.value.reshape(c, 1, 1, 1)}, filters=c, kernel_size=1,
                           use_bias=False, groups=c)
            return self.keep(v, x)
        if not all(isinstance(a, fx.Node) and isinstance(self.env.get(a), Value) for a in args):
            raise _Refused("a product with a constant is not supported (only of two computed tensors)")
        xs = [self.tensor(a) for a in args]
        if len({x.kept for x in xs}) == 2:  # an image and a kept (N, C, 1, 1) gate: the spec's (C,) gate
            image = next(x for x in xs if not x.kept)
            if len(image.shape) != 3 or Multiply.gate([x.shape for x in xs]) is None:
                raise _Refused(f"multiplies shapes {', '.join(map(str, (self.shape(a) for a in args)))}; only equal "
                               f"shapes or an image and a per-channel (N, C, 1, 1) gate")
            return self.layer(node, Multiply, xs)
        shapes = [self.shape(a) for a in args]
        if len(set(shapes)) != 1 and Multiply.gate([x.shape for x in xs]) is None:
            raise _Refused(f"multiplies shapes {', '.join(map(str, shapes))}; only equal shapes or an image and a "
                           f"per-channel (N, C, 1, 1) gate")
        return self.keep(self.layer(node, Multiply, xs), xs[0])

    def pad(self, node) -> Value:
        x = self.image(self.tensor(node.args[0]), "pad")
        pads = tuple(_arg(node, 1, "pad", ()))
        if _arg(node, 2, "mode", "constant") != "constant" or (_arg(node, 3, "value", None) or 0) != 0 \
                or len(pads) != 4 or min(pads) < 0:
            raise _Refused(f"pad {pads}: only zero padding of height and width (>= 0) is a ZeroPadding2D")
        left, right, top, bottom = (int(v) for v in pads)
        if not any((left, right, top, bottom)):  # TensorFlow-style "same" padding before a 1x1 or stride-1 conv
            return x
        return self.layer(node, ZeroPadding2D, [x], padding=((top, bottom), (left, right)))

    def view(self, node):
        x = self.tensor(node.args[0])
        target = node.args[1:] if "shape" not in node.kwargs else (node.kwargs["shape"],)
        resolve = lambda t: self.env.get(t, t) if isinstance(t, fx.Node) else t  # noqa: E731
        if len(target) == 1 and isinstance(resolve(target[0]), (tuple, list)):
            target = tuple(resolve(target[0]))
        target = tuple(resolve(t) for t in target)
        size = math.prod(x.shape)
        flat = len(target) == 2 and ((target[0] is _BATCH and target[1] in (-1, size))
                                     or (target[0] == -1 and target[1] == size))
        if not flat:
            shown = tuple("batch" if t is _BATCH else t for t in target)
            raise _Refused(f"reshape to {shown}: only a flatten to (batch, {size}) (x.view(x.size(0), -1) or "
                           f"x.view(-1, {size})) is supported")
        return self.to_flat(node, x)


def from_torch(module, input_shape):
    if not isinstance(module, nn.Module):
        raise InteropError(f"from_torch: expected a torch nn.Module, got {type(module).__name__}")
    if (not isinstance(input_shape, (tuple, list)) or len(input_shape) not in (1, 3)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape)):
        raise InteropError(f"from_torch: input_shape must be (C, H, W) or (features,) of positive ints (no batch "
                           f"axis), got {input_shape!r}")
    source = f"torch module {type(module).__name__}"
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()  # traced and run as inference; self.training branches take their eval side
        param = next(module.parameters(), None)
        x = torch.randn(_SAMPLE_BATCH, *input_shape, dtype=param.dtype if param is not None else None,
                        device=param.device if param is not None else None)
        try:
            with torch.no_grad():
                module(x.clone())
        except Exception as e:
            raise InteropError(f"{source}: does not run on inputs of shape (N, {', '.join(map(str, input_shape))}): "
                               f"{str(e).splitlines()[0][:300]}") from None
        try:
            tracer = _Tracer(x.clone())
            graph = tracer.trace(module)
            gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
        except Exception as e:  # data-dependent control flow, unsupported Python
            raise InteropError(f"{source}: torch.fx cannot trace it: {str(e).splitlines()[0][:300]}") from None
        for n in gm.graph.nodes:
            n.meta.pop(_VALUE, None)
            n.meta.pop(_BATCHED, None)
        gm.graph.eliminate_dead_code()
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(x)
        except Exception as e:
            raise InteropError(f"{source}: does not run on inputs of shape (N, {', '.join(map(str, input_shape))}): "
                               f"{str(e).splitlines()[0][:300]}") from None
        return _Walk(gm, tuple(input_shape), source).run(type(module).__name__)
    finally:
        for m, training in modes.items():
            m.training = training
