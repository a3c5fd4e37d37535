"""The adapter boundary: bad labels, non-finite or empty inputs, bad weights and API misuse each give one
BackendError naming what is wrong and where, for every installed backend."""
import math
import re
import warnings

import numpy as np
import pytest

from nncompare.backends import Adam, BackendError, SGD, get_adapter, make_optimizer
from nncompare.backends.base import loss_and_dlogits
from nncompare.models import BatchNorm, Dense, ModelSpec, init_weights

from .conftest import FRAMEWORKS, require

BACKENDS = ["numpy", *FRAMEWORKS]
MULTI = ModelSpec("multi", (4,), (Dense(5, activation="tanh"), BatchNorm(), Dense(10, activation="softmax")))
BINARY = ModelSpec("binary", (4,), (Dense(3, activation="tanh"), Dense(1, activation="sigmoid")))
_NETS = {}


def net(backend, spec=MULTI):
    """A built adapter, shared by the tests of this module (rejected calls must leave it unchanged)."""
    require(backend)
    if (backend, spec.name) not in _NETS:
        _NETS[backend, spec.name] = get_adapter(backend).build(spec, seed=3, optimizer=SGD(lr=0.1))
    return _NETS[backend, spec.name]


def batch(n=6, spec=MULTI, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *spec.input_shape)).astype(np.float32), rng.integers(0, 2, n)


def every_entry(a, x, y):
    """Each public entry point that takes inputs (and labels), as a call on (x, y)."""
    return {"train_step": lambda: a.train_step(x, y), "fit": lambda: a.fit(x, y, batch_size=4),
            "evaluate": lambda: a.evaluate(x, y), "loss_and_grads": lambda: a.loss_and_grads(x, y),
            "predict": lambda: a.predict(x), "logits": lambda: a.logits(x),
            "layer_outputs": lambda: a.layer_outputs(x)}


LABEL_ENTRIES = ["train_step", "fit", "evaluate", "loss_and_grads"]


def raises(call, message):
    with pytest.raises(BackendError, match=re.escape(message)):
        call()


