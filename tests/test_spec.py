"""The spec: validation messages, shape/param/FLOP inference, serialisation."""
import hashlib
import json

import pytest

from nncompare.models import (INPUT, Activation, AdaptiveAvgPool2D, AvgPool2D, BatchNorm, Conv2D, Dense, Dropout,
                              Flatten, GlobalAveragePooling2D, LayerNormalization, MaxPool2D, ModelSpec, Multiply,
                              Normalization, Rescaling, SpecError, ZeroPadding2D, init_weights, resolve, zoo)

# mobilenet_mini and efficientnet_mini: counted layer by layer in their docstrings (models/zoo.py)
ZOO_PARAMS = {"perceptron": 3, "mlp": 235_146, "lenet5": 61_706, "cifar_cnn": 1_117_738,
              "digits_mlp": 4_810, "digits_cnn": 13_706,
              "resnet20": 274_042, "inception_mini": 12_570, "residual_mlp": 21_450, "every_kind": 3_091,
              "mobilenet_mini": 15_690, "efficientnet_mini": 14_318}

# sha256 of each older zoo model's to_json(), taken before the CNN-family vocabulary (groups, dilation, explicit
# pads, ceil_mode, new kinds) was added: new fields stay out of JSON at their defaults
ZOO_JSON_SHA256 = {
    "perceptron": "4a32f8fa07d4940e55917a6d612bce5936ea625f1c4b4fb551bf35ef97d6ccd5",
    "mlp": "28a0c56175e9317dbc6d6edd5900b6b1dce4f003c00a0ab3346b3b01ae726f52",
    "lenet5": "03d23bb8d2330318e163932983c1b58dab7f0b0f5a499ccc943e83423836188f",
    "cifar_cnn": "f470e8fa7cd154fb5a885c7e94ad4a0c6c192e1141f0465eedbb73ee7559554a",
    "digits_mlp": "766675f6037067ac78f8669ad8c286ebe5164246a005de6a30b69a28658b0a48",
    "digits_cnn": "e0b7d769d027e0329f47eb3bc361f8535a1cfc143c5b442bf057e4533fb15efe",
    "resnet20": "03378052ffa182578dc39649f1774c7c160a2bbb19ec03aedb81ec212ced8d0a",
    "inception_mini": "c79225fa3d747ba3598031fa55fe10e808c8597528acf6c3ec32ecd2dfa751f6",
    "residual_mlp": "72fcc93e9690891ff65acb7f2269ce0502507016834d7e34229dfa26bc2897cd",
    "every_kind": "7e46ca40a2ca22a014cc8fed06c243b7c5a9b13eb46fe95257ddaab58a4cc968",
}


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


# --- the standard CNN families' vocabulary ---------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO_JSON_SHA256))
def test_older_zoo_models_json_is_byte_identical(name):
    assert hashlib.sha256(zoo.get(name).to_json().encode()).hexdigest() == ZOO_JSON_SHA256[name]


def test_new_fields_stay_out_of_json_at_their_defaults():
    layers = ModelSpec("m", (2, 6, 6), (Conv2D(2, 3), MaxPool2D(2), AvgPool2D(1), GlobalAveragePooling2D())).to_dict()
    assert [sorted(l) for l in layers["layers"]] == [
        ["activation", "filters", "kernel_size", "padding", "strides", "type"], ["pool_size", "strides", "type"],
        ["pool_size", "strides", "type"], ["type"]]


