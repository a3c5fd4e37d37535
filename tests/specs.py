"""Hand-written specs that together exercise every layer kind, activation, odd sizes, strides, paddings and graphs."""
import numpy as np

from nncompare.models import (INPUT, Activation, AdaptiveAvgPool2D, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D,
                              Dense, Dropout, Flatten, GlobalAveragePooling2D, LayerNormalization, MaxPool2D, ModelSpec,
                              Multiply, Normalization, Rescaling, ZeroPadding2D)

EVERY_LAYER = {
    "conv_same_stride2": ModelSpec("conv_same_stride2", (2, 7, 6), (
        Conv2D(3, 3, strides=2, padding="same", activation="tanh"), BatchNorm(), Activation("sigmoid"),
        MaxPool2D(2, strides=1), Conv2D(4, (2, 3), padding=1), AvgPool2D((2, 1)), Flatten(),
        BatchNorm(momentum=0.9, epsilon=1e-5), Dense(5, activation="softmax"), Dense(3))),
    "dense_bn_sigmoid_head": ModelSpec("dense_bn_sigmoid_head", (9,), (
        Dense(6, activation="tanh"), Dropout(0.0), BatchNorm(), Dense(4, activation="sigmoid"),
        Dense(1, activation="sigmoid"))),
    "softmax_channels": ModelSpec("softmax_channels", (1, 8, 8), (
        Conv2D(2, 4, strides=2, padding="same"), Activation("softmax"), Flatten(),
        Dense(3, activation="softmax"))),
    "even_same_relu": ModelSpec("even_same_relu", (3, 6, 5), (
        Conv2D(4, (4, 2), strides=(1, 2), padding="same", activation="relu"), MaxPool2D(3, strides=2),
        Flatten(), Dense(7, activation="relu"), Dense(4))),
}

# Every activation, in Dense and as an Activation layer (with a slope other than the defaults for leaky_relu).
NEW_ACTIVATIONS = ("leaky_relu", "leaky_relu(0.05)", "elu", "softplus", "silu", "gelu", "gelu_tanh")
ACTIVATION_SPECS = {
    a: ModelSpec(f"act_{a.replace('(', '_').replace(')', '').replace('.', '')}", (5,), (
        Dense(6, activation=a), Activation(a), Dense(3)))
    for a in NEW_ACTIVATIONS
}

GRAPHS = {
    # A residual block with a projection shortcut and a bias-free conv before BatchNorm.
    "residual_conv": ModelSpec("residual_conv", (3, 6, 6), (
        Conv2D(4, 3, padding="same", use_bias=False, name="c1"), BatchNorm(name="bn1"), Activation("relu", name="r1"),
        Conv2D(4, 3, strides=2, padding="same", use_bias=False, name="c2"), BatchNorm(name="bn2"),
        Conv2D(4, 1, strides=2, use_bias=False, name="proj", inputs=[INPUT]), BatchNorm(name="bnp"),
        Add(name="add", inputs=("bn2", "bnp")), Activation("elu", name="r2"),
        GlobalAveragePooling2D(name="gap"), Dense(3, name="out"))),
    # Inception-style branches, pools with "same" padding (odd size: the extra pad is bottom/right).
    "branches_same_pools": ModelSpec("branches_same_pools", (2, 5, 7), (
        Conv2D(3, 1, activation="relu", name="b1"),
        Conv2D(2, 1, activation="silu", name="b2r", inputs=[INPUT]), Conv2D(3, 3, padding="same", name="b2",
                                                                           activation="gelu"),
        MaxPool2D(3, strides=1, padding="same", name="b3p", inputs=[INPUT]), Conv2D(2, 1, name="b3"),
        AvgPool2D(3, strides=2, padding="same", name="b4p", inputs=[INPUT]),
        Conv2D(2, 1, name="b4", activation="leaky_relu(0.1)"),
        Concatenate(name="cat", inputs=("b1", "b2", "b3")),
        AvgPool2D(2, strides=2, padding="same", name="down"),
        Concatenate(name="cat2", inputs=("down", "b4")),
        Flatten(), Dense(4, activation="softmax"))),
    # Fan-out: a node read three times (twice by one Add), dense residual MLP.
    "fanout_mlp": ModelSpec("fanout_mlp", (6,), (
        Dense(5, activation="tanh", name="a"),
        Dense(5, activation="gelu_tanh", name="b"),
        Add(name="s", inputs=("a", "b", "a")),
        BatchNorm(name="bn"),
        Dense(4, activation="softplus", name="c", inputs=("a",)),
        Concatenate(name="cat", inputs=("bn", "c")),
        Dense(1, activation="sigmoid", name="out"))),
}