# --- labels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_labels_are_refused_everywhere(backend):
    a, w = net(backend), net(backend).get_weights()
    x, y = batch()
    for bad, message in ((12, "labels: class 12 at index 3 is out of range for 10 outputs (0..9)"),
                         (-1, "labels: class -1 at index 3 is out of range for 10 outputs")):
        y_bad = y.copy()
        y_bad[3] = bad
        for entry in LABEL_ENTRIES:
            raises(every_entry(a, x, y_bad)[entry], message)
    np.testing.assert_array_equal(a.get_weights()["dense_0/kernel"], w["dense_0/kernel"])  # nothing trained


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_binary_head_takes_0_or_1(backend):
    a = net(backend, BINARY)
    x, y = batch(spec=BINARY)
    y[2] = 2
    for entry in LABEL_ENTRIES:
        raises(every_entry(a, x, y)[entry], "labels: class 2 at index 2 is out of range for a binary head "
                                            "(1 output: labels 0 or 1)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_must_be_whole_numbers_of_the_right_shape_and_length(backend):
    a = net(backend)
    x, y = batch()
    cases = [(np.where(np.arange(6) == 4, 1.5, y), "labels: 1.5 at index 4 is not a class index "
                                                   "(labels are integers, or floats holding whole numbers)"),
             (np.where(np.arange(6) == 1, np.nan, y), "labels: nan at index 1 is not a class index"),
             (np.eye(10)[y], "labels: shape (6, 10): expected (N,) or (N, 1) class indices"),
             (y[:5], "labels: 5 labels for 6 input samples"),
             (y.astype(str), "labels: dtype <U21 is not numeric"),
             ("0", "labels: must be a numeric array, got str")]
    for y_bad, message in cases:
        for entry in LABEL_ENTRIES:
            raises(every_entry(a, x, y_bad)[entry], message)


@pytest.mark.parametrize("backend", BACKENDS)
def test_n_by_1_and_integral_float_labels_mean_the_same_as_int_labels(backend):
    oracle, a = net("numpy"), net(backend)
    x, y = batch(n=8, seed=4)
    y = np.arange(8) % 10
    ref_loss, ref_grads = a.loss_and_grads(x, y)
    for same in (y[:, None], y.astype(np.float32), y.astype(np.int32)[:, None], list(y)):
        loss, grads = a.loss_and_grads(x, same)
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        np.testing.assert_allclose(grads["dense_2/kernel"], ref_grads["dense_2/kernel"], rtol=1e-5, atol=1e-7)
        assert a.evaluate(x, same) == pytest.approx(a.evaluate(x, y))
    assert oracle.evaluate(x, y[:, None]) == pytest.approx(oracle.evaluate(x, y))


def test_the_oracle_loss_takes_n_by_1_labels():
    """An (N, 1) label column broadcast against arange(N) into an N x N pick: a different loss."""
    z = np.random.default_rng(0).standard_normal((5, 3))
    y = np.array([0, 2, 1, 1, 0])
    loss, d = loss_and_dlogits(z, y)
    loss_col, d_col = loss_and_dlogits(z, y[:, None])
    assert loss_col == loss and np.array_equal(d_col, d)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    assert loss == pytest.approx(-logp[np.arange(5), y].mean())


# --- non-finite and empty inputs -----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_are_refused_naming_the_first_bad_element(backend):
    a = net(backend)
    x, y = batch()
    for value, message in ((np.nan, "inputs: value nan at index (2, 3) is not finite"),
                           (-np.inf, "inputs: value -inf at index (2, 3) is not finite"),
                           (1e39, "inputs: value 1e+39 at index (2, 3) is outside float32's range")):
        x_bad = x.astype(np.float64)
        x_bad[2, 3] = value
        x_bad[4, 0] = value
        for call in every_entry(a, x_bad, y).values():
            raises(call, message)


@pytest.mark.parametrize("backend", [*BACKENDS, "onnxruntime"])
def test_float32_inputs_reach_inference_unscanned_and_training_refuses_them(backend):
    """predict and logits hand a ready float32 batch to the engine as it is (NaN in, NaN out, as the frameworks
    do); every entry that trains or scores still names the bad element."""
    a = net(backend)
    x, y = batch()
    x[2, 3] = np.nan
    for entry in ("predict", "logits"):
        out = every_entry(a, x, y)[entry]()
        assert out.shape == (6, 10) and np.isnan(out[2]).all() and np.isfinite(np.delete(out, 2, axis=0)).all()
    for entry in ("train_step", "fit", "evaluate", "loss_and_grads", "layer_outputs"):  # checked before any
        raises(every_entry(a, x, y)[entry], "inputs: value nan at index (2, 3) is not finite")  # backend call
    strided = np.asfortranarray(batch()[0])  # not C-contiguous: converted, so checked
    strided[1, 0] = np.inf
    raises(lambda: a.predict(strided), "inputs: value inf at index (1, 0) is not finite")
    raises(lambda: a.logits(x[:, :3]), "inputs: shape (6, 3) does not match the spec's input_shape")
    raises(lambda: a.logits(x[:0]), "inputs: empty (0 samples)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_batch_is_refused(backend):
    """MXNet crashed on an empty predict; fit and evaluate divided by zero."""
    a = net(backend)
    x, y = batch(n=0)
    for call in every_entry(a, x, y).values():
        raises(call, "inputs: empty (0 samples)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_of_the_wrong_kind_or_shape_are_refused(backend):
    a = net(backend)
    x, _ = batch()
    raises(lambda: a.predict(x[0]), "inputs: shape (4,) does not match the spec's input_shape: expected (N, 4) "
                                    "(one sample needs a batch axis: x[None])")
    raises(lambda: a.predict(x[:, :3]), "inputs: shape (6, 3) does not match")
    raises(lambda: a.predict(x.astype(complex)), "inputs: dtype complex128 is not numeric")
    raises(lambda: a.predict([[1, 2, 3, 4], [1, 2]]), "inputs: not a numeric array")
    raises(lambda: a.predict(None), "inputs: must be a numeric array, got NoneType")
    raises(lambda: a.predict("abcd"), "inputs: must be a numeric array, got str")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_read_only_and_integer_inputs_are_fine(backend):
    a = net(backend)
    x, _ = batch()
    expected = a.logits(x[::-1].copy())
    frozen = x[::-1]
    frozen.flags.writeable = False  # torch.from_numpy refused negative strides and warned on read-only arrays
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(a.logits(frozen), expected)
    np.testing.assert_allclose(a.logits(np.ones((2, 4), np.int64)), a.logits(np.ones((2, 4), np.float32)))


def test_predict_applies_a_sigmoid_head_without_overflow():
    a = get_adapter("numpy").build(BINARY, weights={k: v * 1e3 for k, v in init_weights(BINARY, 0).items()})
    x, _ = batch(spec=BINARY)
    x = x * 1e3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = a.predict(x)
    z = a.logits(x)
    assert np.abs(z).max() > 800  # exp(-z) overflows float64 for z < -709
    np.testing.assert_array_equal(p, (z > 0).astype(np.float32))


# --- weights -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_weights_are_refused_and_nothing_is_loaded(backend):
    a = net(backend)
    before = a.get_weights()
    good = init_weights(MULTI, 9)

    def with_(key, value):
        return {**good, key: value}

    kernel = good["dense_0/kernel"].copy()
    kernel[1, 2] = np.nan
    wide = good["dense_2/bias"].astype(np.float64)
    wide[7] = 1e300
    var = good["batchnorm_1/moving_var"].copy()
    var[3] = -0.5
    cases = [(with_("dense_0/kernel", kernel), "weight 'dense_0/kernel': value nan at index (1, 2) is not finite"),
             (with_("dense_2/bias", wide), "weight 'dense_2/bias': value 1e+300 at index 7 is outside float32's range"),
             (with_("batchnorm_1/moving_var", var), "weight 'batchnorm_1/moving_var': variance -0.5 at index 3 "
                                                    "is negative"),
             (with_("dense_0/bias", np.array(["0"] * 5)), "weight 'dense_0/bias': dtype <U1 is not numeric"),
             (with_("dense_0/bias", np.zeros(4)), "weight 'dense_0/bias': shape (4,), the spec needs (5,)"),
             (list(good.values()), "weights: must be a dict of canonical key -> array"),
             (None, "weights: must be a dict"),
             ({**good, 3: np.zeros(1)}, "unexpected [3]")]
    for weights, message in cases:
        raises(lambda: a.set_weights(weights), message)
    for k, v in a.get_weights().items():
        np.testing.assert_array_equal(v, before[k])
    raises(lambda: get_adapter(backend).build(MULTI, weights=list(good.values())), "weights: must be a dict")


def test_the_oracle_keeps_float64_weights():
    w = {k: v.astype(np.float64) + 1e-12 for k, v in init_weights(BINARY, 1).items()}
    a = get_adapter("numpy").build(BINARY, weights=w)
    assert a.w["dense_0/kernel"][0, 0] == w["dense_0/kernel"][0, 0]


# --- API misuse ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_and_evaluate_arguments_are_checked(backend):
    a = net(backend)
    x, y = batch()
    for kw, message in (({"batch_size": 0}, "batch_size: must be an integer >= 1, got 0"),
                        ({"batch_size": -4}, "batch_size: must be an integer >= 1, got -4"),
                        ({"batch_size": 2.5}, "batch_size: must be an integer >= 1, got 2.5"),
                        ({"batch_size": True}, "batch_size: must be an integer >= 1, got True"),
                        ({"batch_size": "32"}, "batch_size: must be an integer >= 1, got '32'"),
                        ({"epochs": -1}, "epochs: must be an integer >= 0, got -1"),
                        ({"epochs": 1.5}, "epochs: must be an integer >= 0, got 1.5"),
                        ({"seed": -1}, "seed: must be an integer >= 0, got -1"),
                        ({"seed": "0"}, "seed: must be an integer >= 0, got '0'"),
                        ({"start_epoch": -2}, "start_epoch: must be an integer >= 0, got -2"),
                        ({"shuffle": "no"}, "shuffle: must be True or False, got 'no'"),
                        ({"optimizer": "adam"}, "optimizer: must be an SGD(...) or Adam(...) config")):
        raises(lambda: a.fit(x, y, **kw), message)
    assert a.optimizer == SGD(lr=0.1)  # the refused fit did not replace it
    raises(lambda: a.evaluate(x, y, batch_size=0), "batch_size: must be an integer >= 1, got 0")
    assert a.fit(x, y, epochs=np.int64(0), batch_size=np.int32(4)) == {"loss": []}


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_optimizer_must_be_a_config(backend):
    """The NumPy backend took a string and then never trained."""
    a = net(backend)
    for bad in ("adam", object(), None, {"lr": 0.1}):
        raises(lambda: a.set_optimizer(bad), "optimizer: must be an SGD(...) or Adam(...) config")
        raises(lambda: get_adapter(backend).build(MULTI, optimizer=bad if bad is not None else "sgd"),
               "optimizer: must be")
    raises(lambda: a.set_optimizer("adam"), "make_optimizer('adam') builds one from a name")
    assert a.optimizer == SGD(lr=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_without_an_optimizer_is_refused(backend):
    require(backend)
    a = get_adapter(backend)(MULTI)  # constructed, not built: no optimizer
    raises(lambda: a.train_step(*batch()), "no optimizer set")
    raises(lambda: a.fit(*batch()), "no optimizer set")


@pytest.mark.parametrize("backend", BACKENDS)
def test_build_arguments_are_checked(backend):
    require(backend)
    cls = get_adapter(backend)
    for device in (0, None, ["cpu"], b"cpu", 1.5):
        raises(lambda: cls.build(MULTI, device=device), "device must be a string (cpu, gpu, gpu:N or cuda:N)")
    raises(lambda: cls.build(MULTI, device="tpu"), "unknown device 'tpu'")
    raises(lambda: cls.build("lenet5"), "spec: must be a ModelSpec (nncompare.models), got str")
    for seed in (-1, "0", 1.0, None):
        raises(lambda: cls.build(MULTI, seed=seed), "seed: must be an integer >= 0")
    raises(lambda: cls.build(MULTI, compile="yes"), "compile: must be True or False, got 'yes'")
    raises(lambda: cls.build(MULTI, init=["native"]), "unknown init ['native']")


@pytest.mark.parametrize("name", [["torch"], None, 1, b"numpy", ("numpy",)])
def test_get_adapter_wants_a_name(name):
    raises(lambda: get_adapter(name), "backend name must be a string (numpy, keras")


@pytest.mark.parametrize("make, message", [
    (lambda: SGD(lr=math.nan), "SGD: field 'lr': must be a finite number >= 0, got nan"),
    (lambda: SGD(lr=math.inf), "SGD: field 'lr': must be a finite number >= 0, got inf"),
    (lambda: SGD(lr=-0.1), "SGD: field 'lr': must be a finite number >= 0, got -0.1"),
    (lambda: SGD(lr="0.1"), "SGD: field 'lr': must be a finite number >= 0, got '0.1'"),
    (lambda: SGD(lr=True), "SGD: field 'lr': must be a finite number >= 0, got True"),
    (lambda: SGD(momentum=1.0), "SGD: field 'momentum': must be a finite number in [0, 1), got 1.0"),
    (lambda: SGD(momentum=-0.5), "SGD: field 'momentum': must be a finite number in [0, 1), got -0.5"),
    (lambda: Adam(beta1=1.0), "Adam: field 'beta1': must be a finite number in [0, 1), got 1.0"),
    (lambda: Adam(beta2=-0.1), "Adam: field 'beta2': must be a finite number in [0, 1), got -0.1"),
    (lambda: Adam(epsilon=0.0), "Adam: field 'epsilon': must be a finite number > 0, got 0.0"),
    (lambda: Adam(epsilon=math.nan), "Adam: field 'epsilon': must be a finite number > 0, got nan"),
    (lambda: Adam(lr=-1), "Adam: field 'lr': must be a finite number >= 0, got -1"),
    (lambda: make_optimizer("sgd", lr=math.inf), "SGD: field 'lr'"),
])
def test_optimizer_configs_check_their_fields(make, message):
    raises(make, message)


def test_optimizer_configs_accept_what_the_suite_uses():
    assert SGD(lr=0.0).lr == 0.0  # a deliberate no-op step: BatchNorm statistics move, weights do not
    assert SGD(lr=np.float32(0.5), momentum=0).momentum == 0
    assert Adam(lr=1, beta1=0.0, epsilon=1e-3).beta1 == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_thread_counts_and_cpu_indices_are_checked(backend):
    require(backend)
    cls = get_adapter(backend)
    for n in (0, -2, "4", 2.0):
        raises(lambda: cls.set_threads(n), f"threads: must be an integer >= 1, got {n!r}")
    raises(lambda: cls.build(MULTI, device="cpu:5"), "unknown device 'cpu:5'")  # silently the CPU before
    assert cls.build(MULTI, device="CPU:0").device == "cpu"  # stored under its canonical name


def test_the_abstract_contract_cannot_be_built():
    from nncompare.backends import Adapter
    raises(lambda: Adapter.build(MULTI), "Adapter is the abstract contract: build a backend's adapter")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_model_without_parameters_refuses_gradients_and_optimizers_alike(backend):
    """torch raised RuntimeError and MXNet MXNetError/TypeError where NumPy and Keras answered."""
    require(backend)
    from nncompare.models import Flatten, MaxPool2D
    free = ModelSpec("free", (1, 4, 4), (MaxPool2D(2), Flatten()))
    a = get_adapter(backend).build(free)
    x = np.ones((2, 1, 4, 4), np.float32)
    for call in (lambda: a.loss_and_grads(x, [0, 1]), lambda: a.set_optimizer(SGD()),
                 lambda: a.train_step(x, [0, 1]), lambda: a.fit(x, [0, 1])):
        raises(call, "model 'free' has no trainable parameters: nothing to train")
    assert a.evaluate(x, [0, 1])[1] in (0.0, 0.5, 1.0) and a.predict(x).shape == (2, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_images_get_a_hint(backend):
    require(backend)
    from nncompare.models import Flatten
    a = get_adapter(backend).build(ModelSpec("img", (3, 4, 5), (Flatten(), Dense(2))))
    raises(lambda: a.predict(np.zeros((2, 4, 5, 3))), "expected (N, 3, 4, 5) (channels-last? inputs are NCHW: "
                                                      "x.transpose(0, 3, 1, 2))")


@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_batches_staged_on_the_device_are_checked_too(backend):
    a = net(backend)
    if not hasattr(a, "to_device"):
        pytest.skip(f"{backend} stages no batches")
    x, y = batch()
    y[3] = 12
    raises(lambda: a.to_device(x, y), "labels: class 12 at index 3 is out of range for 10 outputs")
    raises(lambda: a.to_device(x[:0], y[:0]), "inputs: empty (0 samples)")
    raises(lambda: a.to_device(x, y[:5]), "labels: 5 labels for 6 input samples")


def test_the_shared_batch_order_checks_its_arguments():
    from nncompare.backends import batch_indices
    raises(lambda: list(batch_indices(5, 0, 0)), "batch_size: must be an integer >= 1, got 0")
    raises(lambda: list(batch_indices(5, 2, -1)), "epoch: must be an integer >= 0, got -1")
    assert [list(b) for b in batch_indices(5, 2, 0, shuffle=False)] == [[0, 1], [2, 3], [4]]
