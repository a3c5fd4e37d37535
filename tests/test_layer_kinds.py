"""Layer kinds register themselves and declare their traits; a kind a backend cannot convert is refused there.

Throwaway kinds are defined inside fixtures and unregistered after each test, so the rest of the suite never
sees them.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import ClassVar

import numpy as np
import pytest

from nncompare.backends import BackendError, get_adapter
from nncompare.backends.check import sample_batch, scaled_diff
from nncompare.models import Dense, Flatten, ModelSpec
from nncompare.models.spec import (FLAT_ORDERS, LAYER_KINDS, Add, BatchNorm, Layer, LayerNormalization, Normalization,
                                   SpecError)

from .conftest import FRAMEWORKS, ROOT, require

IN_PROCESS = ["numpy", *FRAMEWORKS, "onnxruntime"]


@pytest.fixture
def registry():
    """LAYER_KINDS as it was, restored after the test (a kind registers itself when its class is defined)."""
    before = dict(LAYER_KINDS)
    yield LAYER_KINDS
    LAYER_KINDS.clear()
    LAYER_KINDS.update(before)


def throwaway_kind(kind: str, flat_order: str = "elementwise"):
    """A single-input, shape-keeping layer kind that no backend has a converter for."""
    namespace = {"kind": kind, "flat_order": flat_order, "check": lambda self, in_shape: in_shape,
                 "__annotations__": {"kind": ClassVar[str], "flat_order": ClassVar[str]}}
    return dataclasses.dataclass(frozen=True)(type(f"Throwaway_{kind}", (Layer,), namespace))


def test_every_kind_is_registered_with_a_known_trait():
    assert set(LAYER_KINDS) >= {"dense", "conv2d", "maxpool2d", "avgpool2d", "globalavgpool2d", "flatten",
                                "activation", "dropout", "batchnorm", "add", "concatenate"}
    assert all(cls.flat_order in FLAT_ORDERS for cls in LAYER_KINDS.values())
    assert {LAYER_KINDS[k].flat_order for k in ("add", "concatenate", "flatten", "dense")} == \
        {"merge", "concatenate", "flatten", "new"}


def test_a_new_kind_registers_itself_and_round_trips_through_json(registry):
    kind = throwaway_kind("scratch_identity")
    assert registry["scratch_identity"] is kind
    spec = ModelSpec("s", (4,), (Dense(3), kind()))
    assert ModelSpec.from_dict(json.loads(spec.to_json())) == spec


def test_an_unknown_trait_is_refused_when_the_kind_is_defined(registry):
    with pytest.raises(TypeError, match=r"layer kind 'sideways': flat_order must be one of elementwise, merge, "
                                        r"concatenate, flatten, new, got 'sideways_order'"):
        throwaway_kind("sideways", "sideways_order")
    with pytest.raises(TypeError, match="flat_order must be one of"):
        throwaway_kind("no_trait", "")  # forgetting the trait is refused, never treated as elementwise
    assert "sideways" not in registry and "no_trait" not in registry


def test_a_kind_name_is_not_taken_twice(registry):
    with pytest.raises(TypeError, match="'dense'.*must be a new"):
        throwaway_kind("dense")
    assert registry["dense"] is Dense


@pytest.mark.parametrize("norm", [LayerNormalization(name="ln"), Normalization(name="ln"), BatchNorm(name="ln")])
def test_a_normalization_on_an_input_of_the_wrong_rank_blames_its_input(registry, norm):
    """No built-in kind gives a 2-D shape, so a throwaway one does: the error names the layer and 'inputs'."""
    drop_w = dataclasses.dataclass(frozen=True)(type("Throwaway_drop_w", (Layer,), {
        "kind": "scratch_drop_w", "flat_order": "new", "check": lambda self, in_shape: in_shape[:2],
        "__annotations__": {"kind": ClassVar[str], "flat_order": ClassVar[str]}}))
    with pytest.raises(SpecError, match=r"^layer 1 \(ln\): field 'inputs': \w+ needs a \(C, H, W\) or "
                                        r"\(features,\) input, got \(3, 4\)$"):
        ModelSpec("s", (3, 4, 5), (drop_w(), norm, Flatten(), Dense(2)))


@pytest.mark.parametrize("backend", IN_PROCESS)
def test_every_backend_refuses_a_kind_it_cannot_convert(registry, backend):
    require(backend)
    kind = throwaway_kind("scratch_identity")
    spec = ModelSpec("s", (4,), (Dense(3, name="d"), kind(name="mystery"), Dense(2)))
    with pytest.raises(BackendError, match=rf"^{backend}: no converter for layer kind 'scratch_identity' "
                                           rf"\(layer 1, 'mystery'\); it converts .*dense"):
        get_adapter(backend).build(spec)


KERAS_ENGINE_SCRIPT = """
import dataclasses, sys
from typing import ClassVar
sys.path.insert(0, {root!r})
from nncompare.backends import BackendError, get_adapter
from nncompare.models import Dense, ModelSpec
from nncompare.models.spec import Layer

