"""The proof itself: `compare()` must fail an engine that is wrong, at any output scale, in every check.

Wrong engines here are the float64 oracle with one output corrupted (negated, zeroed, or scaled by 1 %), so
a right engine matches to rounding and nothing but the corruption can make a check fail.
"""
from __future__ import annotations

import numpy as np
import pytest

from nncompare.backends import SGD, get_adapter
from nncompare.backends.check import (TOLERANCE, Report, compare, dict_diff, sample_batch, scaled_diff,
                                      update_diff)
from nncompare.models import Activation, Dense, ModelSpec

from .conftest import require

SCALES = (1e-8, 1e-4, 1.0, 1e4, 1e8)
CORRUPTIONS = {"negated": lambda v: -v, "zeroed": lambda v: v * 0.0, "scaled by 1%": lambda v: v * 0.99}
ONE_DENSE = ModelSpec("one_dense", (5,), (Dense(3),))


def scaled_weights(spec: ModelSpec, scale: float) -> dict[str, np.ndarray]:
    """The spec's canonical weights times `scale` (every output of a single Dense is then at that scale)."""
    rng = np.random.default_rng(0)
    return {k: (scale * rng.uniform(0.5, 1.5, s) * rng.choice([-1, 1], s)).astype(np.float32)
            for k, s in spec.param_shapes().items()}


def wrong_engine(check: str, corrupt, step_only: bool = False):
    """The oracle with the output that `check` compares corrupted ("weights": what get_weights returns;
    step_only: the update a training step makes, the weights it reports staying honest)."""
    oracle = get_adapter("numpy")

    class Wrong(oracle):
        name = f"wrong-{check}"

        def logits(self, x):
            z = super().logits(x)
            return corrupt(z) if check == "logits" else z

        def loss_and_grads(self, x, y):
            loss, grads = super().loss_and_grads(x, y)
            if check == "loss":
                loss = corrupt(np.float64(loss))
            if check == "grads":
                grads = {k: corrupt(v) for k, v in grads.items()}
            return loss, grads

        def get_weights(self):
            w = super().get_weights()
            return {k: corrupt(v) for k, v in w.items()} if check == "weights" and not step_only else w

        def _train_batch(self, x, y):
            before = super().get_weights()
            loss = super()._train_batch(x, y)
            if step_only:
                after = super().get_weights()
                self.set_weights({k: before[k] + corrupt(after[k] - before[k]) for k in after})
            return loss
    return Wrong


@pytest.mark.parametrize("scale", SCALES)
def test_the_oracle_passes_against_itself_at_every_scale(scale):
    report = compare(get_adapter("numpy"), get_adapter("numpy"), ONE_DENSE,
                     weights=scaled_weights(ONE_DENSE, scale))
    assert report.ok() and max(report.diffs.values()) < 1e-6, report.diffs


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("check", ["logits", "loss", "grads"])
def test_a_wrong_output_fails_at_every_scale(check, scale, corruption):
    report = compare(wrong_engine(check, CORRUPTIONS[corruption]), get_adapter("numpy"), ONE_DENSE, checks=(check,),
                     weights=scaled_weights(ONE_DENSE, scale))
    assert not report.passed(check), report.describe(check)


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("check", ["sgd", "adam"])
def test_wrong_weights_after_a_step_fail_at_every_scale(check, scale, corruption):
    wrong = wrong_engine("weights", CORRUPTIONS[corruption])
    report = compare(wrong, get_adapter("numpy"), ONE_DENSE, checks=(check,),
                     weights=scaled_weights(ONE_DENSE, scale))
    assert not report.passed(check), report.describe(check)


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("check", ["sgd", "adam"])
def test_a_wrong_update_fails(check, corruption):
    """A step that moves the weights 1 % short, the wrong way or not at all: the update is compared with the
    oracle's, so comparing the weights after they were reset, or against the weights' scale, would miss it."""
    wrong = wrong_engine("weights", CORRUPTIONS[corruption], step_only=True)
    report = compare(wrong, get_adapter("numpy"), ONE_DENSE, checks=(check,))
    assert not report.passed(check), report.describe(check)


