"""Lazy registry of framework adapters: nothing here imports a deep-learning framework."""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys

from .base import (Adam, Adapter, BackendError, SGD, as_inputs, as_labels, batch_indices, check_optimizer,
                   make_optimizer, parse_device)

# name -> (module, class, the distribution that provides the framework, the pip extra that installs it)
_REGISTRY = {
    "numpy": ("nncompare.backends.numpy_backend", "NumpyAdapter", "numpy", None),
    "keras": ("nncompare.backends.keras_backend", "KerasAdapter", "keras", "keras"),
    "keras-jax": ("nncompare.backends.keras_backend", "KerasJaxAdapter", "keras", "jax"),
    "keras-torch": ("nncompare.backends.keras_backend", "KerasTorchAdapter", "keras", "torch"),
    "torch": ("nncompare.backends.torch_backend", "TorchAdapter", "torch", "torch"),
    "mxnet": ("nncompare.backends.mxnet_backend", "MXNetAdapter", "mxnet", "mxnet"),
}
# Backends with a compiled path apart from their default one (compile=True), and what it is.
COMPILERS = {"keras": "XLA (jit_compile)", "torch": "torch.compile"}
# The engine each Keras backend runs on (Keras 3 needs it beside keras); it is also the KERAS_BACKEND value.
_IMPORT_NAME = {"keras": "tensorflow", "keras-jax": "jax", "keras-torch": "torch"}


def names() -> list[str]:
    return list(_REGISTRY)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _installed(name: str) -> bool:
    _, _, dist, _ = _REGISTRY[name]
    return all(importlib.util.find_spec(m) is not None for m in {dist, _IMPORT_NAME.get(name, dist)})


def available_backends() -> dict[str, dict]:
    """{name: {"installed": bool, "version": str | None}} without importing any framework."""
    return {n: {"installed": _installed(n), "version": _version(_REGISTRY[n][2]) if _installed(n) else None}
            for n in _REGISTRY}


def check_backend(name: str) -> None:
    """Raise BackendError if `name` is unknown or its framework is not installed."""
    if not isinstance(name, str):
        raise BackendError(f"backend name must be a string ({', '.join(_REGISTRY)}), "
                           f"got {type(name).__name__} {name!r}"[:200])
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend {name!r} (known: {', '.join(_REGISTRY)})")
    if not _installed(name):
        extra = _REGISTRY[name][3]
        raise BackendError(f"backend {name!r} is not installed: pip install 'nncompare[{extra}]' "
                           f"(or pip install -e '.[{extra}]' from a checkout)")


def get_adapter(name: str) -> type[Adapter]:
    """The adapter class for `name`; its framework is imported when the class is first used."""
    check_backend(name)
    module, cls, dist, _ = _REGISTRY[name]
    if dist == "keras":
        _select_keras_engine(name, _IMPORT_NAME[name])
    return getattr(importlib.import_module(module), cls)


def _select_keras_engine(name: str, engine: str) -> None:
    """Keras reads KERAS_BACKEND once, when it is first imported: set it, or refuse a second engine."""
    keras = sys.modules.get("keras")
    if keras is None:
        os.environ["KERAS_BACKEND"] = engine
    elif keras.backend.backend() != engine:
        raise BackendError(f"{name} needs its own process: this one already runs Keras on "
                           f"{keras.backend.backend()}")


__all__ = ["COMPILERS", "Adam", "Adapter", "BackendError", "SGD", "as_inputs", "as_labels", "available_backends", "batch_indices",
           "check_backend", "check_optimizer", "get_adapter", "make_optimizer", "names", "parse_device"]
