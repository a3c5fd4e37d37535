"""MXNet adapter: a hybridized Gluon HybridSequential in NCHW, canonical weights, gluon.Trainer SGD/Adam."""
from __future__ import annotations

import math

import numpy as np

# MXNet 1.x uses np.bool, which NumPy 1.24 removed (NumPy 2 brings it back): restore it before importing MXNet.
if "bool" not in vars(np):
    np.bool = bool

import warnings  # noqa: E402

import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon, nd  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

from ..models import Activation, AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D  # noqa: E402

from .base import Adam, Adapter, BackendError, SGD, as_inputs, gpu_index  # noqa: E402

# nd.array() probes scipy.sparse.csr, deprecated in SciPy: one warning per array made, every step.
warnings.filterwarnings("ignore", message="Please import `csr_matrix`", category=DeprecationWarning)


class _Softmax(nn.HybridBlock):
    """Softmax over channels/features (axis 1 of the canonical layout); gluon's Activation has none."""

    def hybrid_forward(self, F, x):
        return F.softmax(x, axis=1)


class _Pad(nn.HybridBlock):
    """Zero padding ((top, bottom), (left, right)) of an NCHW tensor: TF "same" may pad one more pixel
    at the bottom/right, which the convolution's own symmetric padding cannot express."""

    def __init__(self, pads, **kwargs):
        super().__init__(**kwargs)
        (pt, pb), (pl, pr) = pads
        self._width = (0, 0, 0, 0, pt, pb, pl, pr)

    def hybrid_forward(self, F, x):
        return F.pad(x, mode="constant", constant_value=0, pad_width=self._width)


class _MeanLoss(nn.HybridBlock):
    """The canonical loss from logits, averaged over the batch (Gluon's losses are per sample): softmax
    cross-entropy with integer labels, or binary cross-entropy when there is one output.

    Not gluon's SoftmaxCrossEntropyLoss: MXNet's log_softmax loses precision for large logits (with logits
    of a few hundred its gradient is ~20x less accurate than PyTorch's). Shifting by the max first and
    taking logsumexp(s) - s[y] gives a softmax gradient as accurate as PyTorch's.
    """

    def __init__(self, binary: bool, **kwargs):
        super().__init__(**kwargs)
        self.binary = binary

    def hybrid_forward(self, F, z, y):
        z = F.flatten(z)
        if self.binary:  # max(z, 0) - z * y + log(1 + exp(-|z|))
            loss = F.relu(z) - z * F.reshape_like(y, z) + F.Activation(-F.abs(z), act_type="softrelu")
        else:
            s = F.broadcast_sub(z, F.BlockGrad(F.max(z, axis=1, keepdims=True)))
            loss = F.log(F.sum(F.exp(s), axis=1)) - F.pick(s, y, axis=1)
        return F.mean(loss)


class _CanonicalAdam(mx.optimizer.Adam):
    """Adam with epsilon added after bias correction (Kingma & Ba, Algorithm 1; PyTorch).

    MXNet folds the bias correction into the step size, lr * sqrt(1 - b2^t) / (1 - b1^t), and adds
    epsilon to sqrt(v) uncorrected; scaling epsilon by sqrt(1 - b2^t) makes the two updates equal.
    """

    def __init__(self, epsilon: float, **kwargs):
        super().__init__(epsilon=epsilon, **kwargs)
        self.canonical_epsilon = epsilon

    def update(self, index, weight, grad, state):
        t = self._index_update_count.get(index, self.begin_num_update) + 1  # the t super().update will use
        self.epsilon = self.canonical_epsilon * math.sqrt(1 - self.beta2 ** t)
        super().update(index, weight, grad, state)


class _Loss:
    """A loss still on the device: float() fetches it (an NDArray has no __float__)."""

    __slots__ = ("value",)

    def __init__(self, value: nd.NDArray):
        self.value = value

    def __float__(self) -> float:
        return float(self.value.asscalar())