def test_new_options_and_kinds_round_trip_through_json(tmp_path):
    spec = ModelSpec("m", (4, 9, 8), (
        ZeroPadding2D(((0, 1), (2, 0)), name="zp"), Conv2D(8, 3, strides=2, groups=4, name="dw"),
        Conv2D(8, 3, padding=((1, 0), (0, 1)), dilation=(2, 1), groups=2, activation="elu(0.5)"),
        MaxPool2D(2, padding=((1, 0), (0, 1)), ceil_mode=True),
        AvgPool2D(3, strides=2, padding=1, ceil_mode=True, count_include_pad=True),
        GlobalAveragePooling2D(keepdims=True, name="g"), Conv2D(8, 1, activation="hard_sigmoid", name="gate"),
        Multiply(name="mul", inputs=("dw", "gate")), AdaptiveAvgPool2D((3, 2)), Rescaling(1 / 255, offset=-1),
        Normalization(), LayerNormalization(epsilon=1e-5), Activation("hard_swish"), Flatten(),
        Dense(3, activation="relu6")))
    d = json.loads(spec.to_json())
    assert d["layers"][0] == {"type": "zeropadding2d", "name": "zp", "padding": [[0, 1], [2, 0]]}
    assert d["layers"][1] == {"type": "conv2d", "name": "dw", "filters": 8, "kernel_size": 3, "strides": 2,
                              "padding": "valid", "activation": "linear", "groups": 4}
    assert d["layers"][2]["padding"] == [[1, 0], [0, 1]] and d["layers"][2]["dilation"] == [2, 1]
    assert d["layers"][4] == {"type": "avgpool2d", "pool_size": 3, "strides": 2, "padding": 1, "ceil_mode": True,
                              "count_include_pad": True}
    assert d["layers"][5] == {"type": "globalavgpool2d", "name": "g", "keepdims": True}
    assert ModelSpec.from_dict(d) == spec
    spec.save(tmp_path / "m.json")
    assert ModelSpec.load(tmp_path / "m.json") == spec
    # the JSON lists of explicit padding are the same layer as tuples
    assert ZeroPadding2D([[0, 1], [2, 0]]) == ZeroPadding2D(((0, 1), (2, 0)))


def test_grouped_conv_params_flops_and_kernel_shape():
    spec = ModelSpec("g", (6, 5, 5), (Conv2D(12, 3, padding="same", groups=6, name="dw"),
                                      Conv2D(4, (3, 1), groups=2, use_bias=False, name="g2")))
    dw, g2 = spec.infos
    assert spec.param_shapes() == {"dw/kernel": (12, 1, 3, 3), "dw/bias": (12,), "g2/kernel": (4, 6, 3, 1)}
    assert dw.params == 12 * 9 + 12 and g2.params == 4 * 6 * 3
    assert dw.flops == 2 * 9 * 1 * (12 * 25) + 12 * 25  # 2 k_h k_w (in / groups) per output element, + bias
    assert g2.flops == 2 * 3 * 6 * (4 * 3 * 5)
    assert init_weights(spec)["dw/kernel"].shape == (12, 1, 3, 3)


@pytest.mark.parametrize("size,kernel,dilation,stride,pads,out", [
    (7, 3, 2, 1, (2, 2), 7),    # extent 5
    (8, 2, 3, 1, (1, 2), 8),    # extent 4: the odd pad after
    (6, 3, 1, 2, (0, 1), 3),
])
def test_same_padding_covers_the_dilated_extent(size, kernel, dilation, stride, pads, out):
    spec = ModelSpec("s", (1, size, size), (Conv2D(2, kernel, strides=stride, dilation=dilation, padding="same"),))
    assert spec.layers[0].pads((1, size, size)) == (pads, pads)
    assert spec.output_shape == (2, out, out)


def test_pool_output_sizes_with_padding_and_ceil_mode():
    spec = ModelSpec("p", (2, 7, 8), (MaxPool2D(3, strides=3, padding=1, ceil_mode=True),))
    assert spec.output_shape == (2, 3, 3)  # columns: 4 windows by ceil, the 4th would start in the padding
    assert spec.layers[0].overhang((2, 7, 8)) == (0, 0)
    assert MaxPool2D(2, ceil_mode=True).overhang((2, 5, 4)) == (1, 0)
    assert ModelSpec("p", (2, 7, 8), (AvgPool2D(2, padding=((1, 0), (0, 1))),)).output_shape == (2, 4, 4)
    assert ModelSpec("p", (2, 7, 8), (AvgPool2D(2, padding=1),)).output_shape == (2, 4, 5)


