"""Hand-written specs that together exercise every layer kind, odd sizes, strides and paddings."""
from nncompare.models import Activation, AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ModelSpec

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
