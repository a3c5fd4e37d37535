"""Keras 3 model -> spec. Keras images are channels-last (H, W, C), the spec's (C, H, W): conv kernels go HWIO ->
OIHW, and a flattened image is in (H, W, C) order, tracked as a permutation per flat tensor (as
backends/keras_backend.py does) and absorbed into the next Dense kernel's rows or a flat BatchNorm's parameters.

Import is for inference: a Dropout with a noise_shape (stochastic depth, whole samples dropped) is the identity
there and is folded away, so the spec predicts exactly what the model predicts but trains without stochastic depth;
a plain Dropout stays a Dropout."""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

import dataclasses

from ..models import (INPUT, Activation, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D, Dense, Dropout, Flatten,
                      GlobalAveragePooling2D, LayerNormalization, MaxPool2D, Multiply, Normalization, Rescaling,
                      ZeroPadding2D)

from ._common import Builder, InteropError, Value, leaky, supported

L = keras.layers
# Keras activation names -> the spec's (Keras' leaky_relu slope 0.2 and elu alpha 1 are the spec's defaults)
_ACTIVATIONS = {"linear": "linear", "relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "softmax": "softmax",
                "elu": "elu", "softplus": "softplus", "silu": "silu", "swish": "silu", "gelu": "gelu",
                "leaky_relu": "leaky_relu", "relu6": "relu6", "hard_sigmoid": "hard_sigmoid",
                "hard_silu": "hard_swish", "hard_swish": "hard_swish"}
SUPPORTED = ("InputLayer", "Dense (flat, or per position of an image)", "Conv2D", "DepthwiseConv2D",
             "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "ZeroPadding2D", "Flatten",
             "Reshape (a flat (C,) to (1, 1, C))", "Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "Dropout",
             "BatchNormalization", "LayerNormalization", "Normalization", "Rescaling", "Add", "Multiply",
             "Concatenate", "Identity", "ConvNeXt's LayerScale and StochasticDepth",
             "Sequential (of these)")


class _Refused(Exception):
    """Raised while converting one layer; from_keras adds the layer's name and type."""


def _float32_only(layer) -> None:
    policy = getattr(layer, "dtype_policy", None)
    if policy is not None and getattr(policy, "compute_dtype", "float32") != "float32":
        raise _Refused(f"computes in {policy.compute_dtype}; the spec computes in float32")


def _activation(value) -> str:
    if value is None:
        return "linear"
    if not isinstance(value, str) or value not in _ACTIVATIONS:
        raise _Refused(f"activation {value!r} is not supported (supported: {supported(_ACTIVATIONS)})")
    return _ACTIVATIONS[value]


def _numpy(variable) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable), np.float32)


def _hwc_order(shape: tuple) -> np.ndarray:
    """For a (C, H, W) image flattened channels-last: the canonical (C, H, W) flat index of each position."""
    c, h, w = shape
    return np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)


def _identity(perm) -> bool:
    return perm is None or np.array_equal(perm, np.arange(len(perm)))


def _load(model_or_path):
    if isinstance(model_or_path, keras.Model):
        return model_or_path
    if not isinstance(model_or_path, (str, Path)):
        raise InteropError(f"from_keras: expected a keras.Model or a .keras file path, got "
                           f"{type(model_or_path).__name__}")
    try:
        return keras.saving.load_model(str(model_or_path), compile=False)
    except Exception as e:  # a missing file, a file that is no Keras model, unsafe (Lambda) deserialization
        raise InteropError(f"{model_or_path}: cannot load a Keras model: {str(e).splitlines()[0][:300]}") from None


