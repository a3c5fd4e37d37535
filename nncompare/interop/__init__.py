"""Bring your own network: import Keras, PyTorch and ONNX models as (ModelSpec, canonical weights), export a
spec to ONNX. Import is exact or refused: a model that would compute anything else is one InteropError naming
the layer or node, its type and what is supported.

Importing this package imports no deep-learning framework, onnx or onnxruntime; each function imports what it
reads when it is called (one module per source: keras_import, torch_import, onnx_import, onnx_export).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import InteropError

OPSET = 20  # the ONNX opset to_onnx writes (onnx_export.OPSET; here so that reading it loads no onnx)


def from_keras(model_or_path: Any):
    """(ModelSpec, weights) of a keras.Model (Sequential or functional) or a .keras file: channels-last images
    become the spec's (C, H, W), kernels OIHW, and the first Dense after a Flatten has its rows in C, H, W order."""
    from .keras_import import from_keras as impl
    return impl(model_or_path)


def from_torch(module: Any, input_shape: tuple):
    """(ModelSpec, weights) of a torch nn.Module for inputs of `input_shape` ((C, H, W) or (features,), no batch
    axis), traced with torch.fx in eval mode (the module's own modes are restored)."""
    from .torch_import import from_torch as impl
    return impl(module, input_shape)


def from_onnx(path_or_model: Any):
    """(ModelSpec, weights) of an ONNX model (a path or a ModelProto) with one NCHW or (N, features) input."""
    from .onnx_import import from_onnx as impl
    return impl(path_or_model)


def to_onnx(spec, weights: dict, path: str | Path | None = None):
    """The ONNX model computing what `predict` computes (the head activation included), NCHW input "input" with
    a dynamic batch axis; written to `path` when given. Returns the onnx.ModelProto."""
    from .onnx_export import PROTO_LIMIT, build
    import onnx
    model = build(spec, weights)
    if path is not None:
        path = Path(path)
        try:
            if sum(len(t.raw_data) for t in model.graph.initializer) > PROTO_LIMIT:
                onnx.save_model(model, path, save_as_external_data=True, location=path.name + ".data")
                onnx.checker.check_model(str(path))
            else:
                onnx.save_model(model, path)
        except (OSError, ValueError) as e:
            raise InteropError(f"{path}: cannot write the ONNX model: {e}") from None
    return model


__all__ = ["OPSET", "InteropError", "from_keras", "from_onnx", "from_torch", "to_onnx"]
