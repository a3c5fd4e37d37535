"""The float64 NumPy oracle: forward and backward for every layer kind, written from the definitions.

CONVERTERS maps each layer class to its node (forward and backward); one graph walk runs the nodes in
topological order and, backwards, sums the gradients of a node consumed more than once (fan-out).
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..models import (INPUT, Activation, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D, Dense, Dropout, Flatten,
                      GlobalAveragePooling2D, MaxPool2D, init_weights, parse_activation)

from .base import Adam, Adapter, BackendError, SGD, as_inputs, converter, loss_and_dlogits, parse_device

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
def act_forward(activation: str, x: np.ndarray) -> np.ndarray:
    kind, alpha = parse_activation(activation)
    if kind == "relu":
        return np.maximum(x, 0)
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
def _windows(x: np.ndarray, k: tuple[int, int], s: tuple[int, int]) -> np.ndarray:
    """(N, C, OH, OW, kh, kw) strided view of every window."""
    return sliding_window_view(x, k, axis=(2, 3))[:, :, ::s[0], ::s[1]]


def _scatter_windows(dwin: np.ndarray, shape: tuple, s: tuple[int, int]) -> np.ndarray:
    """Adjoint of _windows: add each window's gradient back at its input position."""
    dx = np.zeros(shape, dwin.dtype)
    _, _, oh, ow, kh, kw = dwin.shape
    for i in range(kh):
        for j in range(kw):
            dx[:, :, i:i + s[0] * (oh - 1) + 1:s[0], j:j + s[1] * (ow - 1) + 1:s[1]] += dwin[..., i, j]
    return dx


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _pad(x: np.ndarray, pads, value: float = 0.0) -> np.ndarray:
    (pt, pb), (pl, pr) = pads
    return np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=value)


def _crop(dxp: np.ndarray, pads, shape: tuple) -> np.ndarray:
    (pt, _), (pl, _) = pads
    return dxp[:, :, pt:pt + shape[2], pl:pl + shape[3]]


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
    def forward(self, w, xs, training):
        x, layer = xs[0], self.layer
        pads = layer.pads(x.shape[1:])
        xp = _pad(x, pads)
        k = w[f"{self.name}/kernel"]
        win = _windows(xp, k.shape[2:], _pair(layer.strides))
        z = np.tensordot(win, k, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
        if layer.use_bias:
            z = z + w[f"{self.name}/bias"][None, :, None, None]
        y = act_forward(layer.activation, z)
        return y, (x.shape, xp.shape, pads, win, z, y)

    def backward(self, w, cache, dy, grads):
        xshape, xpshape, pads, win, z, y = cache
        dz = act_backward(self.layer.activation, z, y, dy)
        k = w[f"{self.name}/kernel"]
        grads[f"{self.name}/kernel"] = np.tensordot(dz, win, axes=([0, 2, 3], [0, 2, 3]))
        if self.layer.use_bias:
            grads[f"{self.name}/bias"] = dz.sum(axis=(0, 2, 3))
        dwin = np.tensordot(dz, k, axes=([1], [0]))  # (N, OH, OW, C, kh, kw)
        dxp = _scatter_windows(dwin.transpose(0, 3, 1, 2, 4, 5), xpshape, _pair(self.layer.strides))
        return (_crop(dxp, pads, xshape),)


class MaxPoolNode(Node):
    """Max over each window; "same" pads with -inf so padded cells never win."""

    def forward(self, w, xs, training):
        x = xs[0]
        k, s = self.layer.window()
        pads = self.layer.pads(x.shape[1:])
        xp = _pad(x, pads, -np.inf)
        flat = _windows(xp, k, s).reshape(*((len(x), x.shape[1]) + self.info.out_shape[1:]), -1)
        arg = flat.argmax(axis=-1)
        return np.take_along_axis(flat, arg[..., None], -1)[..., 0], (x.shape, xp.shape, pads, arg)

    def backward(self, w, cache, dy, grads):
        xshape, xpshape, pads, arg = cache
        (kh, kw), s = self.layer.window()
        dwin = ((arg[..., None] == np.arange(kh * kw)) * dy[..., None]).reshape(dy.shape + (kh, kw))
        return (_crop(_scatter_windows(dwin, xpshape, s), pads, xshape),)


class AvgPoolNode(Node):
    """Mean over each window's real cells: "same" padding is excluded from the count (TensorFlow's meaning)."""

    def forward(self, w, xs, training):
        x = xs[0]
        k, s = self.layer.window()
        pads = self.layer.pads(x.shape[1:])
        xp = _pad(x, pads)
        count = _windows(_pad(np.ones((1, 1) + x.shape[2:]), pads), k, s).sum(axis=(4, 5))  # (1, 1, OH, OW)
        return _windows(xp, k, s).sum(axis=(4, 5)) / count, (x.shape, xp.shape, pads, count)

    def backward(self, w, cache, dy, grads):
        xshape, xpshape, pads, count = cache
        (kh, kw), s = self.layer.window()
        dwin = np.broadcast_to((dy / count)[..., None, None], dy.shape + (kh, kw))
        return (_crop(_scatter_windows(dwin, xpshape, s), pads, xshape),)


class GlobalAvgPoolNode(Node):
    def forward(self, w, xs, training):
        return xs[0].mean(axis=(2, 3)), xs[0].shape

    def backward(self, w, shape, dy, grads):
        return (np.broadcast_to(dy[:, :, None, None] / (shape[2] * shape[3]), shape),)


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


CONVERTERS = {
    Dense: DenseNode, Conv2D: Conv2DNode, MaxPool2D: MaxPoolNode, AvgPool2D: AvgPoolNode,
    GlobalAveragePooling2D: GlobalAvgPoolNode, Flatten: FlattenNode, Activation: ActivationNode,
    Dropout: DropoutNode, BatchNorm: BatchNormNode, Add: AddNode, Concatenate: ConcatenateNode,
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
        self.native = self

    def get_weights(self):
        return {k: v.astype(np.float32) for k, v in self.w.items()}

    def set_weights(self, weights):
        self.w = {k: np.array(weights[k], dtype=np.float64) for k in self.spec.param_shapes()}

    def set_optimizer(self, optimizer):
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
        return self.forward(as_inputs(self.spec, x)).astype(np.float32)

    def layer_outputs(self, x) -> dict[str, np.ndarray]:
        """Inference-mode output of every logits node, keyed by layer name, in topological order."""
        return self.walk(as_inputs(self.spec, x))[1]

    def loss_and_grads(self, x, y):
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
