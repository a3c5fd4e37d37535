"""Framework-neutral model specs and the zoo. Importing this package imports no deep-learning framework."""
from . import zoo
from .init import init_weights
from .spec import (ACTIVATIONS, INPUT, LAYER_KINDS, Activation, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D, Dense,
                   Dropout, Flatten, GlobalAveragePooling2D, Layer, LayerInfo, MaxPool2D, ModelSpec, SpecError,
                   parse_activation, same_padding)


def resolve(name_or_path: str) -> ModelSpec:
    """A zoo model by name, or a spec from a JSON file path."""
    if name_or_path in zoo.names():
        return zoo.get(name_or_path)
    if name_or_path.endswith(".json") or "/" in name_or_path:
        return ModelSpec.load(name_or_path)
    raise SpecError(f"unknown model {name_or_path!r}: not a zoo model ({', '.join(zoo.names())}) "
                    f"nor a .json spec file")


__all__ = ["ACTIVATIONS", "INPUT", "LAYER_KINDS", "Activation", "Add", "AvgPool2D", "BatchNorm", "Concatenate", "Conv2D",
           "Dense", "Dropout", "Flatten", "GlobalAveragePooling2D", "Layer", "LayerInfo", "MaxPool2D", "ModelSpec",
           "SpecError", "init_weights", "parse_activation", "resolve", "same_padding", "zoo"]
