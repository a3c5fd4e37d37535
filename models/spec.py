"""Framework-neutral model spec: layer dataclasses, graph validation, shape/param/FLOP inference, JSON.

A spec is a list of layers in topological order. Each layer reads the previous layer's output unless it names
its `inputs` (layer names, or INPUT for the model input); the last layer is the model output. A plain stack
never names inputs, so Sequential specs and their JSON look exactly as before graphs existed.

Heads (the rule the loss and `predict` rely on): a final softmax or sigmoid (the last layer's `activation`, or a
final Activation layer) is the head, folded into the loss; `predict` applies it. A sigmoid head needs exactly 1
output (binary cross-entropy), a softmax head at least 2 (softmax cross-entropy); a head needs a flat
(features,) output and a layer before it that computes the logits; it may not sit on another softmax/sigmoid (it
would be applied twice), and a softmax/sigmoid may not be followed by Dropout (the loss would read its probabilities
as logits). Both are traced back through the layers that hand values on unchanged: Dropout, a linear Activation,
Flatten. Anywhere else softmax and sigmoid are ordinary activations. Without a head the logits are the output itself.
"""
from __future__ import annotations

import dataclasses
import json
import os
import stat
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh", "softmax", "leaky_relu", "elu", "softplus", "silu", "gelu",
               "gelu_tanh", "relu6", "hard_sigmoid", "hard_swish")
HEADS = ("softmax", "sigmoid")  # output activations the loss folds into its logits
NON_TRAINABLE = ("moving_mean", "moving_var", "mean", "variance")  # BatchNorm's and Normalization's statistics
INPUT = "input"  # reserved name addressing the model input in `inputs`
LEAKY_RELU_SLOPE = 0.2  # plain "leaky_relu": Keras 3's default (PyTorch's default is 0.01: a trap)
ELU_ALPHA = 1.0
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_PARAMS = 2_000_000_000        # ~8 GB of float32 weights
# Per sample, per tensor (outputs, padded inputs, a convolution's or pool's window matrix): 537 MB of float32. A
# check runs 8 samples through the float64 oracle, 8.6 GB for such a tensor.
MAX_ELEMENTS = 2 ** 27
MAX_SPEC_BYTES = 16 * 2 ** 20     # a spec file larger than this is not a spec
# Any kernel, pool, stride or padding side: past every input MAX_ELEMENTS allows in practice, far below the
# 32-bit sizes where frameworks break (TensorFlow segfaults at strides of 2^31 - 2, MXNet refuses 2^31 - 1).
MAX_WINDOW = 2 ** 16
MIN_SLOPE, MAX_SLOPE = 1e-30, 1e38  # a leaky_relu slope other than 0: a normal float32 number
# A smaller BatchNorm epsilon sends float32 rounding through 1/sqrt(epsilon) in a (near-)constant channel: a batch
# of one at 1e-7 puts torch 3.6e-4 off the float64 oracle, at 1e-20 its loss 100 % off. cuDNN's minimum, too.
MIN_BN_EPSILON = 1e-5
# LayerNormalization averages over the channels of one position, which are rarely near-constant: ConvNeXt's 1e-6
# (Keras, torchvision, Hugging Face) is allowed.
MIN_LN_EPSILON = 1e-6
NORMALIZATION_EPSILON = 1e-7  # Normalization divides by max(sqrt(variance), this): Keras 3's backend epsilon
_OMIT_DEFAULT = {"omit_default": True}  # fields added after v1: left out of JSON at their default


class SpecError(ValueError):
    """An invalid spec; the message names the layer index, layer name and field."""


class _DuplicateKey(Exception):
    """A JSON object with the same key twice (json would silently keep the last)."""


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKey(next(k for k in keys if keys.count(k) > 1))
    return dict(pairs)


class _FieldError(Exception):
    """Raised by a layer's checks; ModelSpec adds the layer index and name."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name
        self.message = message


def _short(value: Any, limit: int = 60) -> str:
    """repr() cut to a readable length (a spec file may hold huge or deeply nested values)."""
    try:
        text = repr(value)
    except RecursionError:
        return f"<deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pair(value: Any, field_name: str) -> tuple[int, int]:
    if _is_int(value):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_int(v) for v in value):
        raise _FieldError(field_name, f"must be a positive int or a pair of them, got {_short(value)}")
    if min(value) <= 0:
        raise _FieldError(field_name, f"must be positive, got {_short(value)}")
    if max(value) > MAX_WINDOW:
        raise _FieldError(field_name, f"must be at most {MAX_WINDOW}, got {_short(value)}")
    return int(value[0]), int(value[1])


def _positive_int(value: Any, field_name: str) -> int:
    if not _is_int(value) or value <= 0:
        raise _FieldError(field_name, f"must be a positive int, got {_short(value)}")
    return value


def _unit_interval(value: Any, field_name: str) -> float:
    """A finite number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise _FieldError(field_name, f"must be a number in [0, 1), got {_short(value)}")
    return value


