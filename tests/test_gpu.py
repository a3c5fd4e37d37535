"""The GPU paths, where this machine has a GPU that the framework sees; skipped with the reason elsewhere."""
import pytest

from nncompare import devices
from nncompare.backends import BackendError, get_adapter
from nncompare.backends.check import TOLERANCE, compare
from nncompare.models import zoo

from .conftest import FRAMEWORKS, require

# the fast lane (-m 'not slow') leaves out this file's real processes and clusters
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model", ["lenet5", "cifar_cnn"])
@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_gpu_matches_the_oracle(backend, model):
    require(backend)
    if len(devices.available_devices()) == 1:
        pytest.skip("no GPU on this machine")
    try:
        report = compare(get_adapter(backend), get_adapter("numpy"), zoo.get(model).without_dropout(), device="gpu:0")
    except BackendError as e:
        if "it sees cpu" in str(e) and "gpu:0" not in str(e).split("it sees")[1]:
            pytest.skip(f"this {backend} build sees no GPU: {e}")
        raise
    bad = [report.describe(c) for c in report.diffs if report.diffs[c] > TOLERANCE]
    assert not bad, "\n".join(bad)
