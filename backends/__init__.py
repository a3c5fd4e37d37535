"""Lazy registry of framework adapters: nothing here imports a deep-learning framework."""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util

from .base import Adam, Adapter, BackendError, SGD, batch_indices, make_optimizer, parse_device

# name -> (module, class, the distribution that provides the framework, the pip extra that installs it)
_REGISTRY = {
    "numpy": ("nncompare.backends.numpy_backend", "NumpyAdapter", "numpy", None),
    "keras": ("nncompare.backends.keras_backend", "KerasAdapter", "keras", "keras"),
    "torch": ("nncompare.backends.torch_backend", "TorchAdapter", "torch", "torch"),
    "mxnet": ("nncompare.backends.mxnet_backend", "MXNetAdapter", "mxnet", "mxnet"),
}
_IMPORT_NAME = {"keras": "tensorflow"}  # Keras 3 here runs on TensorFlow: both must be present


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
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend {name!r} (known: {', '.join(_REGISTRY)})")
    if not _installed(name):
        extra = _REGISTRY[name][3]
        raise BackendError(f"backend {name!r} is not installed: pip install 'nncompare[{extra}]' "
                           f"(or pip install -e '.[{extra}]' from a checkout)")


def get_adapter(name: str) -> type[Adapter]:
    """The adapter class for `name`; its framework is imported when the class is first used."""
    check_backend(name)
    module, cls, _, _ = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


__all__ = ["Adam", "Adapter", "BackendError", "SGD", "available_backends", "batch_indices", "check_backend",
           "get_adapter", "make_optimizer", "names", "parse_device"]
