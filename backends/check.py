"""Cross-framework equivalence: compare an adapter against the float64 NumPy oracle, name the first diverging layer."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np

from ..models import ModelSpec

from .base import Adam, Adapter, BackendError, SGD

TOLERANCE = 1e-4  # float32 against float64: max abs difference relative to the reference's own scale
# The smallest scale a difference is measured against: far below any real output (float32's smallest normal
# number is 1.2e-38), so a reference of 1e-8 is judged relative to 1e-8, never in absolute terms.
SCALE_FLOOR = 1e-30
# An optimizer step is judged by the update it makes, relative to the oracle's update. Float32 weights round
# by up to 6e-8 of their size, so an update is never judged finer than UPDATE_FLOOR of the weights' scale.
UPDATE_FLOOR = 2e-3


def _scale(ref: np.ndarray) -> float:
    return float(np.abs(ref).max(initial=0.0))


def scaled_diff(got, ref, scale: float | None = None) -> float:
    """max |got - ref| / scale (default: max |ref|, the reference's own scale, floored at SCALE_FLOOR);
    inf for a shape mismatch or any NaN/inf in either: a reference that is not finite proves nothing."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape or not np.isfinite(got).all() or not np.isfinite(ref).all():
        return float("inf")
    scale = _scale(ref) if scale is None else scale
    if not math.isfinite(scale):
        return float("inf")
    with np.errstate(over="ignore"):
        d = float(np.abs(got - ref).max(initial=0.0) / max(scale, SCALE_FLOOR))
    return d if math.isfinite(d) else float("inf")


def dict_diff(got: dict, ref: dict, scale: float | None = None) -> tuple[float, str | None]:
    """Worst scaled difference over ref's keys (scale: the largest entry of all of ref, so a tensor that is
    truly ~0 is not judged by its float32 rounding noise) and its key; a missing key counts as inf."""
    if scale is None:
        scale = max((_scale(np.asarray(v, np.float64)) for v in ref.values()), default=0.0)
    worst, worst_key = 0.0, None
    for k, r in ref.items():
        d = scaled_diff(got[k], r, scale) if k in got else float("inf")
        if d > worst or worst_key is None:
            worst, worst_key = d, k
    return worst, worst_key


def update_diff(got: dict, ref: dict, start: dict, got_start: dict | None = None) -> tuple[float, str | None]:
    """How far one optimizer step's update (got - got_start, default start) is from the oracle's (ref - start),
    relative to the largest update of the oracle's, floored at UPDATE_FLOOR of the weights' scale; and the
    worst key."""
    got_start = start if got_start is None else got_start
    weights = max((_scale(np.asarray(v, np.float64)) for v in ref.values()), default=0.0)
    delta_ref = {k: np.asarray(ref[k], np.float64) - np.asarray(start[k], np.float64) for k in ref}
    delta_got = {k: np.asarray(got[k], np.float64) - np.asarray(got_start[k], np.float64) for k in ref if k in got}
    updates = max((_scale(v) for v in delta_ref.values()), default=0.0)
    return dict_diff(delta_got, delta_ref, max(updates, UPDATE_FLOOR * weights))


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


def noisy_steps(before: Adapter, x: np.ndarray, y: np.ndarray, start: dict, ref: dict, draws: int = 16,
                noise: float = 1e-6, seed: int = 0) -> list[tuple[float, float]]:
    """The oracle's own step from its state `before` it, with inputs and weights moved by float32-sized relative
    noise, `draws` times, each reduced at once to (its weights' scaled diff from `ref`, its update's from ref's
    update): one draw's weights held at a time (a ResNet50 draw's are ~300 MB). Beside a ReLU or max-pool kink a
    float32 framework lands on either side (it starts each step from the oracle's weights rounded to float32);
    the optimizer-step twin of gradient_jitter."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        o = copy.deepcopy(before)
        moved = {k: v * (1 + noise * rng.standard_normal(v.shape)) for k, v in start.items()}
        o.set_weights(moved)
        o.train_step(x * (1 + noise * rng.standard_normal(x.shape)), y)
        after = o.get_weights()
        del o
        out.append((dict_diff(after, ref)[0], update_diff(after, ref, start, got_start=moved)[0]))
    return out


def sample_batch(spec: ModelSpec, n: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded float32 inputs and int64 labels for `spec`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + spec.input_shape).astype(np.float32)
    return x, rng.integers(0, max(spec.num_classes, 2), n).astype(np.int64)


def compare(backend_cls: type[Adapter], oracle_cls: type[Adapter], spec: ModelSpec, checks=None,
            device: str = "cpu", seed: int = 0, n: int = 8, steps: int = 5, compile: bool = False,
            weights: dict | None = None) -> Report:
    """Run the equivalence checks ("logits", "loss", "grads", "sgd", "adam") of one backend against the oracle,
    both starting from `weights` (default: the spec's seeded canonical init)."""
    checks = checks or ("logits", "loss", "grads", "sgd", "adam")
    report = Report(backend_cls.name, spec.name)
    x, y = sample_batch(spec, n, seed)
    batches = [sample_batch(spec, n, seed + 1 + i) for i in range(steps)]
    net = backend_cls.build(spec, device, seed, weights=weights, compile=compile)
    oracle = oracle_cls.build(spec, "cpu", seed, weights=weights)
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
    # BatchNorm, a dead unit) take lr-sized steps driven by float32 rounding. epsilon=1e-3 keeps the
    # check well-conditioned; a misplaced epsilon (before or after bias correction) still shows.
    for name, opt in (("sgd", SGD(lr=0.005, momentum=0.9)), ("adam", Adam(lr=1e-4, epsilon=1e-3))):
        if name not in checks:
            continue
        net = backend_cls.build(spec, device, seed, weights=weights, optimizer=opt, compile=compile)
        oracle = oracle_cls.build(spec, "cpu", seed, weights=weights, optimizer=opt)
        seen = []  # (diff, jitter or None, worst key or reason) per comparison made
        carried = 0.0  # a kink crossed at an earlier step lives on in the framework's momentum and moments
        for step, (bx, by) in enumerate(batches, 1):
            start, before, noisy = oracle.get_weights(), copy.deepcopy(oracle), None
            net.train_step(bx, by)
            oracle.train_step(bx, by)
            ref = oracle.get_weights()
            if not all(np.isfinite(v).all() for v in ref.values()):  # the oracle itself overflowed
                seen.append((float("inf"), None, f"the oracle's own weights are not finite after step {step}"))
                break
            got = net.get_weights()
            diff, key = dict_diff(got, ref)  # the weights, against their own scale
            jitter = None
            if math.isfinite(diff) and diff > TOLERANCE:  # the oracle's own steps under noise, made once a step
                noisy = noisy or noisy_steps(before, bx, by, start, ref)
                jitter = max(weights for weights, _ in noisy)
            if jitter is not None and carried:
                jitter = max(jitter, carried)
            if jitter is not None and within(diff, TOLERANCE, jitter):
                carried = max(carried, jitter)
            seen.append((diff, jitter, key))
            if step == 1:
                # The first update alone, against the oracle's: no optimizer state carried from an earlier step
                # (a later step's momentum carries the other side of any ReLU or max-pool kink the framework's
                # float32 gradient crossed), so a 1 % slip in lr, momentum or Adam's step shows at any scale.
                diff, key = update_diff(got, ref, start)
                jitter = None
                if math.isfinite(diff) and diff > TOLERANCE:
                    noisy = noisy or noisy_steps(before, bx, by, start, ref)
                    jitter = max(update for _, update in noisy)
                seen.append((diff, jitter, f"{key} (first update)"))
            if not math.isfinite(seen[-1][0]):
                break
            # Free-running float32 and float64 trajectories of a large ReLU net part ways through rounding
            # alone (a unit flips sign, the difference grows step by step), so each step starts from the
            # oracle's weights; the optimizer state (momentum, Adam moments, step count) stays the framework's.
            try:
                net.set_weights(ref)
            except BackendError as e:  # weights beyond float32's range: the framework cannot follow
                seen.append((float("inf"), None, f"after step {step}: {e}"))
                break
        # Report a step outside its own jitter if there is one, else the largest difference.
        failing = [s for s in seen if not within(s[0], TOLERANCE, s[1])]
        diff, jitter, where = max(failing or seen, key=lambda s: s[0])
        report.diffs[name], report.where[name] = diff, where
        if jitter is not None:
            report.jitter[name] = jitter
    return report
