"""Seeded generator of random valid specs mixing every layer kind, odd sizes, strides and "same" padding."""
import numpy as np

from nncompare.models import (Activation, AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ModelSpec,
                    SpecError)

ACTS = ("linear", "relu", "sigmoid", "tanh", "softmax")


def _image_layer(rng):
    pick = rng.integers(8)
    if pick <= 2:
        return Conv2D(int(rng.integers(1, 6)), (int(rng.integers(1, 5)), int(rng.integers(1, 5))),
                      strides=int(rng.integers(1, 3)), padding=["valid", "same", "same", 1][rng.integers(4)],
                      activation=ACTS[rng.integers(4)])  # no softmax inside conv: covered by Activation
    if pick in (3, 7):
        k = int(rng.integers(2, 4))
        return (MaxPool2D if rng.integers(2) else AvgPool2D)(k, strides=[None, 1, 2][rng.integers(3)])
    if pick == 4:
        return BatchNorm(momentum=float(rng.choice([0.9, 0.99, 0.5])), epsilon=float(rng.choice([1e-3, 1e-5])))
    if pick == 5:
        return Activation(ACTS[rng.integers(1, 5)])
    return Dropout(0.0)


def _flat_layer(rng):
    pick = rng.integers(5)
    if pick <= 1:
        return Dense(int(rng.integers(1, 12)), activation=ACTS[rng.integers(5)])
    if pick == 2:
        return BatchNorm(momentum=float(rng.choice([0.9, 0.99])))
    if pick == 3:
        return Activation(ACTS[rng.integers(1, 5)])
    return Dropout(0.0)


def random_spec(seed: int) -> ModelSpec:
    """A valid spec: an image part (when the input is an image), Flatten, a dense part, a Dense output."""
    rng = np.random.default_rng(seed)
    image = rng.integers(4) > 0
    shape = (int(rng.integers(1, 4)), int(rng.integers(4, 12)), int(rng.integers(4, 12))) if image \
        else (int(rng.integers(1, 20)),)
    layers = []

    def add(layer):
        try:
            ModelSpec("probe", shape, tuple(layers) + (layer,))
        except SpecError:
            return
        layers.append(layer)

    if image:
        for _ in range(rng.integers(1, 5)):
            add(_image_layer(rng))
        layers.append(Flatten())
    for _ in range(rng.integers(0, 4)):
        add(_flat_layer(rng))
    classes = int(rng.choice([1, 2, 3, 5]))
    layers.append(Dense(classes, activation=["linear", "softmax" if classes > 1 else "sigmoid"][rng.integers(2)]))
    return ModelSpec(f"random_{seed}", shape, tuple(layers))
