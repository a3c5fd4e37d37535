"""The spec: validation messages, shape/param/FLOP inference, serialisation."""
import json

import pytest

from nncompare.models import (Activation, AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ModelSpec,
                    SpecError, init_weights, resolve, zoo)

ZOO_PARAMS = {"perceptron": 3, "mlp": 235_146, "lenet5": 61_706, "cifar_cnn": 1_117_738,
              "digits_mlp": 4_810, "digits_cnn": 13_706,
              "resnet20": 274_042, "inception_mini": 12_570, "residual_mlp": 21_450, "every_kind": 3_091}


def test_zoo_names_cover_the_required_models():
    assert {"perceptron", "mlp", "lenet5", "cifar_cnn"} <= set(zoo.names())
    assert set(zoo.names()) == set(ZOO_PARAMS)


@pytest.mark.parametrize("name", sorted(ZOO_PARAMS))
def test_zoo_parameter_counts_are_exact(name):
    assert zoo.get(name).params == ZOO_PARAMS[name]


def test_lenet5_shapes_and_flops():
    spec = zoo.get("lenet5")
    assert [i.out_shape for i in spec.infos] == [
        (6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5), (400,), (120,), (84,), (10,)]
    conv0 = spec.infos[0]
    # 2 FLOPs per multiply-add, + bias add, + one per ReLU
    assert conv0.flops == 2 * 6 * 28 * 28 * 25 + 6 * 28 * 28 + 6 * 28 * 28
    assert spec.flops == sum(i.flops for i in spec.infos)


def test_perceptron_is_a_logistic_regressor():
    spec = zoo.get("perceptron")
    assert spec.head == "sigmoid" and spec.output_shape == (1,)
    assert spec.logits_layers()[0].activation == "linear"


@pytest.mark.parametrize("size,kernel,stride,expected", [
    (7, 3, 2, (1, 1)), (6, 3, 2, (0, 1)), (8, 4, 1, (1, 2)), (5, 1, 1, (0, 0))])
