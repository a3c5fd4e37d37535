"""Specs and arguments where a framework once computed something other than the spec's meaning, or raised its own
raw exception: each checked in every in-process framework against the float64 oracle. The Keras engines on JAX
and torch run the same checks in their own processes (tests/keras_worker.py, asserted in test_keras_engines.py).
"""
from __future__ import annotations

import fractions

import numpy as np
import pytest

from nncompare.backends import SGD, Adam, BackendError, get_adapter
from nncompare.backends.check import TOLERANCE, compare, sample_batch, scaled_diff, update_diff
from nncompare.models import Activation, BatchNorm, Dense, ModelSpec

from .conftest import FRAMEWORKS, require
from .keras_worker import (ADAM_NEAR_ONE, DEEP_LAYERS, SEMANTIC_SPECS, adam_steps, deep_spec, set_flipped_weights,
                           set_weights_after_training)

BACKENDS = FRAMEWORKS + ["numpy"]


def adapter(backend):
    require(backend)
    return get_adapter(backend)


@pytest.mark.parametrize("model", sorted(SEMANTIC_SPECS))
@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_matches_the_oracle(backend, model):
    report = compare(adapter(backend), get_adapter("numpy"), SEMANTIC_SPECS[model])
    bad = [report.describe(c) for c in report.diffs if report.diffs[c] > TOLERANCE]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_batchnorm_at_its_smallest_epsilon_matches_the_oracle_on_a_batch_of_one(backend):
    # every channel constant: float32 rounding goes through 1/sqrt(epsilon) (at 1e-7 torch's Adam step was 3.6e-4
    # off, at 1e-20 its loss 100 %): the spec's bound
    spec = ModelSpec("bn1", (4,), (Dense(3), BatchNorm(epsilon=1e-5), Dense(2)))
    report = compare(adapter(backend), get_adapter("numpy"), spec, n=1)
    assert report.ok(), "\n".join(report.describe(c) for c in report.diffs)


def test_keras_on_tensorflow_takes_a_softmax_output_for_its_logits_in_its_own_loss():
    # The trap the keras adapter shields its loss from (docs/design.md): Keras' cross-entropy finds the tensor
    # before a softmax through `_keras_logits` and uses it, from_logits=True or not. Should Keras stop, the
    # tf.identity in KerasAdapter._loss can go.
    require("keras")
    get_adapter("keras")
    import keras
    import tensorflow as tf
    x = np.array([[5.0, -5.0, 0.0]], np.float32)
    y = np.array([2])

    @tf.function
    def own_loss(x):
        probs = keras.activations.softmax(x)
        return keras.ops.sparse_categorical_crossentropy(y, probs, from_logits=True)
    probs = np.exp(x) / np.exp(x).sum()
    meant = -np.log(np.exp(probs) / np.exp(probs).sum())[0, 2]  # the probabilities taken as logits
    swapped = -np.log(probs)[0, 2]  # what Keras computes: the loss of the pre-softmax logits
    assert abs(float(own_loss(x)[0]) - swapped) < 1e-4 and meant < 2 < 4 < swapped


# --- optimizers --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_adam_with_betas_near_one_follows_the_oracle(backend):
    # MXNet corrected float32-rounded moments with float64 betas (weights 0.7 % off at 1 - 1e-6, 3.6e4 off at
    # 1 - 1e-10); Keras gave NaN where float32 rounded a beta to 1
    diff, key = adam_steps(adapter(backend), get_adapter("numpy"), ADAM_NEAR_ONE)
    assert diff <= TOLERANCE, f"{backend}: scaled diff {diff:.2e} at {key}"


@pytest.mark.parametrize("field", ["beta1", "beta2"])
@pytest.mark.parametrize("value", [1 - 1e-10, 1 - 5e-8, np.float64(1 - 3e-8)])
def test_betas_float32_rounds_to_one_are_refused(field, value):
    with pytest.raises(BackendError, match=f"Adam: field '{field}': must be at most 0.9999999 \\(1 - 1e-07\\): "
                                           f"the frameworks keep Adam's moments in float32"):
        Adam(**{field: value})
    assert getattr(Adam(**{field: 1 - 1e-7}), field) == 1 - 1e-7


