"""Framework-neutral model specs and the zoo. Importing this package imports no deep-learning framework."""
from . import zoo
from .init import init_weights
from .spec import (ACTIVATIONS, INPUT, LAYER_KINDS, Activation, AdaptiveAvgPool2D, Add, AvgPool2D, BatchNorm,
                   Concatenate, Conv2D, Dense, Dropout, Flatten, GlobalAveragePooling2D, Layer, LayerInfo,
                   LayerNormalization, MaxPool2D, ModelSpec, Multiply, Normalization, Rescaling, SpecError,
                   ZeroPadding2D, adaptive_bins, parse_activation, pool_output_size, same_padding)


def resolve(name_or_path: str) -> ModelSpec:
    """A zoo model by name, or a spec from a JSON file path."""
    if name_or_path in zoo.names():
        return zoo.get(name_or_path)
    if name_or_path.endswith(".json") or "/" in name_or_path:
        return ModelSpec.load(name_or_path)
    raise SpecError(f"unknown model {name_or_path!r}: not a zoo model ({', '.join(zoo.names())}) "
                    f"nor a .json spec file")


__all__ = ["ACTIVATIONS", "INPUT", "LAYER_KINDS", "Activation", "AdaptiveAvgPool2D", "Add", "AvgPool2D", "BatchNorm",
           "Concatenate", "Conv2D", "Dense", "Dropout", "Flatten", "GlobalAveragePooling2D", "Layer", "LayerInfo",
           "LayerNormalization", "MaxPool2D", "ModelSpec", "Multiply", "Normalization", "Rescaling", "SpecError",
           "ZeroPadding2D", "adaptive_bins", "init_weights", "parse_activation", "pool_output_size", "resolve",
           "same_padding", "zoo"]