_ACTS = ("relu", "sigmoid", "tanh")  # what gluon's Activation (and the fused activation of Dense/Conv2D) has


class MXNetAdapter(Adapter):
    """gluon.nn.HybridSequential, hybridized; each spec layer is one child block (a HybridSequential when it
    has parts). Weights are mapped by layer position: MXNet's parameter names carry global counters."""

    name = "mxnet"

    @classmethod
    def version(cls) -> str:
        return f"mxnet {mx.__version__}"

    @property
    def execution_path(self) -> str:  # hybridized is MXNet's compiled path: compile=True changes nothing
        return "hybridized, static alloc"

    @property
    def device_name(self) -> str:
        return str(self.ctx) if self.ctx.device_type == "gpu" else super().device_name

    def _build(self) -> None:
        index = gpu_index(self.device, "mxnet", mx.context.num_gpus())
        self.ctx = mx.cpu() if index is None else mx.gpu(index)
        self.layers = self.spec.logits_layers()
        self.infos = self.spec.infos[:len(self.layers)]
        self._params = {}  # canonical key -> (gluon Parameter, whether it is a transposed Dense kernel)
        self.native = nn.HybridSequential()
        with self.native.name_scope():
            for layer, info in zip(self.layers, self.infos):
                self.native.add(self._block(layer, info.name, info.in_shape))
        self.native.initialize(ctx=self.ctx)  # gluon's default init; canonical weights are set after
        # static_shape still accepts other batch sizes (it re-plans memory when the shape changes)
        self.native.hybridize(static_alloc=True, static_shape=True)
        self._loss = _MeanLoss(binary=self.spec.num_classes == 1)
        self._loss.hybridize(static_alloc=True, static_shape=True)

    def _block(self, layer, name: str, in_shape: tuple) -> nn.HybridBlock:
        """The Gluon block for one spec layer; records its parameters under their canonical keys."""
        if isinstance(layer, (Dense, Conv2D)):
            act = layer.activation if layer.activation in _ACTS else None
            parts = []
            if isinstance(layer, Dense):  # flatten=False: the spec flattens explicitly; weight is (out, in)
                core = nn.Dense(layer.units, activation=act, flatten=False, in_units=in_shape[0])
            else:  # kernel OIHW, the canonical layout
                (pt, pb), (pl, pr) = layer.pads(in_shape)
                padding = (pt, pl)
                if pt != pb or pl != pr:
                    parts.append(_Pad(((pt, pb), (pl, pr))))
                    padding = (0, 0)
                kernel = layer.param_shapes(in_shape)["kernel"][2:]
                core = nn.Conv2D(layer.filters, kernel, strides=layer.strides, padding=padding,
                                 in_channels=in_shape[0], activation=act)
            self._params[f"{name}/kernel"] = (core.weight, isinstance(layer, Dense))
            self._params[f"{name}/bias"] = (core.bias, False)
            parts.append(core)
            if layer.activation == "softmax":
                parts.append(_Softmax())
            return self._sequence(parts)
        if isinstance(layer, (MaxPool2D, AvgPool2D)):
            k, s = layer.window()
            pool = nn.MaxPool2D if isinstance(layer, MaxPool2D) else nn.AvgPool2D
            return pool(pool_size=k, strides=s, padding=0, ceil_mode=False)  # floor: pooling_convention 'valid'
        if isinstance(layer, Flatten):
            return nn.Flatten()  # row-major over (C, H, W): the canonical order
        if isinstance(layer, Activation):
            if layer.activation == "softmax":
                return _Softmax()
            if layer.activation == "linear":
                return nn.HybridLambda("identity")
            return nn.Activation(layer.activation)
        if isinstance(layer, Dropout):
            return nn.Dropout(layer.rate)
        if isinstance(layer, BatchNorm):
            # MXNet's momentum weighs the old value and its moving variance is biased: the canonical meaning.
            bn = nn.BatchNorm(axis=1, momentum=layer.momentum, epsilon=layer.epsilon, in_channels=in_shape[0])
            for key, p in (("gamma", bn.gamma), ("beta", bn.beta),
                           ("moving_mean", bn.running_mean), ("moving_var", bn.running_var)):
                self._params[f"{name}/{key}"] = (p, False)
            return bn
        raise BackendError(f"mxnet backend: unsupported layer {type(layer).__name__}")

    @staticmethod
    def _sequence(parts: list[nn.HybridBlock]) -> nn.HybridBlock:
        if len(parts) == 1:
            return parts[0]
        seq = nn.HybridSequential()
        seq.add(*parts)
        return seq

    # --- weights ---------------------------------------------------------------------------------
    def get_weights(self):
        out = {}
        for k, (p, tr) in self._params.items():
            a = p.data().asnumpy()
            out[k] = np.ascontiguousarray(a.T if tr else a, dtype=np.float32)
        return out

    def set_weights(self, weights):
        self._check_weights(weights)
        for k, (p, tr) in self._params.items():
            w = np.asarray(weights[k], np.float32)
            p.set_data(nd.array(w.T if tr else w, ctx=self.ctx, dtype="float32"))  # in place: keeps static_alloc

    # --- inference -------------------------------------------------------------------------------
    def _array(self, x):
        return nd.array(as_inputs(self.spec, x), ctx=self.ctx, dtype="float32")

    def logits(self, x):
        return self.native(self._array(x)).asnumpy()

    def layer_outputs(self, x):
        h, out = self._array(x), {}
        for info, block in zip(self.infos, self.native):
            h = block(h)
            out[info.name] = h.asnumpy()
        return out

    # --- training --------------------------------------------------------------------------------
    def _labels(self, y):
        return nd.array(np.asarray(y), ctx=self.ctx, dtype="float32")  # pick() and the BCE take float labels

    def _forward_backward(self, x, y) -> nd.NDArray:
        """Training-mode mean loss, with its gradients written (not accumulated) into the parameters."""
        with autograd.record(train_mode=True):
            loss = self._loss(self.native(x), y)
        loss.backward()
        return loss

    def loss_and_grads(self, x, y):
        # MXNet's BatchNorm moves its running statistics during backward: save them and put them back.
        stats = [p for k, (p, _) in self._params.items() if k.endswith(("/moving_mean", "/moving_var"))]
        saved = [p.data().copy() for p in stats]
        loss = self._forward_backward(self._array(x), self._labels(y))
        for p, v in zip(stats, saved):
            p.set_data(v)
        grads = {}
        for k in self.spec.trainable_keys():
            p, tr = self._params[k]
            g = p.grad().asnumpy()
            grads[k] = np.ascontiguousarray(g.T if tr else g)
        return float(loss.asscalar()), grads

    def set_optimizer(self, optimizer):
        self.optimizer = optimizer
        params = self.native.collect_params()
        if isinstance(optimizer, SGD):  # MXNet's momentum form equals the canonical one at constant lr
            self.trainer = gluon.Trainer(params, "sgd", {"learning_rate": optimizer.lr,
                                                         "momentum": optimizer.momentum, "wd": 0.0},
                                         kvstore=None, update_on_kvstore=False)
        elif isinstance(optimizer, Adam):
            opt = _CanonicalAdam(learning_rate=optimizer.lr, beta1=optimizer.beta1, beta2=optimizer.beta2,
                                 epsilon=optimizer.epsilon, wd=0.0)
            self.trainer = gluon.Trainer(params, opt, kvstore=None, update_on_kvstore=False)
        else:
            raise BackendError(f"mxnet backend: unsupported optimizer {optimizer!r}")

    def _train_batch(self, x, y):
        loss = self._forward_backward(nd.array(x, ctx=self.ctx, dtype="float32"), self._labels(y))
        self.trainer.step(1)  # the loss is already a batch mean: step(batch_size) would rescale again
        return _Loss(loss)

    def sync(self):
        mx.nd.waitall()
