"""Every backend maps every layer kind of the spec through its converter table: adding a layer kind
means its dataclass, one converter per backend and one oracle node; this test names what is missing."""
import importlib

import pytest

from nncompare.backends import BACKENDS, available_backends, get_adapter
from nncompare.models import LAYER_KINDS

from .conftest import require

# One test per backend module (keras, keras-jax and keras-torch share keras_backend).
MODULES: dict[str, list[str]] = {}
for _b in BACKENDS.values():
    MODULES.setdefault(_b.module, []).append(_b.name)


@pytest.mark.parametrize("module", sorted(MODULES), ids=lambda m: "/".join(MODULES[m]))
def test_every_layer_kind_has_a_converter(module):
    installed = [n for n in MODULES[module] if available_backends()[n]["installed"]]
    if not installed:
        require(MODULES[module][0])
    get_adapter(installed[0])  # imports the module the way the registry does (Keras engine chosen first)
    table = getattr(importlib.import_module(module), "CONVERTERS", None)
    assert isinstance(table, dict), f"{module} has no CONVERTERS table"
    missing = sorted(cls.__name__ for cls in LAYER_KINDS.values() if cls not in table)
    assert not missing, f"{module}: no converter for {', '.join(missing)}"
    assert all(callable(c) for c in table.values())
