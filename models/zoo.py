"""Named reference architectures: `get(name)` and `names()`."""
from __future__ import annotations

from .spec import (Activation, AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ModelSpec,
                   SpecError)


def perceptron() -> ModelSpec:
    """The single neuron: logistic regression sigma(w.x + b) on 2 features."""
    return ModelSpec("perceptron", (2,), (Dense(1, activation="sigmoid"),))


def mlp() -> ModelSpec:
    """MNIST-sized dense net: 784 -> 256 -> 128 -> 10."""
    return ModelSpec("mlp", (784,), (Dense(256, activation="relu"), Dense(128, activation="relu"), Dense(10)))


def lenet5() -> ModelSpec:
    """LeCun's LeNet-5 on 1x28x28 (first conv "same", max pooling): 61,706 parameters."""
    return ModelSpec("lenet5", (1, 28, 28), (
        Conv2D(6, 5, padding="same", activation="relu"), MaxPool2D(2),
        Conv2D(16, 5, activation="relu"), MaxPool2D(2),
        Flatten(), Dense(120, activation="relu"), Dense(84, activation="relu"), Dense(10)))


def cifar_cnn() -> ModelSpec:
    """VGG-style CIFAR-10 net: two conv-conv-pool blocks with batch-norm and dropout, dense head."""
    def block(filters):
        return (Conv2D(filters, 3, padding="same"), BatchNorm(), Activation("relu"),
                Conv2D(filters, 3, padding="same"), BatchNorm(), Activation("relu"),
                MaxPool2D(2), Dropout(0.25))
    return ModelSpec("cifar_cnn", (3, 32, 32), block(32) + block(64) + (
        Flatten(), Dense(256, activation="relu"), Dropout(0.5), Dense(10)))


def digits_mlp() -> ModelSpec:
    """Dense net for scikit-learn's 8x8 digits (64 features)."""
    return ModelSpec("digits_mlp", (64,), (Dense(64, activation="relu"), Dense(10)))


def digits_cnn() -> ModelSpec:
    """Small CNN for scikit-learn's 1x8x8 digits."""
    return ModelSpec("digits_cnn", (1, 8, 8), (
        Conv2D(16, 3, padding="same", activation="relu"), MaxPool2D(2),
        Conv2D(32, 3, padding="same", activation="relu"), AvgPool2D(2),
        Flatten(), Dense(64, activation="relu"), Dense(10)))


_ZOO = {f.__name__: f for f in (perceptron, mlp, lenet5, cifar_cnn, digits_mlp, digits_cnn)}


def names() -> list[str]:
    return list(_ZOO)


def get(name: str) -> ModelSpec:
    if name not in _ZOO:
        raise SpecError(f"unknown zoo model {name!r} (known: {', '.join(_ZOO)})")
    return _ZOO[name]()
