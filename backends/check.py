"""Cross-framework equivalence: compare an adapter against the float64 NumPy oracle, name the first diverging layer."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..models import ModelSpec

from .base import Adam, Adapter, SGD

TOLERANCE = 1e-4  # float32 against float64: max abs difference relative to the reference's scale


def scaled_diff(got, ref, scale: float | None = None) -> float:
    """max |got - ref| / scale (default: max(1, max |ref|)); inf for a shape mismatch or any NaN/inf."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape or not np.isfinite(got).all():
        return float("inf")
    if scale is None:
        scale = max(1.0, float(np.abs(ref).max(initial=0)))
    return float(np.abs(got - ref).max(initial=0) / max(scale, 1e-30))


def dict_diff(got: dict, ref: dict) -> tuple[float, str | None]:
    """Worst scaled difference over matching keys (scale: the largest entry of all of ref) and its key."""
    scale = max(float(np.abs(v).max(initial=0)) for v in ref.values()) if ref else 1.0
    worst, worst_key = 0.0, None
    for k, r in ref.items():
        d = scaled_diff(got[k], r, scale) if k in got else float("inf")
        if d > worst or worst_key is None:
            worst, worst_key = d, k
    return worst, worst_key


def first_divergence(net: Adapter, oracle: Adapter, x: np.ndarray, tol: float = TOLERANCE) -> str | None:
    """Name of the first node, in the spec's topological order, whose inference output differs from the
    oracle's by more than tol."""
    got, ref = net.layer_outputs(x), oracle.layer_outputs(x)
    for info in oracle.spec.logits_infos():
        if info.name in got and info.name in ref and scaled_diff(got[info.name], ref[info.name]) > tol:
            return info.name
    return None


def within(diff: float, tol: float, jitter: float | None = None) -> bool:
    """Within tolerance, or within what the oracle itself moves under float32-sized input noise (a jitter that
    is not a finite number, e.g. from an overflow at a perturbed input, allows nothing)."""
    allowed = jitter if jitter is not None and math.isfinite(jitter) else 0.0
    return diff <= max(tol, allowed)


@dataclass
class Report:
    """Scaled differences against the oracle, one per check; `where` names the worst tensor or diverging layer."""

    backend: str
    model: str
    diffs: dict[str, float] = field(default_factory=dict)
    where: dict[str, str | None] = field(default_factory=dict)
    jitter: dict[str, float] = field(default_factory=dict)  # the oracle's own movement, where it was measured

    def passed(self, check: str, tol: float = TOLERANCE) -> bool:
        return within(self.diffs[check], tol, self.jitter.get(check))

    def ok(self, tol: float = TOLERANCE) -> bool:
        return all(self.passed(c, tol) for c in self.diffs)

    def describe(self, check: str) -> str:
        where = f" (worst: {self.where[check]})" if self.where.get(check) else ""
        jitter = f"; the oracle's own jitter {self.jitter[check]:.2e}" if check in self.jitter else ""
        return f"{self.backend} {self.model} {check}: scaled diff {self.diffs[check]:.2e}{where}{jitter}"


def gradient_jitter(oracle: Adapter, x: np.ndarray, y: np.ndarray, ref: dict, draws: int = 6,
                    noise: float = 1e-6, seed: int = 0) -> float:
    """How far the oracle's own gradients move when the inputs move by float32-sized relative noise: beside
    a ReLU kink, rounding alone carries them across it (resnet20 at 32x32, seed 0: 5e-3 for 1e-6 noise), a
    difference no float32 framework can be held to."""
    rng = np.random.default_rng(seed)
    return max(dict_diff(oracle.loss_and_grads(x * (1 + noise * rng.standard_normal(x.shape)), y)[1], ref)[0]
               for _ in range(draws))


def sample_batch(spec: ModelSpec, n: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded float32 inputs and int64 labels for `spec`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + spec.input_shape).astype(np.float32)
    return x, rng.integers(0, max(spec.num_classes, 2), n).astype(np.int64)


def compare(backend_cls: type[Adapter], oracle_cls: type[Adapter], spec: ModelSpec, checks=None,
            device: str = "cpu", seed: int = 0, n: int = 8, steps: int = 5, compile: bool = False) -> Report:
    """Run the equivalence checks ("logits", "loss", "grads", "sgd", "adam") of one backend against the oracle."""
    checks = checks or ("logits", "loss", "grads", "sgd", "adam")
    report = Report(backend_cls.name, spec.name)
    x, y = sample_batch(spec, n, seed)
    batches = [sample_batch(spec, n, seed + 1 + i) for i in range(steps)]
    net, oracle = backend_cls.build(spec, device, seed, compile=compile), oracle_cls.build(spec, "cpu", seed)
    if "logits" in checks:
        report.diffs["logits"] = scaled_diff(net.logits(x), oracle.logits(x))
        if report.diffs["logits"] > TOLERANCE:
            report.where["logits"] = first_divergence(net, oracle, x)
    if "loss" in checks or "grads" in checks:
        loss, grads = net.loss_and_grads(x, y)
        ref_loss, ref_grads = oracle.loss_and_grads(x, y)
        report.diffs["loss"] = scaled_diff(loss, ref_loss)
        report.diffs["grads"], report.where["grads"] = dict_diff(grads, ref_grads)
        if report.diffs["grads"] > TOLERANCE:
            report.jitter["grads"] = gradient_jitter(oracle, x, y, ref_grads)
    # Adam divides by sqrt(v): with a tiny epsilon, weights whose true gradient is ~0 (a bias before
    # BatchNorm, a dead unit) take lr-sized steps driven by float32 rounding. epsilon=1e-2 keeps the
    # check well-conditioned; a misplaced epsilon (before or after bias correction) still shows.
    for name, opt in (("sgd", SGD(lr=0.005, momentum=0.9)), ("adam", Adam(lr=1e-4, epsilon=1e-3))):
        if name not in checks:
            continue
        net = backend_cls.build(spec, device, seed, optimizer=opt, compile=compile)
        oracle = oracle_cls.build(spec, "cpu", seed, optimizer=opt)
        report.diffs[name] = 0.0
        for bx, by in batches:
            net.train_step(bx, by)
            oracle.train_step(bx, by)
            ref = oracle.get_weights()
            diff, key = dict_diff(net.get_weights(), ref)
            if diff >= report.diffs[name]:
                report.diffs[name], report.where[name] = diff, key
            # Free-running float32 and float64 trajectories of a large ReLU net part ways through rounding
            # alone (a unit flips sign, the difference grows step by step), so each step starts from the
            # oracle's weights; the optimizer state (momentum, Adam moments, step count) stays the framework's.
            net.set_weights(ref)
    return report
