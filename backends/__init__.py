"""Lazy registry of framework adapters: nothing here imports a deep-learning framework."""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass

from .base import (Adam, Adapter, BackendError, SGD, as_inputs, as_labels, batch_indices, check_optimizer,
                   inference_inputs, make_optimizer, parse_device)


@dataclass(frozen=True)
class Backend:
    """Everything the project knows about one backend, without importing its framework: every list of backend
    names (CLI defaults, thread environments, tests, benchmarks) derives from BACKENDS."""

    name: str
    module: str                  # the one module that holds its adapter
    adapter: str                 # the adapter class in that module
    distribution: str            # the distribution whose version the rows report
    requires: tuple[str, ...]    # import names that must be present (a Keras engine needs keras and the engine)
    extra: str | None            # the pip extra that installs them (None: a core dependency)
    framework: str               # the framework whose kernels and thread pools run its cells
    keras_engine: str | None = None  # the KERAS_BACKEND value of a Keras backend
    compiler: str | None = None      # the compiled path apart from its default one (compile=True), if any
    reference: bool = False          # the float64 oracle every other backend is checked against
    trains: bool = True              # False: inference only (predict, logits, layer_outputs, evaluate)


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("numpy", "nncompare.backends.numpy_backend", "NumpyAdapter", "numpy", ("numpy",), None, "numpy",
            reference=True),
    Backend("keras", "nncompare.backends.keras_backend", "KerasAdapter", "keras", ("keras", "tensorflow"), "keras",
            "tensorflow", keras_engine="tensorflow", compiler="XLA (jit_compile)"),
    Backend("keras-jax", "nncompare.backends.keras_backend", "KerasJaxAdapter", "keras", ("keras", "jax"), "jax",
            "jax", keras_engine="jax"),
    Backend("keras-torch", "nncompare.backends.keras_backend", "KerasTorchAdapter", "keras", ("keras", "torch"),
            "torch", "torch", keras_engine="torch"),
    Backend("torch", "nncompare.backends.torch_backend", "TorchAdapter", "torch", ("torch",), "torch", "torch",
            compiler="torch.compile"),
    Backend("mxnet", "nncompare.backends.mxnet_backend", "MXNetAdapter", "mxnet", ("mxnet",), "mxnet", "mxnet"),
    Backend("onnxruntime", "nncompare.backends.onnxruntime_backend", "OnnxRuntimeAdapter", "onnxruntime",
            ("onnxruntime", "onnx"), "onnx", "onnxruntime", trains=False),
)}
# Backends with a compiled path apart from their default one (compile=True), and what it is.
COMPILERS = {b.name: b.compiler for b in BACKENDS.values() if b.compiler}


def names() -> list[str]:
    return list(BACKENDS)


def frameworks() -> list[str]:
    """Every backend checked against the oracle in full, training included (all but the reference itself and the
    inference-only ones), in the registry's order."""
    return [b.name for b in BACKENDS.values() if not b.reference and b.trains]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _missing(name: str) -> list[str]:
    return [m for m in BACKENDS[name].requires if importlib.util.find_spec(m) is None]


def available_backends() -> dict[str, dict]:
    """{name: {"installed": bool, "version": str | None}} without importing any framework."""
    out = {}
    for n, b in BACKENDS.items():
        installed = not _missing(n)
        out[n] = {"installed": installed, "version": _version(b.distribution) if installed else None}
    return out


def check_backend(name: str) -> None:
    """Raise BackendError if `name` is unknown or its framework (or a package it needs beside it) is missing."""
    if not isinstance(name, str):
        raise BackendError(f"backend name must be a string ({', '.join(BACKENDS)}), "
                           f"got {type(name).__name__} {name!r}"[:200])
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})"[:300])
    missing = _missing(name)
    if missing:
        extra = BACKENDS[name].extra
        how = f"pip install 'nncompare[{extra}]' (or pip install -e '.[{extra}]' from a checkout)" if extra \
            else "reinstall nncompare"
        raise BackendError(f"backend {name!r} is not installed (missing: {', '.join(missing)}): {how}")


def get_adapter(name: str) -> type[Adapter]:
    """The adapter class for `name`; its framework is imported when the class is first used."""
    check_backend(name)
    b = BACKENDS[name]
    if b.keras_engine:
        _select_keras_engine(name, b.keras_engine)
    return getattr(importlib.import_module(b.module), b.adapter)


def _select_keras_engine(name: str, engine: str) -> None:
    """Keras reads KERAS_BACKEND once, when it is first imported: set it, or refuse a second engine."""
    keras = sys.modules.get("keras")
    if keras is None:
        os.environ["KERAS_BACKEND"] = engine
    elif keras.backend.backend() != engine:
        raise BackendError(f"{name} needs its own process: this one already runs Keras on "
                           f"{keras.backend.backend()}")


__all__ = ["BACKENDS", "COMPILERS", "Adam", "Backend", "Adapter", "BackendError", "SGD", "as_inputs", "as_labels",
           "available_backends", "batch_indices", "check_backend", "check_optimizer", "frameworks", "get_adapter",
           "inference_inputs", "make_optimizer", "names", "parse_device"]
