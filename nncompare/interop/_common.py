"""What every importer shares: the error class, layer naming, and a builder that collects spec layers and weights."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

from ..models import INPUT, Layer, ModelSpec, SpecError, same_padding
from ..models.spec import LEAKY_RELU_SLOPE


class InteropError(SpecError):
    """A model that cannot be imported or exported exactly; one line naming the layer or node, its type and what
    is supported. A SpecError, so callers that report bad specs report these the same way."""


def supported(names) -> str:
    return ", ".join(sorted(set(names)))


@dataclass(frozen=True)
class Value:
    """A source tensor as the spec sees it: the spec layer (or INPUT) computing it and its canonical shape
    (no batch axis). perm: for a flat tensor whose source order differs from the canonical one (a channels-last
    image flattened), the canonical index of each source position. kept: the source keeps pooled images as
    (C, 1, 1) where the spec has (C,). last: the source holds this image channels-last (torch's permute(0, 2, 3, 1)),
    where only what acts per position (elementwise layers, Linear or LayerNorm over the channels) may read it."""

    name: str
    shape: tuple
    perm: np.ndarray | None = None
    kept: bool = False
    last: bool = False


class Builder:
    """Spec layers and canonical weights in topological order; names sanitized and unique."""

    def __init__(self, source: str):
        self.source = source
        self.layers: list[Layer] = []
        self.weights: dict[str, np.ndarray] = {}
        self.used = {INPUT}

    def name(self, raw, fallback: str) -> str:
        """`raw` as a spec layer name: letters, digits, _ and - (others become _), at most 64, unique."""
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", str(raw or "")).strip("_")[:56].strip("_") or fallback
        name, n = base, 1
        while name in self.used:
            n += 1
            name = f"{base}_{n}"
        self.used.add(name)
        return name

    def add(self, layer: Layer, inputs: list[Value], weights: dict | None = None, where: str = "") -> Value:
        """Append `layer` (already named) reading `inputs`; returns its Value. A layer reading the one before it
        names no inputs, so a stack imports as a plain stack."""
        names = tuple(v.name for v in inputs)
        try:
            shape = tuple(layer.check_inputs(tuple(v.shape for v in inputs), names))
        except Exception as e:  # the spec's own field check, e.g. a kernel larger than its input
            field = f"field {e.field!r}: " if getattr(e, "field", "inputs") != "inputs" else ""
            raise InteropError(f"{self.source}: {where or layer.name}: {field}{getattr(e, 'message', e)}") from None
        previous = self.layers[-1].name if self.layers else INPUT
        single = len(names) == 1 and names[0] == previous and not layer.merges
        layer = dataclasses.replace(layer, inputs=None if single else names)
        self.layers.append(layer)
        for k, v in (weights or {}).items():
            self.weights[f"{layer.name}/{k}"] = np.ascontiguousarray(v, dtype=np.float32)
        return Value(layer.name, shape)

    def spec(self, model_name: str, input_shape: tuple, output: Value) -> tuple[ModelSpec, dict[str, np.ndarray]]:
        if output.name == INPUT or not self.layers:
            raise InteropError(f"{self.source}: computes nothing from its input (its output is the input itself)")
        if output.name != self.layers[-1].name:
            raise InteropError(f"{self.source}: its output {output.name!r} is not the last layer computed; "
                               f"a layer whose result is never used makes a dangling branch")
        name = re.sub(r"\s+", " ", str(model_name or "")).strip()[:100]
        name = name if name.isprintable() and name else "imported"
        try:
            spec = ModelSpec(name, tuple(int(s) for s in input_shape), tuple(self.layers))
        except SpecError as e:
            raise InteropError(f"{self.source}: not a valid spec after import: {e}") from None
        shapes = spec.param_shapes()
        for k, shape in shapes.items():  # a mismatch is a bug in an importer, not in the user's model
            assert self.weights[k].shape == tuple(shape), (k, self.weights[k].shape, shape)
        return spec, {k: self.weights[k] for k in shapes}


def leaky(slope: float) -> str:
    """The spec's activation string for a leaky ReLU of slope `slope`."""
    return "leaky_relu" if float(slope) == LEAKY_RELU_SLOPE else f"leaky_relu({float(slope)!r})"


def is_tf_same(size: int, kernel: int, stride: int, before: int, out: int) -> bool:
    """Whether a window padded `before` cells at the start and giving `out` cells is TensorFlow's "same" on this
    axis (the rest of its padding, if any, after the end: bottom/right)."""
    return same_padding(size, kernel, stride)[0] == before and out == -(-size // stride)
