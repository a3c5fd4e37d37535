"""Canonical seeded initial weights, identical for every framework."""
from __future__ import annotations

import math

import numpy as np

from .spec import ModelSpec


def init_weights(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Glorot-uniform kernels, zero biases, BatchNorm gamma=1 beta=0 mean=0 var=1 (Normalization's mean and variance
    too); float32, canonical layout."""
    rng = np.random.default_rng(seed)
    weights = {}
    for key, shape in spec.param_shapes().items():
        param = key.rsplit("/", 1)[1]
        if param == "kernel":
            if len(shape) == 2:   # Dense (in, out)
                fan_in, fan_out = shape
            else:                 # Conv2D (out, in // groups, kh, kw)
                field = shape[2] * shape[3]
                fan_in, fan_out = shape[1] * field, shape[0] * field
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            weights[key] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
        elif param in ("gamma", "moving_var", "variance"):
            weights[key] = np.ones(shape, np.float32)
        else:
            weights[key] = np.zeros(shape, np.float32)
    return weights
