"""MXNet adapter: one hybridized Gluon HybridBlock walking the spec's graph in NCHW, canonical weights,
gluon.Trainer SGD/Adam. Layer kinds map to Gluon blocks through CONVERTERS."""
from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import platform

import numpy as np


def _env_int(var: str) -> int | None:
    value = os.environ.get(var, "").strip()
    return int(value) if value.isdigit() else None


def _own_default() -> int:
    """The OpenMP count MXNet gives operators with no thread variables set (src/engine/openmp.cc): half the
    cores on x86, where it assumes hyperthreads (1 on a 2-core machine), else all of them."""
    procs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(procs >> 1, 1) if platform.machine() in ("x86_64", "AMD64", "i386", "i686") else procs


def _omp_cap() -> int:
    """MXNet's cap on any operator's OpenMP threads: MXNET_OMP_MAX_THREADS, else OMP_NUM_THREADS, else its
    own default."""
    cap = _env_int("MXNET_OMP_MAX_THREADS") or _env_int("OMP_NUM_THREADS")
    return _OWN_DEFAULT if cap is None else cap


# MXNet reads its thread variables once, as it loads (src/engine/openmp.cc): OMP_NUM_THREADS set fixes every
# operator's OpenMP count for the process; unset, each operator follows its engine worker's own OpenMP setting.
_OMP_FIXED = bool(os.environ.get("OMP_NUM_THREADS"))
_OWN_DEFAULT = _own_default()
_OMP_CAP = _omp_cap()

# MXNet 1.x uses np.bool, which NumPy 1.24 removed (NumPy 2 brings it back): restore it before importing MXNet.
if "bool" not in vars(np):
    np.bool = bool

import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon, nd  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

from ..models.spec import (INPUT, NORMALIZATION_EPSILON, Activation, AdaptiveAvgPool2D, Add,  # noqa: E402
                           AvgPool2D, BatchNorm, Concatenate, Conv2D, Dense, Dropout, Flatten, GlobalAveragePooling2D,
                           LayerNormalization, MaxPool2D, Multiply, Normalization, Rescaling, ZeroPadding2D,
                           parse_activation)

from .base import (Adam, Adapter, BackendError, SGD, _check_int, as_inputs, converter, gpu_index,  # noqa: E402
                   inference_inputs)

HYBRIDIZE = {"static_alloc": True, "static_shape": True}  # static_shape still re-plans for other batch sizes


def _nd(a, ctx) -> nd.NDArray:
    """A float32 NDArray copy of a host array, copied by MXNet's engine thread, never by the Python thread:
    nd.array copies a large array (>~150k elements) with an OpenMP team on the calling thread, and from then
    on every operator the engine runs is ~2x slower on small steps (libgomp throttles its spinning once it
    manages more threads than cores: docs/design.md trap 21)."""
    host = np.array(a, dtype=np.float32, order="C")  # our own copy: from_numpy shares it and marks it read-only
    return nd.from_numpy(host, zero_copy=True).copyto(ctx)


class _Softmax(nn.HybridBlock):
    """Softmax over channels/features (axis 1 of the canonical layout); gluon's Activation has none."""

    def hybrid_forward(self, F, x):
        return F.softmax(x, axis=1)