def test_same_padding_puts_the_odd_pixel_after(size, kernel, stride, expected):
    spec = ModelSpec("s", (1, size, size), (Conv2D(2, kernel, strides=stride, padding="same"),))
    assert spec.layers[0].pads((1, size, size))[0] == expected
    assert spec.output_shape == (2, -(-size // stride), -(-size // stride))


def test_pool_output_is_floored_and_strides_default_to_pool_size():
    spec = ModelSpec("p", (3, 7, 9), (MaxPool2D(2), AvgPool2D(3, strides=1)))
    assert [i.out_shape for i in spec.infos] == [(3, 3, 4), (3, 1, 2)]


def test_batchnorm_params_count_statistics_but_are_not_trainable():
    spec = ModelSpec("b", (4, 5, 5), (BatchNorm(), Flatten(), Dense(2)))
    assert spec.params == 16 + 100 * 2 + 2
    assert spec.trainable_params == 8 + 100 * 2 + 2
    assert list(spec.param_shapes()) == ["batchnorm_0/gamma", "batchnorm_0/beta", "batchnorm_0/moving_mean",
                                         "batchnorm_0/moving_var", "dense_2/kernel", "dense_2/bias"]


@pytest.mark.parametrize("build,message", [
    (lambda: ModelSpec("m", (3,), (Dense(0),)), "layer 0 (dense_0): field 'units': must be a positive int"),
    (lambda: ModelSpec("m", (3,), (Dense(4), Dense(-2))), "layer 1 (dense_1): field 'units'"),
    (lambda: ModelSpec("m", (3,), (Dense(4, activation="gelu_fast"),)), "layer 0 (dense_0): field 'activation': unknown activation 'gelu_fast'"),
    (lambda: ModelSpec("m", (1, 4, 4), (Conv2D(2, 5),)), "layer 0 (conv2d_0): field 'kernel_size': kernel 5x5 is larger"),
    (lambda: ModelSpec("m", (1, 4, 4), (Conv2D(2, 3, strides=0),)), "layer 0 (conv2d_0): field 'strides': must be positive"),
    (lambda: ModelSpec("m", (1, 4, 4), (Conv2D(2, 3, padding="full"),)), "field 'padding'"),
    (lambda: ModelSpec("m", (1, 4, 4), (Dense(3),)), "layer 0 (dense_0): field 'units': Dense needs a flat input"),
    (lambda: ModelSpec("m", (8,), (Conv2D(3, 1),)), "layer 0 (conv2d_0): field 'filters': Conv2D needs a (C, H, W) input"),
    (lambda: ModelSpec("m", (1, 4, 4), (MaxPool2D(5),)), "layer 0 (maxpool2d_0): field 'pool_size': pool 5x5 is larger"),
    (lambda: ModelSpec("m", (4,), (Dropout(1.0),)), "layer 0 (dropout_0): field 'rate'"),
    (lambda: ModelSpec("m", (4,), (BatchNorm(momentum=1.5),)), "layer 0 (batchnorm_0): field 'momentum'"),
    (lambda: ModelSpec("m", (4,), (BatchNorm(epsilon=0),)), "layer 0 (batchnorm_0): field 'epsilon'"),
    (lambda: ModelSpec("m", (4,), (Activation("swish"),)), "layer 0 (activation_0): field 'activation'"),
    (lambda: ModelSpec("m", (4, 4), (Flatten(),)), "field 'input_shape'"),
    (lambda: ModelSpec("m", (0,), (Dense(2),)), "field 'input_shape'"),
    (lambda: ModelSpec("m", (4,), ()), "field 'layers'"),
    (lambda: ModelSpec("m", (4,), (Dense(2, name="a"), Dense(2, name="a"))), "layer 1 (a): field 'name': duplicate"),
])
def test_invalid_specs_name_the_layer_and_field(build, message):
    with pytest.raises(SpecError) as e:
        build()
    assert message in str(e.value)


@pytest.mark.parametrize("layer,message", [
    ({"type": "lstm", "units": 3}, "layer 0 (lstm): field 'type': unknown layer kind 'lstm'"),
    ({"type": "dense", "units": 3, "bias": False}, "layer 0 (dense): field 'bias': unknown field"),
    ({"type": "dense"}, "layer 0 (dense): field 'units': missing"),
    ("dense", "layer 0: field 'type'"),
])
def test_from_dict_rejects_bad_layers(layer, message):
    with pytest.raises(SpecError) as e:
        ModelSpec.from_dict({"name": "m", "input_shape": [4], "layers": [layer]})
    assert message in str(e.value)


@pytest.mark.parametrize("name", sorted(ZOO_PARAMS))
def test_dict_and_json_round_trip_exactly(name, tmp_path):
    spec = zoo.get(name)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    path = tmp_path / f"{name}.json"
    spec.save(path)
    assert ModelSpec.load(path) == spec
    assert resolve(str(path)) == spec


def test_load_rejects_files_that_are_not_specs(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match=r"bad\.json: not JSON \(line 1"):
        ModelSpec.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(SpecError, match="not a spec object"):
        ModelSpec.load(bad)
    bad.write_text('{"name": "x", "layers": []}')
    with pytest.raises(SpecError, match="field 'input_shape': missing"):
        ModelSpec.load(bad)
    with pytest.raises(SpecError, match="cannot read"):
        ModelSpec.load(tmp_path / "missing.json")


def test_summary_lists_every_layer_with_totals():
    text = zoo.get("lenet5").summary()
    assert "conv2d_0 (Conv2D)" in text and "(16, 5, 5)" in text and "48,120" in text
    assert "Total params: 61,706" in text


def test_without_dropout_keeps_names_and_weights():
    spec = zoo.get("cifar_cnn")
    plain = spec.without_dropout()
    assert spec.has_dropout and not plain.has_dropout
    assert plain.param_shapes() == spec.param_shapes()
    assert [i.name for i in plain.infos] == [i.name for i in spec.infos]


def test_canonical_init_is_seeded_glorot_uniform():
    spec = zoo.get("lenet5")
    a, b, c = init_weights(spec, 0), init_weights(spec, 0), init_weights(spec, 1)
    assert all((a[k] == b[k]).all() for k in a)
    assert not (a["dense_5/kernel"] == c["dense_5/kernel"]).all()
    k = a["dense_5/kernel"]
    limit = (6 / (400 + 120)) ** 0.5
    assert k.dtype.name == "float32" and k.shape == (400, 120)
    assert abs(k).max() <= limit and abs(k).max() > 0.95 * limit
    assert (a["dense_5/bias"] == 0).all()
    conv_limit = (6 / (1 * 25 + 6 * 25)) ** 0.5
    assert abs(a["conv2d_0/kernel"]).max() <= conv_limit
    bn = init_weights(zoo.get("cifar_cnn"))
    assert (bn["batchnorm_1/gamma"] == 1).all() and (bn["batchnorm_1/moving_var"] == 1).all()
    assert (bn["batchnorm_1/beta"] == 0).all() and (bn["batchnorm_1/moving_mean"] == 0).all()