def _graph(model) -> tuple[list[tuple], str, str]:
    """[(layer or keras.ops operation, [input layer names], [its arguments: a layer name per tensor, numbers as they
    are])] in topological order, the input layer's name and the output layer's name."""
    if isinstance(model, keras.Sequential):
        layers, previous, graph = model.layers, "input", []
        for layer in layers:
            graph.append((layer, [previous], [previous]))
            previous = layer.name
        return graph, "input", previous
    config = model.get_config()
    ends = []
    for key in ("input_layers", "output_layers"):
        refs = config.get(key) or []
        refs = [refs] if refs and isinstance(refs[0], str) else refs
        if len(refs) != 1:
            raise InteropError(f"Keras model {model.name!r}: {len(refs)} {key.split('_')[0]}s; a spec has one")
        ends.append(refs[0][0])
    operations = {op.name: op for op in model.operations}  # layers, and keras.ops calls on Keras tensors (x + 3)
    graph = []
    for entry in config["layers"]:
        layer = operations[entry["name"]]
        nodes = entry.get("inbound_nodes") or []
        if len(nodes) > 1:
            raise InteropError(f"Keras model {model.name!r}: layer {layer.name!r} ({type(layer).__name__}) is "
                               f"called {len(nodes)} times; shared layers are not supported")
        inputs, args = [], []

        def collect(obj, top=False):
            if isinstance(obj, dict) and obj.get("class_name") == "__keras_tensor__":
                inputs.append(obj["config"]["keras_history"][0])
                args.append(inputs[-1])
            elif isinstance(obj, dict):
                for v in obj.values():
                    collect(v)
            elif isinstance(obj, (list, tuple)):
                for v in obj:
                    collect(v, top)
            elif top and isinstance(obj, (int, float)) and not isinstance(obj, bool):
                args.append(obj)
        if nodes:
            collect(nodes[0].get("args", []), top=True)
            collect(nodes[0].get("kwargs", {}))
        graph.append((layer, inputs, args))
    return graph, ends[0], ends[1]