def test_new_kinds_shapes_params_and_flops():
    spec = ModelSpec("k", (3, 5, 7), (
        ZeroPadding2D(((1, 0), (2, 3)), name="zp"), AdaptiveAvgPool2D((4, 2), name="ad"),
        Rescaling(2.0, name="r"), Normalization(name="n"), LayerNormalization(name="ln"),
        GlobalAveragePooling2D(keepdims=True, name="g"), Multiply(name="m", inputs=("ln", "g")),
        Flatten(), Normalization(name="nf"), LayerNormalization(name="lf"), Dense(2)))
    info = {i.name: i for i in spec.infos}
    assert info["zp"].out_shape == (3, 6, 12) and info["ad"].out_shape == (3, 4, 2)
    assert info["g"].out_shape == (3, 1, 1) and info["m"].out_shape == (3, 4, 2)
    assert spec.param_shapes()["n/mean"] == (3,) and spec.param_shapes()["nf/variance"] == (24,)
    assert spec.param_shapes()["ln/gamma"] == (3,) and spec.param_shapes()["lf/beta"] == (24,)
    assert "n/mean" not in spec.trainable_keys() and "ln/gamma" in spec.trainable_keys()
    assert spec.params == 6 + 6 + 48 + 48 + 24 * 2 + 2 and spec.trainable_params == 6 + 48 + 50
    # adaptive bins of 6 rows into 4: 2 rows each (overlapping); 12 columns into 2: 6 each
    assert info["ad"].flops == 3 * (4 * 2) * (2 * 6) + 3 * 4 * 2
    assert info["m"].flops == 24 and info["r"].flops == 2 * 24 and info["zp"].flops == 0
    text = spec.summary()
    assert "zp (ZeroPadding2D)" in text and "m (Multiply)" in text and "ln, g" in text
    assert "(trainable 104)" in text