@dataclasses.dataclass(frozen=True)
class Scratch(Layer):
    kind: ClassVar[str] = "scratch_identity"
    flat_order: ClassVar[str] = "elementwise"
    def check(self, in_shape):
        return in_shape

try:
    get_adapter({backend!r}).build(ModelSpec("s", (4,), (Dense(3), Scratch(name="mystery"), Dense(2))))
except BackendError as e:
    print(e)
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["keras-jax", "keras-torch"])
def test_each_keras_engine_refuses_a_kind_it_cannot_convert(backend):
    require(backend)
    out = subprocess.run([sys.executable, "-c", KERAS_ENGINE_SCRIPT.format(root=str(ROOT), backend=backend)],
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().startswith(f"{backend}: no converter for layer kind 'scratch_identity' (layer 1, "
                                         f"'mystery')"), out.stdout + out.stderr[-2000:]


@pytest.fixture
def maximum_kind(registry):
    """A merge kind (elementwise max of its inputs) with an oracle node and a Keras converter: what adding a
    layer kind takes, nothing more."""
    from nncompare.backends import numpy_backend

    @dataclasses.dataclass(frozen=True)
    class Maximum(Add):
        kind: ClassVar[str] = "scratch_maximum"
        flat_order: ClassVar[str] = "merge"

    class MaximumNode(numpy_backend.Node):
        def forward(self, w, xs, training):
            stacked = np.stack(xs)
            return stacked.max(axis=0), stacked.argmax(axis=0)

        def backward(self, w, arg, dy, grads):
            return tuple(np.where(arg == k, dy, 0.0) for k in range(len(self.info.inputs)))

    numpy_backend.CONVERTERS[Maximum] = MaximumNode
    yield Maximum
    del numpy_backend.CONVERTERS[Maximum]


def test_keras_follows_a_merge_kinds_trait_through_a_flattened_image(maximum_kind):
    """A flattened channels-last image and a Dense output meet in the new kind: Keras reorders the image's
    features because the kind says it merges, and its logits match the oracle's."""
    require("keras")
    get_adapter("keras")
    keras_backend = sys.modules["nncompare.backends.keras_backend"]
    keras = keras_backend.keras
    keras_backend.CONVERTERS[maximum_kind] = lambda l, i: (keras.layers.Maximum(name=i.name), {})
    try:
        spec = ModelSpec("m", (2, 3, 4), (
            Flatten(name="flat"), Flatten(name="flat2", inputs=("input",)), Dense(24, name="side"),
            maximum_kind(name="mx", inputs=("flat", "side")), Dense(3, name="out")))
        x, _ = sample_batch(spec, 4)
        got = get_adapter("keras").build(spec).logits(x)
        want = get_adapter("numpy").build(spec).logits(x)
        assert scaled_diff(got, want) < 1e-5
    finally:
        del keras_backend.CONVERTERS[maximum_kind]