class _GeluTanh(nn.HybridBlock):
    """GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written out: MXNet's
    LeakyReLU(act_type='gelu') is the exact (erf) form."""

    def hybrid_forward(self, F, x):
        return 0.5 * x * (1 + F.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


class _Pad(nn.HybridBlock):
    """Constant padding ((top, bottom), (left, right)) of an NCHW tensor: TF "same" may pad one more pixel
    at the bottom/right, which the symmetric padding of MXNet's convolution and pooling cannot express."""

    def __init__(self, pads, value: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        (pt, pb), (pl, pr) = pads
        self._width, self._value = (0, 0, 0, 0, pt, pb, pl, pr), value

    def hybrid_forward(self, F, x):
        return F.pad(x, mode="constant", constant_value=self._value, pad_width=self._width)


class _PaddedAvgPool(nn.HybridBlock):
    """Average pooling with asymmetric pads (and any ceil_mode overhang) padded here: a window sum over the
    zero-padded input divided by the cells the spec counts under each window (`counted`: 1 on a counted cell of
    the padded input; the divisors a constant map)."""

    def __init__(self, pads, kernel, strides, counted: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        self._pad, self._kernel, self._strides = _Pad(pads), kernel, strides
        (kh, kw), (sh, sw) = kernel, strides
        count = np.lib.stride_tricks.sliding_window_view(counted, (kh, kw))[::sh, ::sw].sum(axis=(2, 3))
        self.count = self.params.get_constant("count", count[None, None].astype(np.float32))

    def hybrid_forward(self, F, x, count):
        s = F.Pooling(self._pad(x), kernel=self._kernel, stride=self._strides, pool_type="sum",
                      pooling_convention="valid")
        return F.broadcast_div(s, count)


class _Multiply(nn.HybridBlock):
    """Elementwise product; with a per-channel gate (index `gate`) it broadcasts over H and W."""

    def __init__(self, gate: int | None, **kwargs):
        super().__init__(**kwargs)
        self._gate = gate

    def hybrid_forward(self, F, x, *rest):
        if self._gate is not None:
            xs = (x,) + rest
            image, gate = xs[1 - self._gate], xs[self._gate]
            return F.broadcast_mul(image, F.reshape(gate, (0, 0, 1, 1)))  # (N, C) or (N, C, 1, 1) -> (N, C, 1, 1)
        for t in rest:
            x = x * t
        return x


class _Normalization(nn.HybridBlock):
    """(x - mean) / max(sqrt(variance), 1e-7) per channel or feature; mean and variance take no gradient."""

    def __init__(self, channels: int, image: bool, **kwargs):
        super().__init__(**kwargs)
        self._shape = (1, channels, 1, 1) if image else (1, channels)
        self.mean = self.params.get("mean", shape=(channels,), init="zeros", grad_req="null")
        self.variance = self.params.get("variance", shape=(channels,), init="ones", grad_req="null")

    def hybrid_forward(self, F, x, mean, variance):
        scale = F.maximum(F.sqrt(variance), NORMALIZATION_EPSILON)
        return F.broadcast_div(F.broadcast_sub(x, F.reshape(mean, self._shape)), F.reshape(scale, self._shape))


class _Elementwise(nn.HybridBlock):
    """A pointwise function of one input, written with MXNet's operators (fn(F, x))."""

    def __init__(self, fn, **kwargs):
        super().__init__(**kwargs)
        self._fn = fn

    def hybrid_forward(self, F, x):
        return self._fn(F, x)


def _relu6(F, x):
    # MXNet's clip passes the gradient at its bounds; the spec's relu6 has none at 0 and 6, as relu at 0 (trap 34)
    inside = F.broadcast_logical_and(x > 0, x < 6)
    return F.where(inside, x, F.BlockGrad(F.clip(x, 0, 6)))


def _hard_sigmoid(F, x):
    # relu6(x + 3) / 6, the spec's. Not MXNet's hard_sigmoid: its defaults (alpha 0.2, beta 0.5) are Keras 2's
    # (trap 28), and hybridized, its backward writes over its output gradient where another node still reads it
    # (trap 38)
    return _relu6(F, x + 3) / 6


class _GlobalAvgPool(nn.HybridBlock):
    """Global average pooling by MXNet's pooling op: its mean over (2, 3) took 5x as long."""

    def __init__(self, keepdims: bool, **kwargs):
        super().__init__(**kwargs)
        self._keepdims = keepdims

    def hybrid_forward(self, F, x):
        pooled = F.Pooling(x, kernel=(1, 1), global_pool=True, pool_type="avg")
        return pooled if self._keepdims else F.Flatten(pooled)


class _Merge(nn.HybridBlock):
    """Add (elementwise sum) or Concatenate (along canonical axis 1) of several inputs."""

    def __init__(self, concat: bool, **kwargs):
        super().__init__(**kwargs)
        self._concat = concat

    def hybrid_forward(self, F, x, *rest):
        return F.concat(x, *rest, dim=1) if self._concat else F.add_n(x, *rest)


class _Graph(nn.HybridBlock):
    """The spec's graph: one child block per node, registered as node0, node1, ... (by position, never by
    MXNet's counter-carrying names); hybrid_forward runs them in topological order."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.nodes: list[tuple[str, str, tuple[str, ...]]] = []  # (layer name, child attribute, inputs)

    def add_node(self, name: str, block: nn.HybridBlock, inputs: tuple[str, ...]) -> None:
        attr = f"node{len(self.nodes)}"
        setattr(self, attr, block)  # registers the child
        self.nodes.append((name, attr, inputs))

    def walk(self, x):
        """Every node's output by layer name (the last one is the graph's output)."""
        values = {INPUT: x}
        for name, attr, inputs in self.nodes:
            values[name] = getattr(self, attr)(*(values[i] for i in inputs))
        del values[INPUT]
        return values

    def hybrid_forward(self, F, x):
        return self.walk(x)[self.nodes[-1][0]]


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
        if self.binary:  # softplus(z) - z * y; softrelu is overflow-safe and its gradient is sigmoid(z). Not
            # max(z, 0) - z*y + log(1 + exp(-|z|)): at z == 0 exactly the kinks of relu and |z| both give
            # gradient 0 where the true one is 1/2 (trap 22)
            loss = F.Activation(z, act_type="softrelu") - z * F.reshape_like(y, z)
        else:
            s = F.broadcast_sub(z, F.BlockGrad(F.max(z, axis=1, keepdims=True)))
            loss = F.log(F.sum(F.exp(s), axis=1)) - F.pick(s, y, axis=1)
        return F.mean(loss)


class _WithLoss(nn.HybridBlock):
    """Network and loss as one hybridized block: one cached graph per training step instead of two (measured
    ~5% more samples/s on small, host-bound steps)."""

    def __init__(self, net: nn.HybridBlock, loss: nn.HybridBlock, **kwargs):
        super().__init__(**kwargs)
        self.net, self.loss = net, loss

    def hybrid_forward(self, F, x, y):
        return self.loss(self.net(x), y)


class _CanonicalAdam(mx.optimizer.Adam):
    """Adam with epsilon added after bias correction (Kingma & Ba, Algorithm 1; PyTorch).

    MXNet folds the bias correction into the step size, lr * sqrt(1 - b2^t) / (1 - b1^t), and adds
    epsilon to sqrt(v) uncorrected; scaling epsilon by sqrt(1 - b2^t) makes the two updates equal.
    Its kernel takes the betas as float32: the bias corrections here use the same float32 betas, else a beta
    near 1 (1 - 1e-6: 1 - beta off by 1.3 %) corrects moments it did not make (weights 0.7 % off the oracle's).
    """

    def __init__(self, epsilon: float, beta1: float, beta2: float, **kwargs):
        beta1, beta2 = float(np.float32(beta1)), float(np.float32(beta2))
        super().__init__(epsilon=epsilon, beta1=beta1, beta2=beta2, **kwargs)
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


# --- converters: spec layer -> (Gluon block, {param: (gluon Parameter, transposed Dense kernel?)}) ---------
def _activation(spec: str) -> nn.HybridBlock | None:
    """The Gluon block computing one spec activation (None for linear)."""
    kind, alpha = parse_activation(spec)
    if kind == "linear":
        return None
    if kind in ("relu", "sigmoid", "tanh"):
        return nn.Activation(kind)
    return {"softplus": lambda: nn.Activation("softrelu"), "softmax": _Softmax,
            "leaky_relu": lambda: nn.LeakyReLU(alpha), "elu": lambda: nn.ELU(alpha),
            "silu": nn.Swish, "gelu": nn.GELU,  # GELU: LeakyReLU(act_type='gelu'), the exact erf form
            "gelu_tanh": _GeluTanh,
            "relu6": lambda: _Elementwise(_relu6),
            "hard_sigmoid": lambda: _Elementwise(_hard_sigmoid),
            "hard_swish": lambda: _Elementwise(lambda F, x: x * _hard_sigmoid(F, x))}[kind]()


def _sequence(*parts: nn.HybridBlock | None) -> nn.HybridBlock:
    parts = [p for p in parts if p is not None]
    if len(parts) == 1:
        return parts[0]
    seq = nn.HybridSequential()
    seq.add(*parts)
    return seq


def _dense(layer: Dense, info):
    # flatten=False: the spec flattens explicitly; Gluon's weight is (out, in), the canonical kernel (in, out)
    core = nn.Dense(layer.units, flatten=False, in_units=info.in_shape[0])
    return _sequence(core, _activation(layer.activation)), {"kernel": (core.weight, True), "bias": (core.bias, False)}


def _conv2d(layer: Conv2D, info):
    (pt, pb), (pl, pr) = layer.pads(info.in_shape)
    symmetric = pt == pb and pl == pr
    # kernel (out, in // groups, kh, kw): the canonical layout, grouped and depthwise included
    core = nn.Conv2D(layer.filters, layer.param_shapes(info.in_shape)["kernel"][2:], strides=layer.strides,
                     padding=(pt, pl) if symmetric else (0, 0), dilation=layer.dilation, groups=layer.groups,
                     in_channels=info.in_shape[0], use_bias=layer.use_bias)
    params = {"kernel": (core.weight, False)} | ({"bias": (core.bias, False)} if layer.use_bias else {})
    pad = None if symmetric else _Pad(((pt, pb), (pl, pr)))
    return _sequence(pad, core, _activation(layer.activation)), params


def _pool(layer, info):
    (k, s), ((pt, pb), (pl, pr)) = layer.window(), layer.pads(info.in_shape)
    is_max = isinstance(layer, MaxPool2D)
    floor = dataclasses.replace(layer, ceil_mode=False).output_hw(info.in_shape)
    if pt == pb and pl == pr and layer.output_hw(info.in_shape) == floor:
        # MXNet's max ignores padded cells; every window lies in the padded input, so count_include_pad means
        # the spec's. Its ceil convention ('full') keeps a last window that starts in the padding, torch's drops
        # it (trap 29): a ceil_mode that adds windows is padded here instead
        kw = {} if is_max else {"count_include_pad": layer.count_include_pad}
        pool = (nn.MaxPool2D if is_max else nn.AvgPool2D)(pool_size=k, strides=s, padding=(pt, pl),
                                                          ceil_mode=False, **kw)  # floor: 'valid' convention
        return pool, {}
    eh, ew = layer.overhang(info.in_shape)
    pads = (pt, pb + eh), (pl, pr + ew)  # the overhang of a ceil_mode window padded too: then a floor pool
    out = layer.output_hw(info.in_shape)
    if is_max and pt == pl == 0 and all(n >= kn and -(-(n - kn) // sn) + 1 == o and (o - 1) * sn < n
                                        for n, kn, sn, o in zip(info.in_shape[1:], k, s, out)):
        # padding only after the input ("same" at stride 2 on an even side): 'full' takes exactly those windows,
        # each starting inside the input, without a Pad op (MXNet's costs 2.4x the pool itself)
        return nn.MaxPool2D(pool_size=k, strides=s, padding=0, ceil_mode=True), {}
    if is_max:  # the lowest float32 never wins a max, and every window holds a real cell
        return _sequence(_Pad(pads, float(np.finfo(np.float32).min)),
                         nn.MaxPool2D(pool_size=k, strides=s, padding=0)), {}
    h, w = info.in_shape[1:]
    if layer.count_include_pad:  # the explicit pads count, the overhang never does
        counted = np.pad(np.ones((h + pt + pb, w + pl + pr)), ((0, eh), (0, ew)))
    else:
        counted = np.pad(np.ones((h, w)), pads)
    return _PaddedAvgPool(pads, k, s, counted), {}


def _multiply(layer: Multiply, info):
    return _Multiply(Multiply.gate(info.in_shapes)), {}


def _normalization(layer: Normalization, info):
    norm = _Normalization(info.in_shape[0], len(info.in_shape) == 3)
    return norm, {"mean": (norm.mean, False), "variance": (norm.variance, False)}


def _layernorm(layer: LayerNormalization, info):
    ln = nn.LayerNorm(axis=1, epsilon=layer.epsilon, in_channels=info.in_shape[0])  # channels of NCHW, or features
    return ln, {"gamma": (ln.gamma, False), "beta": (ln.beta, False)}


def _batchnorm(layer: BatchNorm, info):
    # MXNet's momentum weighs the old value and its moving variance is biased: the canonical meaning.
    bn = nn.BatchNorm(axis=1, momentum=layer.momentum, epsilon=layer.epsilon, in_channels=info.in_shape[0])
    return bn, {"gamma": (bn.gamma, False), "beta": (bn.beta, False), "moving_mean": (bn.running_mean, False),
                "moving_var": (bn.running_var, False)}


CONVERTERS = {
    Dense: _dense,
    Conv2D: _conv2d,
    MaxPool2D: _pool,
    AvgPool2D: _pool,
    GlobalAveragePooling2D: lambda layer, info: (_GlobalAvgPool(layer.keepdims), {}),
    # contrib's adaptive pooling: torch's bins (the spec's), larger outputs included
    AdaptiveAvgPool2D: lambda layer, info: (
        nn.HybridLambda(lambda F, x: F.contrib.AdaptiveAvgPooling2D(x, output_size=info.out_shape[1:])), {}),
    ZeroPadding2D: lambda layer, info: (_Pad(layer.pads()), {}),
    Flatten: lambda layer, info: (nn.Flatten(), {}),  # row-major over (C, H, W): the canonical order
    Activation: lambda layer, info: (_activation(layer.activation) or nn.HybridLambda("identity"), {}),
    Dropout: lambda layer, info: (nn.Dropout(layer.rate), {}),
    BatchNorm: _batchnorm,
    Add: lambda layer, info: (_Merge(concat=False), {}),
    Concatenate: lambda layer, info: (_Merge(concat=True), {}),
    Multiply: _multiply,
    Rescaling: lambda layer, info: (_Elementwise(lambda F, x: x * layer.scale + layer.offset), {}),
    Normalization: _normalization,
    LayerNormalization: _layernorm,
}


_SYNC_FUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


class _Context(ctypes.Structure):
    """mxnet::Context as the C API takes it; dev_type 1 is the CPU."""
    _fields_ = [("dev_type", ctypes.c_int), ("dev_id", ctypes.c_int)]


def _on_cpu_worker(fn):
    """fn() run on the engine's CPU worker, the thread that runs every CPU operator, and its result: OpenMP
    settings are per thread, so the worker's can only be set and read there."""
    out = []

    def call(_run_ctx, _param):
        try:
            out.append((True, fn()))
        except Exception as e:  # an exception cannot cross the C callback: carried back instead
            out.append((False, e))
    callback = _SYNC_FUNC(call)
    mx.base.check_call(mx.base._LIB.MXEnginePushSync(callback, None, None, ctypes.byref(_Context(1, 0)),
                                                     None, 0, None, 0, None, 0, None))
    mx.nd.waitall()
    ok, value = out[0]
    if not ok:
        raise value
    return value


def _libgomp():
    """The OpenMP runtime MXNet's Linux wheels link, or None elsewhere: only to read the worker's count."""
    try:
        return ctypes.CDLL("libgomp.so.1")
    except OSError:
        return None


class MXNetAdapter(Adapter):
    """A _Graph HybridBlock, hybridized with static memory; weights are mapped by canonical key through the
    converters' bindings: MXNet's parameter names carry global counters."""

    name = "mxnet"

    @classmethod
    def version(cls) -> str:
        return f"mxnet {mx.__version__}"

    @property
    def execution_path(self) -> str:  # hybridized is MXNet's compiled path: compile=True changes nothing
        return "hybridized, static alloc"

    @property
    def settings(self) -> dict:
        """The performance settings in effect, recorded with each timing."""
        return {"hybridize": dict(HYBRIDIZE), "engine": os.environ.get("MXNET_ENGINE_TYPE", "ThreadedEnginePerDevice"),
                "cpu_worker_threads": _env_int("MXNET_CPU_WORKER_NTHREADS") or 1,
                "omp_threads": self.omp_threads, "omp_threads_fixed_at_load": _OMP_FIXED, "kvstore": None}

    @property
    def omp_threads(self) -> int | None:
        """The OpenMP threads each CPU operator uses, read from the engine worker where MXNet follows it
        (None where the OpenMP runtime cannot be asked); omp_get_max_threads() in Python's thread says nothing."""
        if _OMP_FIXED:
            return _OMP_CAP
        gomp = _libgomp()
        return None if gomp is None else min(_on_cpu_worker(gomp.omp_get_max_threads), _OMP_CAP)

    def thread_choices(self, threads: int) -> list[int]:
        """OpenMP counts this network's operators can switch between in place: threads, threads // 2, ..., 1
        (at most MXNet's cap), the one nearest MXNet's own default first, so that a near tie keeps MXNet's
        choice; none on GPU or where OMP_NUM_THREADS was set as MXNet loaded."""
        top = min(threads, _OMP_CAP)
        if self.ctx.device_type != "cpu" or _OMP_FIXED or top < 2:
            return []
        choices = [top]
        while choices[-1] > 1:
            choices.append(choices[-1] // 2)
        own = min(choices, key=lambda c: (abs(c - _OWN_DEFAULT), c))
        return [own] + [c for c in choices if c != own]

    def use_threads(self, n: int) -> None:
        """Run every later CPU operator with n OpenMP threads (up to MXNet's cap): set on the engine worker."""
        n = _check_int("threads", n, 1)
        _on_cpu_worker(lambda: mx.base.check_call(mx.base._LIB.MXSetNumOMPThreads(ctypes.c_int(n))))

    @property
    def device_name(self) -> str:
        return str(self.ctx) if self.ctx.device_type == "gpu" else super().device_name

    def _seed(self, seed: int) -> None:
        mx.random.seed(seed, ctx=self.ctx)

    def _build(self) -> None:
        index = gpu_index(self.device, "mxnet", mx.context.num_gpus())
        self.ctx = mx.cpu() if index is None else mx.gpu(index)
        self.infos = self.spec.logits_infos()
        self._params = {}  # canonical key -> (gluon Parameter, whether it is a transposed Dense kernel)
        self.native = _Graph()
        with self.native.name_scope():
            for info in self.infos:
                block, params = converter(CONVERTERS, info, "mxnet")(info.layer, info)
                self.native.add_node(info.name, block, info.inputs)
                self._params.update({f"{info.name}/{k}": p for k, p in params.items()})
        self.native.initialize(ctx=self.ctx)  # gluon's default init; canonical weights are set after
        self.native.hybridize(**HYBRIDIZE)
        self._train_net = _WithLoss(self.native, _MeanLoss(binary=self.spec.num_classes == 1))
        self._train_net.hybridize(**HYBRIDIZE)
        if self.ctx.device_type == "cpu" and not _OMP_FIXED:
            # the worker starts with min(cores, cap) threads: a cap above the core count is asked for
            self.use_threads(_OMP_CAP)

    # --- weights ---------------------------------------------------------------------------------
    def get_weights(self):
        out = {}
        for k, (p, tr) in self._params.items():
            a = p.data().asnumpy()
            out[k] = np.ascontiguousarray(a.T if tr else a, dtype=np.float32)
        return out

    def _set_weights(self, weights):
        for k, (p, tr) in self._params.items():
            w = np.asarray(weights[k], np.float32)
            p.set_data(_nd(w.T if tr else w, self.ctx))  # in place: keeps static_alloc

    # --- data ------------------------------------------------------------------------------------
    def _array(self, x) -> nd.NDArray:
        return _nd(as_inputs(self.spec, x), self.ctx)

    def _labels(self, y) -> nd.NDArray:
        return _nd(y, self.ctx)  # pick() and the BCE take float labels

    def _to_device(self, x, y) -> tuple[nd.NDArray, nd.NDArray]:
        """One batch as NDArrays on this network's context, for _train_batch. Make one pair per batch:
        slicing one big NDArray inside autograd.record halves training speed (docs/design.md trap 14)."""
        return self._array(x), self._labels(y)

    # --- inference -------------------------------------------------------------------------------
    def logits(self, x):
        return self.native(_nd(inference_inputs(self.spec, x), self.ctx)).asnumpy()

    def layer_outputs(self, x):
        # each child block runs on its own (hybridized) graph: the outputs of every node, not just the last
        return {name: v.asnumpy() for name, v in self.native.walk(self._array(x)).items()}

    # --- training --------------------------------------------------------------------------------
    def _forward_backward(self, x, y) -> nd.NDArray:
        """Training-mode mean loss, with its gradients written (not accumulated) into the parameters."""
        with autograd.record(train_mode=True):
            loss = self._train_net(x, y)
        loss.backward()
        return loss

    def _loss_and_grads(self, x, y):
        # MXNet's BatchNorm moves its running statistics during backward: save them and put them back.
        stats = [p for k, (p, _) in self._params.items() if k.endswith(("/moving_mean", "/moving_var"))]
        saved = [p.data().copy() for p in stats]
        loss = self._forward_backward(*self._to_device(x, y))
        for p, v in zip(stats, saved):
            p.set_data(v)
        grads = {}
        for k in self.spec.trainable_keys():
            p, tr = self._params[k]
            g = p.grad().asnumpy()
            grads[k] = np.ascontiguousarray(g.T if tr else g)
        return float(loss.asscalar()), grads

    def _set_optimizer(self, optimizer):
        self.optimizer = optimizer
        params = self.native.collect_params()
        if isinstance(optimizer, SGD):  # MXNet's momentum form equals the canonical one at constant lr
            opt = mx.optimizer.SGD(learning_rate=optimizer.lr, momentum=optimizer.momentum, wd=0.0)
        elif isinstance(optimizer, Adam):
            opt = _CanonicalAdam(learning_rate=optimizer.lr, beta1=optimizer.beta1, beta2=optimizer.beta2,
                                 epsilon=optimizer.epsilon, wd=0.0)
        else:
            raise BackendError(f"mxnet backend: unsupported optimizer {optimizer!r}")
        # one device: no kvstore, the Trainer updates the weights itself
        self.trainer = gluon.Trainer(params, opt, kvstore=None, update_on_kvstore=False)

    def _train_batch(self, x, y):
        """One step on numpy arrays, or on NDArrays already placed by to_device."""
        x = x if isinstance(x, nd.NDArray) else _nd(x, self.ctx)
        y = y if isinstance(y, nd.NDArray) else self._labels(y)
        loss = self._forward_backward(x, y)
        self.trainer.step(1)  # the loss is already a batch mean: step(batch_size) would rescale again
        return _Loss(loss)

    def sync(self):
        mx.nd.waitall()
