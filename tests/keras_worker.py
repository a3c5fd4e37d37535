"""Runs one Keras engine's equivalence checks in its own process (Keras hosts one engine per process) and
writes JSON for tests/test_keras_engines.py; also exports trained weights and predicts from given weights.

    python tests/keras_worker.py check keras-jax OUT.json
    python tests/keras_worker.py export keras-jax OUT.npz      # weights after 3 SGD steps + predictions
    python tests/keras_worker.py predict keras-torch IN.npz OUT.npz [IN2.npz OUT2.npz ...]
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from nncompare.backends import SGD, Adam, BackendError, get_adapter  # noqa: E402
from nncompare.backends.check import compare, sample_batch, scaled_diff, update_diff  # noqa: E402
from nncompare.models import (INPUT, Activation, Add, AvgPool2D, Concatenate, Conv2D, Dense, Dropout,  # noqa: E402
                              Flatten, ModelSpec, zoo)

from tests.randspec import random_graph_spec, random_spec  # noqa: E402
from tests.specs import ACTIVATION_SPECS, CNN_SPECS, EVERY_LAYER, GRAPHS  # noqa: E402

RANDOM_SPECS, RANDOM_GRAPHS = 4, 8
TRANSFER_SPECS = ("conv_same_stride2", "residual_conv")
# mobilenet_mini at 32x32, seed 0: keras-jax's third SGD step sits on a kink (the oracle's own gradients move by
# 4e-2 under 1e-6 input noise) and the momentum carries it into the later weights
SMALL_INPUT = {"resnet20": (3, 8, 8), "inception_mini": (3, 8, 8), "mobilenet_mini": (3, 8, 8),
               "efficientnet_mini": (3, 8, 8)}

# Specs where a framework once computed something else, checked in every framework (tests/test_semantics.py) and
# every Keras engine (tests/test_keras_engines.py).
SEMANTIC_SPECS = {
    # Keras on TensorFlow took the softmax/sigmoid output for its pre-activation (`_keras_logits`) in the loss
    "softmax_handed_on": ModelSpec("softmax_handed_on", (4,), (Dense(3, activation="softmax"), Activation("linear"))),
    "sigmoid_handed_on": ModelSpec("sigmoid_handed_on", (4,), (Dense(1, activation="sigmoid"), Activation("linear"))),
    # "same" average pools uneven on one axis only (pads (0, 1) one way, (1, 1) the other): keras-torch pools
    # itself when either axis is uneven
    "same_avg_pool_uneven_h": ModelSpec("same_avg_pool_uneven_h", (2, 6, 5), (
        AvgPool2D(3, strides=2, padding="same"), Flatten(), Dense(3))),
    "same_avg_pool_uneven_w": ModelSpec("same_avg_pool_uneven_w", (2, 5, 6), (
        AvgPool2D(3, strides=2, padding="same"), Flatten(), Dense(3))),
    # a flattened channels-last image (HWC order inside Keras) meeting flat Dense outputs (canonical order) in Add
    # and Concatenate, first and second
    "flat_image_meets_dense": ModelSpec("flat_image_meets_dense", (2, 3, 4), (
        Conv2D(3, 2, padding="same", activation="tanh", name="conv"), Flatten(name="f"),
        Dense(36, activation="tanh", name="d"), Add(name="fd", inputs=("f", "d")), Add(name="df", inputs=("d", "f")),
        Concatenate(name="cat_fd", inputs=("f", "d")), Concatenate(name="cat_df", inputs=("df", "fd")),
        Dense(5, name="p", inputs=("cat_fd",)), Dense(5, name="q", inputs=("cat_df",)),
        Add(name="s", inputs=("p", "q")), Dense(3, name="out"))),
    # leaky_relu slopes at the spec's bounds (float32 made 1e39 inf; MXNet refused a slope of 1e-38)
    "leaky_relu_slope_bounds": ModelSpec("leaky_relu_slope_bounds", (4,), (
        Dense(3, activation="leaky_relu(1e6)"), Activation("leaky_relu(1e-30)"), Dense(2))),
    # Add of three distinct inputs (a framework summing only two of them)
    "add_three": ModelSpec("add_three", (5,), (
        Dense(4, name="a"), Dense(4, activation="tanh", name="b", inputs=(INPUT,)),
        Dense(4, activation="relu", name="c", inputs=(INPUT,)), Add(name="s", inputs=("a", "b", "c")), Dense(3))),
    "add_three_images": ModelSpec("add_three_images", (2, 4, 4), (
        Conv2D(3, 1, name="a"), Conv2D(3, 3, padding="same", name="b", inputs=(INPUT,)),
        Conv2D(3, 2, padding="same", activation="relu", name="c", inputs=(INPUT,)),
        Add(name="s", inputs=("a", "b", "c")), Flatten(), Dense(2))),
}
# Adam with betas close to 1 (the bound is 1 - 1e-7): MXNet and Keras rounded them to float32 in part of the step
ADAM_NEAR_ONE = Adam(lr=1e-3, beta1=1 - 1e-6, beta2=1 - 1e-7, epsilon=1e-3)
DEEP_LAYERS = 1200  # a chain deeper than Python's default recursion limit of 1000


def models() -> dict[str, ModelSpec]:
    """Zoo (without dropout), the hand-written specs (the CNN vocabulary's too), and a few random plain and graph
    specs."""
    out = {n: zoo.get(n).without_dropout() for n in zoo.names()}
    for n in SMALL_INPUT:  # size-agnostic (global pooling) nets on 8x8 inputs: the same graph, a fraction of the time
        out[n] = dataclasses.replace(out[n], input_shape=SMALL_INPUT[n])
    out.update(EVERY_LAYER)
    out.update({s.name: s for s in ACTIVATION_SPECS.values()})
    out.update(GRAPHS)
    out.update(CNN_SPECS)
    out.update(SEMANTIC_SPECS)
    out.update({f"random_{i}": random_spec(i) for i in range(RANDOM_SPECS)})
    out.update({f"random_graph_{i}": random_graph_spec(i) for i in range(RANDOM_GRAPHS)})
    return out


def _guarded(fn):
    try:
        return fn()
    except Exception as e:  # one broken check must not hide the others: the test shows this text
        return {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"}


def check(backend: str) -> dict:
    cls, oracle = get_adapter(backend), get_adapter("numpy")
    result = {"models": {}, "extras": {}}
    for name, spec in models().items():
        def run(spec=spec):
            t0 = time.perf_counter()
            r = compare(cls, oracle, spec)
            return {"diffs": r.diffs, "where": r.where, "seconds": time.perf_counter() - t0}
        result["models"][name] = _guarded(run)
    extras = result["extras"]

    def round_trip():
        spec = EVERY_LAYER["conv_same_stride2"]
        rng = np.random.default_rng(5)
        w = {k: (np.abs if k.endswith("moving_var") else np.asarray)(rng.standard_normal(s)).astype(np.float32)
             for k, s in spec.param_shapes().items()}
        got = cls.build(spec, weights=w).get_weights()
        return {"keys_equal": list(got) == list(w),
                "exact": all(got[k].dtype == np.float32 and np.array_equal(got[k], w[k]) for k in w)}
    extras["round_trip"] = _guarded(round_trip)

    def keeps_state():
        spec = GRAPHS["residual_conv"]
        net = cls.build(spec, optimizer=SGD(lr=0.1, momentum=0.9))
        net.train_step(*sample_batch(spec, 8, seed=1))  # the JAX engine now holds its state in arrays
        before = net.get_weights()
        net.loss_and_grads(*sample_batch(spec, 8))
        after = net.get_weights()
        return {"unchanged": all(np.array_equal(before[k], after[k]) for k in before)}
    extras["loss_and_grads_keeps_state"] = _guarded(keeps_state)

    def dropout():
        spec = ModelSpec("dropout", (4000,), (Dropout(0.3), Dense(2)))
        net, ref = cls.build(spec), oracle.build(spec)
        x, y = sample_batch(spec, 1)
        infer = scaled_diff(net.predict(x), ref.predict(x))
        g = net.loss_and_grads(x, y)[1]["dense_1/kernel"]
        return {"inference_diff": infer, "dropped_fraction": float(np.all(g == 0, axis=1).mean())}
    extras["dropout"] = _guarded(dropout)

    def fit():
        spec = zoo.get("digits_cnn")
        x, y = sample_batch(spec, 40, seed=3)
        opt = SGD(lr=0.05, momentum=0.9)
        got = cls.build(spec, optimizer=opt).fit(x, y, epochs=2, batch_size=16)["loss"]
        ref = oracle.build(spec, optimizer=opt).fit(x, y, epochs=2, batch_size=16)["loss"]
        return {"loss": got, "ref": ref}
    extras["fit"] = _guarded(fit)

    def resident():  # to_device batches train exactly like host batches
        spec = EVERY_LAYER["conv_same_stride2"]
        a, b = cls.build(spec, optimizer=SGD(0.05, 0.9)), cls.build(spec, optimizer=SGD(0.05, 0.9))
        for i in range(3):
            x, y = sample_batch(spec, 8, seed=i)
            a.train_step(x, y)
            float(b.train_batch(*b.to_device(x, y)))
        wa, wb = a.get_weights(), b.get_weights()
        return {"equal": all(np.array_equal(wa[k], wb[k]) for k in wa), "settings": b.settings,
                "path": b.execution_path, "version": cls.version()}
    extras["resident"] = _guarded(resident)

    def same_avg_pool():  # docs/design.md trap 17 in Keras itself: on torch, odd "same" pads replicate the edge cells
        import keras
        spec = ModelSpec("same_avg", (1, 6, 6), (AvgPool2D(3, strides=2, padding="same", name="pool"), Flatten(),
                                                 Dense(2)))  # pads (0, 1): the last window holds 2 real cells
        x = sample_batch(spec, 2)[0]
        ref = oracle.build(spec).layer_outputs(x)["pool"]
        ours = cls.build(spec).layer_outputs(x)["pool"]
        nhwc = keras.layers.AveragePooling2D(3, 2, "same")(x.transpose(0, 2, 3, 1))  # Keras' own layer
        own = keras.ops.convert_to_numpy(nhwc).transpose(0, 3, 1, 2)
        return {"adapter_diff": scaled_diff(ours, ref), "keras_own_diff": scaled_diff(own, ref)}
    extras["same_avg_pool"] = _guarded(same_avg_pool)

    def adam_near_one():
        diff, _ = adam_steps(cls, oracle, ADAM_NEAR_ONE)
        return {"diff": diff}
    extras["adam_near_one"] = _guarded(adam_near_one)

    def flipped_weights():
        diff = set_flipped_weights(cls, oracle)
        return {"diff": diff}
    extras["flipped_weights"] = _guarded(flipped_weights)

    def set_after_training():
        return set_weights_after_training(cls, oracle)
    extras["set_after_training"] = _guarded(set_after_training)
    extras["statistics_set"] = _guarded(lambda: {"diff": set_statistics(cls, oracle)})

    def deep():  # at Python's default recursion limit, whatever the engine's imports raised it to
        if backend != "keras-torch":  # the same build code on every engine; torch's builds it fastest (5 s)
            return {"skip": "checked on keras-torch"}
        sys.setrecursionlimit(1000)
        spec = deep_spec(DEEP_LAYERS)
        x = sample_batch(spec, 4)[0]
        w = oracle.build(spec).get_weights()
        return {"diff": scaled_diff(cls.build(spec, weights=w).predict(x), oracle.build(spec, weights=w).predict(x)),
                "limit_after": sys.getrecursionlimit()}
    extras["deep"] = _guarded(deep)

    def bad_device():
        try:
            cls.build(zoo.get("perceptron"), device="gpu:7")
        except BackendError as e:
            return {"message": str(e)}
        return {"message": None}
    extras["bad_device"] = _guarded(bad_device)

    def second_engine():
        from nncompare.backends import available_backends
        others = [b for b in ("keras-jax", "keras-torch", "keras") if b != backend and available_backends()[b]["installed"]]
        if not others:
            return {"message": None, "skip": "no other Keras engine is installed here"}
        other = others[0]
        try:
            get_adapter(other)
        except BackendError as e:
            return {"message": str(e)}
        return {"message": None}
    extras["second_engine"] = _guarded(second_engine)

    def initialisers():  # Keras' random initialisers run only where their weights are kept (init="native")
        import keras
        calls = []
        original = keras.initializers.GlorotUniform.__call__
        keras.initializers.GlorotUniform.__call__ = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
        try:
            cls.build(zoo.get("lenet5"))
            canonical = len(calls)
            cls.build(zoo.get("lenet5"), init="native")
        finally:
            keras.initializers.GlorotUniform.__call__ = original
        return {"canonical": canonical, "native": len(calls) - canonical}
    extras["initialisers"] = _guarded(initialisers)

    def compiles():  # XLA compiles of a training step and of inference, after the first of each
        if backend != "keras-jax":
            return {"skip": f"{backend} compiles nothing"}
        import jax
        events = []

        def on_event(name, *a, **k):
            if name == "/jax/core/compile/backend_compile_duration":
                events.append(1)
        # JAX has reported a compile as a duration event and, in later releases, as a time span: listen to both
        # (a compile counted twice still leaves "none after the first" exact)
        jax.monitoring.register_event_duration_secs_listener(on_event)
        if hasattr(jax.monitoring, "register_event_time_span_listener"):
            jax.monitoring.register_event_time_span_listener(on_event)
        spec = zoo.get("digits_cnn")
        x, y = sample_batch(spec, 8)
        out = {}
        for data in ("host", "resident"):  # numpy batches (train_step), device arrays (what timing feeds)
            net = cls.build(spec, optimizer=SGD(0.05, 0.9))
            step = (lambda: net.train_step(x, y)) if data == "host" else (
                lambda batch=net.to_device(x, y): float(net.train_batch(*batch)))
            start = len(events)
            step()
            first = len(events)
            for _ in range(3):
                step()
            out[data] = {"first_step": first - start, "later_steps": len(events) - first}
        return out
    extras["compiles"] = _guarded(compiles)
    return result


# --- semantic checks shared with tests/test_semantics.py (in-process frameworks) ------------------------------
def adam_steps(cls, oracle, opt, steps: int = 10) -> tuple[float, str | None]:
    """The worst update difference from the oracle's over `steps` free-running steps of `opt` (small net)."""
    spec = ModelSpec("adam", (4,), (Dense(5, activation="tanh"), Dense(3)))
    net, ref = cls.build(spec, optimizer=opt), oracle.build(spec, optimizer=opt)
    start = ref.get_weights()
    for i in range(steps):
        x, y = sample_batch(spec, 8, seed=i)
        net.train_step(x, y)
        ref.train_step(x, y)
    return update_diff(net.get_weights(), ref.get_weights(), start)


def set_flipped_weights(cls, oracle) -> float:
    """Weights given as np.flip views (negative strides): loaded exactly? Returns the worst scaled difference."""
    spec = SEMANTIC_SPECS["add_three_images"]
    w = oracle.build(spec, seed=3).get_weights()
    flipped = {k: np.flip(np.flip(v).copy()) for k, v in w.items()}  # equal values, negative strides
    assert all(any(s < 0 for s in a.strides) for a in flipped.values() if a.size > 1)
    got = cls.build(spec, weights=flipped).get_weights()
    return max(scaled_diff(got[k], w[k]) for k in w)


def set_weights_after_training(cls, oracle) -> dict:
    """Train a step, then load other weights: predict and get_weights must follow them, not the trained state."""
    spec = SEMANTIC_SPECS["add_three_images"]
    other = oracle.build(spec, seed=7).get_weights()
    net = cls.build(spec, optimizer=SGD(lr=0.1, momentum=0.9))
    net.train_step(*sample_batch(spec, 8, seed=1))
    net.set_weights(other)
    x = sample_batch(spec, 4, seed=2)[0]
    got = net.get_weights()
    return {"predict": scaled_diff(net.predict(x), oracle.build(spec, weights=other).predict(x)),
            "weights": max(scaled_diff(got[k], other[k]) for k in other)}


def set_statistics(cls, oracle) -> float:
    """Weights whose Normalization statistics are not the initial 0 and 1 (nor LayerNormalization's gamma and beta
    ones and zeros), set after the build and set again: the worst scaled difference of the logits from the
    oracle's, over both."""
    spec = CNN_SPECS["squeeze_excite"]
    net, worst = cls.build(spec), 0.0
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        w = {k: (rng.uniform(0.2, 3.0, v.shape) if k.endswith("/variance") else rng.uniform(-1, 1, v.shape) + v)
             .astype(np.float32) for k, v in oracle.build(spec, seed=seed).get_weights().items()}
        x = sample_batch(spec, 4, seed=seed)[0]
        net.set_weights(w)
        worst = max(worst, scaled_diff(net.logits(x), oracle.build(spec, weights=w).logits(x)))
    return worst


def deep_spec(layers: int) -> ModelSpec:
    """A chain of `layers` layers whose outputs stay far from 0 and differ per sample: Dense, activations, Dense."""
    acts = tuple(Activation("tanh" if i % 2 else "leaky_relu(0.5)") for i in range(layers - 2))
    return ModelSpec("deep", (4,), (Dense(4),) + acts + (Dense(3),))


def export(backend: str, out: str) -> None:
    """Per transfer spec: weights after 3 SGD steps (BatchNorm statistics moved) and predictions on a batch."""
    cls, arrays = get_adapter(backend), {}
    for name in TRANSFER_SPECS:
        spec = {**EVERY_LAYER, **GRAPHS}[name]
        net = cls.build(spec, optimizer=SGD(lr=0.05, momentum=0.9))
        for i in range(3):
            net.train_step(*sample_batch(spec, 8, seed=i))
        arrays.update({f"{name}|w|{k}": v for k, v in net.get_weights().items()})
        arrays[f"{name}|predict"] = net.predict(sample_batch(spec, 8, seed=99)[0])
    np.savez(out, **arrays)


def load_weights(path: str, name: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k.split("|", 2)[2]: f[k] for k in f.files if k.startswith(f"{name}|w|")}


def predict(backend: str, pairs: list[str]) -> None:
    """For each (weights .npz, output .npz) pair: this backend's predictions from those weights."""
    cls = get_adapter(backend)
    for src, out in zip(pairs[::2], pairs[1::2]):
        arrays = {}
        for name in TRANSFER_SPECS:
            spec = {**EVERY_LAYER, **GRAPHS}[name]
            arrays[f"{name}|predict"] = cls.build(spec, weights=load_weights(src, name)).predict(
                sample_batch(spec, 8, seed=99)[0])
        np.savez(out, **arrays)


if __name__ == "__main__":
    mode, backend, *paths = sys.argv[1:]
    if mode == "check":
        Path(paths[0]).write_text(json.dumps(check(backend), default=float))
    elif mode == "export":
        export(backend, paths[0])
    elif mode == "predict":
        predict(backend, paths)
    else:
        sys.exit(f"unknown mode {mode!r}")