def test_one_wrong_element_fails():
    """The worst element decides: one wrong logit among many is not averaged away."""
    def corrupt(z):
        z = z.copy()
        z.flat[7] += 1e-3 * np.abs(z).max()
        return z
    spec = ModelSpec("wide", (5,), (Dense(64),))
    report = compare(wrong_engine("logits", corrupt), get_adapter("numpy"), spec, checks=("logits",))
    assert not report.passed("logits") and report.diffs["logits"] == pytest.approx(1e-3, rel=1e-6)


def test_a_non_finite_reference_or_result_never_passes():
    assert scaled_diff([1.0, np.nan], [1.0, 2.0]) == float("inf")
    assert scaled_diff([1.0, 2.0], [1.0, np.inf]) == float("inf")  # the oracle overflowed: nothing is proven
    assert scaled_diff([1.5e308, -1.5e308], [-1.5e308, 1.5e308]) == float("inf")  # the difference itself overflows
    assert scaled_diff([1.0], [1.0, 2.0]) == float("inf")
    assert dict_diff({"a": np.ones(2)}, {"a": np.ones(2), "b": np.ones(2)}) == (float("inf"), "b")
    assert not Report("b", "m", diffs={"logits": float("nan")}).ok()


def test_differences_are_relative_to_the_references_own_scale():
    assert scaled_diff([-2e-5], [2e-5]) == pytest.approx(2.0)  # was 4e-5 under a scale floor of 1
    assert scaled_diff([1e-8 * 1.00001], [1e-8]) == pytest.approx(1e-5)
    assert scaled_diff([0.0], [0.0]) == 0.0
    # a tensor that is truly ~0 beside large ones is judged against the dict's scale, not its own rounding
    assert dict_diff({"a": np.array([1.0]), "b": np.array([1e-9])}, {"a": np.array([1.0]), "b": np.array([0.0])})[0] \
        == pytest.approx(1e-9)


def test_an_update_is_compared_with_the_oracles_update():
    start = {"w": np.array([1.0, -1.0])}
    ref = {"w": np.array([0.99, -0.99])}
    assert update_diff({"w": np.array([0.9901, -0.9901])}, ref, start)[0] == pytest.approx(0.01)
    assert update_diff(ref, ref, start)[0] == 0.0
    # an update far below float32's resolution of the weights is judged against that resolution instead
    tiny = {"w": start["w"] * (1 - 1e-12)}
    assert update_diff(start, tiny, start)[0] < TOLERANCE


def test_an_overflowing_training_run_is_a_failed_check_not_bad_input():
    """leaky_relu(1e30) overflows in training: the check fails with a reason; it does not raise."""
    spec = ModelSpec("overflow", (4,), (Dense(4, activation="leaky_relu(1e30)"), Dense(4, activation="leaky_relu(1e30)"),
                                        Dense(2)))
    report = compare(get_adapter("numpy"), get_adapter("numpy"), spec, checks=("sgd",), steps=3)
    assert not report.ok()
    assert "not finite" in (report.where["sgd"] or ""), report.describe("sgd")


def test_a_torch_engine_returning_negated_small_logits_fails():
    """The case that passed with a floor of 1: logits of ~1e-5 negated by a torch subclass."""
    require("torch")
    torch_cls = get_adapter("torch")

    class Negated(torch_cls):
        def logits(self, x):
            return -super().logits(x)
    spec = ModelSpec("small_logits", (6,), (Dense(4, activation="softmax"), Activation("softmax"), Dense(3)))
    w = scaled_weights(spec, 1.0)
    w["dense_2/kernel"] *= 1e-5
    w["dense_2/bias"] *= 1e-5
    right = compare(torch_cls, get_adapter("numpy"), spec, checks=("logits",), weights=w)
    wrong = compare(Negated, get_adapter("numpy"), spec, checks=("logits",), weights=w)
    assert right.ok(), right.describe("logits")
    assert not wrong.ok(), wrong.describe("logits")


def test_sgd_check_uses_the_frameworks_own_optimizer_state():
    """A framework that restarts momentum on every set_weights would take plain SGD steps: that must fail."""
    oracle = get_adapter("numpy")

    class Forgetful(oracle):
        def set_weights(self, weights):
            super().set_weights(weights)
            if self.optimizer is not None:
                self.set_optimizer(self.optimizer)  # fresh state: momentum lost

    report = compare(Forgetful, oracle, ONE_DENSE, checks=("sgd",))
    assert not report.passed("sgd"), report.describe("sgd")
    assert SGD(lr=0.005, momentum=0.9).momentum > 0