def _number(value: Any, field_name: str, what: str = "a number") -> float:
    """A finite int or float that float32 holds (|value| at most 1e38)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -MAX_SLOPE <= value <= MAX_SLOPE:
        raise _FieldError(field_name, f"must be {what} between {-MAX_SLOPE:g} and {MAX_SLOPE:g}, got {_short(value)}")
    return value


def _bool(value: Any, field_name: str) -> bool:
    if not isinstance(value, bool):
        raise _FieldError(field_name, f"must be true or false, got {_short(value)}")
    return value


def _sides(value: Any, field_name: str, words: str = "an int >= 0 or [[top, bottom], [left, right]]") \
        -> tuple[tuple[int, int], tuple[int, int]]:
    """Explicit padding ((top, bottom), (left, right)) from an int (every side) or that 2x2 form."""
    given = value
    if _is_int(value):
        value = ((value, value), (value, value))
    if not (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(p, (tuple, list)) and len(p) == 2 and all(_is_int(v) for v in p) for p in value)):
        raise _FieldError(field_name, f"must be {words}, got {_short(value)}")
    sides = [v for p in value for v in p]
    if min(sides) < 0:
        raise _FieldError(field_name, f"must be >= 0 on every side, got {_short(given)}")
    if max(sides) > MAX_WINDOW:
        raise _FieldError(field_name, f"must be at most {MAX_WINDOW}, got {_short(given)}")
    return (int(value[0][0]), int(value[0][1])), (int(value[1][0]), int(value[1][1]))


def _freeze(value: Any) -> Any:
    """JSON lists as tuples, two levels deep (padding's [[t, b], [l, r]]), so equal layers compare equal."""
    if isinstance(value, (list, tuple)):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


def _thaw(value: Any) -> Any:
    """Tuples as lists, at any depth, for JSON."""
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


def parse_activation(value: Any) -> tuple[str, float | None]:
    """(kind, alpha): alpha is the slope of leaky_relu ("leaky_relu(0.1)"; plain means 0.2) or elu's alpha
    ("elu(0.5)"; plain means 1.0), None for every other kind. Raises SpecError for an unknown or malformed one."""
    try:
        return _parse_activation(value)
    except _FieldError as e:
        raise SpecError(f"activation: {e.message}") from None


def _parse_activation(value: Any, field_name: str = "activation") -> tuple[str, float | None]:
    if not isinstance(value, str):
        raise _FieldError(field_name, f"must be an activation name (a string), got {_short(value)}")
    m = re.fullmatch(r"(leaky_relu|elu)\(([^()]*)\)", value.strip())
    if m:
        kind, what = m.group(1), "leaky_relu slope" if m.group(1) == "leaky_relu" else "elu alpha"
        try:
            alpha = float(m.group(2))
        except ValueError:
            alpha = float("nan")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise _FieldError(field_name, f"{what} must be a finite number >= 0, got {_short(m.group(2))}")
        if alpha > MAX_SLOPE or 0 < alpha < MIN_SLOPE:
            # float32 turns 1e39 into inf and 1e-40 into a subnormal number: torch and MXNet refuse them
            raise _FieldError(field_name, f"{what} must be 0 or between {MIN_SLOPE:g} and {MAX_SLOPE:g}, "
                                          f"got {_short(m.group(2))}")
        return kind, alpha
    if value not in ACTIVATIONS:
        raise _FieldError(field_name, f"unknown activation {_short(value)} (known: {', '.join(ACTIVATIONS)}; "
                                      f"leaky_relu takes a slope: 'leaky_relu(0.1)', elu an alpha: 'elu(0.5)')")
    return value, {"leaky_relu": LEAKY_RELU_SLOPE, "elu": ELU_ALPHA}.get(value)


def _image(shape: tuple, field_name: str, what: str) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise _FieldError(field_name, f"{what} needs a (C, H, W) input, got shape {shape}; add a layer that gives one")
    return shape


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding (before, after): the odd extra pixel goes after (bottom/right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _check_windows(channels: int, out: tuple, kernel: tuple[int, int], field_name: str) -> None:
    """Bound the window matrix (channels x kernel cells, one row per output position) that the oracle builds
    for a convolution or pool: with a large kernel it dwarfs both the input and the output."""
    n = channels * kernel[0] * kernel[1] * out[1] * out[2]
    if n > MAX_ELEMENTS:
        raise _FieldError(field_name, f"its window matrix ({channels * kernel[0] * kernel[1]} values for each of "
                                      f"{out[1] * out[2]} output positions) is {_bytes(n)} of float32 per sample")


_ACT_FLOPS = {"linear": 0, "relu": 1, "leaky_relu": 2, "sigmoid": 4, "tanh": 4, "softmax": 3, "elu": 4,
              "softplus": 4, "silu": 5, "gelu": 8, "gelu_tanh": 8, "relu6": 2, "hard_sigmoid": 4, "hard_swish": 5}


def _activation_flops(activation: str, elements: int) -> int:
    return _ACT_FLOPS[parse_activation(activation)[0]] * elements


# How a layer kind maps a flattened feature order: what a backend that flattens images in its own layout
# (Keras' channels-last) must know to keep every later layer's weights in canonical order.
#   elementwise  each output feature is its input's feature at the same place (Activation, Dropout, BatchNorm)
#   merge        inputs combined feature by feature: they must share one order, the first input's (Add)
#   concatenate  its inputs' orders one after another (Concatenate)
#   flatten      an image becomes flat in the backend's own layout order (Flatten)
#   new          outputs in a fresh canonical order, or an image (Dense, Conv2D, pools, global pooling)
FLAT_ORDERS = ("elementwise", "merge", "concatenate", "flatten", "new")
# Every layer kind, by its JSON "type" tag: a kind registers itself when its class is defined.
LAYER_KINDS: dict[str, type["Layer"]] = {}


@dataclass(frozen=True)
class Layer:
    """Base of every layer kind; `kind` is the JSON "type" tag, `flat_order` its trait in FLAT_ORDERS.

    `inputs`: the names of the layers (or INPUT) this layer reads; None means the previous layer
    (the model input for layer 0). Single-input kinds take exactly one, merge kinds (Add, Concatenate) two or more.
    """

    kind: ClassVar[str] = ""
    flat_order: ClassVar[str] = ""
    merges: ClassVar[bool] = False  # takes >= 2 inputs
    size_field: ClassVar[str] = "name"  # the field blamed for an output too large to fit
    name: str | None = field(default=None, kw_only=True)
    inputs: tuple[str, ...] | None = field(default=None, kw_only=True, metadata=_OMIT_DEFAULT)

    def __init_subclass__(cls, **kwargs):
        """Register a concrete kind (one that sets its own `kind`); refuse a trait no backend knows."""
        super().__init_subclass__(**kwargs)
        if "kind" not in cls.__dict__:
            return  # a shared base such as the pools'
        if cls.flat_order not in FLAT_ORDERS:
            raise TypeError(f"layer kind {cls.kind!r}: flat_order must be one of {', '.join(FLAT_ORDERS)}, "
                            f"got {cls.flat_order!r}")
        if not isinstance(cls.kind, str) or not cls.kind or LAYER_KINDS.get(cls.kind, cls).__name__ != cls.__name__:
            raise TypeError(f"layer kind {cls.kind!r} of {cls.__name__}: the kind must be a new, non-empty name")
        LAYER_KINDS[cls.kind] = cls

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _freeze(getattr(self, f.name)))

    def check(self, in_shape: tuple) -> tuple:
        """Validate fields against the input shape; return the output shape."""
        raise NotImplementedError

    def check_inputs(self, in_shapes: tuple[tuple, ...], names: tuple[str, ...]) -> tuple:
        """Validate against every input's shape (names for the messages); return the output shape."""
        return self.check(in_shapes[0])

    def param_shapes(self, in_shape: tuple) -> dict[str, tuple]:
        """Canonical parameter shapes, in canonical order."""
        return {}

    def flops(self, in_shape: tuple, out_shape: tuple) -> int:
        return 0

    def to_dict(self) -> dict:
        d = {"type": self.kind}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if (f.name == "name" and v is None) or (f.metadata.get("omit_default") and v == f.default):
                continue
            d[f.name] = _thaw(v)
        return d


@dataclass(frozen=True)
class Dense(Layer):
    kind: ClassVar[str] = "dense"
    flat_order: ClassVar[str] = "new"
    size_field: ClassVar[str] = "units"
    units: int
    activation: str = "linear"

    def check(self, in_shape):
        _positive_int(self.units, "units")
        _parse_activation(self.activation)
        if len(in_shape) != 1:
            raise _FieldError("units", f"Dense needs a flat input, got shape {in_shape}; add a Flatten before it")
        return (self.units,)

    def param_shapes(self, in_shape):
        return {"kernel": (in_shape[0], self.units), "bias": (self.units,)}

    def flops(self, in_shape, out_shape):
        return 2 * in_shape[0] * self.units + self.units + _activation_flops(self.activation, self.units)


@dataclass(frozen=True)
class Conv2D(Layer):
    """2-D convolution, canonical kernel (filters, in_channels // groups, kh, kw); use_bias=False for a conv before
    BatchNorm. A depthwise convolution is groups == in_channels with filters = in_channels * multiplier."""

    kind: ClassVar[str] = "conv2d"
    flat_order: ClassVar[str] = "new"
    size_field: ClassVar[str] = "filters"
    filters: int
    kernel_size: int | tuple[int, int] = 3
    strides: int | tuple[int, int] = 1
    padding: str | int | tuple[tuple[int, int], tuple[int, int]] = "valid"
    activation: str = "linear"
    use_bias: bool = field(default=True, metadata=_OMIT_DEFAULT)
    groups: int = field(default=1, metadata=_OMIT_DEFAULT)
    dilation: int | tuple[int, int] = field(default=1, metadata=_OMIT_DEFAULT)

    def extent(self) -> tuple[int, int]:
        """The dilated kernel's extent on the input: (k - 1) * dilation + 1 per axis."""
        (kh, kw), (dh, dw) = _pair(self.kernel_size, "kernel_size"), _pair(self.dilation, "dilation")
        return (kh - 1) * dh + 1, (kw - 1) * dw + 1

    def pads(self, in_shape) -> tuple[tuple[int, int], tuple[int, int]]:
        """Explicit ((top, bottom), (left, right)) padding; "same" is TensorFlow's, over the dilated extent."""
        (eh, ew), (sh, sw) = self.extent(), _pair(self.strides, "strides")
        if self.padding == "same":
            return same_padding(in_shape[1], eh, sh), same_padding(in_shape[2], ew, sw)
        return _sides(0 if self.padding == "valid" else self.padding, "padding")

    def check(self, in_shape):
        _positive_int(self.filters, "filters")
        (sh, sw), (dh, dw) = _pair(self.strides, "strides"), _pair(self.dilation, "dilation")
        _pair(self.kernel_size, "kernel_size")
        if not (isinstance(self.padding, str) and self.padding in ("valid", "same")):
            _sides(self.padding, "padding", "'valid', 'same', an int >= 0 or [[top, bottom], [left, right]]")
        _parse_activation(self.activation)
        _bool(self.use_bias, "use_bias")
        groups = _positive_int(self.groups, "groups")
        c, h, w = _image(in_shape, "filters", "Conv2D")
        if c % groups or self.filters % groups:
            raise _FieldError("groups", f"{groups} groups must divide both the input channels ({c}) and the "
                                        f"filters ({self.filters})")
        if max(sh, sw) > 1 and max(dh, dw) > 1:
            raise _FieldError("dilation", f"strides {(sh, sw)} > 1 together with dilation {(dh, dw)} > 1 are "
                                          f"refused (Keras refuses them)")
        (pt, pb), (pl, pr) = self.pads(in_shape)
        if math.prod((c, h + pt + pb, w + pl + pr)) > MAX_ELEMENTS:
            raise _FieldError("kernel_size" if self.padding == "same" else "padding", f"padded input {c}x{h + pt + pb}x{w + pl + pr} is "
                                         f"{_bytes(c * (h + pt + pb) * (w + pl + pr))} of float32 per sample")
        (kh, kw), (eh, ew) = _pair(self.kernel_size, "kernel_size"), self.extent()
        if eh > h + pt + pb or ew > w + pl + pr:
            dilated = f" (dilated to {eh}x{ew})" if (eh, ew) != (kh, kw) else ""
            raise _FieldError("kernel_size", f"kernel {kh}x{kw}{dilated} is larger than the padded input "
                                             f"{h + pt + pb}x{w + pl + pr}")
        out = (self.filters, (h + pt + pb - eh) // sh + 1, (w + pl + pr - ew) // sw + 1)
        _check_windows(c, out, (kh, kw), "kernel_size")
        return out

    def param_shapes(self, in_shape):
        kh, kw = _pair(self.kernel_size, "kernel_size")
        kernel = {"kernel": (self.filters, in_shape[0] // self.groups, kh, kw)}
        return kernel | {"bias": (self.filters,)} if self.use_bias else kernel

    def flops(self, in_shape, out_shape):
        kh, kw = _pair(self.kernel_size, "kernel_size")
        n = math.prod(out_shape)
        return (2 * n * (in_shape[0] // self.groups) * kh * kw + n * self.use_bias
                + _activation_flops(self.activation, n))


def pool_output_size(size: int, pool: int, stride: int, before: int, after: int, ceil_mode: bool) -> int:
    """Windows along one axis of a padded input: floor, or torch's ceil_mode (ceil, minus the last window when it
    would start in the after-padding or beyond)."""
    span = size + before + after - pool
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    return out - 1 if (out - 1) * stride >= size + before else out


@dataclass(frozen=True)
class _Pool(Layer):
    """Pooling. padding: "valid", "same" (TensorFlow's: output ceil(H/s)), an int or [[top, bottom], [left, right]],
    each side at most half the pool (torch's limit: no window of padding only). Max ignores padded cells; the
    average excludes them from its count unless count_include_pad. ceil_mode: torch's."""

    flat_order: ClassVar[str] = "new"
    size_field: ClassVar[str] = "pool_size"
    pool_size: int | tuple[int, int] = 2
    strides: int | tuple[int, int] | None = None
    padding: str | int | tuple[tuple[int, int], tuple[int, int]] = field(default="valid", metadata=_OMIT_DEFAULT)
    ceil_mode: bool = field(default=False, metadata=_OMIT_DEFAULT)
    count_include_pad: bool = field(default=False, metadata=_OMIT_DEFAULT)

    def window(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(pool_size, strides) as pairs; strides default to the pool size."""
        k = _pair(self.pool_size, "pool_size")
        return k, (k if self.strides is None else _pair(self.strides, "strides"))

    def pads(self, in_shape) -> tuple[tuple[int, int], tuple[int, int]]:
        """((top, bottom), (left, right)) padding: zero for "valid", TensorFlow's split for "same"."""
        (kh, kw), (sh, sw) = self.window()
        if self.padding == "same":
            return same_padding(in_shape[1], kh, sh), same_padding(in_shape[2], kw, sw)
        return _sides(0 if self.padding == "valid" else self.padding, "padding")

    def overhang(self, in_shape) -> tuple[int, int]:
        """(bottom, right): how far the last ceil_mode window reaches past the padded input (0 without ceil_mode).
        Those cells never count, not even with count_include_pad."""
        (kh, kw), (sh, sw) = self.window()
        (pt, pb), (pl, pr) = self.pads(in_shape)
        out = self.output_hw(in_shape)
        return (max((out[0] - 1) * sh + kh - (in_shape[1] + pt + pb), 0),
                max((out[1] - 1) * sw + kw - (in_shape[2] + pl + pr), 0))

    def output_hw(self, in_shape) -> tuple[int, int]:
        (kh, kw), (sh, sw) = self.window()
        if self.padding == "same":
            return -(-in_shape[1] // sh), -(-in_shape[2] // sw)
        (pt, pb), (pl, pr) = self.pads(in_shape)
        return (pool_output_size(in_shape[1], kh, sh, pt, pb, self.ceil_mode),
                pool_output_size(in_shape[2], kw, sw, pl, pr, self.ceil_mode))

    def check(self, in_shape):
        (kh, kw), _ = self.window()
        same = isinstance(self.padding, str) and self.padding == "same"
        if not (same or self.padding == "valid"):
            _sides(self.padding, "padding", "'valid', 'same', an int >= 0 or [[top, bottom], [left, right]]")
        if _bool(self.ceil_mode, "ceil_mode") and same:
            raise _FieldError("ceil_mode", "ceil_mode with padding 'same' means nothing ('same' already gives "
                                           "ceil(H / stride) windows); use 'valid' or explicit padding")
        _bool(self.count_include_pad, "count_include_pad")
        c, h, w = _image(in_shape, "pool_size", type(self).__name__)
        (pt, pb), (pl, pr) = self.pads(in_shape)
        if not same and (max(pt, pb) > kh // 2 or max(pl, pr) > kw // 2):
            raise _FieldError("padding", f"padding {_short(self.padding)} is more than half the pool {kh}x{kw} on "
                                         f"a side: a window could hold padding only (torch's limit)")
        if math.prod((c, h + pt + pb, w + pl + pr)) > MAX_ELEMENTS:
            raise _FieldError("pool_size" if same else "padding", f"padded input {c}x{h + pt + pb}x{w + pl + pr} is "
                                           f"{_bytes(c * (h + pt + pb) * (w + pl + pr))} of float32 per sample")
        if not same and (kh > h + pt + pb or kw > w + pl + pr):
            padded = "padded input" if pt + pb + pl + pr else "input"
            raise _FieldError("pool_size", f"pool {kh}x{kw} is larger than the {padded} {h + pt + pb}x{w + pl + pr}")
        out = (c,) + self.output_hw(in_shape)
        _check_windows(c, out, (kh, kw), "pool_size")
        return out

    def flops(self, in_shape, out_shape):
        (kh, kw), _ = self.window()
        return math.prod(out_shape) * kh * kw


@dataclass(frozen=True)
class MaxPool2D(_Pool):
    kind: ClassVar[str] = "maxpool2d"

    def check(self, in_shape):
        if self.count_include_pad is not False:
            raise _FieldError("count_include_pad", f"is for AvgPool2D only (max pooling never counts), got "
                                                   f"{_short(self.count_include_pad)}")
        return super().check(in_shape)


@dataclass(frozen=True)
class AvgPool2D(_Pool):
    kind: ClassVar[str] = "avgpool2d"


@dataclass(frozen=True)
class GlobalAveragePooling2D(Layer):
    """Mean over the spatial dimensions: (C, H, W) -> (C,), or (C, 1, 1) with keepdims."""

    kind: ClassVar[str] = "globalavgpool2d"
    flat_order: ClassVar[str] = "new"
    keepdims: bool = field(default=False, metadata=_OMIT_DEFAULT)

    def check(self, in_shape):
        _bool(self.keepdims, "keepdims")
        c, _, _ = _image(in_shape, "inputs", "GlobalAveragePooling2D")
        return (c, 1, 1) if self.keepdims else (c,)

    def flops(self, in_shape, out_shape):
        return math.prod(in_shape)


@dataclass(frozen=True)
class ZeroPadding2D(Layer):
    """Zeros around an image: padding an int (every side) or ((top, bottom), (left, right))."""

    kind: ClassVar[str] = "zeropadding2d"
    flat_order: ClassVar[str] = "new"
    size_field: ClassVar[str] = "padding"
    padding: int | tuple[tuple[int, int], tuple[int, int]]

    def pads(self, in_shape=None) -> tuple[tuple[int, int], tuple[int, int]]:
        return _sides(self.padding, "padding")

    def check(self, in_shape):
        (t, b), (l, r) = self.pads()
        c, h, w = _image(in_shape, "padding", "ZeroPadding2D")
        return c, h + t + b, w + l + r


def adaptive_bins(size: int, out: int) -> tuple[tuple[int, int], ...]:
    """torch's adaptive pooling bins along one axis: [floor(i * size / out), ceil((i + 1) * size / out))."""
    return tuple((i * size // out, -(-(i + 1) * size // out)) for i in range(out))


@dataclass(frozen=True)
class AdaptiveAvgPool2D(Layer):
    """Average over torch's adaptive bins to a fixed (oh, ow); an output larger than the input repeats cells."""

    kind: ClassVar[str] = "adaptiveavgpool2d"
    flat_order: ClassVar[str] = "new"
    size_field: ClassVar[str] = "output_size"
    output_size: int | tuple[int, int]

    def check(self, in_shape):
        oh, ow = _pair(self.output_size, "output_size")
        c, h, w = _image(in_shape, "output_size", "AdaptiveAvgPool2D")
        # the oracle averages rows, then columns: its intermediate is the smaller of these
        if min(c * oh * w, c * h * ow) > MAX_ELEMENTS:
            raise _FieldError("output_size", f"{oh}x{ow} bins of a {h}x{w} input need "
                                             f"{_bytes(min(c * oh * w, c * h * ow))} of float32 per sample")
        return c, oh, ow

    def flops(self, in_shape, out_shape):
        rows = sum(b - a for a, b in adaptive_bins(in_shape[1], out_shape[1]))
        cols = sum(b - a for a, b in adaptive_bins(in_shape[2], out_shape[2]))
        return in_shape[0] * rows * cols + math.prod(out_shape)


@dataclass(frozen=True)
class Flatten(Layer):
    kind: ClassVar[str] = "flatten"
    flat_order: ClassVar[str] = "flatten"

    def check(self, in_shape):
        return (math.prod(in_shape),)


@dataclass(frozen=True)
class Activation(Layer):
    kind: ClassVar[str] = "activation"
    flat_order: ClassVar[str] = "elementwise"
    activation: str = "relu"

    def check(self, in_shape):
        _parse_activation(self.activation)
        return in_shape

    def flops(self, in_shape, out_shape):
        return _activation_flops(self.activation, math.prod(out_shape))


@dataclass(frozen=True)
class Dropout(Layer):
    kind: ClassVar[str] = "dropout"
    flat_order: ClassVar[str] = "elementwise"
    rate: float = 0.5

    def check(self, in_shape):
        _unit_interval(self.rate, "rate")
        return in_shape


def _epsilon(value: Any, floor: float = MIN_BN_EPSILON) -> float:
    """A normalisation epsilon: in [floor, 1]."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not 0 < value <= 1):  # NaN fails the comparison; an int of any size is compared exactly
        raise _FieldError("epsilon", f"must be a finite positive number at most 1, got {_short(value)}")
    if value < floor:
        raise _FieldError("epsilon", f"must be at least {floor:g} (float32 frameworks part from the "
                                     f"float64 oracle on near-constant channels below it), got {_short(value)}")
    return value


@dataclass(frozen=True)
class BatchNorm(Layer):
    """Batch normalisation over channels (images) or features (flat).

    momentum weighs the old moving value (Keras' meaning): moving = m * moving + (1 - m) * batch;
    the moving variance uses the biased batch variance. epsilon in [1e-5, 1].
    """

    kind: ClassVar[str] = "batchnorm"
    flat_order: ClassVar[str] = "elementwise"
    momentum: float = 0.99
    epsilon: float = 1e-3

    def check(self, in_shape):
        _unit_interval(self.momentum, "momentum")
        _epsilon(self.epsilon)
        if len(in_shape) not in (1, 3):
            raise _FieldError("inputs", f"BatchNorm needs a (C, H, W) or (features,) input, got {in_shape}")
        return in_shape

    def param_shapes(self, in_shape):
        c = (in_shape[0],)
        return {"gamma": c, "beta": c, "moving_mean": c, "moving_var": c}

    def flops(self, in_shape, out_shape):
        return 2 * math.prod(out_shape)


@dataclass(frozen=True)
class Rescaling(Layer):
    """y = x * scale + offset (Keras' Rescaling), no weights."""

    kind: ClassVar[str] = "rescaling"
    flat_order: ClassVar[str] = "elementwise"
    scale: float
    offset: float = 0.0

    def check(self, in_shape):
        if 0 < abs(_number(self.scale, "scale")) < MIN_SLOPE:
            raise _FieldError("scale", f"must be 0 or at least {MIN_SLOPE:g} in size (float32 holds it), "
                                       f"got {_short(self.scale)}")
        _number(self.offset, "offset")
        return in_shape

    def flops(self, in_shape, out_shape):
        return 2 * math.prod(out_shape)


@dataclass(frozen=True)
class Normalization(Layer):
    """y = (x - mean) / max(sqrt(variance), 1e-7) per channel (image) or feature (flat): Keras 3's Normalization.
    mean and variance are non-trainable weights (initially 0 and 1)."""

    kind: ClassVar[str] = "normalization"
    flat_order: ClassVar[str] = "elementwise"

    def check(self, in_shape):
        if len(in_shape) not in (1, 3):
            raise _FieldError("inputs", f"Normalization needs a (C, H, W) or (features,) input, got {in_shape}")
        return in_shape

    def param_shapes(self, in_shape):
        return {"mean": (in_shape[0],), "variance": (in_shape[0],)}

    def flops(self, in_shape, out_shape):
        return 2 * math.prod(out_shape)


@dataclass(frozen=True)
class LayerNormalization(Layer):
    """Normalization over the channels of an image at each position (ConvNeXt's channels-last LayerNorm) or over
    the features of a flat input, biased variance; trainable gamma (ones) and beta (zeros), each (C,)."""

    kind: ClassVar[str] = "layernorm"
    flat_order: ClassVar[str] = "elementwise"
    epsilon: float = 1e-3

    def check(self, in_shape):
        _epsilon(self.epsilon, MIN_LN_EPSILON)
        if len(in_shape) not in (1, 3):
            raise _FieldError("inputs", f"LayerNormalization needs a (C, H, W) or (features,) input, got {in_shape}")
        return in_shape

    def param_shapes(self, in_shape):
        return {"gamma": (in_shape[0],), "beta": (in_shape[0],)}

    def flops(self, in_shape, out_shape):
        return 7 * math.prod(out_shape)  # mean, variance, normalise, scale and shift


@dataclass(frozen=True)
class Add(Layer):
    """Elementwise sum of two or more inputs of equal shape (a residual connection)."""

    kind: ClassVar[str] = "add"
    flat_order: ClassVar[str] = "merge"
    merges: ClassVar[bool] = True

    def check_inputs(self, in_shapes, names):
        for shape, name in zip(in_shapes[1:], names[1:]):
            if shape != in_shapes[0]:
                raise _FieldError("inputs", f"cannot add {name!r} of shape {shape} to {names[0]!r} of shape "
                                            f"{in_shapes[0]}: Add needs equal shapes")
        return in_shapes[0]

    def flops(self, in_shape, out_shape):
        return (len(self.inputs) - 1) * math.prod(out_shape)


@dataclass(frozen=True)
class Concatenate(Layer):
    """Concatenation of two or more inputs along canonical axis 1: channels of (C, H, W), features of flat."""

    kind: ClassVar[str] = "concatenate"
    flat_order: ClassVar[str] = "concatenate"
    merges: ClassVar[bool] = True

    def check_inputs(self, in_shapes, names):
        first = in_shapes[0]
        for shape, name in zip(in_shapes[1:], names[1:]):
            if len(shape) != len(first):
                raise _FieldError("inputs", f"cannot concatenate {name!r} of shape {shape} with {names[0]!r} of "
                                            f"shape {first}: one is flat, the other an image")
            if shape[1:] != first[1:]:
                raise _FieldError("inputs", f"cannot concatenate {name!r} of shape {shape} with {names[0]!r} of "
                                            f"shape {first}: spatial sizes {shape[1:]} and {first[1:]} differ")
        return (sum(s[0] for s in in_shapes),) + first[1:]


@dataclass(frozen=True)
class Multiply(Layer):
    """Elementwise product of two or more inputs of equal shape, or of exactly two: an image (C, H, W) and a
    per-channel gate (C,) or (C, 1, 1) broadcast over H and W (squeeze-and-excitation); the image's shape out."""

    kind: ClassVar[str] = "multiply"
    flat_order: ClassVar[str] = "merge"
    merges: ClassVar[bool] = True

    @staticmethod
    def gate(in_shapes) -> int | None:
        """The index of the broadcast per-channel gate among the input shapes, None when all shapes are equal."""
        if len(in_shapes) != 2 or in_shapes[0] == in_shapes[1]:
            return None
        for g, image in ((0, in_shapes[1]), (1, in_shapes[0])):
            if len(image) == 3 and tuple(in_shapes[g]) in ((image[0],), (image[0], 1, 1)):
                return g
        return None

    def check_inputs(self, in_shapes, names):
        g = self.gate(in_shapes)
        if g is not None:
            return in_shapes[1 - g]
        for shape, name in zip(in_shapes[1:], names[1:]):
            if shape != in_shapes[0]:
                raise _FieldError("inputs", f"cannot multiply {name!r} of shape {shape} with {names[0]!r} of shape "
                                            f"{in_shapes[0]}: Multiply needs equal shapes, or exactly two inputs: "
                                            f"an image (C, H, W) and a per-channel gate (C,) or (C, 1, 1)")
        return in_shapes[0]

    def flops(self, in_shape, out_shape):
        return (len(self.inputs) - 1) * math.prod(out_shape)




def _bytes(elements: int) -> str:
    """A float32 tensor's size in words: "about 4.0 TB" (any int, however large)."""
    size = 4 * elements
    if size >= 10 ** 21:
        return f"about 10^{len(str(size)) - 1} bytes"
    for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB"):
        if size < 1000 or unit == "EB":
            return f"about {size:.1f} {unit}"
        size /= 1000


@dataclass(frozen=True)
class LayerInfo:
    """What the spec infers about one layer: its resolved inputs (producer names, INPUT for the model input)
    and their shapes; in_shape is in_shapes[0]."""

    index: int
    name: str
    layer: Layer
    in_shape: tuple
    out_shape: tuple
    params: int
    flops: int
    inputs: tuple[str, ...] = ()
    in_shapes: tuple[tuple, ...] = ()


def _hands_values_on(layer: Layer) -> bool:
    """Whether a layer passes its input's values on unchanged in meaning: Dropout, Flatten, a linear Activation."""
    return isinstance(layer, (Dropout, Flatten)) or (isinstance(layer, Activation) and layer.activation == "linear")


def _layer_name(layer: Layer, index: int) -> Any:
    return layer.name if layer.name is not None else f"{layer.kind}_{index}"


@dataclass(frozen=True)
class ModelSpec:
    """A whole network: name, channels-first input shape and layers in topological order (the last is the output)."""

    name: str
    input_shape: tuple
    layers: tuple

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip() or len(self.name) > 100 \
                or not self.name.isprintable():
            raise SpecError(f"model: field 'name': must be a non-empty printable string of at most 100 characters, "
                            f"got {_short(self.name)}")
        shape = self.input_shape
        if (not isinstance(shape, (tuple, list)) or len(shape) not in (1, 3)
                or not all(_is_int(s) and s > 0 for s in shape)):
            raise SpecError(f"model {self.name!r}: field 'input_shape': must be (features,) or (C, H, W) "
                            f"of positive ints, got {_short(shape)}")
        if math.prod(shape) > MAX_ELEMENTS:
            raise SpecError(f"model {self.name!r}: field 'input_shape': {_short(tuple(shape))} is "
                            f"{_bytes(math.prod(shape))} of float32 per sample")
        object.__setattr__(self, "input_shape", tuple(shape))
        if isinstance(self.layers, (str, bytes, dict)) or not hasattr(self.layers, "__iter__"):
            raise SpecError(f"model {self.name!r}: field 'layers': must be a list of layers, got {_short(self.layers)}")
        layers = tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        if not layers:
            raise SpecError(f"model {self.name!r}: field 'layers': a model needs at least one layer")
        object.__setattr__(self, "_infos", self._infer(layers))

    def _infer(self, layers: tuple) -> tuple[LayerInfo, ...]:
        all_names = {}  # name -> first index, to tell a forward reference (a cycle) from an unknown input
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise SpecError(f"layer {i}: field 'type': not a layer: {_short(layer)}")
            if isinstance(_layer_name(layer, i), str):
                all_names.setdefault(_layer_name(layer, i), i)
        shapes, consumed, infos, total = {INPUT: self.input_shape}, set(), [], 0
        for i, layer in enumerate(layers):
            name = _layer_name(layer, i)
            where = f"layer {i} ({name if isinstance(name, str) and name.isprintable() else _short(name)})"
            if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
                raise SpecError(f"{where}: field 'name': must be 1 to 64 ASCII letters, digits, '_' or '-', "
                                f"got {_short(name)}")
            if name == INPUT:
                raise SpecError(f"{where}: field 'name': {INPUT!r} is reserved for the model input")
            if name in shapes:
                raise SpecError(f"{where}: field 'name': duplicate layer name {name!r}")
            inputs = self._resolve_inputs(layer, i, where, infos, all_names, shapes)
            consumed.update(inputs)
            in_shapes = tuple(shapes[n] for n in inputs)
            try:
                out = tuple(layer.check_inputs(in_shapes, inputs))
                if math.prod(out) > MAX_ELEMENTS:
                    raise _FieldError(layer.size_field, f"output {_short(out)} is {_bytes(math.prod(out))} of float32 "
                                                        f"per sample")
                pshapes = layer.param_shapes(in_shapes[0])
                params = sum(math.prod(s) for s in pshapes.values())
                if params > MAX_PARAMS or total + params > MAX_PARAMS:
                    what = "" if params > MAX_PARAMS else " (with the layers before it)"
                    raise _FieldError(layer.size_field, f"{_bytes(max(params, total + params))} of float32 "
                                                        f"weights{what}")
            except _FieldError as e:
                raise SpecError(f"{where}: field '{e.field}': {e.message}") from None
            total += params
            infos.append(LayerInfo(i, name, layer, in_shapes[0], out, params, layer.flops(in_shapes[0], out),
                                   inputs, in_shapes))
            shapes[name] = out
        for info in infos[:-1]:
            if info.name not in consumed:
                raise SpecError(f"layer {info.index} ({info.name}): field 'name': dangling branch: no later layer "
                                f"takes {info.name!r} as input, and only the last layer is the model output")
        self._check_head(infos)
        return tuple(infos)

    @staticmethod
    def _resolve_inputs(layer, i, where, infos, all_names, shapes) -> tuple[str, ...]:
        if layer.inputs is None:
            if layer.merges:
                raise SpecError(f"{where}: field 'inputs': {type(layer).__name__} needs 'inputs' naming at least "
                                f"two layers (or {INPUT!r})")
            return (infos[-1].name if infos else INPUT,)
        if not isinstance(layer.inputs, (tuple, list)) or not all(isinstance(n, str) for n in layer.inputs):
            raise SpecError(f"{where}: field 'inputs': must be a list of layer names, got {_short(layer.inputs)}")
        inputs = tuple(layer.inputs)
        if layer.merges and len(inputs) < 2:
            raise SpecError(f"{where}: field 'inputs': {type(layer).__name__} takes at least 2 inputs, "
                            f"got {len(inputs)}")
        if not layer.merges and len(inputs) != 1:
            raise SpecError(f"{where}: field 'inputs': {type(layer).__name__} takes exactly 1 input, "
                            f"got {len(inputs)}")
        for n in inputs:
            if n in shapes:
                continue
            if all_names.get(n, -1) >= i:
                raise SpecError(f"{where}: field 'inputs': input {_short(n)} is layer {all_names[n]}, not an earlier "
                                f"layer: layers must be in topological order, and a layer that reads itself or a "
                                f"later one makes a cycle")
            known = ", ".join([INPUT] + [x.name for x in infos][-8:])
            raise SpecError(f"{where}: field 'inputs': unknown input {_short(n)} (earlier layers: {known})")
        return inputs

    @staticmethod
    def _check_head(infos: list[LayerInfo]) -> None:
        by_name = {i.name: i for i in infos}

        def source(info: LayerInfo) -> tuple[LayerInfo, LayerInfo | None]:
            """The layer whose values `info` hands on, back through Dropout, linear Activation and Flatten, and
            the Dropout nearest the output on the way (None if none)."""
            dropout = None
            while _hands_values_on(info.layer) and info.inputs[0] in by_name:
                if dropout is None and isinstance(info.layer, Dropout):
                    dropout = info
                info = by_name[info.inputs[0]]
            return info, dropout

        last = infos[-1]
        head = getattr(last.layer, "activation", None)
        if head not in HEADS:
            below, dropout = source(last)
            hidden = getattr(below.layer, "activation", None)
            if dropout is not None and hidden in HEADS:
                # the loss would take these probabilities for logits and apply its own softmax/sigmoid again
                raise SpecError(f"layer {below.index} ({below.name}): field 'activation': a {hidden} head must be "
                                f"the last layer, but Dropout layer {dropout.index} ({dropout.name}) follows it; put "
                                f"the Dropout before it")
            return
        where = f"layer {last.index} ({last.name}): field 'activation'"
        if len(last.out_shape) != 1:
            raise SpecError(f"{where}: a {head} head needs a flat (features,) output, got {last.out_shape}; "
                            f"add Flatten (or GlobalAveragePooling2D) and a Dense before it")
        n = last.out_shape[0]
        if head == "sigmoid" and n != 1:
            raise SpecError(f"{where}: a sigmoid head needs exactly 1 output (binary cross-entropy), got {n}; "
                            f"use softmax for {n} classes")
        if head == "softmax" and n < 2:
            raise SpecError(f"{where}: a softmax head needs at least 2 outputs, got 1; use sigmoid for one "
                            f"binary output")
        if not isinstance(last.layer, Activation):
            return
        if last.inputs[0] not in by_name:
            raise SpecError(f"{where}: a {head} head needs a layer before it that computes its logits, but it "
                            f"reads the model input; add one (e.g. a Dense) or make the activation linear")
        below, _ = source(by_name[last.inputs[0]])
        hidden = getattr(below.layer, "activation", None)
        if hidden in HEADS:
            via = "" if below.name == last.inputs[0] else f" (through {last.inputs[0]!r})"
            raise SpecError(f"{where}: the {head} head sits on {below.name!r}{via}, which already applies "
                            f"{hidden}: it would be applied twice; drop one of them")

    # --- inference -------------------------------------------------------------------------------
    @property
    def infos(self) -> tuple[LayerInfo, ...]:
        return self._infos

    @property
    def is_graph(self) -> bool:
        """True when some layer reads anything other than the layer before it."""
        return any(i.inputs != ((self._infos[i.index - 1].name,) if i.index else (INPUT,)) for i in self._infos)

    @property
    def output_shape(self) -> tuple:
        return self._infos[-1].out_shape

    @property
    def num_classes(self) -> int:
        return math.prod(self.output_shape)

    @property
    def params(self) -> int:
        return sum(i.params for i in self._infos)

    @property
    def trainable_params(self) -> int:
        shapes = self.param_shapes()
        return sum(math.prod(shapes[k]) for k in self.trainable_keys())

    @property
    def flops(self) -> int:
        """Forward FLOPs per sample (2 per multiply-add, plus bias, activation, pooling, norm, adds)."""
        return sum(i.flops for i in self._infos)

    def param_shapes(self) -> dict[str, tuple]:
        """Ordered canonical weight keys "<layer>/<param>" and their shapes."""
        return {f"{i.name}/{k}": s for i in self._infos for k, s in i.layer.param_shapes(i.in_shape).items()}

    def trainable_keys(self) -> list[str]:
        return [k for k in self.param_shapes() if k.rsplit("/", 1)[1] not in NON_TRAINABLE]

    @property
    def head(self) -> str | None:
        """The output activation ("softmax"/"sigmoid") that the loss folds into its logits, if any."""
        act = getattr(self.layers[-1], "activation", None)
        return act if act in HEADS else None

    def logits_infos(self) -> tuple[LayerInfo, ...]:
        """The nodes that compute the logits, in topological order: a final Activation head is dropped (the
        logits node is its input), a final Dense/Conv2D head becomes linear under its own name."""
        if self.head is None:
            return self._infos
        last = self._infos[-1]
        if isinstance(last.layer, Activation):
            return self._infos[:-1]
        layer = dataclasses.replace(last.layer, activation="linear", name=last.name)
        return self._infos[:-1] + (dataclasses.replace(last, layer=layer, flops=layer.flops(last.in_shape,
                                                                                          last.out_shape)),)

    def logits_layers(self) -> tuple[Layer, ...]:
        """The layers up to the logits: the model without its head activation."""
        return tuple(i.layer for i in self.logits_infos())

    def without_dropout(self) -> "ModelSpec":
        """The same model with every Dropout rate set to 0 (names and weights unchanged)."""
        return dataclasses.replace(self, layers=tuple(
            dataclasses.replace(l, rate=0.0, name=i.name) if isinstance(l, Dropout) else l
            for l, i in zip(self.layers, self._infos)))

    @property
    def has_dropout(self) -> bool:
        return any(isinstance(l, Dropout) and l.rate > 0 for l in self.layers)

    # --- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"name": self.name, "input_shape": list(self.input_shape),
                "layers": [l.to_dict() for l in self.layers]}

    @classmethod
    def from_dict(cls, d: Any) -> "ModelSpec":
        if not isinstance(d, dict):
            raise SpecError(f"model: not a spec object (a JSON object with name, input_shape, layers), "
                            f"got {type(d).__name__}")
        missing = [k for k in ("name", "input_shape", "layers") if k not in d]
        if missing:
            raise SpecError(f"model: field '{missing[0]}': missing (a spec needs name, input_shape, layers)")
        extra = sorted(set(d) - {"name", "input_shape", "layers"})
        if extra:
            raise SpecError(f"model: field {_short(extra[0])}: unknown field")
        if not isinstance(d["layers"], list):
            raise SpecError("model: field 'layers': must be a list of layer objects")
        layers = []
        for i, ld in enumerate(d["layers"]):
            if not isinstance(ld, dict):
                raise SpecError(f"layer {i}: field 'type': must be an object with a 'type', got {_short(ld)}")
            label = ld.get("name") if isinstance(ld.get("name"), str) else ld.get("type")
            where = f"layer {i} ({label if isinstance(label, str) else '?'})"
            kind = ld.get("type")
            if not isinstance(kind, str) or kind not in LAYER_KINDS:
                raise SpecError(f"{where}: field 'type': unknown layer kind {_short(kind)} "
                                f"(known: {', '.join(LAYER_KINDS)})")
            cls_ = LAYER_KINDS[kind]
            fields = {f.name for f in dataclasses.fields(cls_)}
            args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ld.items() if k != "type"}
            for k in args:
                if k not in fields:
                    raise SpecError(f"{where}: field {_short(k)}: unknown field for {kind} "
                                    f"(known: {', '.join(sorted(fields))})")
            required = [f.name for f in dataclasses.fields(cls_)
                        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
            for k in required:
                if k not in args:
                    raise SpecError(f"{where}: field '{k}': missing (required for {kind})")
            layers.append(cls_(**args))
        input_shape = d["input_shape"]
        return cls(d["name"], tuple(input_shape) if isinstance(input_shape, list) else input_shape, tuple(layers))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelSpec":
        """Read a JSON spec file (UTF-8, a BOM accepted); every problem is one SpecError naming the file."""
        path = Path(path)
        try:
            # O_NONBLOCK: a FIFO must not block the open; only a regular file is read, and bounded (/dev/zero)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with open(fd, "rb") as f:
                raw = f.read(MAX_SPEC_BYTES + 1) if stat.S_ISREG(os.fstat(fd).st_mode) else None
        except OSError as e:
            raise SpecError(f"{path}: cannot read spec file: {e.strerror}") from None
        except ValueError as e:  # a path with a NUL byte
            raise SpecError(f"{_short(str(path))}: cannot read spec file: {e}") from None
        if raw is None:
            raise SpecError(f"{path}: not a regular file (a FIFO, device or folder): not a spec file")
        if len(raw) > MAX_SPEC_BYTES:
            raise SpecError(f"{path}: spec file larger than {MAX_SPEC_BYTES // 2 ** 20} MiB: not a spec")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise SpecError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}: not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        except RecursionError:
            raise SpecError(f"{path}: not a usable spec: JSON nested too deeply") from None
        except _DuplicateKey as e:
            raise SpecError(f"{path}: duplicate key {_short(e.args[0])} in one JSON object (which one counts?)") from None
        except ValueError as e:  # e.g. an integer literal past Python's digit limit
            raise SpecError(f"{path}: not a usable spec: {str(e).splitlines()[0]}") from None
        try:
            return cls.from_dict(data)
        except SpecError as e:
            raise SpecError(f"{path}: {e}") from None
        except RecursionError:
            raise SpecError(f"{path}: not a usable spec: values nested too deeply") from None

    # --- display ---------------------------------------------------------------------------------
    def summary(self) -> str:
        """A Keras-style table: layer, output shape, params, FLOPs (and each layer's inputs for a graph)."""
        from tabulate import tabulate
        graph = self.is_graph
        rows = [(f"{i.name} ({type(i.layer).__name__})",) + ((", ".join(i.inputs),) if graph else ())
                + (str(i.out_shape), f"{i.params:,}", f"{i.flops:,}") for i in self._infos]
        headers = ("Layer (type)",) + (("Inputs",) if graph else ()) + ("Output shape", "Params", "FLOPs")
        table = tabulate(rows, headers=headers, colalign=("left",) * (len(headers) - 2) + ("right", "right"))
        return (f'Model "{self.name}"  input {self.input_shape}\n{table}\n'
                f"Total params: {self.params:,} (trainable {self.trainable_params:,})\n"
                f"Forward FLOPs per sample: {self.flops:,}")
