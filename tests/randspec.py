"""Seeded generators of random valid specs (stacks and graphs) mixing every layer kind, odd sizes, strides,
"same", int and explicit padding, groups, dilation and ceil_mode."""
import dataclasses

import numpy as np

from nncompare.models import (INPUT, Activation, AdaptiveAvgPool2D, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D,
                              Dense, Dropout, Flatten, GlobalAveragePooling2D, LayerNormalization, MaxPool2D, ModelSpec,
                              Multiply, Normalization, Rescaling, SpecError, ZeroPadding2D)

ACTS = ("linear", "relu", "sigmoid", "tanh", "softmax")
CNN_ACTS = ("relu6", "hard_sigmoid", "hard_swish", "elu(0.5)")


def _explicit_pads(rng, most: int = 2):
    """((top, bottom), (left, right)), each side 0..most."""
    return tuple(tuple(int(v) for v in rng.integers(0, most + 1, 2)) for _ in range(2))


def _conv(rng, channels: int, act: str, use_bias: bool = True) -> Conv2D:
    """A conv with any of: groups (depthwise with a multiplier among them), dilation, explicit padding."""
    groups = int(rng.choice([g for g in (1, 2, 3, channels) if channels % g == 0]))
    filters = groups * int(rng.integers(1, 3)) if groups > 1 else int(rng.integers(1, 7))
    dilated = rng.integers(3) == 0
    return Conv2D(filters, (int(rng.integers(1, 4)), int(rng.integers(1, 4))),
                  strides=1 if dilated else int(rng.integers(1, 3)),
                  padding=["valid", "same", "same", 1, _explicit_pads(rng)][rng.integers(5)],
                  activation=act, use_bias=use_bias, groups=groups,
                  dilation=(int(rng.integers(1, 3)), int(rng.integers(1, 3))) if dilated else 1)


