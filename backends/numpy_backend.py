"""The float64 NumPy oracle: forward and backward for every layer kind, written from the definitions.

CONVERTERS maps each layer class to its node (forward and backward); one graph walk runs the nodes in
topological order and, backwards, sums the gradients of a node consumed more than once (fan-out).
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..models import (INPUT, Activation, AdaptiveAvgPool2D, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D, Dense,
                      Dropout, Flatten, GlobalAveragePooling2D, LayerNormalization, MaxPool2D, Multiply, Normalization,
                      Rescaling, ZeroPadding2D, adaptive_bins, init_weights, parse_activation)
from ..models.spec import NORMALIZATION_EPSILON

from .base import (Adam, Adapter, BackendError, SGD, as_inputs, converter, inference_inputs, loss_and_dlogits,
                   parse_device)

_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_ERF = np.frompyfunc(math.erf, 1, 1)


# NumPy has neither; scipy is no dependency of the core. Both to float64's last bit or so.
def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise: the C library's erf (math.erf) over the array."""
    return _ERF(np.asarray(x, np.float64)).astype(np.float64)


def expit(x: np.ndarray) -> np.ndarray:
    """The logistic sigmoid 1 / (1 + exp(-x)), without overflow: exp of -|x| only."""
    x = np.asarray(x, np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


# --- activations ---------------------------------------------------------------------------------
# At a kink the gradient is that of the outer piece, as relu's is 0 at 0: relu6' is 1 on (0, 6) only, hard_sigmoid'
# 1/6 on (-3, 3) only, hard_swish' 0 at -3 and 1 at 3. Frameworks differ exactly there (torch's hardswish takes the
# middle piece at both); tests keep their inputs off the kinks.
def act_forward(activation: str, x: np.ndarray) -> np.ndarray:
    kind, alpha = parse_activation(activation)
    if kind == "relu":
        return np.maximum(x, 0)
    if kind == "relu6":
        return np.clip(x, 0, 6)
    if kind == "hard_sigmoid":
        return np.clip(x + 3, 0, 6) / 6
    if kind == "hard_swish":
        return x * np.clip(x + 3, 0, 6) / 6
    if kind == "leaky_relu":
        return np.where(x > 0, x, alpha * x)
    if kind == "elu":
        return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))
    if kind == "sigmoid":
        return expit(x)
    if kind == "tanh":
        return np.tanh(x)
    if kind == "softplus":
        return np.logaddexp(0, x)
    if kind == "silu":
        return x * expit(x)
    if kind == "gelu":
        return 0.5 * x * (1 + erf(x / math.sqrt(2)))
    if kind == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))
    if kind == "softmax":  # over channels/features: axis 1 of the canonical layout
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return x


def act_backward(activation: str, x: np.ndarray, y: np.ndarray, dy: np.ndarray) -> np.ndarray:
    kind, alpha = parse_activation(activation)
    if kind == "relu":
        return dy * (x > 0)
    if kind == "relu6":
        return dy * ((x > 0) & (x < 6))
    if kind == "hard_sigmoid":
        return dy * ((x > -3) & (x < 3)) / 6
    if kind == "hard_swish":
        return dy * np.where(x <= -3, 0.0, np.where(x >= 3, 1.0, (2 * x + 3) / 6))
    if kind == "leaky_relu":
        return dy * np.where(x > 0, 1.0, alpha)
    if kind == "elu":
        return dy * np.where(x > 0, 1.0, y + alpha)
    if kind == "sigmoid":
        return dy * y * (1 - y)
    if kind == "tanh":
        return dy * (1 - y * y)
    if kind == "softplus":
        return dy * expit(x)
    if kind == "silu":
        s = expit(x)
        return dy * (s + x * s * (1 - s))
    if kind == "gelu":
        return dy * (0.5 * (1 + erf(x / math.sqrt(2))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi))
    if kind == "gelu_tanh":
        t = np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
        return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x))
    if kind == "softmax":
        return y * (dy - (dy * y).sum(axis=1, keepdims=True))
    return dy