@pytest.mark.parametrize("make,fields", [
    (lambda: SGD(lr=1, momentum=fractions.Fraction(1, 2)), {"lr": 1.0, "momentum": 0.5}),
    (lambda: SGD(lr=fractions.Fraction(1, 20), momentum=np.float32(0.25)), {"lr": 0.05, "momentum": 0.25}),
    (lambda: Adam(lr=1, beta1=np.float64(0.5), beta2=fractions.Fraction(9, 10), epsilon=1),
     {"lr": 1.0, "beta1": 0.5, "beta2": 0.9, "epsilon": 1.0}),
])
def test_optimizer_fields_take_any_real_number_and_hold_floats(make, fields):
    opt = make()
    assert {k: getattr(opt, k) for k in fields} == fields
    assert all(type(getattr(opt, k)) is float for k in fields)


@pytest.mark.parametrize("make,message", [
    (lambda: SGD(lr=1e7), "SGD: field 'lr': must be at most 1e+06, got 10000000.0"),
    (lambda: SGD(lr=1e39), "SGD: field 'lr': must be at most 1e+06"),  # float32: inf (torch, MXNet raised)
    (lambda: SGD(lr=10 ** 400), "SGD: field 'lr': must be a finite number >= 0, got 1000"),  # past float
    (lambda: Adam(epsilon=1e-45), "Adam: field 'epsilon': must be at least 1e-30"),  # MXNet raised
    (lambda: Adam(epsilon=1e7), "Adam: field 'epsilon': must be at most 1e+06"),
    (lambda: SGD(lr=complex(1, 0)), "SGD: field 'lr': must be a finite number >= 0, got (1+0j)"),
])
def test_optimizer_fields_out_of_bounds_are_one_backend_error(make, message):
    with pytest.raises(BackendError) as e:
        make()
    assert str(e.value).startswith(message) and len(str(e.value)) <= 300


@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_int_and_fraction_learning_rates_train_like_floats(backend):
    # Keras refused an int learning rate, torch and the oracle a Fraction, each with its own exception
    spec = SEMANTIC_SPECS["add_three"]
    for given, plain in ((SGD(lr=1, momentum=fractions.Fraction(1, 2)), SGD(lr=1.0, momentum=0.5)),
                         (Adam(lr=fractions.Fraction(1, 100), beta1=fractions.Fraction(1, 2), epsilon=1),
                          Adam(lr=0.01, beta1=0.5, epsilon=1.0))):
        net, ref = adapter(backend).build(spec, optimizer=given), get_adapter("numpy").build(spec, optimizer=plain)
        start = ref.get_weights()
        for i in range(3):
            net.train_step(*sample_batch(spec, 8, seed=i))
            ref.train_step(*sample_batch(spec, 8, seed=i))
        diff, key = update_diff(net.get_weights(), ref.get_weights(), start)
        assert diff <= TOLERANCE, f"{given}: {diff:.2e} at {key}"


# --- weights -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_given_as_negative_stride_views_load_exactly(backend):
    # torch.as_tensor refused an np.flip view with a raw ValueError
    assert set_flipped_weights(adapter(backend), get_adapter("numpy")) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_set_after_training_replace_the_trained_ones(backend):
    r = set_weights_after_training(adapter(backend), get_adapter("numpy"))
    assert r["weights"] == 0 and r["predict"] <= TOLERANCE, r


# --- depth -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "mxnet"])
def test_a_deep_chain_matches_the_oracle(backend):
    spec = deep_spec(DEEP_LAYERS)
    w = get_adapter("numpy").build(spec).get_weights()
    x = sample_batch(spec, 4)[0]
    got = adapter(backend).build(spec, weights=w).predict(x)
    assert scaled_diff(got, get_adapter("numpy").build(spec, weights=w).predict(x)) <= TOLERANCE


def test_keras_refuses_a_spec_deeper_than_it_can_build_with_one_backend_error():
    require("keras")
    from nncompare.backends.keras_backend import MAX_LAYERS
    spec = ModelSpec("deep", (4,), tuple(Activation("relu") for _ in range(MAX_LAYERS)) + (Dense(3),))
    with pytest.raises(BackendError, match=f"keras: model 'deep' has {MAX_LAYERS + 1} layers; Keras builds a "
                                           f"functional model by recursing"):
        get_adapter("keras").build(spec)