# The standard CNN families' vocabulary, every new option at least once, on odd non-square shapes. Kept apart from
# EVERY_LAYER and GRAPHS so the suites over those stay green while a backend's converters for these land.
CNN_ACTIVATIONS = ("relu6", "hard_sigmoid", "hard_swish", "elu(0.5)")
CNN_SPECS = {
    # the input scaled by 4 spreads the pre-activations across every kink (0, 6; -3, 3)
    **{f"cnn_act_{a.replace('(', '_').replace(')', '').replace('.', '')}": ModelSpec(
        f"cnn_act_{a.replace('(', '_').replace(')', '').replace('.', '')}", (5,), (
            Rescaling(4.0), Dense(6, activation=a), Activation(a), Dense(3))) for a in CNN_ACTIVATIONS},
    # groups 2 with dilation 2 and "same" (extent 5), explicit asymmetric padding with groups 3, a depthwise conv
    # with multiplier 2 and stride 2, a non-square dilation, int padding
    "grouped_dilated_convs": ModelSpec("grouped_dilated_convs", (4, 9, 8), (
        Conv2D(6, 3, padding="same", groups=2, dilation=2, activation="relu6"),
        Conv2D(6, (3, 2), padding=((1, 0), (2, 1)), groups=3, use_bias=False), BatchNorm(),
        Conv2D(12, 3, strides=2, padding="same", groups=6, activation="hard_swish"),
        Conv2D(4, (2, 3), padding=1, dilation=(2, 1), activation="elu(0.5)"), Flatten(), Dense(3))),
    # ceil_mode with and without padding (the last-window rule firing, and windows hanging past the padded input),
    # count_include_pad with int, explicit and "same" pads, adaptive pools that shrink and grow their input
    "pools_ceil_and_pads": ModelSpec("pools_ceil_and_pads", (2, 7, 8), (
        MaxPool2D(3, strides=3, padding=1, ceil_mode=True, name="max_ceil_rule"),                 # (2, 3, 3)
        AvgPool2D(3, strides=2, padding=1, ceil_mode=True, count_include_pad=True, name="avg_ceil_include",
                  inputs=(INPUT,)),                                                              # (2, 4, 5)
        AvgPool2D(2, strides=2, padding=((0, 1), (1, 0)), ceil_mode=True, count_include_pad=True,
                  name="avg_ceil_explicit"),                                                     # (2, 2, 3)
        MaxPool2D(2, strides=2, ceil_mode=True, name="max_ceil", inputs=(INPUT,)),               # (2, 4, 4)
        AvgPool2D(3, strides=2, padding=1, ceil_mode=True, name="avg_ceil_exclude"),             # (2, 3, 3)
        AvgPool2D(3, strides=2, padding="same", count_include_pad=True, name="avg_same_include",
                  inputs=(INPUT,)),                                                              # (2, 4, 4)
        AvgPool2D(3, strides=1, padding=((1, 1), (0, 1)), count_include_pad=True, name="avg_explicit",
                  inputs=(INPUT,)),                                                              # (2, 7, 7)
        AdaptiveAvgPool2D((3, 2), name="adaptive_down"),                                          # (2, 3, 2)
        AdaptiveAvgPool2D(5, name="adaptive_up", inputs=("avg_ceil_exclude",)),                  # (2, 5, 5)
        Flatten(name="f1", inputs=("max_ceil_rule",)), Flatten(name="f2", inputs=("avg_ceil_explicit",)),
        Flatten(name="f3", inputs=("avg_same_include",)), Flatten(name="f4", inputs=("adaptive_down",)),
        Flatten(name="f5", inputs=("adaptive_up",)),
        Concatenate(name="cat", inputs=("f1", "f2", "f3", "f4", "f5")), Dense(3, name="out"))),
    # Keras' stride-2 depthwise block: explicit ((0, 1), (0, 1)) zero padding, then "valid"
    "zero_padding_depthwise": ModelSpec("zero_padding_depthwise", (3, 8, 7), (
        ZeroPadding2D(((0, 1), (0, 1))), Conv2D(6, 3, strides=2, groups=3, use_bias=False), BatchNorm(),
        Activation("relu6"), ZeroPadding2D(1), Conv2D(4, 1), ZeroPadding2D(((2, 0), (1, 3))),
        GlobalAveragePooling2D(), Dense(2, activation="softmax"))),
    # squeeze-and-excitation with a (C, 1, 1) gate and a flat (C,) gate, gate first and second; a 3-input
    # product; Rescaling, Normalization and LayerNormalization on images and on flat features
    "squeeze_excite": ModelSpec("squeeze_excite", (3, 6, 5), (
        Rescaling(0.5, offset=-0.25, name="rescale"), Normalization(name="norm"),
        Conv2D(4, 3, padding="same", activation="silu", name="conv"),
        GlobalAveragePooling2D(keepdims=True, name="squeeze"),
        Conv2D(2, 1, activation="silu", name="reduce"), Conv2D(4, 1, activation="hard_sigmoid", name="expand"),
        Multiply(name="excite", inputs=("conv", "expand")),
        GlobalAveragePooling2D(name="flat_squeeze", inputs=("conv",)), Dense(4, activation="sigmoid", name="gate"),
        Multiply(name="flat_excite", inputs=("gate", "excite")),
        LayerNormalization(epsilon=1e-6, name="ln_image"),  # ConvNeXt's, the least allowed
        Multiply(name="triple", inputs=("ln_image", "conv", "excite")),
        GlobalAveragePooling2D(name="gap"), Normalization(name="norm_flat"), LayerNormalization(epsilon=1e-5,
                                                                                               name="ln_flat"),
        Dense(5, activation="hard_swish", name="fc"), Multiply(name="square", inputs=("fc", "fc")),
        Dense(3, activation="softmax", name="out"))),
}