# --- windows (convolution and pooling) -----------------------------------------------------------
def _windows(x: np.ndarray, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int] = (1, 1)) -> np.ndarray:
    """(N, C, OH, OW, kh, kw) strided view of every window (its cells d apart: dilation)."""
    extent = ((k[0] - 1) * d[0] + 1, (k[1] - 1) * d[1] + 1)
    return sliding_window_view(x, extent, axis=(2, 3))[:, :, ::s[0], ::s[1], ::d[0], ::d[1]]


def _scatter_windows(dwin: np.ndarray, shape: tuple, s: tuple[int, int], d: tuple[int, int] = (1, 1)) -> np.ndarray:
    """Adjoint of _windows: add each window's gradient back at its input position."""
    dx = np.zeros(shape, dwin.dtype)
    _, _, oh, ow, kh, kw = dwin.shape
    for i in range(kh):
        for j in range(kw):
            r, c = i * d[0], j * d[1]
            dx[:, :, r:r + s[0] * (oh - 1) + 1:s[0], c:c + s[1] * (ow - 1) + 1:s[1]] += dwin[..., i, j]
    return dx


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _pad(x: np.ndarray, pads, value: float = 0.0) -> np.ndarray:
    (pt, pb), (pl, pr) = pads
    return np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=value)


def _crop(dxp: np.ndarray, pads, shape: tuple) -> np.ndarray:
    (pt, _), (pl, _) = pads
    return dxp[:, :, pt:pt + shape[2], pl:pl + shape[3]]


def _pool_pads(layer, in_shape):
    """The pool's padding with the cells a ceil_mode window hangs beyond it added after (bottom, right)."""
    ((pt, pb), (pl, pr)), (eh, ew) = layer.pads(in_shape), layer.overhang(in_shape)
    return (pt, pb + eh), (pl, pr + ew)


# --- nodes: one per layer kind -------------------------------------------------------------------
class Node:
    """One layer of the graph: forward(w, xs, training) -> (y, cache); backward(w, cache, dy, grads) -> dxs,
    one gradient per input. `params` are its canonical weight keys (its parameter bindings)."""

    def __init__(self, info, rng: np.random.Generator):
        self.layer, self.name, self.info, self.rng = info.layer, info.name, info, rng
        self.params = [f"{self.name}/{k}" for k in self.layer.param_shapes(info.in_shape)]

    def forward(self, w, xs, training):
        raise NotImplementedError

    def backward(self, w, cache, dy, grads):
        raise NotImplementedError


class DenseNode(Node):
    def forward(self, w, xs, training):
        x = xs[0]
        z = x @ w[f"{self.name}/kernel"] + w[f"{self.name}/bias"]
        y = act_forward(self.layer.activation, z)
        return y, (x, z, y)

    def backward(self, w, cache, dy, grads):
        x, z, y = cache
        dz = act_backward(self.layer.activation, z, y, dy)
        grads[f"{self.name}/kernel"] = x.T @ dz
        grads[f"{self.name}/bias"] = dz.sum(axis=0)
        return (dz @ w[f"{self.name}/kernel"].T,)


