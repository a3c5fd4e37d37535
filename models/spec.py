"""Framework-neutral model spec: layer dataclasses, validation, shape/param/FLOP inference, JSON."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh", "softmax")
HEADS = ("softmax", "sigmoid")  # output activations the loss folds into its logits
NON_TRAINABLE = ("moving_mean", "moving_var")


class SpecError(ValueError):
    """An invalid spec; the message names the layer index, layer name and field."""


class _FieldError(Exception):
    """Raised by a layer's checks; ModelSpec adds the layer index and name."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name
        self.message = message


def _pair(value: Any, field_name: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise _FieldError(field_name, f"must be a positive int or a pair of them, got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise _FieldError(field_name, f"must be a positive int or a pair of them, got {value!r}")
    if min(value) <= 0:
        raise _FieldError(field_name, f"must be positive, got {value!r}")
    return int(value[0]), int(value[1])


def _positive_int(value: Any, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _FieldError(field_name, f"must be a positive int, got {value!r}")
    return value


def _activation(value: Any, field_name: str = "activation") -> str:
    if value not in ACTIVATIONS:
        raise _FieldError(field_name, f"unknown activation {value!r} (known: {', '.join(ACTIVATIONS)})")
    return value


def _image(shape: tuple, field_name: str, what: str) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise _FieldError(field_name, f"{what} needs a (C, H, W) input, got shape {shape}; add a layer that gives one")
    return shape


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding (before, after): the odd extra pixel goes after (bottom/right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _activation_flops(kind: str, elements: int) -> int:
    return {"linear": 0, "relu": 1, "sigmoid": 4, "tanh": 4, "softmax": 3}[kind] * elements


@dataclass(frozen=True)
class Layer:
    """Base of every layer kind; `kind` is the JSON "type" tag."""

    kind: ClassVar[str] = ""
    name: str | None = field(default=None, kw_only=True)

    def check(self, in_shape: tuple) -> tuple:
        """Validate fields against the input shape; return the output shape."""
        raise NotImplementedError

    def param_shapes(self, in_shape: tuple) -> dict[str, tuple]:
        """Canonical parameter shapes, in canonical order."""
        return {}

    def flops(self, in_shape: tuple, out_shape: tuple) -> int:
        return 0

    def to_dict(self) -> dict:
        d = {"type": self.kind}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "name" and v is None:
                continue
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


@dataclass(frozen=True)
class Dense(Layer):
    kind: ClassVar[str] = "dense"
    units: int
    activation: str = "linear"

    def check(self, in_shape):
        _positive_int(self.units, "units")
        _activation(self.activation)
        if len(in_shape) != 1:
            raise _FieldError("units", f"Dense needs a flat input, got shape {in_shape}; add a Flatten before it")
        return (self.units,)

    def param_shapes(self, in_shape):
        return {"kernel": (in_shape[0], self.units), "bias": (self.units,)}

    def flops(self, in_shape, out_shape):
        return 2 * in_shape[0] * self.units + self.units + _activation_flops(self.activation, self.units)


@dataclass(frozen=True)
class Conv2D(Layer):
    kind: ClassVar[str] = "conv2d"
    filters: int
    kernel_size: int | tuple[int, int] = 3
    strides: int | tuple[int, int] = 1
    padding: str | int = "valid"
    activation: str = "linear"

    def pads(self, in_shape) -> tuple[tuple[int, int], tuple[int, int]]:
        """Explicit ((top, bottom), (left, right)) padding, TensorFlow's meaning for "same"."""
        (kh, kw), (sh, sw) = _pair(self.kernel_size, "kernel_size"), _pair(self.strides, "strides")
        if self.padding == "same":
            return same_padding(in_shape[1], kh, sh), same_padding(in_shape[2], kw, sw)
        p = 0 if self.padding == "valid" else self.padding
        return (p, p), (p, p)

    def check(self, in_shape):
        _positive_int(self.filters, "filters")
        (kh, kw), (sh, sw) = _pair(self.kernel_size, "kernel_size"), _pair(self.strides, "strides")
        if not (self.padding in ("valid", "same")
                or (isinstance(self.padding, int) and not isinstance(self.padding, bool) and self.padding >= 0)):
            raise _FieldError("padding", f"must be 'valid', 'same' or an int >= 0, got {self.padding!r}")
        _activation(self.activation)
        c, h, w = _image(in_shape, "filters", "Conv2D")
        (pt, pb), (pl, pr) = self.pads(in_shape)
        if kh > h + pt + pb or kw > w + pl + pr:
            raise _FieldError("kernel_size", f"kernel {kh}x{kw} is larger than the padded input {h + pt + pb}x{w + pl + pr}")
        return (self.filters, (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1)

    def param_shapes(self, in_shape):
        kh, kw = _pair(self.kernel_size, "kernel_size")
        return {"kernel": (self.filters, in_shape[0], kh, kw), "bias": (self.filters,)}

    def flops(self, in_shape, out_shape):
        kh, kw = _pair(self.kernel_size, "kernel_size")
        n = math.prod(out_shape)
        return 2 * n * in_shape[0] * kh * kw + n + _activation_flops(self.activation, n)


@dataclass(frozen=True)
class _Pool(Layer):
    pool_size: int | tuple[int, int] = 2
    strides: int | tuple[int, int] | None = None

    def window(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(pool_size, strides) as pairs; strides default to the pool size (floor output, no padding)."""
        k = _pair(self.pool_size, "pool_size")
        return k, (k if self.strides is None else _pair(self.strides, "strides"))

    def check(self, in_shape):
        (kh, kw), (sh, sw) = self.window()
        c, h, w = _image(in_shape, "pool_size", type(self).__name__)
        if kh > h or kw > w:
            raise _FieldError("pool_size", f"pool {kh}x{kw} is larger than the input {h}x{w}")
        return (c, (h - kh) // sh + 1, (w - kw) // sw + 1)

    def flops(self, in_shape, out_shape):
        (kh, kw), _ = self.window()
        return math.prod(out_shape) * kh * kw


@dataclass(frozen=True)
class MaxPool2D(_Pool):
    kind: ClassVar[str] = "maxpool2d"


@dataclass(frozen=True)
class AvgPool2D(_Pool):
    kind: ClassVar[str] = "avgpool2d"


@dataclass(frozen=True)
class Flatten(Layer):
    kind: ClassVar[str] = "flatten"

    def check(self, in_shape):
        return (math.prod(in_shape),)


@dataclass(frozen=True)
class Activation(Layer):
    kind: ClassVar[str] = "activation"
    activation: str = "relu"

    def check(self, in_shape):
        _activation(self.activation)
        return in_shape

    def flops(self, in_shape, out_shape):
        return _activation_flops(self.activation, math.prod(out_shape))


@dataclass(frozen=True)
class Dropout(Layer):
    kind: ClassVar[str] = "dropout"
    rate: float = 0.5

    def check(self, in_shape):
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0 <= self.rate < 1:
            raise _FieldError("rate", f"must be a number in [0, 1), got {self.rate!r}")
        return in_shape


@dataclass(frozen=True)
class BatchNorm(Layer):
    """Batch normalisation over channels (images) or features (flat).

    momentum weighs the old moving value (Keras' meaning): moving = m * moving + (1 - m) * batch;
    the moving variance uses the biased batch variance.
    """

    kind: ClassVar[str] = "batchnorm"
    momentum: float = 0.99
    epsilon: float = 1e-3

    def check(self, in_shape):
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise _FieldError("momentum", f"must be a number in [0, 1), got {self.momentum!r}")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not self.epsilon > 0:
            raise _FieldError("epsilon", f"must be a positive number, got {self.epsilon!r}")
        if len(in_shape) not in (1, 3):
            raise _FieldError("momentum", f"BatchNorm needs a (C, H, W) or (features,) input, got {in_shape}")
        return in_shape

    def param_shapes(self, in_shape):
        c = (in_shape[0],)
        return {"gamma": c, "beta": c, "moving_mean": c, "moving_var": c}

    def flops(self, in_shape, out_shape):
        return 2 * math.prod(out_shape)


LAYER_KINDS: dict[str, type[Layer]] = {
    cls.kind: cls for cls in (Dense, Conv2D, MaxPool2D, AvgPool2D, Flatten, Activation, Dropout, BatchNorm)
}


@dataclass(frozen=True)
class LayerInfo:
    """What the spec infers about one layer."""

    index: int
    name: str
    layer: Layer
    in_shape: tuple
    out_shape: tuple
    params: int
    flops: int


@dataclass(frozen=True)
class ModelSpec:
    """A whole network: name, channels-first input shape and an ordered list of layers."""

    name: str
    input_shape: tuple
    layers: tuple

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"model: field 'name': must be a non-empty string, got {self.name!r}")
        shape = self.input_shape
        if (not isinstance(shape, (tuple, list)) or len(shape) not in (1, 3)
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
            raise SpecError(f"model {self.name!r}: field 'input_shape': must be (features,) or (C, H, W) "
                            f"of positive ints, got {shape!r}")
        object.__setattr__(self, "input_shape", tuple(shape))
        layers = tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        if not layers:
            raise SpecError(f"model {self.name!r}: field 'layers': a model needs at least one layer")
        infos, seen = [], set()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise SpecError(f"layer {i}: field 'type': not a layer: {layer!r}")
            name = layer.name if layer.name is not None else f"{layer.kind}_{i}"
            where = f"layer {i} ({name})"
            if not isinstance(name, str) or not name or "/" in name:
                raise SpecError(f"{where}: field 'name': must be a non-empty string without '/', got {name!r}")
            if name in seen:
                raise SpecError(f"{where}: field 'name': duplicate layer name {name!r}")
            seen.add(name)
            try:
                out = tuple(layer.check(shape))
            except _FieldError as e:
                raise SpecError(f"{where}: field '{e.field}': {e.message}") from None
            pshapes = layer.param_shapes(shape)
            infos.append(LayerInfo(i, name, layer, shape, out, sum(math.prod(s) for s in pshapes.values()),
                                   layer.flops(shape, out)))
            shape = out
        object.__setattr__(self, "_infos", tuple(infos))

    # --- inference -------------------------------------------------------------------------------
    @property
    def infos(self) -> tuple[LayerInfo, ...]:
        return self._infos

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
        """Forward FLOPs per sample (2 per multiply-add, plus bias, activation, pooling, norm)."""
        return sum(i.flops for i in self._infos)

    def param_shapes(self) -> dict[str, tuple]:
        """Ordered canonical weight keys "<layer>/<param>" and their shapes."""
        return {f"{i.name}/{k}": s for i in self._infos for k, s in i.layer.param_shapes(i.in_shape).items()}

    def trainable_keys(self) -> list[str]:
        return [k for k in self.param_shapes() if k.rsplit("/", 1)[1] not in NON_TRAINABLE]

    @property
    def head(self) -> str | None:
        """The output activation ("softmax"/"sigmoid") that the loss folds into its logits, if any."""
        last = self.layers[-1]
        act = getattr(last, "activation", None)
        return act if act in HEADS else None

    def logits_layers(self) -> tuple[Layer, ...]:
        """The layers up to the logits: the model without its head activation."""
        if self.head is None:
            return self.layers
        last = self.layers[-1]
        if isinstance(last, Activation):
            return self.layers[:-1]
        return self.layers[:-1] + (dataclasses.replace(last, activation="linear", name=self._infos[-1].name),)

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
            raise SpecError(f"model: not a spec object (a JSON object with name, input_shape, layers), got {type(d).__name__}")
        missing = [k for k in ("name", "input_shape", "layers") if k not in d]
        if missing:
            raise SpecError(f"model: field '{missing[0]}': missing (a spec needs name, input_shape, layers)")
        extra = sorted(set(d) - {"name", "input_shape", "layers"})
        if extra:
            raise SpecError(f"model: field '{extra[0]}': unknown field")
        if not isinstance(d["layers"], list):
            raise SpecError("model: field 'layers': must be a list of layer objects")
        layers = []
        for i, ld in enumerate(d["layers"]):
            if not isinstance(ld, dict):
                raise SpecError(f"layer {i}: field 'type': must be an object with a 'type', got {ld!r}")
            where = f"layer {i} ({ld.get('name') or ld.get('type')})"
            kind = ld.get("type")
            if kind not in LAYER_KINDS:
                raise SpecError(f"{where}: field 'type': unknown layer kind {kind!r} (known: {', '.join(LAYER_KINDS)})")
            cls_ = LAYER_KINDS[kind]
            fields = {f.name for f in dataclasses.fields(cls_)}
            args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ld.items() if k != "type"}
            for k in args:
                if k not in fields:
                    raise SpecError(f"{where}: field '{k}': unknown field for {kind} (known: {', '.join(sorted(fields))})")
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
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise SpecError(f"{path}: cannot read spec file: {e.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}: not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        try:
            return cls.from_dict(data)
        except SpecError as e:
            raise SpecError(f"{path}: {e}") from None

    # --- display ---------------------------------------------------------------------------------
    def summary(self) -> str:
        """A Keras-style table: layer, output shape, params, FLOPs."""
        from tabulate import tabulate
        rows = [(f"{i.name} ({type(i.layer).__name__})", str(i.out_shape), f"{i.params:,}", f"{i.flops:,}")
                for i in self._infos]
        table = tabulate(rows, headers=("Layer (type)", "Output shape", "Params", "FLOPs"),
                         colalign=("left", "left", "right", "right"))
        return (f'Model "{self.name}"  input {self.input_shape}\n{table}\n'
                f"Total params: {self.params:,} (trainable {self.trainable_params:,})\n"
                f"Forward FLOPs per sample: {self.flops:,}")
