"""Hand-written specs that together exercise every layer kind, activation, odd sizes, strides, paddings and graphs."""
from nncompare.models import (INPUT, Activation, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D, Dense, Dropout,
                              Flatten, GlobalAveragePooling2D, MaxPool2D, ModelSpec)

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