def _pool(rng):
    """A max or average pool with any padding, ceil_mode and (average) count_include_pad."""
    k = int(rng.integers(2, 4))
    padding = ["valid", "same", k // 2, ((k // 2, 0), (0, k // 2))][rng.integers(4)]
    ceil = padding != "same" and bool(rng.integers(2))
    if rng.integers(2):
        return MaxPool2D(k, strides=[None, 1, 2][rng.integers(3)], padding=padding, ceil_mode=ceil)
    return AvgPool2D(k, strides=[None, 1, 2][rng.integers(3)], padding=padding, ceil_mode=ceil,
                     count_include_pad=bool(rng.integers(2)))


def _image_layer(rng, channels: int):
    pick = rng.integers(13)
    if pick <= 1:
        return Conv2D(int(rng.integers(1, 6)), (int(rng.integers(1, 5)), int(rng.integers(1, 5))),
                      strides=int(rng.integers(1, 3)), padding=["valid", "same", "same", 1][rng.integers(4)],
                      activation=ACTS[rng.integers(4)])  # no softmax inside conv: covered by Activation
    if pick == 2:
        return _conv(rng, channels, (ACTS[:4] + CNN_ACTS)[rng.integers(8)])
    if pick in (3, 7):
        k = int(rng.integers(2, 4))
        return (MaxPool2D if rng.integers(2) else AvgPool2D)(k, strides=[None, 1, 2][rng.integers(3)])
    if pick == 8:
        return _pool(rng)
    if pick == 4:
        return BatchNorm(momentum=float(rng.choice([0.9, 0.99, 0.5])), epsilon=float(rng.choice([1e-3, 1e-5])))
    if pick == 5:
        return Activation((ACTS[1:] + CNN_ACTS)[rng.integers(8)])
    if pick == 9:
        return ZeroPadding2D(int(rng.integers(0, 3)) if rng.integers(2) else _explicit_pads(rng))
    if pick == 10:
        return AdaptiveAvgPool2D((int(rng.integers(1, 6)), int(rng.integers(1, 6))))
    if pick == 11:
        return [Rescaling(float(rng.choice([0.5, 2.0, -1.5])), offset=float(rng.choice([0.0, 0.25]))),
                Normalization(), LayerNormalization()][rng.integers(3)]
    return Dropout(0.0)


def _flat_layer(rng):
    pick = rng.integers(7)
    if pick <= 1:
        return Dense(int(rng.integers(1, 12)), activation=(ACTS + CNN_ACTS)[rng.integers(9)])
    if pick == 2:
        return BatchNorm(momentum=float(rng.choice([0.9, 0.99])))
    if pick == 3:
        return Activation(ACTS[rng.integers(1, 5)])
    if pick == 4:
        return Normalization()
    if pick == 5:
        return LayerNormalization(epsilon=float(rng.choice([1e-3, 1e-5])))
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
            add(_image_layer(rng, ModelSpec("probe", shape, tuple(layers) + (Flatten(),)).infos[-1].in_shape[0]
                             if layers else shape[0]))
        if rng.integers(6) == 0:  # (C, 1, 1), then flat
            layers.append(GlobalAveragePooling2D(keepdims=True))
        layers.append(Flatten())
    for _ in range(rng.integers(0, 4)):
        add(_flat_layer(rng))
    classes = int(rng.choice([1, 2, 3, 5]))
    layers.append(Dense(classes, activation=["linear", "softmax" if classes > 1 else "sigmoid"][rng.integers(2)]))
    return ModelSpec(f"random_{seed}", shape, tuple(layers))


GRAPH_ACTS = ACTS + ("leaky_relu", "leaky_relu(0.1)", "elu", "softplus", "silu", "gelu", "gelu_tanh") + CNN_ACTS


def random_graph_spec(seed: int) -> ModelSpec:
    """A valid small graph (sizes <= 12): chains, skip connections (Add), branches (Concatenate), "same" pools,
    GlobalAveragePooling2D, bias-free convs, every activation and the CNN families' vocabulary: grouped, dilated and
    explicitly padded convs, ceil_mode pools, ZeroPadding2D, adaptive pooling, Multiply (squeeze-and-excitation
    gates), Rescaling, Normalization, LayerNormalization; every branch is merged before the output."""
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
        choice = rng.integers(16)
        if choice == 10:
            add(_conv(rng, c, act(), use_bias=bool(rng.integers(2))), [src])
        elif choice == 11:
            add(_pool(rng), [src])
        elif choice == 12:
            adaptive = AdaptiveAvgPool2D((int(rng.integers(1, 5)), int(rng.integers(1, 5))))
            add([ZeroPadding2D(_explicit_pads(rng)), adaptive][rng.integers(2)], [src])
        elif choice == 13:
            add([Rescaling(float(rng.choice([0.5, -2.0])), offset=float(rng.choice([0.0, 1.0]))), Normalization(),
                 LayerNormalization(epsilon=float(rng.choice([1e-3, 1e-5])))][rng.integers(3)], [src])
        elif choice == 14:  # squeeze-and-excitation: a per-channel gate (C, 1, 1) or (C,) times the image
            squeeze = add(GlobalAveragePooling2D(keepdims=bool(rng.integers(2))), [src])
            gate = squeeze and add(Conv2D(c, 1, activation=["sigmoid", "hard_sigmoid"][rng.integers(2)])
                                   if len(shapes[squeeze]) == 3 else Dense(c, activation="sigmoid"), [squeeze])
            if gate:
                add(Multiply(), [src, gate] if rng.integers(2) else [gate, src])
        elif choice == 15:  # Multiply of two or three equal-shaped nodes
            same = [n for n in shapes if n != src and shapes[n] == shapes[src]]
            if same:
                add(Multiply(), [src] + [same[i] for i in rng.integers(len(same), size=int(rng.integers(1, 3)))])
        elif choice <= 2:
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
        choice = rng.integers(9)
        if choice == 7:
            add([Normalization(), LayerNormalization(), Rescaling(0.5, offset=-1.0)][rng.integers(3)], [src])
        elif choice == 8:
            same = [n for n in shapes if n != src and shapes[n] == shapes[src]]
            add(Multiply(), [src, same[rng.integers(len(same))] if same else src])
        elif choice <= 1:
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
