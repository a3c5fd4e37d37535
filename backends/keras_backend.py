"""Keras 3 adapters: one functional model built from the spec's graph, run on TensorFlow, JAX or PyTorch.

Keras picks its engine once per process from KERAS_BACKEND (the registry sets it before Keras loads), so a
process hosts one of KerasAdapter (TensorFlow), KerasJaxAdapter or KerasTorchAdapter. Model building and
weight mapping are shared; each engine class holds only its steps, device handling and settings.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # imported directly, not through the registry
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from ..models import (INPUT, Activation, AdaptiveAvgPool2D, Add, AvgPool2D, BatchNorm, Concatenate,  # noqa: E402
                      Conv2D, Dense, Dropout, Flatten, GlobalAveragePooling2D, LayerNormalization, MaxPool2D,
                      Multiply, Normalization, Rescaling, ZeroPadding2D)
from ..models.spec import NORMALIZATION_EPSILON, adaptive_bins, parse_activation  # noqa: E402

from .base import (Adam, Adapter, BackendError, SGD, as_inputs, converter, cpu_name, gpu_index,  # noqa: E402
                   inference_inputs)

ENGINE = keras.backend.backend()
if ENGINE == "tensorflow":
    import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
elif ENGINE == "jax":
    import jax
elif ENGINE == "torch":
    import torch

# TensorFlow's CPU Conv2D runs channels-last only (docs/design.md trap 2), and XLA (JAX) lays out convolutions itself.
# Keras on torch transposes channels-last tensors to torch's NCHW around every conv and pool: keep NCHW there.
DATA_FORMAT = "channels_first" if ENGINE == "torch" else "channels_last"
CHANNELS = 1 if DATA_FORMAT == "channels_first" else -1  # the canonical axis 1, in Keras' layout (flat: 1 == -1)


class KingmaBaAdam(keras.optimizers.Adam):
    """Adam with the canonical epsilon: w -= lr * m_hat / (sqrt(v_hat) + epsilon).

    keras.optimizers.Adam folds the bias corrections into the step size and adds epsilon to sqrt(v)
    before correcting, i.e. it uses epsilon * sqrt(1 - beta2^t) in place of epsilon. Written in keras.ops,
    so it runs on every engine (inside JAX's stateless_apply too).
    """

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr, g = ops.cast(learning_rate, dtype), ops.cast(gradient, dtype)
        t = ops.cast(self.iterations + 1, dtype)
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        # 1 - beta and log(beta) from the float64 betas, and 1 - beta^t as -expm1(t log beta): in float32 a beta
        # near 1 rounds (1 - 1e-7 by 19 %) and 1 - beta^t cancels; torch and the oracle see the exact betas.
        self.assign_add(m, ops.multiply(ops.subtract(g, m), 1 - self.beta_1))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(g), v), 1 - self.beta_2))
        m_hat = ops.divide(m, ops.negative(ops.expm1(ops.multiply(t, _log(self.beta_1)))))
        v_hat = ops.divide(v, ops.negative(ops.expm1(ops.multiply(t, _log(self.beta_2)))))
        self.assign_sub(variable, ops.divide(ops.multiply(lr, m_hat), ops.add(ops.sqrt(v_hat), self.epsilon)))


def _log(beta: float) -> float:
    """log(beta) in float64 (-inf for 0, where t * log(beta) gives 1 - 0^t = 1)."""
    return math.log(beta) if beta > 0 else -math.inf


def _keras_optimizer(optimizer):
    if isinstance(optimizer, SGD):  # Keras: m = mu*m - lr*g; w += m. The canonical form at constant lr
        return keras.optimizers.SGD(learning_rate=optimizer.lr, momentum=optimizer.momentum)
    if isinstance(optimizer, Adam):
        return KingmaBaAdam(learning_rate=optimizer.lr, beta_1=optimizer.beta1, beta_2=optimizer.beta2,
                            epsilon=optimizer.epsilon)
    raise BackendError(f"keras backend: unsupported optimizer {optimizer!r}")


# Keras maps a functional model's graph by recursion, one Python frame per layer on the longest path: at
# Python's default limit a spec of ~1000 layers fails with a RecursionError. The limit is raised while the model
# is built; 12,000 layers built and trained on Python 3.11. Beyond MAX_LAYERS, a BackendError.
MAX_LAYERS = 10_000


@contextlib.contextmanager
def _recursion_room(frames: int):
    """Python's recursion limit raised by `frames` for the block (pure-Python recursion: no C stack on 3.11+)."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(old + frames)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


# --- layers Keras lacks ---------------------------------------------------------------------------
class _Gather(keras.layers.Layer):
    """Reorders the features of a flat tensor: out[:, i] = x[:, index[i]] (layout bookkeeping, no weights)."""

    def __init__(self, index: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        self.index = np.asarray(index, np.int32)

    def call(self, x):
        return ops.take(x, self.index, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], len(self.index))


def _image_pads(pads) -> list:
    """((top, bottom), (left, right)) as the four-axis padding of a batch in DATA_FORMAT."""
    return [(0, 0), (0, 0), *pads] if DATA_FORMAT == "channels_first" else [(0, 0), *pads, (0, 0)]


def _spatial(a: np.ndarray) -> np.ndarray:
    """An (H, W) array shaped to broadcast over a batch in DATA_FORMAT."""
    return (a[None, None] if DATA_FORMAT == "channels_first" else a[None, :, :, None]).astype(np.float32)


class _PaddedPool(keras.layers.Layer):
    """A pool Keras has no option for (explicit padding, torch's ceil_mode, count_include_pad), built exactly:
    the input padded by the spec's pads plus the cells a ceil_mode window hangs past them (-inf for max, zeros for
    the average), a "valid" pool, and the average rescaled to the spec's divisor. Also TensorFlow's "same"
    average on torch, where Keras pads odd "same" pools by replicating edge cells (docs/design.md trap 17)."""

    def __init__(self, layer, in_shape, **kwargs):
        super().__init__(**kwargs)
        self.window, self.strides = layer.window()
        (pt, pb), (pl, pr) = layer.pads(in_shape)
        eh, ew = layer.overhang(in_shape)
        self.pads = (pt, pb + eh), (pl, pr + ew)
        self.max = isinstance(layer, MaxPool2D)
        if self.max:
            return
        (kh, kw), (sh, sw) = self.window, self.strides
        h, w = in_shape[1:]
        if layer.count_include_pad:  # the spec's pads count, the overhang never does
            counted = np.pad(np.ones((h + pt + pb, w + pl + pr)), ((0, eh), (0, ew)))
        else:
            counted = np.pad(np.ones((h, w)), self.pads)
        oh, ow = layer.output_hw(in_shape)
        count = np.array([[counted[i * sh:i * sh + kh, j * sw:j * sw + kw].sum() for j in range(ow)]
                          for i in range(oh)])
        self.scale = _spatial(kh * kw / count)

    def call(self, x):
        pads = _image_pads(self.pads)
        if self.max:
            return ops.max_pool(ops.pad(x, pads, constant_values=-np.inf), self.window, self.strides, "valid",
                                DATA_FORMAT)
        mean = ops.average_pool(ops.pad(x, pads), self.window, self.strides, "valid", DATA_FORMAT)
        return ops.multiply(mean, self.scale)


class _AdaptiveAvgPool(keras.layers.Layer):
    """torch's adaptive average pooling: each bin a rectangle, so rows and columns average apart, as products with
    fixed averaging matrices."""

    def __init__(self, in_hw, out_hw, **kwargs):
        super().__init__(**kwargs)
        self.rows, self.cols = (self._averaging(n, o) for n, o in zip(in_hw, out_hw))

    @staticmethod
    def _averaging(size: int, out: int) -> np.ndarray:
        m = np.zeros((out, size), np.float32)
        for i, (a, b) in enumerate(adaptive_bins(size, out)):
            m[i, a:b] = 1 / (b - a)
        return m

    def call(self, x):
        if DATA_FORMAT == "channels_first":
            return ops.einsum("jw,nciw->ncij", self.cols, ops.einsum("ih,nchw->nciw", self.rows, x))
        return ops.einsum("jw,niwc->nijc", self.cols, ops.einsum("ih,nhwc->niwc", self.rows, x))

    def compute_output_shape(self, input_shape):
        oh, ow = len(self.rows), len(self.cols)
        n = input_shape[0]
        return (n, input_shape[1], oh, ow) if DATA_FORMAT == "channels_first" else (n, oh, ow, input_shape[3])


class _Normalization(keras.layers.Layer):
    """(x - mean) / max(sqrt(variance), 1e-7) with mean and variance as variables. keras.layers.Normalization
    computes the same but reads constants snapshotted from its variables when built, so a later set_weights would
    not reach it."""

    def build(self, input_shape):
        shape = (input_shape[CHANNELS],)
        self.mean = self.add_weight(shape=shape, initializer="zeros", trainable=False, name="mean")
        self.variance = self.add_weight(shape=shape, initializer="ones", trainable=False, name="variance")

    def call(self, x):
        shape = (1, -1, 1, 1) if len(x.shape) == 4 and DATA_FORMAT == "channels_first" else (-1,)
        scale = ops.maximum(ops.sqrt(self.variance), NORMALIZATION_EPSILON)
        return ops.divide(ops.subtract(x, ops.reshape(self.mean, shape)), ops.reshape(scale, shape))


class _TorchLayerNorm(keras.layers.LayerNormalization):
    """Keras' LayerNormalization computed as (x - mean) / sqrt(var + epsilon) * gamma + beta. On torch Keras hands
    any axis to torch.layer_norm, which normalizes the last axes (axis 1 of NCHW fails), and whose x * rstd -
    mean * rstd leaves float32 residue where the spec's centred value is 0 (one channel: 1.5e-3 of gamma's grad)."""

    def call(self, x):
        shape = (1, -1, 1, 1) if len(x.shape) == 4 else (1, -1)
        mean, var = ops.moments(x, axes=self.axis, keepdims=True)
        xhat = ops.multiply(ops.subtract(x, mean), ops.rsqrt(ops.add(var, self.epsilon)))
        return ops.add(ops.multiply(xhat, ops.reshape(self.gamma, shape)), ops.reshape(self.beta, shape))


def _activation(kind: str):
    """A Keras activation callable for a spec activation string (None for linear)."""
    kind, alpha = parse_activation(kind)
    if kind == "linear":
        return None
    if kind == "leaky_relu":  # keras.layers.LeakyReLU defaults to 0.3, the spec to 0.2: always explicit
        return functools.partial(keras.activations.leaky_relu, negative_slope=alpha)
    if kind == "elu":
        return functools.partial(keras.activations.elu, alpha=alpha)
    if kind in ("gelu", "gelu_tanh"):  # keras.ops.gelu defaults to the tanh form (docs/design.md trap 18): explicit
        return functools.partial(keras.activations.gelu, approximate=kind == "gelu_tanh")
    if kind == "softmax":
        return functools.partial(keras.activations.softmax, axis=CHANNELS)
    if kind == "hard_swish":
        return keras.activations.hard_silu
    # relu, sigmoid, tanh, softplus, silu, relu6; Keras 3's hard_sigmoid is relu6(x + 3) / 6 (Keras 2's was not:
    # docs/design.md trap 28)
    return keras.activations.get(kind)


# --- converters: (layer, info) -> (call on the input tensors, {canonical param: (layer, attribute, kind)}) ---
# kind: "conv" (HWIO <-> OIHW), "depthwise" ((kh, kw, in, multiplier) <-> (in * multiplier, 1, kh, kw)), "rows"
# (axis 0 follows the input's flat permutation), None (as is).
def _single(block):
    return lambda xs: block(xs[0])


def _dense(layer, info):
    core = keras.layers.Dense(layer.units, activation=_activation(layer.activation), name=info.name)
    return _single(core), {"kernel": (core, "kernel", "rows"), "bias": (core, "bias", None)}


def _conv(layer, info):
    kernel = layer.param_shapes(info.in_shape)["kernel"][2:]
    pads = layer.pads(info.in_shape)
    explicit = layer.padding != "same" and any(v for side in pads for v in side)
    padding = "same" if layer.padding == "same" else "valid"
    common = dict(strides=layer.strides, padding=padding, data_format=DATA_FORMAT, dilation_rate=layer.dilation,
                  activation=_activation(layer.activation), use_bias=layer.use_bias, name=info.name)
    channels = info.in_shape[0]
    if layer.groups == channels and channels > 1:
        core = keras.layers.DepthwiseConv2D(kernel, depth_multiplier=layer.filters // channels, **common)
        bindings = {"kernel": (core, "kernel", "depthwise")}
    else:
        core = keras.layers.Conv2D(layer.filters, kernel, groups=layer.groups, **common)
        bindings = {"kernel": (core, "kernel", "conv")}
    if layer.use_bias:
        bindings["bias"] = (core, "bias", None)
    if not explicit:  # Keras "same" is TensorFlow's, over the dilated extent: the spec's meaning
        return _single(core), bindings
    pad = keras.layers.ZeroPadding2D(pads, data_format=DATA_FORMAT, name=f"{info.name}.pad")
    return _single(lambda x: core(pad(x))), bindings


def _pool(layer, info):
    window, strides = layer.window()
    (pt, pb), (pl, pr) = layer.pads(info.in_shape)
    if layer.padding == "same":
        # Keras' own "same": TensorFlow's, counting no padded cells; on torch odd pads replicate edge cells
        native = not layer.count_include_pad and not (
            isinstance(layer, AvgPool2D) and ENGINE == "torch" and (pt != pb or pl != pr))
    else:
        native = not any((pt, pb, pl, pr)) and not any(layer.overhang(info.in_shape))
    if not native:
        return _single(_PaddedPool(layer, info.in_shape, name=info.name)), {}
    cls = keras.layers.MaxPooling2D if isinstance(layer, MaxPool2D) else keras.layers.AveragePooling2D
    padding = "same" if layer.padding == "same" else "valid"
    return _single(cls(window, strides, padding, data_format=DATA_FORMAT, name=info.name)), {}


def _batchnorm(layer, info):
    # Same moving-average meaning and biased variance as the spec. Numerically TF normalises as
    # x * inv + (beta - mean * inv), which loses float32 digits where |mean| >> std (vs (x - mean) * inv).
    core = keras.layers.BatchNormalization(axis=CHANNELS, momentum=layer.momentum, epsilon=layer.epsilon,
                                           name=info.name)
    return _single(core), {key: (core, attr, "rows") for key, attr in (
        ("gamma", "gamma"), ("beta", "beta"), ("moving_mean", "moving_mean"), ("moving_var", "moving_variance"))}


def _layernorm(layer, info):
    cls = _TorchLayerNorm if ENGINE == "torch" else keras.layers.LayerNormalization
    core = cls(axis=CHANNELS, epsilon=layer.epsilon, name=info.name)
    return _single(core), {"gamma": (core, "gamma", "rows"), "beta": (core, "beta", "rows")}


def _normalization(layer, info):
    core = _Normalization(name=info.name)
    return _single(core), {"mean": (core, "mean", "rows"), "variance": (core, "variance", "rows")}


def _multiply(layer, info):
    core = keras.layers.Multiply(name=info.name)
    g = Multiply.gate(info.in_shapes)
    if g is None or len(info.in_shapes[g]) == 3:  # equal shapes, or a (C, 1, 1) gate: Keras broadcasts it
        return core, {}
    shape = (-1, 1, 1) if DATA_FORMAT == "channels_first" else (1, 1, -1)
    gate = keras.layers.Reshape(shape, name=f"{info.name}.gate")
    return lambda xs: core([gate(x) if k == g else x for k, x in enumerate(xs)]), {}


CONVERTERS = {
    Dense: _dense,
    Conv2D: _conv,
    MaxPool2D: _pool,
    AvgPool2D: _pool,
    BatchNorm: _batchnorm,
    # Flatten in the tensor's own order: (H, W, C) for channels-last, tracked as a permutation below.
    Flatten: lambda l, i: (_single(keras.layers.Flatten(data_format="channels_last", name=i.name)), {}),
    Activation: lambda l, i: (_single(keras.layers.Activation(_activation(l.activation) or "linear",
                                                              name=i.name)), {}),
    Dropout: lambda l, i: (_single(keras.layers.Dropout(l.rate, name=i.name)), {}),
    Add: lambda l, i: (keras.layers.Add(name=i.name), {}),
    Concatenate: lambda l, i: (keras.layers.Concatenate(axis=CHANNELS, name=i.name), {}),
    GlobalAveragePooling2D: lambda l, i: (_single(keras.layers.GlobalAveragePooling2D(
        DATA_FORMAT, keepdims=l.keepdims, name=i.name)), {}),
    ZeroPadding2D: lambda l, i: (_single(keras.layers.ZeroPadding2D(l.pads(), data_format=DATA_FORMAT,
                                                                    name=i.name)), {}),
    AdaptiveAvgPool2D: lambda l, i: (_single(_AdaptiveAvgPool(i.in_shape[1:], i.out_shape[1:], name=i.name)), {}),
    Multiply: _multiply,
    Rescaling: lambda l, i: (_single(keras.layers.Rescaling(l.scale, l.offset, name=i.name)), {}),
    Normalization: _normalization,
    LayerNormalization: _layernorm,
}


# --- flat permutations: keras_flat = canonical_flat[perm]; None when the orders agree ---------------
def _hwc_order(shape: tuple) -> np.ndarray | None:
    """For a (C, H, W) image flattened channels-last: the canonical (C, H, W) flat index of each position."""
    if DATA_FORMAT == "channels_first":
        return None
    perm = np.arange(np.prod(shape)).reshape(shape).transpose(1, 2, 0).ravel()
    return None if np.array_equal(perm, np.arange(perm.size)) else perm


def _perm_or_identity(perm, size: int) -> np.ndarray:
    return np.arange(size) if perm is None else perm


def _flat_order(order: str, info, in_perms: list) -> np.ndarray | None:
    """The flat order of a node's output (None: canonical, or an image) from its kind's flat_order trait."""
    if len(info.out_shape) == 3 or order == "new":
        return None
    if order == "flatten":
        return _hwc_order(info.in_shape) if len(info.in_shape) == 3 else in_perms[0]
    if order == "concatenate":
        if all(p is None for p in in_perms):
            return None
        offsets = np.cumsum([0] + [s[0] for s in info.in_shapes])
        return np.concatenate([_perm_or_identity(p, s[0]) + o for p, s, o in zip(in_perms, info.in_shapes, offsets)])
    if order in ("elementwise", "merge"):  # a merge's inputs were reordered into its first input's order
        return in_perms[0]
    raise BackendError(f"layer kind {info.layer.kind!r} (layer {info.index}, {info.name!r}): flat order trait "
                       f"{order!r} is unknown to the Keras backend")


def _same_perm(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def _canonical_output(h, perm, name: str):
    """A Keras tensor in the canonical layout: NCHW for images, (C, H, W) order for a flattened image."""
    if len(h.shape) == 4 and DATA_FORMAT == "channels_last":
        return keras.layers.Permute((3, 1, 2), name=f"{name}.nchw")(h)
    return h if perm is None else _Gather(np.argsort(perm), name=f"{name}.chw")(h)


class _KerasAdapter(Adapter):
    """The Keras model shared by the three engines: canonical NCHW inputs and outputs, Keras layout inside.

    One Keras layer per spec node, named after it (plus a ZeroPadding2D for explicit conv padding). A flattened
    channels-last image is in (H, W, C) order: each flat node carries that permutation, absorbed into the next
    Dense kernel's rows (and a flat BatchNorm's parameters), so the network itself never reorders features.
    """

    name = "keras"
    engine = "tensorflow"

    # --- engine hooks --------------------------------------------------------------------------------
    def _gpu_count(self) -> int:
        raise NotImplementedError

    def _use_device(self, index: int | None) -> None:
        """Remember the device (GPU index or None) and set what float32 equivalence needs there (TF32 off)."""

    def _after_build(self) -> None:
        """Compile the engine's functions for the built model."""

    @classmethod
    def version(cls) -> str:
        return f"keras {keras.__version__} / {cls.engine} {cls._engine_version()}"

    @property
    def settings(self) -> dict:
        """How this row runs, recorded beside its timings."""
        return {"engine": self.engine, "data_format": DATA_FORMAT}

    # --- build -----------------------------------------------------------------------------------------
    def _build(self) -> None:
        if ENGINE != self.engine:
            raise BackendError(f"{self.name} needs its own process: this one already runs Keras on {ENGINE}")
        index = gpu_index(self.device, f"{self.name} ({self.engine})", self._gpu_count())
        self._gpu = index is not None
        # "cpu", not "cpu:0": Keras on torch would copy each new parameter to "cpu:0", leaving a non-leaf tensor
        self._kdev = f"gpu:{index}" if self._gpu else "cpu"
        self._use_device(index)
        spec = self.spec
        self.infos = spec.logits_infos()
        self._binary = spec.num_classes == 1
        if len(self.infos) > MAX_LAYERS:
            raise BackendError(f"{self.name}: model {spec.name!r} has {len(self.infos)} layers; Keras builds a "
                               f"functional model by recursing through its graph, which this adapter allows for "
                               f"up to {MAX_LAYERS} layers")
        with self._on_device(), _recursion_room(3 * len(self.infos) + 100):
            self._build_model()
        self._after_build()

    def _on_device(self):
        return keras.device(self._kdev)

    def _seed(self, seed: int) -> None:
        # a Dropout made without a seed draws one from Python's per-process random state
        drops = [layer.seed_generator for layer in self.native.layers
                 if isinstance(layer, keras.layers.Dropout) and hasattr(layer, "seed_generator")]  # rate 0: none
        for k, generator in enumerate(drops):
            state = generator.state
            state.assign(np.array([seed * len(drops) + k, 0], dtype=keras.backend.standardize_dtype(state.dtype)))

    def _build_model(self) -> None:
        spec = self.spec
        inputs = keras.Input(self._native_shape(spec.input_shape), name=INPUT)
        tensors = {INPUT: inputs}
        perms, params = {INPUT: None}, {}
        for info in self.infos:
            layer = info.layer
            call, bindings = converter(CONVERTERS, info, self.name)(layer, info)
            xs, in_perms = [tensors[n] for n in info.inputs], [perms[n] for n in info.inputs]
            order = type(layer).flat_order
            gate = Multiply.gate(info.in_shapes) if isinstance(layer, Multiply) else None
            if gate is not None:  # an image times a per-channel gate: a flat gate in canonical (channel) order
                if in_perms[gate] is not None:
                    xs[gate] = _Gather(np.argsort(in_perms[gate]), name=f"{info.name}.in{gate}")(xs[gate])
                in_perms = [None] * len(xs)
            elif order == "merge" and any(not _same_perm(p, in_perms[0]) for p in in_perms):
                # Inputs flattened in different orders: reorder each into the first input's order.
                size = info.in_shapes[0][0]
                target = _perm_or_identity(in_perms[0], size)
                xs = [x if _same_perm(p, in_perms[0]) else
                      _Gather(np.argsort(_perm_or_identity(p, size))[target], name=f"{info.name}.in{k}")(x)
                      for k, (x, p) in enumerate(zip(xs, in_perms))]
            if not self.native_init:
                # Canonical weights replace these at once. Keras' random initialisers would be wasted work, and
                # on JAX each compiles an XLA program per shape (1.3 s of lenet5's 1.8 s build on 2 cores).
                for core, attr, _ in bindings.values():
                    setattr(core, f"{attr}_initializer", keras.initializers.Zeros())
            tensors[info.name] = call(xs)
            perms[info.name] = _flat_order(order, info, in_perms)
            for key, (core, attr, kind) in bindings.items():
                params[f"{info.name}/{key}"] = (getattr(core, attr), kind, in_perms[0] if kind == "rows" else None)
        outputs = [_canonical_output(tensors[i.name], perms[i.name], i.name) for i in self.infos]
        self.native = keras.Model(inputs, outputs[-1], name=re.sub(r"[^A-Za-z0-9_.-]", "_", spec.name) or "model")
        self._probe = keras.Model(inputs, outputs)
        # canonical key -> (Keras variable, binding kind, flat permutation of axis 0 or None), spec order
        self._params = {k: params[k] for k in spec.param_shapes()}
        trainable = spec.trainable_keys()
        self._trainable = [self._params[k][0] for k in trainable]
        self._stats = [v for k, (v, _, _) in self._params.items() if k not in trainable]  # BatchNorm statistics

    # --- weights -----------------------------------------------------------------------------------------
    @staticmethod
    def _to_canonical(a: np.ndarray, kind: str | None, perm: np.ndarray | None) -> np.ndarray:
        if kind == "conv":
            a = a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif kind == "depthwise":  # (kh, kw, in, m) -> (in * m, 1, kh, kw): output channel c * m + j reads c
            a = a.transpose(2, 3, 0, 1).reshape(-1, 1, *a.shape[:2])
        elif perm is not None:
            a = a[np.argsort(perm)]
        return np.ascontiguousarray(a, dtype=np.float32)

    @staticmethod
    def _to_native(a: np.ndarray, kind: str | None, perm: np.ndarray | None, shape: tuple) -> np.ndarray:
        """A canonical array in the layout of a Keras variable of `shape`."""
        if kind == "conv":
            return np.ascontiguousarray(a.transpose(2, 3, 1, 0))  # OIHW -> HWIO
        if kind == "depthwise":
            kh, kw, c, m = shape
            return np.ascontiguousarray(a.reshape(c, m, kh, kw).transpose(2, 3, 0, 1))
        return a if perm is None else a[perm]

    def get_weights(self):
        return {k: self._to_canonical(ops.convert_to_numpy(v.value), kind, perm)
                for k, (v, kind, perm) in self._params.items()}

    def _set_weights(self, weights):
        with self._on_device():
            for k, (v, kind, perm) in self._params.items():
                v.assign(self._to_native(np.asarray(weights[k], np.float32), kind, perm, v.shape))

    # --- shared pieces -----------------------------------------------------------------------------------
    def _loss(self, z, y):
        """Mean loss from canonical logits, as backends.base.loss_and_dlogits: Keras' own ops on every engine."""
        if ENGINE == "tensorflow":
            # Keras on TensorFlow swaps a softmax/sigmoid output (one that carries `_keras_logits`, or a Softmax
            # op) for its input, from_logits or not: a Dense(softmax) the spec hands on through a linear
            # Activation would be trained as if it had no softmax. A new tensor carries neither.
            z = tf.identity(z)
        if self._binary:
            y = ops.reshape(ops.cast(y, z.dtype), (-1, 1))
            return ops.mean(ops.binary_crossentropy(y, z, from_logits=True))
        return ops.mean(ops.sparse_categorical_crossentropy(y, z, from_logits=True))

    def layer_outputs(self, x):
        x = as_inputs(self.spec, x)
        with self._on_device():
            outs = self._probe(self._input(x), training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]  # a one-layer model returns a bare tensor
        return {i.name: ops.convert_to_numpy(o) for i, o in zip(self.infos, outs)}

    def _nhwc(self) -> bool:
        return len(self.spec.input_shape) == 3 and DATA_FORMAT == "channels_last"

    def _native_shape(self, shape: tuple) -> tuple:
        return (*shape[1:], shape[0]) if self._nhwc() else tuple(shape)

    def _input(self, x: np.ndarray) -> np.ndarray:
        """Canonical NCHW inputs in the model's layout, transposed on the host: training batches once, as a Keras
        user's data pipeline delivers them (not by a transpose inside the timed graph); TensorFlow's inference
        batches on each call (its in-graph Transpose cost 4-6 % of a batch-1 call)."""
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if self._nhwc() else x

    def _grads_to_canonical(self, grads) -> dict[str, np.ndarray]:
        return {k: self._to_canonical(ops.convert_to_numpy(g), *self._params[k][1:])
                for k, g in zip(self.spec.trainable_keys(), grads)}


class KerasAdapter(_KerasAdapter):
    """Keras on TensorFlow: tf.function steps (a GradientTape), XLA with compile=True; NHWC (docs/design.md trap 2)."""

    name = "keras"
    engine = "tensorflow"

    @staticmethod
    def _engine_version():
        return tf.__version__

    @property
    def execution_path(self) -> str:
        return "tf.function + XLA" if self.compile else "tf.function graph"

    @property
    def settings(self):
        return {**super().settings, "jit": "tf.function", "xla": self.compile, "tf32": False if self._gpu else None}

    @classmethod
    def _set_threads(cls, n: int) -> None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(n)
        except RuntimeError:  # the runtime already started: the TF_NUM_*_THREADS variables have applied
            pass

    def _gpu_count(self):
        return len(tf.config.list_physical_devices("GPU"))

    def _use_device(self, index):
        if index is not None:
            tf.config.experimental.enable_tensor_float32_execution(False)  # TF32 would break float32 equivalence

    @property
    def device_name(self) -> str:
        if self._gpu:
            gpu = tf.config.list_physical_devices("GPU")[int(self._kdev.rsplit(":", 1)[1])]
            return tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
        return cpu_name()

    def peak_device_memory(self):
        return tf.config.experimental.get_memory_info(self._kdev.upper())["peak"] if self._gpu else None

    def _after_build(self):
        # Traced for the batch's exact shape, as Keras' own fit does (reduce_retracing): a later shape (the last
        # partial batch) adds one trace with a free batch size. A free batch size from the start (an
        # input_signature of None) cost 7 % of mlp b32's training speed (docs/performance.md).
        def forward(x):
            with self._on_device():  # placed in the traced graph: a call enters no device scope
                return self.native(x, training=False)

        self._logits_fn = tf.function(forward, reduce_retracing=True, jit_compile=self.compile)
        self._grads_fn = tf.function(self._grads_graph, reduce_retracing=True)
        self._step_fn = None

    def _grads_graph(self, x, y):
        saved = [tf.identity(v.value) for v in self._stats]  # the training call moves the BatchNorm statistics
        with tf.GradientTape() as tape:
            loss = self._loss(self.native(x, training=True), y)
        grads = tape.gradient(loss, self._trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        for v, s in zip(self._stats, saved):
            v.assign(s)
        return loss, grads

    def _step_graph(self, x, y):
        with tf.GradientTape() as tape:
            loss = self._loss(self.native(x, training=True), y)
        grads = tape.gradient(loss, self._trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        self._opt.apply_gradients(zip(grads, self._trainable))
        return loss

    def logits(self, x):
        return self._logits_fn(self._input(inference_inputs(self.spec, x))).numpy()

    def _loss_and_grads(self, x, y):
        with self._on_device():
            loss, grads = self._grads_fn(self._input(x), np.asarray(y, np.int64))
        return float(loss), self._grads_to_canonical(grads)

    def _set_optimizer(self, optimizer):
        opt = _keras_optimizer(optimizer)
        with self._on_device():
            opt.build(self._trainable)  # slots created eagerly, outside the traced step
        self.optimizer, self._opt = optimizer, opt
        self._step_fn = tf.function(self._step_graph, reduce_retracing=True,  # traces against the new slots
                                    jit_compile=self.compile)

    def _to_device(self, x, y):
        """Inputs and labels resident on the device, for timing without host copies."""
        with self._on_device():
            return tf.constant(self._input(x)), tf.constant(np.asarray(y, np.int64))

    def _train_batch(self, x, y):
        if isinstance(x, np.ndarray):
            x = self._input(x)
        with self._on_device():
            return self._step_fn(x, y)

    def sync(self):
        # CPU kernels of a tf.function call have run when it returns; GPU kernels may still be queued.
        if self._gpu:
            tf.test.experimental.sync_devices()


class KerasJaxAdapter(_KerasAdapter):
    """Keras on JAX: `model.stateless_call` and `optimizer.stateless_apply` under one `jax.jit` (Keras' guide).

    Between steps the state (trainable, non-trainable and optimizer values) lives in arrays the step returns;
    it is written back to the Keras variables only when weights are read, set or the optimizer changes.
    """

    name = "keras-jax"
    engine = "jax"

    @staticmethod
    def _engine_version():
        return jax.__version__

    def _graph_input(self, x):
        """Canonical NCHW inference inputs in the model's layout, inside the traced logits function: XLA folds
        the transpose into the first layer (a host transpose cost 2 % of cifar_cnn's b64 call)."""
        return ops.transpose(x, (0, 2, 3, 1)) if self._nhwc() else x

    @property
    def execution_path(self) -> str:
        return "jax.jit stateless_call (XLA)"

    @property
    def settings(self):
        return {**super().settings, "jit": "jax.jit", "xla": True,
                "matmul_precision": jax.config.jax_default_matmul_precision}

    def _gpu_count(self):
        try:
            return len(jax.devices("gpu"))
        except RuntimeError:  # no GPU platform in this jaxlib
            return 0

    def _use_device(self, index):
        if index is not None:  # float32 matmuls and convolutions, not TF32 (what "highest" means on GPU)
            jax.config.update("jax_default_matmul_precision", "highest")
        self._jdev = jax.devices("gpu")[index] if index is not None else jax.devices("cpu")[0]

    @property
    def device_name(self) -> str:
        return self._jdev.device_kind if self._gpu else cpu_name()

    def peak_device_memory(self):
        stats = self._jdev.memory_stats() if self._gpu else None
        return stats.get("peak_bytes_in_use") if stats else None

    def _after_build(self):
        model = self.native
        self._state = None  # (trainable, non-trainable, optimizer) values ahead of the Keras variables
        index = {id(v): i for i, v in enumerate(model.trainable_variables)}
        self._grad_index = [index[id(v)] for v in self._trainable]  # spec's trainable order -> Keras order

        def logits(tv, ntv, x):
            return model.stateless_call(tv, ntv, self._graph_input(x), training=False)[0]

        def loss_fn(tv, ntv, x, y):
            z, ntv = model.stateless_call(tv, ntv, x, training=True)
            return self._loss(z, y), ntv

        def grads(tv, ntv, x, y):  # the updated BatchNorm statistics are dropped: no state changes
            (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(tv, ntv, x, y)
            return loss, g

        def step(state, x, y):
            tv, ntv, ov = state
            (loss, ntv), g = jax.value_and_grad(loss_fn, has_aux=True)(tv, ntv, x, y)
            tv, ov = self._opt.stateless_apply(ov, g, tv)
            return loss, (tv, ntv, ov)

        self._logits_fn, self._grads_fn = jax.jit(logits), jax.jit(grads)
        self._step = step
        self._opt = None

    def _variables(self):
        return (self.native.trainable_variables, self.native.non_trainable_variables,
                self._opt.variables if self._opt is not None else [])

    def _pull(self):
        """The current state as arrays (from the variables when they are current)."""
        if self._state is None:
            # Committed to the device, as the step's outputs are: jit keys its cache on committedness, and
            # uncommitted variable values made the second step compile the whole step again (2 s for lenet5).
            self._state = jax.device_put(tuple([v.value for v in vs] for vs in self._variables()), self._jdev)
        return self._state

    def _push(self):
        """Write the state arrays back into the Keras variables."""
        if self._state is not None:
            with self._on_device():
                for vs, values in zip(self._variables(), self._state):
                    for v, a in zip(vs, values):
                        v.assign(a)
            self._state = None

    def get_weights(self):
        self._push()
        return super().get_weights()

    def _set_weights(self, weights):
        self._push()  # keeps the optimizer state
        super()._set_weights(weights)

    def layer_outputs(self, x):
        self._push()
        return super().layer_outputs(x)

    def _labels(self, y):
        return np.asarray(y, np.int32)  # JAX without x64 holds int32

    def logits(self, x):
        tv, ntv, _ = self._pull()
        # no device scope (it costs a tenth of lenet5's batch-1 call): jit runs where the committed state lives
        return np.asarray(self._logits_fn(tv, ntv, inference_inputs(self.spec, x)))

    def _loss_and_grads(self, x, y):
        tv, ntv, _ = self._pull()
        with self._on_device():
            loss, grads = self._grads_fn(tv, ntv, self._input(x), self._labels(y))
        return float(loss), self._grads_to_canonical([grads[i] for i in self._grad_index])

    def _set_optimizer(self, optimizer):
        opt = _keras_optimizer(optimizer)
        self._push()
        with self._on_device():
            opt.build(self.native.trainable_variables)
        self.optimizer, self._opt = optimizer, opt
        # traced anew: the step reads the optimizer's Python-level settings (momentum, betas) at trace time
        self._step_fn = jax.jit(self._step, donate_argnums=0 if self._gpu else ())  # the old state dies

    def _to_device(self, x, y):
        """Inputs and labels resident on the device, for timing without host copies."""
        return jax.device_put((self._input(x), self._labels(y)), self._jdev)

    def _train_batch(self, x, y):
        if isinstance(x, np.ndarray):
            x, y = self._input(x), self._labels(y)
        with self._on_device():
            loss, self._state = self._step_fn(self._pull(), x, y)
        return loss

    def sync(self):
        if self._state is not None:
            jax.block_until_ready(self._state)


class KerasTorchAdapter(_KerasAdapter):
    """Keras on PyTorch, Keras' guide loop: forward, `loss.backward()`, `optimizer.apply` under no_grad; NCHW."""

    name = "keras-torch"
    engine = "torch"

    def __init__(self, spec, device="cpu", compile=False, native_init=True):
        if compile:
            raise BackendError("keras-torch: compile is not supported (Keras on torch runs eagerly; "
                               "use the torch backend for torch.compile)")
        super().__init__(spec, device, compile, native_init)

    @staticmethod
    def _engine_version():
        return torch.__version__

    @property
    def execution_path(self) -> str:
        return "eager (Keras layers on torch)"

    @property
    def settings(self):
        return {**super().settings, "jit": None, "xla": False, "tf32": False if self._gpu else None,
                "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if self._gpu else None}

    @classmethod
    def _set_threads(cls, n: int) -> None:
        torch.set_num_threads(n)

    def _gpu_count(self):
        return torch.cuda.device_count()

    def _use_device(self, index):
        if index is not None:
            torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would break float32 equivalence
            torch.backends.cudnn.allow_tf32 = False
        self._tdev = torch.device("cuda", index) if index is not None else torch.device("cpu")

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self._tdev) if self._gpu else cpu_name()

    def peak_device_memory(self):
        return torch.cuda.max_memory_allocated(self._tdev) if self._gpu else None

    def _seed(self, seed: int) -> None:
        super()._seed(seed)
        torch.manual_seed(seed)  # Keras on torch drops unseeded layers with torch's global generator

    def _after_build(self):
        self._opt = None

    def _input(self, x):
        return torch.from_numpy(x).to(self._tdev)

    def _labels(self, y):
        return torch.from_numpy(np.asarray(y, np.int64)).to(self._tdev)

    def logits(self, x):
        with torch.no_grad(), self._on_device():
            return self.native(self._input(inference_inputs(self.spec, x)), training=False).cpu().numpy()

    def _backward(self, x, y):
        for v in self._trainable:
            v.value.grad = None
        loss = self._loss(self.native(x, training=True), y)
        loss.backward()
        return loss.detach()

    def _loss_and_grads(self, x, y):
        saved = [v.value.detach().clone() for v in self._stats]  # the training call moves BatchNorm statistics
        with self._on_device():
            loss = self._backward(self._input(x), self._labels(y))
        with torch.no_grad():
            for v, s in zip(self._stats, saved):
                v.value.copy_(s)
        grads = [v.value.grad if v.value.grad is not None else torch.zeros_like(v.value) for v in self._trainable]
        for v in self._trainable:
            v.value.grad = None
        return float(loss), self._grads_to_canonical(grads)

    def _set_optimizer(self, optimizer):
        opt = _keras_optimizer(optimizer)
        with self._on_device():
            opt.build(self._trainable)
        self.optimizer, self._opt = optimizer, opt

    def _to_device(self, x, y):
        """Inputs and labels resident on the device, for timing without host copies."""
        return self._input(as_inputs(self.spec, x)), self._labels(y)

    def _train_batch(self, x, y):
        if isinstance(x, np.ndarray):
            x, y = self._input(x), self._labels(y)
        with self._on_device():
            loss = self._backward(x, y)
            grads = [v.value.grad if v.value.grad is not None else torch.zeros_like(v.value)
                     for v in self._trainable]
            with torch.no_grad():
                self._opt.apply(grads, self._trainable)
        return loss

    def sync(self):
        if self._gpu:
            torch.cuda.synchronize(self._tdev)