class Conv2DNode(Node):
    """Convolution in `groups` independent groups of channels: one batched matrix product of each group's
    windows (rows: output positions, columns: its channels x kernel cells) with its filters."""

    def forward(self, w, xs, training):
        x, layer = xs[0], self.layer
        pads = layer.pads(x.shape[1:])
        xp = _pad(x, pads)
        k, g = w[f"{self.name}/kernel"], layer.groups
        f, cg, kh, kw = k.shape
        win = _windows(xp, (kh, kw), _pair(layer.strides), _pair(layer.dilation))
        n, c, oh, ow = win.shape[:4]
        cols = (win.reshape(n, g, cg, oh, ow, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6)
                .reshape(g, n * oh * ow, cg * kh * kw))
        z = cols @ k.reshape(g, f // g, cg * kh * kw).transpose(0, 2, 1)  # (g, positions, filters of the group)
        z = z.reshape(g, n, oh, ow, f // g).transpose(1, 0, 4, 2, 3).reshape(n, f, oh, ow)
        if layer.use_bias:
            z = z + w[f"{self.name}/bias"][None, :, None, None]
        y = act_forward(layer.activation, z)
        return y, (x.shape, xp.shape, pads, cols, z, y)

    def backward(self, w, cache, dy, grads):
        xshape, xpshape, pads, cols, z, y = cache
        layer, k = self.layer, w[f"{self.name}/kernel"]
        g, (f, cg, kh, kw) = layer.groups, k.shape
        dz = act_backward(layer.activation, z, y, dy)
        n, _, oh, ow = dz.shape
        dzm = dz.reshape(n, g, f // g, oh, ow).transpose(1, 0, 3, 4, 2).reshape(g, n * oh * ow, f // g)
        grads[f"{self.name}/kernel"] = (cols.transpose(0, 2, 1) @ dzm).transpose(0, 2, 1).reshape(k.shape)
        if layer.use_bias:
            grads[f"{self.name}/bias"] = dz.sum(axis=(0, 2, 3))
        dcols = dzm @ k.reshape(g, f // g, cg * kh * kw)
        dwin = (dcols.reshape(g, n, oh, ow, cg, kh, kw).transpose(1, 0, 4, 2, 3, 5, 6)
                .reshape(n, g * cg, oh, ow, kh, kw))
        dxp = _scatter_windows(dwin, xpshape, _pair(layer.strides), _pair(layer.dilation))
        return (_crop(dxp, pads, xshape),)


class MaxPoolNode(Node):
    """Max over each window; padding (and a ceil_mode window's overhang) is -inf, so padded cells never win."""

    def forward(self, w, xs, training):
        x = xs[0]
        k, s = self.layer.window()
        pads = _pool_pads(self.layer, x.shape[1:])
        xp = _pad(x, pads, -np.inf)
        win = _windows(xp, k, s)
        flat = win.reshape(win.shape[:4] + (-1,))
        arg = flat.argmax(axis=-1)
        return np.take_along_axis(flat, arg[..., None], -1)[..., 0], (x.shape, xp.shape, pads, arg)

    def backward(self, w, cache, dy, grads):
        xshape, xpshape, pads, arg = cache
        (kh, kw), s = self.layer.window()
        dwin = ((arg[..., None] == np.arange(kh * kw)) * dy[..., None]).reshape(dy.shape + (kh, kw))
        return (_crop(_scatter_windows(dwin, xpshape, s), pads, xshape),)


class AvgPoolNode(Node):
    """Mean over each window. The divisor counts the real cells (TensorFlow's meaning), or with count_include_pad
    the padded ones too, but never the cells a ceil_mode window hangs beyond the padded input (torch's rule)."""

    def forward(self, w, xs, training):
        x, layer = xs[0], self.layer
        k, s = layer.window()
        pads = _pool_pads(layer, x.shape[1:])
        xp = _pad(x, pads)
        if layer.count_include_pad:
            ((pt, pb), (pl, pr)), (eh, ew) = layer.pads(x.shape[1:]), layer.overhang(x.shape[1:])
            counted = _pad(np.ones((1, 1, x.shape[2] + pt + pb, x.shape[3] + pl + pr)), ((0, eh), (0, ew)))
        else:
            counted = _pad(np.ones((1, 1) + x.shape[2:]), pads)
        count = _windows(counted, k, s).sum(axis=(4, 5))  # (1, 1, OH, OW)
        return _windows(xp, k, s).sum(axis=(4, 5)) / count, (x.shape, xp.shape, pads, count)

    def backward(self, w, cache, dy, grads):
        xshape, xpshape, pads, count = cache
        (kh, kw), s = self.layer.window()
        dwin = np.broadcast_to((dy / count)[..., None, None], dy.shape + (kh, kw))
        return (_crop(_scatter_windows(dwin, xpshape, s), pads, xshape),)


class ZeroPaddingNode(Node):
    def forward(self, w, xs, training):
        pads = self.layer.pads()
        return _pad(xs[0], pads), (pads, xs[0].shape)

    def backward(self, w, cache, dy, grads):
        return (_crop(dy, *cache),)


class AdaptiveAvgPoolNode(Node):
    """Each output the mean of its torch bin: a bin is a rectangle, so rows and columns average apart, as two
    products with averaging matrices (rows first when that intermediate is the smaller)."""

    def forward(self, w, xs, training):
        x = xs[0]
        _, oh, ow = self.info.out_shape
        rows, cols = self._averaging(x.shape[2], oh), self._averaging(x.shape[3], ow)
        rows_first = oh * x.shape[3] <= x.shape[2] * ow
        y = (rows @ x) @ cols.T if rows_first else rows @ (x @ cols.T)
        return y, (rows, cols)

    def backward(self, w, cache, dy, grads):
        rows, cols = cache
        return (rows.T @ (dy @ cols),)

    @staticmethod
    def _averaging(size: int, out: int) -> np.ndarray:
        m = np.zeros((out, size))
        for i, (a, b) in enumerate(adaptive_bins(size, out)):
            m[i, a:b] = 1 / (b - a)
        return m


class GlobalAvgPoolNode(Node):
    def forward(self, w, xs, training):
        return xs[0].mean(axis=(2, 3), keepdims=self.layer.keepdims), xs[0].shape

    def backward(self, w, shape, dy, grads):
        return (np.broadcast_to(dy.reshape(shape[:2] + (1, 1)) / (shape[2] * shape[3]), shape),)


class FlattenNode(Node):
    def forward(self, w, xs, training):
        return xs[0].reshape(len(xs[0]), -1), xs[0].shape

    def backward(self, w, shape, dy, grads):
        return (dy.reshape(shape),)


class ActivationNode(Node):
    def forward(self, w, xs, training):
        y = act_forward(self.layer.activation, xs[0])
        return y, (xs[0], y)

    def backward(self, w, cache, dy, grads):
        return (act_backward(self.layer.activation, *cache, dy),)


class DropoutNode(Node):
    """Inverted dropout: kept units scaled by 1/(1 - rate) in training, identity at inference."""

    def forward(self, w, xs, training):
        x, rate = xs[0], self.layer.rate
        if not training or rate == 0:
            return x, None
        mask = (self.rng.random(x.shape) >= rate) / (1 - rate)
        return x * mask, mask

    def backward(self, w, mask, dy, grads):
        return (dy if mask is None else dy * mask,)


class BatchNormNode(Node):
    def forward(self, w, xs, training):
        x, name = xs[0], self.name
        axes = (0, 2, 3) if x.ndim == 4 else (0,)
        bshape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1)
        if training:
            mean, var = x.mean(axis=axes), x.var(axis=axes)
        else:
            mean, var = w[f"{name}/moving_mean"], w[f"{name}/moving_var"]
        inv = 1 / np.sqrt(var + self.layer.epsilon)
        xhat = (x - mean.reshape(bshape)) * inv.reshape(bshape)
        y = xhat * w[f"{name}/gamma"].reshape(bshape) + w[f"{name}/beta"].reshape(bshape)
        return y, (xhat, inv, axes, bshape, mean, var)

    def backward(self, w, cache, dy, grads):
        xhat, inv, axes, bshape, _, _ = cache
        m = dy.size / inv.size
        grads[f"{self.name}/gamma"] = (dy * xhat).sum(axis=axes)
        grads[f"{self.name}/beta"] = dy.sum(axis=axes)
        dxhat = dy * w[f"{self.name}/gamma"].reshape(bshape)
        return ((inv.reshape(bshape) / m) * (m * dxhat - dxhat.sum(axis=axes).reshape(bshape)
                                              - xhat * (dxhat * xhat).sum(axis=axes).reshape(bshape)),)

    def update_statistics(self, w, cache) -> None:
        """moving = m * moving + (1 - m) * batch (Keras' momentum), biased batch variance."""
        m = self.layer.momentum
        for stat, batch in (("moving_mean", cache[4]), ("moving_var", cache[5])):
            key = f"{self.name}/{stat}"
            w[key] = m * w[key] + (1 - m) * batch


class RescalingNode(Node):
    def forward(self, w, xs, training):
        return xs[0] * self.layer.scale + self.layer.offset, None

    def backward(self, w, cache, dy, grads):
        return (dy * self.layer.scale,)


class NormalizationNode(Node):
    """(x - mean) / max(sqrt(variance), 1e-7), per channel or feature; mean and variance take no gradient."""

    def forward(self, w, xs, training):
        x = xs[0]
        bshape = (1, -1) + (1,) * (x.ndim - 2)
        mean, var = w[f"{self.name}/mean"].reshape(bshape), w[f"{self.name}/variance"].reshape(bshape)
        scale = np.maximum(np.sqrt(var), NORMALIZATION_EPSILON)
        return (x - mean) / scale, scale

    def backward(self, w, scale, dy, grads):
        return (dy / scale,)


class LayerNormNode(Node):
    """Normalized over axis 1 (the channels at each position, or the features), biased variance."""

    def forward(self, w, xs, training):
        x = xs[0]
        bshape = (1, -1) + (1,) * (x.ndim - 2)
        mean, var = x.mean(axis=1, keepdims=True), x.var(axis=1, keepdims=True)
        inv = 1 / np.sqrt(var + self.layer.epsilon)
        xhat = (x - mean) * inv
        y = xhat * w[f"{self.name}/gamma"].reshape(bshape) + w[f"{self.name}/beta"].reshape(bshape)
        return y, (xhat, inv, bshape)

    def backward(self, w, cache, dy, grads):
        xhat, inv, bshape = cache
        axes = (0,) + tuple(range(2, dy.ndim))
        grads[f"{self.name}/gamma"] = (dy * xhat).sum(axis=axes)
        grads[f"{self.name}/beta"] = dy.sum(axis=axes)
        dxhat = dy * w[f"{self.name}/gamma"].reshape(bshape)
        c = dy.shape[1]
        return ((inv / c) * (c * dxhat - dxhat.sum(axis=1, keepdims=True)
                             - xhat * (dxhat * xhat).sum(axis=1, keepdims=True)),)


class AddNode(Node):
    def forward(self, w, xs, training):
        return sum(xs[1:], xs[0]), len(xs)

    def backward(self, w, n, dy, grads):
        return (dy,) * n


class ConcatenateNode(Node):
    def forward(self, w, xs, training):
        return np.concatenate(xs, axis=1), np.cumsum([x.shape[1] for x in xs])[:-1]

    def backward(self, w, splits, dy, grads):
        return tuple(np.split(dy, splits, axis=1))


class MultiplyNode(Node):
    """Elementwise product; a per-channel gate (C,) or (C, 1, 1) broadcasts over the image's H and W, and its
    gradient sums over them."""

    def forward(self, w, xs, training):
        g = Multiply.gate(self.info.in_shapes)
        if g is None:
            return np.prod(np.stack(xs), axis=0), (xs, None)
        image, gate = xs[1 - g], xs[g]
        return image * gate.reshape(gate.shape[:2] + (1, 1)), (xs, g)

    def backward(self, w, cache, dy, grads):
        xs, g = cache
        if g is None:  # each input's gradient: dy times the product of the others (no division: zeros are fine)
            return tuple(dy * np.prod(np.stack(xs[:i] + xs[i + 1:]), axis=0) for i in range(len(xs)))
        image, gate = xs[1 - g], xs[g]
        dgate = (dy * image).sum(axis=(2, 3)).reshape(gate.shape)
        dimage = dy * gate.reshape(gate.shape[:2] + (1, 1))
        return (dgate, dimage) if g == 0 else (dimage, dgate)


CONVERTERS = {
    Dense: DenseNode, Conv2D: Conv2DNode, MaxPool2D: MaxPoolNode, AvgPool2D: AvgPoolNode,
    GlobalAveragePooling2D: GlobalAvgPoolNode, Flatten: FlattenNode, Activation: ActivationNode,
    Dropout: DropoutNode, BatchNorm: BatchNormNode, Add: AddNode, Concatenate: ConcatenateNode,
    ZeroPadding2D: ZeroPaddingNode, AdaptiveAvgPool2D: AdaptiveAvgPoolNode, Multiply: MultiplyNode,
    Rescaling: RescalingNode, Normalization: NormalizationNode, LayerNormalization: LayerNormNode,
}


class NumpyAdapter(Adapter):
    """Reference backend: float64, CPU only, straightforward rather than fast."""

    name = "numpy"

    @classmethod
    def version(cls) -> str:
        return f"numpy {np.__version__}"

    @property
    def execution_path(self) -> str:
        return "float64 reference"

    def _build(self) -> None:
        kind, _ = parse_device(self.device)
        if kind != "cpu":
            raise BackendError(f"numpy backend runs on cpu only, not {self.device!r} (devices: cpu)")
        self.rng = np.random.default_rng(0)
        self.nodes = [converter(CONVERTERS, info, "numpy")(info, self.rng) for info in self.spec.logits_infos()]
        self.w = {k: v.astype(np.float64) for k, v in init_weights(self.spec).items()}  # its "native" init
        # `native` stays None: the oracle is no framework object, and `self.native = self` was a reference cycle
        # that kept every deep copy check.py makes (17 a step) until the cyclic collector ran: +9 GB on ResNet50

    def get_weights(self):
        return {k: v.astype(np.float32) for k, v in self.w.items()}

    def _set_weights(self, weights):
        self.w = {k: np.array(weights[k], dtype=np.float64) for k in self.spec.param_shapes()}

    def _set_optimizer(self, optimizer):
        self.optimizer, self.state, self.t = optimizer, {}, 0

    # --- the graph walk ----------------------------------------------------------------------
    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """The float64 logits."""
        return self.walk(x, training)[0]

    def walk(self, x: np.ndarray, training: bool = False):
        """(logits, every node's output by name, every node's cache by name), nodes in topological order."""
        outs, caches = {INPUT: np.asarray(x, np.float64)}, {}
        for node in self.nodes:
            outs[node.name], caches[node.name] = node.forward(self.w, [outs[n] for n in node.info.inputs], training)
        del outs[INPUT]
        return outs[self.nodes[-1].name], outs, caches

    def backward(self, caches: dict, dlogits: np.ndarray) -> dict[str, np.ndarray]:
        """Weight gradients; a node read by several others gets the sum of their gradients."""
        grads, pending = {}, {self.nodes[-1].name: dlogits}
        for node in reversed(self.nodes):
            dxs = node.backward(self.w, caches[node.name], pending.pop(node.name), grads)
            for n, dx in zip(node.info.inputs, dxs):
                pending[n] = pending[n] + dx if n in pending else dx
        return grads

    def _forward_backward(self, x, y):
        z, _, caches = self.walk(x, training=True)
        loss, dz = loss_and_dlogits(z, np.asarray(y))
        return loss, self.backward(caches, dz.reshape(z.shape)), caches

    # --- the contract ------------------------------------------------------------------------
    def logits(self, x):
        return self.forward(inference_inputs(self.spec, x)).astype(np.float32)

    def layer_outputs(self, x) -> dict[str, np.ndarray]:
        """Inference-mode output of every logits node, keyed by layer name, in topological order."""
        return self.walk(as_inputs(self.spec, x))[1]

    def _loss_and_grads(self, x, y):
        loss, grads, _ = self._forward_backward(as_inputs(self.spec, x), y)
        return loss, {k: grads[k] for k in self.spec.trainable_keys()}

    def _train_batch(self, x, y):
        loss, grads, caches = self._forward_backward(x, y)
        for node in self.nodes:
            if isinstance(node, BatchNormNode):
                node.update_statistics(self.w, caches[node.name])
        self.t += 1
        opt = self.optimizer
        if not isinstance(opt, (SGD, Adam)):
            raise BackendError(f"numpy backend: unsupported optimizer {opt!r} (use SGD or Adam)")
        for k in self.spec.trainable_keys():
            g = grads[k]
            if isinstance(opt, SGD):
                if opt.momentum:
                    v = self.state[k] = opt.momentum * self.state.get(k, 0) + g
                    g = v
                self.w[k] -= opt.lr * g
            else:
                m, v = self.state.get(k, (0, 0))
                m = opt.beta1 * m + (1 - opt.beta1) * g
                v = opt.beta2 * v + (1 - opt.beta2) * g * g
                self.state[k] = (m, v)
                mhat, vhat = m / (1 - opt.beta1 ** self.t), v / (1 - opt.beta2 ** self.t)
                self.w[k] -= opt.lr * mhat / (np.sqrt(vhat) + opt.epsilon)
        return loss
