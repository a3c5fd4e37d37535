"""Seeded generators of random valid specs (stacks and graphs) mixing every layer kind, odd sizes, strides and
"same" padding."""
import dataclasses

import numpy as np

from nncompare.models import (INPUT, Activation, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D, Dense, Dropout,
                              Flatten, GlobalAveragePooling2D, MaxPool2D, ModelSpec, SpecError)

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


GRAPH_ACTS = ACTS + ("leaky_relu", "leaky_relu(0.1)", "elu", "softplus", "silu", "gelu", "gelu_tanh")


def random_graph_spec(seed: int) -> ModelSpec:
    """A valid small graph (sizes <= 12): chains, skip connections (Add), branches (Concatenate), "same" pools,
    GlobalAveragePooling2D, bias-free convs and every activation; every branch is merged before the output."""
    rng = np.random.default_rng(seed)
    image = rng.integers(5) > 0
    shape = (int(rng.integers(1, 4)), int(rng.integers(4, 10)), int(rng.integers(4, 10))) if image \
        else (int(rng.integers(2, 13)),)
    shapes, open_, layers = {INPUT: shape}, [INPUT], []  # open_: outputs nobody reads yet

    def act():
        return str(GRAPH_ACTS[rng.integers(len(GRAPH_ACTS))])

    def add(layer, inputs):
        """Append `layer` reading `inputs` if its shapes fit; return its name or None."""
        name = f"n{len(layers)}"
        layer = dataclasses.replace(layer, name=name, inputs=tuple(inputs))
        try:
            out = tuple(layer.check_inputs(tuple(shapes[i] for i in inputs), tuple(inputs)))
        except Exception:  # the layer's own validation: this candidate does not fit here
            return None
        layers.append(layer)
        shapes[name] = out
        for i in inputs:
            if i in open_:
                open_.remove(i)
        open_.append(name)
        return name

    def pick(flat: bool) -> str:
        """An existing node, preferring open ones (so most get consumed by chains, not only the final merge)."""
        pool = [n for n in (open_ if rng.random() < 0.8 else list(shapes)) if (len(shapes[n]) == 1) == flat]
        pool = pool or [n for n in shapes if (len(shapes[n]) == 1) == flat]
        return pool[rng.integers(len(pool))]

    def image_step():
        src = pick(False)
        c = shapes[src][0]
        choice = rng.integers(10)
        if choice <= 2:
            add(Conv2D(int(rng.integers(1, 7)), (int(rng.integers(1, 4)), int(rng.integers(1, 4))),
                       strides=int(rng.integers(1, 3)), padding=["valid", "same", "same", 1][rng.integers(4)],
                       activation=act(), use_bias=bool(rng.integers(2))), [src])
        elif choice == 3:
            pool = MaxPool2D if rng.integers(2) else AvgPool2D
            add(pool(int(rng.integers(2, 4)), strides=[None, 1, 2][rng.integers(3)],
                     padding=["valid", "same"][rng.integers(2)]), [src])
        elif choice == 4:
            add(BatchNorm(momentum=float(rng.choice([0.9, 0.99])), epsilon=float(rng.choice([1e-3, 1e-5]))), [src])
        elif choice == 5:
            add(Activation(act()), [src])
        elif choice == 6:  # a residual connection: src + f(src), f keeping the shape
            branch = add(Conv2D(c, 3, padding="same", activation=act(), use_bias=bool(rng.integers(2))), [src])
            if branch:
                add(Add(), [src, branch] if rng.integers(2) else [branch, src])
        elif choice == 7:  # Add of any two equal-shaped nodes
            same = [n for n in shapes if n != src and shapes[n] == shapes[src]]
            if same:
                add(Add(), [src, same[rng.integers(len(same))]])
        else:  # parallel branches, concatenated over channels
            k = int(rng.integers(1, 4))
            branches = [add(Conv2D(int(rng.integers(1, 5)), 2 * int(rng.integers(0, 2)) + 1, padding="same",
                                   activation=act(), use_bias=bool(rng.integers(2))), [src])
                        for _ in range(int(rng.integers(1, 3)))]
            if rng.integers(2):
                branches.append(add(MaxPool2D(k, strides=1, padding="same"), [src]))
            add(Concatenate(), [b for b in branches if b] + [src])

    def flat_step():
        src = pick(True)
        choice = rng.integers(7)
        if choice <= 1:
            add(Dense(int(rng.integers(1, 13)), activation=act()), [src])
        elif choice == 2:
            add(BatchNorm(momentum=float(rng.choice([0.9, 0.99]))), [src])
        elif choice == 3:
            add(Activation(act()), [src])
        elif choice == 4:
            add(Dropout(0.0), [src])
        elif choice == 5:
            branch = add(Dense(shapes[src][0], activation=act()), [src])
            if branch:
                add(Add(), [branch, src])
        else:
            branch = add(Dense(int(rng.integers(1, 7)), activation=act()), [src])
            if branch:
                add(Concatenate(), [src, branch])

    if image:
        for _ in range(rng.integers(1, 6)):
            image_step()
        for n in [n for n in open_ if len(shapes[n]) == 3]:  # every open image node becomes flat
            add(GlobalAveragePooling2D() if rng.integers(2) else Flatten(), [n])
    for _ in range(rng.integers(0, 4)):
        flat_step()
    if len(open_) > 1:
        add(Concatenate(), list(open_))
    classes = int(rng.choice([1, 2, 3, 5]))
    add(Dense(classes, activation=["linear", "softmax" if classes > 1 else "sigmoid"][rng.integers(2)]), [open_[0]])
    return ModelSpec(f"graph_{seed}", shape, tuple(layers))