@pytest.mark.parametrize("build,message", [
    (lambda: ModelSpec("m", (4, 6, 6), (Conv2D(6, 3, groups=3),)),
     "layer 0 (conv2d_0): field 'groups': 3 groups must divide both the input channels (4) and the filters (6)"),
    (lambda: ModelSpec("m", (4, 6, 6), (Conv2D(6, 3, groups=0),)), "layer 0 (conv2d_0): field 'groups': must be a positive int"),
    (lambda: ModelSpec("m", (4, 6, 6), (Conv2D(4, 3, groups=True),)), "field 'groups': must be a positive int"),
    (lambda: ModelSpec("m", (1, 6, 6), (Conv2D(2, 3, dilation=0),)), "layer 0 (conv2d_0): field 'dilation': must be positive"),
    (lambda: ModelSpec("m", (1, 9, 9), (Conv2D(2, 3, strides=(1, 2), dilation=2),)),
     "layer 0 (conv2d_0): field 'dilation': strides (1, 2) > 1 together with dilation (2, 2) > 1 are refused (Keras"),
    (lambda: ModelSpec("m", (1, 6, 6), (Conv2D(2, 3, dilation=3),)),
     "layer 0 (conv2d_0): field 'kernel_size': kernel 3x3 (dilated to 7x7) is larger than the padded input 6x6"),
    (lambda: ModelSpec("m", (1, 6, 6), (Conv2D(2, 3, padding=(1, 2)),)), "layer 0 (conv2d_0): field 'padding': must be "
     "'valid', 'same', an int >= 0 or [[top, bottom], [left, right]], got (1, 2)"),
    (lambda: ModelSpec("m", (1, 6, 6), (Conv2D(2, 3, padding=((1, -1), (0, 0))),)),
     "layer 0 (conv2d_0): field 'padding': must be >= 0 on every side"),
    (lambda: ModelSpec("m", (1, 6, 6), (MaxPool2D(2, count_include_pad=True),)),
     "layer 0 (maxpool2d_0): field 'count_include_pad': is for AvgPool2D only"),
    (lambda: ModelSpec("m", (1, 6, 6), (AvgPool2D(2, padding="same", ceil_mode=True),)),
     "layer 0 (avgpool2d_0): field 'ceil_mode': ceil_mode with padding 'same' means nothing"),
    (lambda: ModelSpec("m", (1, 6, 6), (AvgPool2D(2, ceil_mode=1),)), "layer 0 (avgpool2d_0): field 'ceil_mode': must be true or false"),
    (lambda: ModelSpec("m", (1, 6, 6), (AvgPool2D(2, count_include_pad="yes"),)), "field 'count_include_pad': must be true"),
    (lambda: ModelSpec("m", (1, 6, 6), (MaxPool2D(3, padding=((2, 0), (0, 0))),)),
     "layer 0 (maxpool2d_0): field 'padding': padding ((2, 0), (0, 0)) is more than half the pool 3x3"),
    (lambda: ModelSpec("m", (1, 6, 6), (AvgPool2D(2, padding="full"),)), "layer 0 (avgpool2d_0): field 'padding': must be"),
    (lambda: ModelSpec("m", (1, 6, 6), (ZeroPadding2D((1, 2)),)), "layer 0 (zeropadding2d_0): field 'padding': must be"),
    (lambda: ModelSpec("m", (6,), (ZeroPadding2D(1),)), "layer 0 (zeropadding2d_0): field 'padding': ZeroPadding2D needs a (C, H, W) input"),
    (lambda: ModelSpec("m", (1, 6, 6), (AdaptiveAvgPool2D((2, 0)),)), "layer 0 (adaptiveavgpool2d_0): field 'output_size': must be positive"),
    (lambda: ModelSpec("m", (6,), (AdaptiveAvgPool2D(2),)), "field 'output_size': AdaptiveAvgPool2D needs a (C, H, W) input"),
    (lambda: ModelSpec("m", (1, 6, 6), (GlobalAveragePooling2D(keepdims="no"),)),
     "layer 0 (globalavgpool2d_0): field 'keepdims': must be true or false"),
    (lambda: ModelSpec("m", (4,), (Rescaling("1/255"),)), "layer 0 (rescaling_0): field 'scale': must be a number"),
    (lambda: ModelSpec("m", (4,), (Rescaling(1e-40),)), "layer 0 (rescaling_0): field 'scale': must be 0 or at least 1e-30"),
    (lambda: ModelSpec("m", (4,), (Rescaling(1.0, offset=float("inf")),)), "layer 0 (rescaling_0): field 'offset'"),
    (lambda: ModelSpec("m", (2, 3), (Normalization(),)), "field 'input_shape'"),
    (lambda: ModelSpec("m", (4,), (LayerNormalization(epsilon=5e-7),)), "layer 0 (layernorm_0): field 'epsilon': must be at least 1e-06"),
    (lambda: ModelSpec("m", (4,), (Dense(3, name="a"), Dense(4, name="b", inputs=(INPUT,)), Multiply(inputs=("a", "b")))),
     "layer 2 (multiply_2): field 'inputs': cannot multiply 'b' of shape (4,) with 'a' of shape (3,)"),
    (lambda: ModelSpec("m", (2, 4, 4), (GlobalAveragePooling2D(name="g"), Multiply(inputs=("input", "g", "input")))),
     "field 'inputs': cannot multiply 'g' of shape (2,)"),  # a gate broadcasts in a product of exactly two
    (lambda: ModelSpec("m", (2, 4, 4), (Conv2D(3, 1, name="g"), GlobalAveragePooling2D(keepdims=True),
                                        Multiply(inputs=("input", "globalavgpool2d_1")))),
     "cannot multiply 'globalavgpool2d_1' of shape (3, 1, 1) with 'input' of shape (2, 4, 4)"),
])
def test_invalid_cnn_options_name_the_layer_and_field(build, message):
    with pytest.raises(SpecError) as e:
        build()
    assert message in str(e.value)
