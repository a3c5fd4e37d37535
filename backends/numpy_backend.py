"""The float64 NumPy oracle: forward and backward for every layer kind, written from the definitions."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..models import Activation, AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, init_weights

from .base import Adam, Adapter, BackendError, SGD, as_inputs, loss_and_dlogits, parse_device


# --- activations ---------------------------------------------------------------------------------
def act_forward(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "relu":
        return np.maximum(x, 0)
    if kind == "sigmoid":
        return 1 / (1 + np.exp(-x))
    if kind == "tanh":
        return np.tanh(x)
    if kind == "softmax":  # over channels/features: axis 1 of the canonical layout
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return x


def act_backward(kind: str, x: np.ndarray, y: np.ndarray, dy: np.ndarray) -> np.ndarray:
    if kind == "relu":
        return dy * (x > 0)
    if kind == "sigmoid":
        return dy * y * (1 - y)
    if kind == "tanh":
        return dy * (1 - y * y)
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
        self.layers = self.spec.logits_layers()
        self.infos = self.spec.infos
        self.w = {k: v.astype(np.float64) for k, v in init_weights(self.spec).items()}  # its "native" init
        self.rng = np.random.default_rng(0)
        self.native = self

    def get_weights(self):
        return {k: v.astype(np.float32) for k, v in self.w.items()}

    def set_weights(self, weights):
        self._check_weights(weights)
        self.w = {k: np.array(weights[k], dtype=np.float64) for k in self.spec.param_shapes()}

    def set_optimizer(self, optimizer):
        self.optimizer, self.state, self.t = optimizer, {}, 0

    # --- forward/backward --------------------------------------------------------------------
    def forward(self, x: np.ndarray, training: bool = False, collect: bool = False):
        """Logits; with collect=True also every layer's output (for divergence reports) and the caches."""
        caches, outs = [], []
        h = np.asarray(x, np.float64)
        for layer, info in zip(self.layers, self.infos):
            h, cache = self._layer_forward(layer, info.name, h, training)
            caches.append(cache)
            if collect:
                outs.append(h)
        return (h, outs, caches) if collect else h

    def _layer_forward(self, layer, name, x, training):
        w = self.w
        if isinstance(layer, Dense):
            z = x @ w[f"{name}/kernel"] + w[f"{name}/bias"]
            y = act_forward(layer.activation, z)
            return y, (x, z, y)
        if isinstance(layer, Conv2D):
            (pt, pb), (pl, pr) = layer.pads(x.shape[1:])
            xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
            k = w[f"{name}/kernel"]
            win = _windows(xp, k.shape[2:], _pair(layer.strides))
            z = np.tensordot(win, k, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2) \
                + w[f"{name}/bias"][None, :, None, None]
            y = act_forward(layer.activation, z)
            return y, (x.shape, xp.shape, win, z, y)
        if isinstance(layer, (MaxPool2D, AvgPool2D)):
            k, s = layer.window()
            win = _windows(x, k, s)
            if isinstance(layer, AvgPool2D):
                return win.mean(axis=(4, 5)), (x.shape, None)
            flat = win.reshape(*win.shape[:4], -1)
            arg = flat.argmax(axis=-1)
            return np.take_along_axis(flat, arg[..., None], -1)[..., 0], (x.shape, arg)
        if isinstance(layer, Flatten):
            return x.reshape(len(x), -1), x.shape
        if isinstance(layer, Activation):
            y = act_forward(layer.activation, x)
            return y, (x, y)
        if isinstance(layer, Dropout):
            if not training or layer.rate == 0:
                return x, None
            mask = (self.rng.random(x.shape) >= layer.rate) / (1 - layer.rate)
            return x * mask, mask
        if isinstance(layer, BatchNorm):
            axes = (0, 2, 3) if x.ndim == 4 else (0,)
            bshape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1)
            if training:
                mean, var = x.mean(axis=axes), x.var(axis=axes)
            else:
                mean, var = w[f"{name}/moving_mean"], w[f"{name}/moving_var"]
            inv = 1 / np.sqrt(var + layer.epsilon)
            xhat = (x - mean.reshape(bshape)) * inv.reshape(bshape)
            y = xhat * w[f"{name}/gamma"].reshape(bshape) + w[f"{name}/beta"].reshape(bshape)
            return y, (xhat, inv, axes, bshape, mean, var)
        raise BackendError(f"numpy backend: unsupported layer {type(layer).__name__}")

    def _layer_backward(self, layer, name, cache, dy, grads):
        w = self.w
        if isinstance(layer, Dense):
            x, z, y = cache
            dz = act_backward(layer.activation, z, y, dy)
            grads[f"{name}/kernel"] = x.T @ dz
            grads[f"{name}/bias"] = dz.sum(axis=0)
            return dz @ w[f"{name}/kernel"].T
        if isinstance(layer, Conv2D):
            xshape, xpshape, win, z, y = cache
            dz = act_backward(layer.activation, z, y, dy)
            k = w[f"{name}/kernel"]
            grads[f"{name}/kernel"] = np.tensordot(dz, win, axes=([0, 2, 3], [0, 2, 3]))
            grads[f"{name}/bias"] = dz.sum(axis=(0, 2, 3))
            dwin = np.tensordot(dz, k, axes=([1], [0]))  # (N, OH, OW, C, kh, kw)
            dxp = _scatter_windows(dwin.transpose(0, 3, 1, 2, 4, 5), xpshape, _pair(layer.strides))
            (pt, _), (pl, _) = layer.pads(xshape[1:])
            return dxp[:, :, pt:pt + xshape[2], pl:pl + xshape[3]]
        if isinstance(layer, (MaxPool2D, AvgPool2D)):
            xshape, arg = cache
            (kh, kw), s = layer.window()
            if arg is None:
                dwin = np.broadcast_to(dy[..., None, None] / (kh * kw), dy.shape + (kh, kw))
            else:
                onehot = arg[..., None] == np.arange(kh * kw)
                dwin = (onehot * dy[..., None]).reshape(dy.shape + (kh, kw))
            return _scatter_windows(dwin, xshape, s)
        if isinstance(layer, Flatten):
            return dy.reshape(cache)
        if isinstance(layer, Activation):
            x, y = cache
            return act_backward(layer.activation, x, y, dy)
        if isinstance(layer, Dropout):
            return dy if cache is None else dy * cache
        if isinstance(layer, BatchNorm):
            xhat, inv, axes, bshape, _, _ = cache
            m = dy.size / inv.size
            grads[f"{name}/gamma"] = (dy * xhat).sum(axis=axes)
            grads[f"{name}/beta"] = dy.sum(axis=axes)
            dxhat = dy * w[f"{name}/gamma"].reshape(bshape)
            return (inv.reshape(bshape) / m) * (m * dxhat - dxhat.sum(axis=axes).reshape(bshape)
                                                 - xhat * (dxhat * xhat).sum(axis=axes).reshape(bshape))
        raise BackendError(f"numpy backend: unsupported layer {type(layer).__name__}")

    def _forward_backward(self, x, y):
        z, _, caches = self.forward(x, training=True, collect=True)
        loss, dz = loss_and_dlogits(z, np.asarray(y))
        d, grads = dz.reshape(z.shape), {}
        for layer, info, cache in reversed(list(zip(self.layers, self.infos, caches))):
            d = self._layer_backward(layer, info.name, cache, d, grads)
        return loss, grads, caches

    # --- the contract ------------------------------------------------------------------------
    def logits(self, x):
        return self.forward(as_inputs(self.spec, x)).astype(np.float32)

    def layer_outputs(self, x) -> dict[str, np.ndarray]:
        """Inference-mode output of every layer, keyed by layer name (for divergence reports)."""
        _, outs, _ = self.forward(as_inputs(self.spec, x), collect=True)
        return {i.name: o for i, o in zip(self.infos, outs)}

    def loss_and_grads(self, x, y):
        loss, grads, _ = self._forward_backward(as_inputs(self.spec, x), y)
        return loss, {k: grads[k] for k in self.spec.trainable_keys()}

    def _train_batch(self, x, y):
        loss, grads, caches = self._forward_backward(x, y)
        for layer, info, cache in zip(self.layers, self.infos, caches):
            if isinstance(layer, BatchNorm):
                m = layer.momentum
                for stat, batch in (("moving_mean", cache[4]), ("moving_var", cache[5])):
                    key = f"{info.name}/{stat}"
                    self.w[key] = m * self.w[key] + (1 - m) * batch
        self.t += 1
        opt = self.optimizer
        for k in self.spec.trainable_keys():
            g = grads[k]
            if isinstance(opt, SGD):
                if opt.momentum:
                    v = self.state[k] = opt.momentum * self.state.get(k, 0) + g
                    g = v
                self.w[k] -= opt.lr * g
            elif isinstance(opt, Adam):
                m, v = self.state.get(k, (0, 0))
                m = opt.beta1 * m + (1 - opt.beta1) * g
                v = opt.beta2 * v + (1 - opt.beta2) * g * g
                self.state[k] = (m, v)
                mhat, vhat = m / (1 - opt.beta1 ** self.t), v / (1 - opt.beta2 ** self.t)
                self.w[k] -= opt.lr * mhat / (np.sqrt(vhat) + opt.epsilon)
        return loss