class _Walk:
    def __init__(self, model, source: str):
        self.model, self.b = model, Builder(source)
        self.values: dict[str, Value] = {}

    def layer(self, layer, kind, inputs: list[Value], weights=None, **fields) -> Value:
        name = self.b.name(layer.name, kind.kind)
        return self.b.add(kind(**fields, name=name), inputs, weights, layer.name)

    @staticmethod
    def channels_last(cfg: dict) -> None:
        if cfg.get("data_format", "channels_last") != "channels_last":
            raise _Refused(f"data_format {cfg['data_format']!r}: only channels_last (Keras' default) is supported")

    def run(self):
        model = self.model
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise InteropError(f"{self.b.source}: {len(model.inputs)} inputs and {len(model.outputs)} outputs; a spec "
                               f"has one of each")
        shape = tuple(model.inputs[0].shape[1:])
        if len(shape) not in (1, 3) or any(s is None for s in shape):
            raise InteropError(f"{self.b.source}: input shape (N, {', '.join(map(str, shape))}) is not a fixed "
                               f"(H, W, C) image or (features,) vector")
        spec_shape = (shape[2], shape[0], shape[1]) if len(shape) == 3 else shape
        graph, input_name, output_name = _graph(model)
        self.readers = {}  # Keras layer name -> how many Keras layers read it
        for _, inputs, _ in graph:
            for n in inputs:
                self.readers[n] = self.readers.get(n, 0) + 1
        self.values[input_name] = Value(INPUT, spec_shape)
        for layer, inputs, args in graph:
            if isinstance(layer, L.InputLayer):
                self.values[layer.name] = self.values[input_name]
                continue
            try:
                missing = [n for n in inputs if n not in self.values]
                if missing or not inputs:
                    raise _Refused(f"reads {missing or 'nothing'}, not an earlier layer of this model")
                _float32_only(layer)
                self.inputs = inputs
                xs = [self.values[n] for n in inputs]
                if not isinstance(layer, keras.Layer):
                    self.values[layer.name] = self.operation(layer, args, xs)
                    continue
                self.values[layer.name] = self.convert(layer, layer.get_config(), xs)
            except _Refused as e:
                raise InteropError(f"{self.b.source}: layer {layer.name!r} ({type(layer).__name__}): {e}") from None
        out = self.values[output_name]
        if not _identity(out.perm):
            raise InteropError(f"{self.b.source}: its output is a flattened channels-last image, in (H, W, C) order "
                               f"where the spec's is (C, H, W); end with a Dense (or a global pooling) instead")
        return self.b.spec(model.name, spec_shape, out)

    def convert(self, layer, cfg: dict, xs: list[Value]) -> Value:
        t, x = type(layer), xs[0]
        if isinstance(layer, keras.Sequential):
            return self.sequential(layer, x)
        if t is L.Dense:
            if len(x.shape) == 3:  # over the channels of each position (ConvNeXt's pointwise convolutions)
                weights = {"kernel": _numpy(layer.kernel).T[:, :, None, None]}
                if layer.use_bias:
                    weights["bias"] = _numpy(layer.bias)
                return self.layer(layer, Conv2D, [x], weights, filters=int(cfg["units"]), kernel_size=1,
                                  activation=_activation(cfg["activation"]), use_bias=bool(layer.use_bias))
            if len(x.shape) != 1:
                raise _Refused(f"Dense on an (N, {', '.join(map(str, x.shape))}) tensor applies to its last axis; the "
                               f"spec's Dense needs a flat input or an image")
            kernel = _numpy(layer.kernel)
            if x.perm is not None:  # rows in the source's flat order -> the canonical C, H, W order
                rows = np.empty_like(kernel)
                rows[x.perm] = kernel
                kernel = rows
            bias = _numpy(layer.bias) if layer.use_bias else np.zeros(kernel.shape[1], np.float32)
            return self.layer(layer, Dense, [x], {"kernel": kernel, "bias": bias}, units=int(cfg["units"]),
                              activation=_activation(cfg["activation"]))
        if t in (L.Conv2D, L.DepthwiseConv2D):
            self.channels_last(cfg)
            kernel = _numpy(layer.kernel)
            if t is L.DepthwiseConv2D:  # (kh, kw, in, m) -> (in * m, 1, kh, kw): output channel c * m + j reads c
                kernel = kernel.transpose(2, 3, 0, 1).reshape(-1, 1, *kernel.shape[:2])
                filters, groups = x.shape[0] * int(cfg["depth_multiplier"]), x.shape[0]
            else:
                kernel, filters, groups = kernel.transpose(3, 2, 0, 1), int(cfg["filters"]), int(cfg.get("groups", 1))
            weights = {"kernel": kernel}  # HWIO -> OIHW
            if layer.use_bias:
                weights["bias"] = _numpy(layer.bias)
            return self.layer(layer, Conv2D, [x], weights, filters=filters, kernel_size=_pair(cfg["kernel_size"]),
                              strides=_pair(cfg["strides"]), padding=cfg["padding"],
                              activation=_activation(cfg["activation"]), use_bias=bool(cfg["use_bias"]),
                              groups=groups, dilation=_pair(cfg["dilation_rate"]))
        if t is L.ZeroPadding2D:
            self.channels_last(cfg)
            return self.layer(layer, ZeroPadding2D, [x], padding=tuple(tuple(int(v) for v in p)
                                                                       for p in cfg["padding"]))
        if t is L.Reshape:
            return self.gate(layer, cfg, x)
        if t is L.Rescaling:
            scale, offset = cfg["scale"], cfg["offset"]
            if not all(isinstance(v, (int, float)) for v in (scale, offset)):
                raise _Refused("per-channel scale or offset is not supported (the spec's Rescaling has one of each)")
            v = self.layer(layer, Rescaling, [x], scale=float(scale), offset=float(offset))
            return Value(v.name, v.shape, x.perm)
        if t is L.Normalization:
            return self.normalization(layer, cfg, x)
        if t is L.LayerNormalization:
            return self.layernorm(layer, cfg, x)
        if t is L.Multiply:
            return self.multiply(layer, xs)
        if t in (L.MaxPooling2D, L.AveragePooling2D):
            self.channels_last(cfg)
            kind = MaxPool2D if t is L.MaxPooling2D else AvgPool2D
            pool, strides = _pair(cfg["pool_size"]), _pair(cfg["strides"] or cfg["pool_size"])
            return self.layer(layer, kind, [x], pool_size=pool, strides=None if strides == pool else strides,
                              padding=cfg["padding"])
        if t is L.GlobalAveragePooling2D:
            self.channels_last(cfg)
            return self.layer(layer, GlobalAveragePooling2D, [x], keepdims=bool(cfg.get("keepdims")))
        if t is L.Flatten:
            self.channels_last(cfg)
            if len(x.shape) == 1:
                return x
            v = self.layer(layer, Flatten, [x])
            return Value(v.name, v.shape, None if _identity(_hwc_order(x.shape)) else _hwc_order(x.shape))
        if t is L.Identity:
            return x
        if t in (L.Activation, L.ReLU, L.LeakyReLU, L.ELU, L.Softmax):
            return self.activation(layer, cfg, x)
        if t is L.Dropout:
            if cfg.get("noise_shape") is not None:
                # stochastic depth (EfficientNet's per-sample Dropout): the identity at inference, folded away, so
                # the imported spec predicts what the model predicts but trains without stochastic depth
                return x
            v = self.layer(layer, Dropout, [x], rate=float(cfg["rate"]))
            return Value(v.name, v.shape, x.perm)
        if t is L.BatchNormalization:
            return self.batchnorm(layer, cfg, x)
        if t in (L.Add, L.Concatenate):
            return self.merge(layer, cfg, xs)
        if t.__module__ == "keras.src.applications.convnext" and t.__name__ in ("StochasticDepth", "LayerScale"):
            return self.convnext(layer, x)
        raise _Refused(f"layer type {t.__name__} is not supported (supported: {supported(SUPPORTED)})")

    def sequential(self, model, x: Value) -> Value:
        """A Sequential inside the model (ConvNeXt's stem and downsampling steps): its layers in turn, each read by
        the next alone; a refusal names the inner layer."""
        for sub in model.layers:
            try:
                _float32_only(sub)
                x = self.convert(sub, sub.get_config(), [x])
            except _Refused as e:
                raise _Refused(f"its layer {sub.name!r} ({type(sub).__name__}): {e}") from None
            self.inputs = [(model.name, sub.name)]
            self.readers[self.inputs[0]] = 1
        return x

    def convnext(self, layer, x: Value) -> Value:
        """ConvNeXt's own layers: StochasticDepth is the identity at inference (folded); LayerScale multiplies each
        channel by its gamma, which a depthwise 1x1 convolution does exactly."""
        if type(layer).__name__ == "StochasticDepth":
            return x
        gamma = _numpy(layer.gamma)
        if len(x.shape) != 3 or gamma.shape != (x.shape[0],):
            raise _Refused(f"a layer scale of {gamma.shape} on an (N, {', '.join(map(str, x.shape))}) tensor; only a "
                           f"per-channel scale of an image is supported")
        return self.layer(layer, Conv2D, [x], {"kernel": gamma.reshape(-1, 1, 1, 1)}, filters=x.shape[0],
                          kernel_size=1, use_bias=False, groups=x.shape[0])

    def operation(self, op, args: list, xs: list[Value]) -> Value:
        """A keras.ops call on Keras tensors: a tensor plus or times a number (MobileNetV3's relu6(x + 3) * (1 / 6)
        as written) is a Rescaling; a sum or product of two tensors an Add or a Multiply."""
        kind = type(op).__name__
        numbers = [a for a in args if not isinstance(a, str)]
        if type(op).__module__.startswith("keras.src.ops.numpy") and kind in ("Add", "Multiply", "Subtract"):
            if len(xs) == 1 and len(numbers) == 1 and (kind != "Subtract" or isinstance(args[0], str)):
                c = float(numbers[0])
                scale, offset = (c, 0.0) if kind == "Multiply" else (1.0, c if kind == "Add" else -c)
                v = self.layer(op, Rescaling, xs, scale=scale, offset=offset)
                return Value(v.name, v.shape, xs[0].perm)
            if len(xs) == 2 and not numbers and kind != "Subtract":
                return self.multiply(op, xs) if kind == "Multiply" else self.merge(op, {}, xs)
        raise _Refused(f"the operation keras.ops.{kind.lower()} on {len(xs)} tensors and the numbers {numbers} is not "
                       f"supported (supported: a tensor plus, minus or times a number; a sum or product of two "
                       f"tensors)")

    def activation(self, layer, cfg: dict, x: Value) -> Value:
        t = type(layer)
        if t is L.Activation:
            act = _activation(cfg["activation"])
        elif t is L.ReLU:
            top, slope = cfg.get("max_value"), cfg.get("negative_slope", 0)
            if cfg.get("threshold", 0) != 0 or top not in (None, 6) or (top is not None and slope != 0):
                raise _Refused("threshold, and max_value other than 6 (relu6), are not supported")
            act = "relu6" if top is not None else "relu" if slope == 0 else leaky(slope)
        elif t is L.LeakyReLU:
            act = leaky(cfg["negative_slope"])
        elif t is L.ELU:
            alpha = float(cfg.get("alpha", 1.0))
            act = "elu" if alpha == 1.0 else f"elu({alpha!r})"
        else:
            axis = cfg.get("axis", -1)
            if axis not in (-1, len(x.shape)):
                raise _Refused(f"softmax over axis {axis}; the spec's runs over the channels (the last Keras axis)")
            act = "softmax"
        if act == "linear":  # Activation(None), as keras.applications ends with classifier_activation=None
            return x
        v = self.layer(layer, Activation, [x], activation=act)
        return Value(v.name, v.shape, x.perm)  # elementwise (softmax: over all features, in any order)

    def batchnorm(self, layer, cfg: dict, x: Value) -> Value:
        axis = cfg["axis"]
        axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
        if axis not in (-1, len(x.shape)):
            raise _Refused(f"normalizes axis {cfg['axis']}; only the channel (last) axis is supported")
        if cfg.get("renorm"):
            raise _Refused("batch renormalization is not supported")
        c = x.shape[0]
        w = {"gamma": _numpy(layer.gamma) if cfg["scale"] else np.ones(c, np.float32),
             "beta": _numpy(layer.beta) if cfg["center"] else np.zeros(c, np.float32),
             "moving_mean": _numpy(layer.moving_mean), "moving_var": _numpy(layer.moving_variance)}
        if x.perm is not None:  # a flat BatchNorm over permuted features: its parameters follow them
            for k, a in w.items():
                canonical = np.empty_like(a)
                canonical[x.perm] = a
                w[k] = canonical
        v = self.layer(layer, BatchNorm, [x], w, momentum=float(cfg["momentum"]), epsilon=float(cfg["epsilon"]))
        return Value(v.name, v.shape, x.perm)

    def gate(self, layer, cfg: dict, x: Value) -> Value:
        """Reshape of a global pooling's flat (C,) to (1, 1, C) (squeeze-and-excitation): the pooling keeps its dims."""
        target = tuple(cfg["target_shape"])
        producer = next((k for k, l in enumerate(self.b.layers) if l.name == x.name), None)
        pooled = producer is not None and isinstance(self.b.layers[producer], GlobalAveragePooling2D)
        if len(x.shape) != 1 or target != (1, 1, x.shape[0]) or not pooled or self.readers[self.inputs[0]] != 1:
            raise _Refused(f"reshape to {target}: only a global pooling's (C,), read by nothing else, to (1, 1, C) "
                           f"is supported")
        self.b.layers[producer] = dataclasses.replace(self.b.layers[producer], keepdims=True)
        return Value(x.name, (x.shape[0], 1, 1))

    def normalization(self, layer, cfg: dict, x: Value) -> Value:
        axis = cfg.get("axis", -1)
        axis = tuple(axis) if isinstance(axis, (list, tuple)) else (axis,)
        if axis not in ((-1,), (len(x.shape),)) or cfg.get("invert"):
            raise _Refused(f"axis {cfg.get('axis')}, invert {cfg.get('invert')}: only a Normalization over the "
                           f"channel (last) axis is supported")
        # the statistics Keras computes with: constants it took from its variables when built
        c = x.shape[0]
        mean, var = (np.broadcast_to(_numpy(v).reshape(-1), (c,)).copy() for v in (layer.mean, layer.variance))
        w = {"mean": self.canonical(mean, x), "variance": self.canonical(var, x)}
        v = self.layer(layer, Normalization, [x], w)
        return Value(v.name, v.shape, x.perm)

    def layernorm(self, layer, cfg: dict, x: Value) -> Value:
        axis = cfg["axis"]
        axis = tuple(axis) if isinstance(axis, (list, tuple)) else (axis,)
        if axis not in ((-1,), (len(x.shape),)) or cfg.get("rms_scaling"):
            raise _Refused(f"axis {cfg['axis']}: only a LayerNormalization over the channel (last) axis is supported")
        c = x.shape[0]
        w = {"gamma": _numpy(layer.gamma) if cfg["scale"] else np.ones(c, np.float32),
             "beta": _numpy(layer.beta) if cfg["center"] else np.zeros(c, np.float32)}
        v = self.layer(layer, LayerNormalization, [x], {k: self.canonical(a, x) for k, a in w.items()},
                       epsilon=float(cfg["epsilon"]))
        return Value(v.name, v.shape, x.perm)

    @staticmethod
    def canonical(a: np.ndarray, x: Value) -> np.ndarray:
        """Per-feature parameters of a flat tensor in the source's order, in the canonical order."""
        if x.perm is None:
            return np.asarray(a, np.float32)
        out = np.empty_like(a)
        out[x.perm] = a
        return out

    def multiply(self, layer, xs: list[Value]) -> Value:
        shapes = [x.shape for x in xs]
        gate = Multiply.gate(shapes)
        if gate is None and (len(set(shapes)) != 1 or len({None if _identity(x.perm) else x.perm.tobytes()
                                                             for x in xs}) != 1):
            raise _Refused("multiplies tensors of different shapes or flatten orders (other than an image and a "
                           "per-channel gate)")
        if gate is not None and not _identity(xs[gate].perm):
            raise _Refused("its per-channel gate is a flattened image")
        v = self.layer(layer, Multiply, xs)
        return Value(v.name, v.shape, xs[0].perm if gate is None else None)

    def merge(self, layer, cfg: dict, xs: list[Value]) -> Value:
        if len(xs) < 2:
            raise _Refused(f"merges {len(xs)} tensor; the spec's merges take two or more")
        if type(layer) is L.Add or not isinstance(layer, keras.Layer):
            if len({x.shape for x in xs}) != 1 or len({None if _identity(x.perm) else x.perm.tobytes()
                                                      for x in xs}) != 1:
                raise _Refused("adds tensors of different shapes or flatten orders")
            v = self.layer(layer, Add, xs)
            return Value(v.name, v.shape, xs[0].perm)
        axis = cfg.get("axis", -1)
        if axis not in (-1, len(xs[0].shape)):
            raise _Refused(f"concatenates axis {axis}; the spec's Concatenate joins the channels (the last axis)")
        v = self.layer(layer, Concatenate, xs)
        if all(_identity(x.perm) for x in xs):
            return v
        offsets = np.cumsum([0] + [x.shape[0] for x in xs[:-1]])
        perm = np.concatenate([(np.arange(x.shape[0]) if x.perm is None else x.perm) + o for x, o in zip(xs, offsets)])
        return Value(v.name, v.shape, perm)


def _pair(v) -> int | tuple[int, int]:
    v = (v, v) if isinstance(v, int) else tuple(int(x) for x in v)
    return v[0] if v[0] == v[1] else v


def from_keras(model_or_path):
    model = _load(model_or_path)
    if not isinstance(model, keras.Model):
        raise InteropError(f"from_keras: {model_or_path} holds a {type(model).__name__}, not a keras.Model")
    if not model.built or not model.inputs:
        raise InteropError(f"Keras model {model.name!r} is not built: give it an input shape (keras.Input) first")
    return _Walk(model, f"Keras model {model.name!r}").run()