# Pools over one row x0..x(W-1) (all negative: a padded 0 would win a max), each with its output by hand.
_X = -np.array([3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0])


def _mean(*v):
    return sum(v) / len(v)


POOL_CASES = {
    # ceil_mode: 8 + 2 - 3 = 7 -> ceil(7 / 3) + 1 = 4 windows, but the 4th would start in the right padding:
    # torch drops it (MXNet's 'full' convention keeps it)
    "ceil_last_window_dropped_max": (MaxPool2D((1, 3), (1, 3), ((0, 0), (1, 1)), ceil_mode=True), 8,
                                     [max(_X[0:2]), max(_X[2:5]), max(_X[5:8])]),
    "ceil_last_window_dropped_avg": (AvgPool2D((1, 3), (1, 3), ((0, 0), (1, 1)), ceil_mode=True,
                                               count_include_pad=True), 8,
                                     [sum(_X[0:2]) / 3, _mean(*_X[2:5]), _mean(*_X[5:8])]),
    # the last ceil_mode window hangs one cell past the input: that cell never counts, even with count_include_pad
    "ceil_overhang_never_counts": (AvgPool2D((1, 3), (1, 2), ceil_mode=True, count_include_pad=True), 6,
                                   [_mean(*_X[0:3]), _mean(*_X[2:5]), _mean(*_X[4:6])]),
    "ceil_overhang_max": (MaxPool2D((1, 3), (1, 2), ceil_mode=True), 6, [max(_X[0:3]), max(_X[2:5]), max(_X[4:6])]),
    # edge windows over one padded cell: counted (/3) or not (/2)
    "edge_windows_count_pad": (AvgPool2D((1, 3), (1, 2), ((0, 0), (1, 1)), count_include_pad=True), 5,
                               [sum(_X[0:2]) / 3, _mean(*_X[1:4]), sum(_X[3:5]) / 3]),
    "edge_windows_exclude_pad": (AvgPool2D((1, 3), (1, 2), ((0, 0), (1, 1))), 5,
                                 [_mean(*_X[0:2]), _mean(*_X[1:4]), _mean(*_X[3:5])]),
    # asymmetric explicit pads (torch's pools pad symmetrically only)
    "asymmetric_count_pad": (AvgPool2D((1, 2), (1, 2), ((0, 0), (0, 1)), count_include_pad=True), 5,
                             [_mean(*_X[0:2]), _mean(*_X[2:4]), _X[4] / 2]),
    "asymmetric_exclude_pad": (AvgPool2D((1, 2), (1, 2), ((0, 0), (0, 1))), 5,
                               [_mean(*_X[0:2]), _mean(*_X[2:4]), _X[4]]),
    "asymmetric_max": (MaxPool2D((1, 2), (1, 2), ((0, 0), (0, 1))), 5, [max(_X[0:2]), max(_X[2:4]), _X[4]]),
    # asymmetric pads and a ceil_mode overhang together: [pad, x0], [x1, x2], [x3, overhang]
    "asymmetric_ceil_avg": (AvgPool2D((1, 2), (1, 2), ((0, 0), (1, 0)), ceil_mode=True, count_include_pad=True), 4,
                            [_X[0] / 2, _mean(*_X[1:3]), _X[3]]),
    "asymmetric_ceil_max": (MaxPool2D((1, 2), (1, 2), ((0, 0), (1, 0)), ceil_mode=True), 4,
                            [_X[0], max(_X[1:3]), _X[3]]),
}


def pool_case(name):
    """(spec, input batch, expected output) of one POOL_CASES entry."""
    layer, width, expect = POOL_CASES[name]
    spec = ModelSpec("p", (1, 1, width), (layer,))
    return spec, _X[:width].astype(np.float32).reshape(1, 1, 1, width), np.array(expect).reshape(1, 1, 1, -1)
