"""The graph spec and hostile spec input: inputs, merges, heads, names, sizes, spec files."""
import json
import math
import re

import pytest

from nncompare.models import (INPUT, Activation, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D, Dense, Dropout,
                              Flatten, GlobalAveragePooling2D, MaxPool2D, ModelSpec, SpecError, parse_activation, zoo)


def residual_block() -> ModelSpec:
    return ModelSpec("res", (3, 8, 8), (
        Conv2D(4, 3, padding="same", use_bias=False, name="c1"), BatchNorm(name="bn1"), Activation("relu", name="r1"),
        Conv2D(4, 3, padding="same", name="c2"),
        Conv2D(4, 1, name="proj", inputs=[INPUT]),
        Add(name="add", inputs=("c2", "proj")),
        MaxPool2D(3, strides=1, padding="same", name="mp"),
        Concatenate(name="cat", inputs=("mp", "add")),
        GlobalAveragePooling2D(name="gap"), Dense(3, activation="leaky_relu(0.1)"),
        Dense(2, activation="softmax", name="out")))


def test_graph_infos_resolve_inputs_and_shapes():
    spec = residual_block()
    info = {i.name: i for i in spec.infos}
    assert info["c1"].inputs == (INPUT,) and info["c1"].in_shapes == ((3, 8, 8),)
    assert info["add"].inputs == ("c2", "proj") and info["add"].in_shapes == ((4, 8, 8), (4, 8, 8))
    assert info["cat"].out_shape == (8, 8, 8) and info["gap"].out_shape == (8,)
    assert info["mp"].out_shape == (4, 8, 8)
    assert "c1/bias" not in spec.param_shapes() and "c2/bias" in spec.param_shapes()
    assert info["c1"].params == 4 * 3 * 9 and info["c2"].params == 4 * 4 * 9 + 4
    assert info["add"].flops == 4 * 64 and info["cat"].flops == 0 and info["gap"].flops == 8 * 64
    assert spec.is_graph and not zoo.get("lenet5").is_graph


def test_logits_infos_drop_the_head():
    spec = residual_block()
    logits = spec.logits_infos()
    assert [i.name for i in logits] == [i.name for i in spec.infos]
    assert logits[-1].layer.activation == "linear" and logits[-1].layer.name == "out"
    assert spec.logits_layers()[-1] == logits[-1].layer
    act_head = ModelSpec("a", (4,), (Dense(3, name="d"), Activation("softmax")))
    assert [i.name for i in act_head.logits_infos()] == ["d"]


def test_graph_json_round_trips_and_inputs_are_lists(tmp_path):
    spec = residual_block()
    d = json.loads(spec.to_json())
    assert d["layers"][4]["inputs"] == ["input"] and "inputs" not in d["layers"][0]
    assert d["layers"][0]["use_bias"] is False and "use_bias" not in d["layers"][3]
    assert d["layers"][6]["padding"] == "same"
    assert ModelSpec.from_dict(d) == spec
    spec.save(tmp_path / "g.json")
    assert ModelSpec.load(tmp_path / "g.json") == spec
    # a Python list for inputs is the same layer as a tuple
    assert Add(inputs=["a", "b"]) == Add(inputs=("a", "b"))


def test_sequential_json_has_no_new_fields():
    for name in ("lenet5", "cifar_cnn", "mlp"):
        for layer in zoo.get(name).to_dict()["layers"]:
            assert "inputs" not in layer and "use_bias" not in layer
            assert not (layer["type"].endswith("pool2d") and "padding" in layer)


def test_summary_shows_inputs_only_for_graphs():
    assert "c2, proj" in residual_block().summary() and "Inputs" in residual_block().summary()
    assert "Inputs" not in zoo.get("lenet5").summary()


def _two(a_units=3, b_units=3):
    return (Dense(a_units, name="a"), Dense(b_units, name="b", inputs=[INPUT]))


@pytest.mark.parametrize("build,message", [
    (lambda: ModelSpec("m", (4,), (Dense(3, inputs=("b",)), Dense(2, name="b"))),
     "layer 0 (dense_0): field 'inputs': input 'b' is layer 1, not an earlier layer"),
    (lambda: ModelSpec("m", (4,), (Dense(3, name="a", inputs=("a",)), Dense(2))), "makes a cycle"),
    (lambda: ModelSpec("m", (4,), _two() + (Add(inputs=("a", "zz")),)),
     "layer 2 (add_2): field 'inputs': unknown input 'zz'"),
    (lambda: ModelSpec("m", (4,), _two(3, 5) + (Add(inputs=("a", "b")),)),
     "layer 2 (add_2): field 'inputs': cannot add 'b' of shape (5,) to 'a' of shape (3,)"),
    (lambda: ModelSpec("m", (1, 8, 8), (Conv2D(2, 3, name="a"), Conv2D(2, 1, name="b", inputs=[INPUT]),
                                        Concatenate(inputs=("a", "b")), Flatten(), Dense(2))),
     "layer 2 (concatenate_2): field 'inputs': cannot concatenate 'b' of shape (2, 8, 8) with 'a' of shape (2, 6, 6)"),
    (lambda: ModelSpec("m", (1, 8, 8), (Flatten(name="a"), Conv2D(2, 1, name="b", inputs=[INPUT]),
                                        Concatenate(inputs=("a", "b")))), "one is flat"),
    (lambda: ModelSpec("m", (4,), _two() + (Dense(2),)),
     "layer 0 (a): field 'name': dangling branch: no later layer takes 'a' as input"),
    (lambda: ModelSpec("m", (4,), (Dense(3, name="a"), Add(inputs=("a",)))),
     "layer 1 (add_1): field 'inputs': Add takes at least 2 inputs, got 1"),
    (lambda: ModelSpec("m", (4,), (Dense(3, name="a"), Concatenate())),
     "layer 1 (concatenate_1): field 'inputs': Concatenate needs 'inputs'"),
    (lambda: ModelSpec("m", (4,), (Dense(3, name="a"), Dense(3, inputs=("a", "a")))),
     "layer 1 (dense_1): field 'inputs': Dense takes exactly 1 input, got 2"),
    (lambda: ModelSpec("m", (4,), (Dense(3, inputs="a"),)), "field 'inputs': must be a list of layer names"),
    (lambda: ModelSpec("m", (4,), (Dense(3, name="input"),)), "field 'name': 'input' is reserved"),
    (lambda: ModelSpec("m", (4,), (GlobalAveragePooling2D(),)), "GlobalAveragePooling2D needs a (C, H, W) input"),
    (lambda: ModelSpec("m", (1, 4, 4), (MaxPool2D(2, padding="full"), Flatten(), Dense(2))), "field 'padding'"),
    (lambda: ModelSpec("m", (1, 4, 4), (Conv2D(2, 1, use_bias="no"), Flatten(), Dense(2))), "field 'use_bias'"),
])
def test_bad_graphs_name_layer_field_and_input(build, message):
    with pytest.raises(SpecError) as e:
        build()
    assert message in str(e.value)


def test_same_pooling_keeps_ceil_size_even_when_the_pool_is_larger_than_the_input():
    spec = ModelSpec("p", (2, 5, 7), (MaxPool2D(3, strides=2, padding="same", name="m"),
                                      AvgPool2D(6, strides=1, padding="same", name="a"), Flatten(), Dense(2)))
    assert [i.out_shape for i in spec.infos[:2]] == [(2, 3, 4), (2, 3, 4)]
    assert spec.layers[0].pads((2, 5, 7)) == ((1, 1), (1, 1))
    assert spec.layers[1].pads((2, 3, 4)) == ((2, 3), (2, 3))
    assert MaxPool2D(2).pads((1, 4, 4)) == ((0, 0), (0, 0))


# --- activations --------------------------------------------------------------------------------
@pytest.mark.parametrize("text,parsed", [
    ("relu", ("relu", None)), ("gelu", ("gelu", None)), ("gelu_tanh", ("gelu_tanh", None)),
    ("leaky_relu", ("leaky_relu", 0.2)), ("leaky_relu(0.1)", ("leaky_relu", 0.1)),
    ("leaky_relu(0)", ("leaky_relu", 0.0)), ("elu", ("elu", 1.0)), ("silu", ("silu", None)),
    ("elu(0.5)", ("elu", 0.5)), ("elu(2)", ("elu", 2.0)), ("relu6", ("relu6", None)),
    ("hard_sigmoid", ("hard_sigmoid", None)), ("hard_swish", ("hard_swish", None)),
])
def test_parse_activation(text, parsed):
    assert parse_activation(text) == parsed
    ModelSpec("m", (3,), (Dense(2, activation=text), Activation(text), Dense(2)))


@pytest.mark.parametrize("text", ["swish", "leaky_relu()", "leaky_relu(-1)", "leaky_relu(nan)", "leaky_relu(inf)",
                                  "leaky_relu(1e999)", "leaky_relu(x)", "elu(-1)", "elu()", "elu(nan)", "elu(1e39)",
                                  "relu6(2)", "hard_sigmoid(0.2)", "", ["relu"], None])
def test_bad_activations_are_spec_errors(text):
    with pytest.raises(SpecError, match="layer 0 \\(dense_0\\): field 'activation'"):
        ModelSpec("m", (3,), (Dense(2, activation=text),))
    with pytest.raises(SpecError):
        parse_activation(text)


# --- heads --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers,message", [
    ((Dense(10, activation="sigmoid"),), "a sigmoid head needs exactly 1 output"),
    ((Dense(3), Activation("sigmoid")), "a sigmoid head needs exactly 1 output"),
    ((Dense(1, activation="softmax"),), "a softmax head needs at least 2 outputs"),
    ((Dense(3, activation="softmax"), Activation("softmax")), "it would be applied twice"),
    ((Dense(1, activation="sigmoid"), Activation("sigmoid")), "it would be applied twice"),
    ((Dense(3), Activation("sigmoid"), Activation("softmax")), "it would be applied twice"),
    # traced back through the graph, not one step back in list order
    ((Dense(3, activation="softmax"), Dropout(0.5), Activation("softmax")),
     "sits on 'dense_0' \\(through 'dropout_1'\\), which already applies softmax: it would be applied twice"),
    ((Dense(1, activation="sigmoid"), Activation("linear"), Dropout(0.1), Flatten(), Activation("sigmoid")),
     "sits on 'dense_0' \\(through 'flatten_3'\\)"),
])
def test_head_rule(layers, message):
    with pytest.raises(SpecError, match=f"layer {len(layers) - 1} .*: field 'activation': .*{message}"):
        ModelSpec("m", (4,), layers)


def test_head_on_a_softmax_over_channels_through_flatten_is_refused():
    with pytest.raises(SpecError, match="layer 2 \\(activation_2\\): field 'activation': the softmax head sits on "
                                        "'conv2d_0' \\(through 'flatten_1'\\)"):
        ModelSpec("m", (1, 4, 4), (Conv2D(3, 4, activation="softmax"), Flatten(), Activation("softmax")))


@pytest.mark.parametrize("spec", [
    {"input_shape": [3], "layers": [{"type": "activation", "activation": "softmax"}]},
    {"input_shape": [1], "layers": [{"type": "activation", "activation": "sigmoid"}]},
])
def test_a_head_with_nothing_to_compute_its_logits_is_refused(spec):
    # its logits would be the model input: no layer left to build, a crash in every backend
    with pytest.raises(SpecError, match="layer 0 \\(activation_0\\): field 'activation': a (softmax|sigmoid) head needs "
                                        "a layer before it that computes its logits, but it reads the model input"):
        ModelSpec.from_dict({"name": "m", **spec})


def test_heads_that_stay_legal():
    assert ModelSpec("m", (4,), (Dense(3), Dropout(0.5), Activation("softmax"))).head == "softmax"
    assert ModelSpec("m", (1, 2, 2), (Flatten(), Activation("softmax"))).logits_layers() == (Flatten(),)
    # a softmax inside, handed on as the output: no head, the probabilities are the logits (as in every framework)
    assert ModelSpec("m", (4,), (Dense(3, activation="softmax"), Activation("linear"))).head is None


def test_head_needs_a_flat_output_but_softmax_inside_is_ordinary():
    with pytest.raises(SpecError, match="softmax head needs a flat"):
        ModelSpec("m", (1, 4, 4), (Conv2D(3, 1, activation="softmax"),))
    with pytest.raises(SpecError, match="softmax head needs a flat"):
        ModelSpec("m", (1, 4, 4), (Conv2D(3, 1), Activation("softmax")))
    inner = ModelSpec("m", (1, 4, 4), (Conv2D(3, 1, activation="softmax"), Activation("sigmoid"), Flatten(),
                                        Dense(4, activation="softmax"), Activation("relu"), Dense(2, activation="softmax")))
    assert inner.head == "softmax"
    assert ModelSpec("m", (4,), (Dense(3, activation="softmax"), Activation("relu"))).head is None
    assert ModelSpec("m", (4,), (Dense(1, activation="sigmoid"),)).head == "sigmoid"


@pytest.mark.parametrize("layers,culprit", [
    ((Dense(3, activation="softmax"), Dropout(0.5)), "layer 0 \\(dense_0\\)"),
    ((Dense(3), Activation("softmax"), Dropout(0.1), Dropout(0.2)), "layer 1 \\(activation_1\\)"),
    ((Dense(1, activation="sigmoid"), Dropout(0.5)), "layer 0 \\(dense_0\\)"),
])
def test_a_head_behind_dropout_is_refused_not_trained_as_logits(layers, culprit):
    # the loss would read the probabilities as logits and apply softmax/sigmoid a second time
    with pytest.raises(SpecError, match=f"{culprit}: field 'activation': a (softmax|sigmoid) head must be the last "
                                        f"layer, but Dropout layer {len(layers) - 1} "):
        ModelSpec("m", (4,), layers)
    # through a linear activation or Flatten on the way, too
    with pytest.raises(SpecError, match="layer 0 \\(dense_0\\): .*but Dropout layer 1 \\(dropout_1\\) follows it"):
        ModelSpec("m", (4,), (Dense(3, activation="softmax"), Dropout(0.1), Activation("linear"), Flatten()))
    # through a graph input, too
    with pytest.raises(SpecError, match="must be the last layer"):
        ModelSpec("g", (4,), (Dense(4, name="h"), Dense(4, name="r", inputs=("input",)), Add(inputs=("h", "r")),
                              Dense(3, activation="softmax", name="p"), Dropout(0.5, name="drop", inputs=("p",))))
    assert ModelSpec("m", (4,), (Dense(3, activation="relu"), Dropout(0.5))).head is None


# --- names, numbers and sizes -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a b", "dense\n", "dénse", "a/b", "a.b", "x" * 65, "", 3, ["a"]])
def test_layer_names_are_restricted(name):
    with pytest.raises(SpecError, match="field 'name': must be 1 to 64 ASCII letters, digits"):
        ModelSpec("m", (4,), (Dense(2, name=name),))


def test_model_name_must_be_printable():
    for bad in ("", "a\nb", "x" * 101, ["m"]):
        with pytest.raises(SpecError, match="model: field 'name'"):
            ModelSpec(bad, (4,), (Dense(2),))


@pytest.mark.parametrize("layer,field", [
    (BatchNorm(epsilon=float("inf")), "epsilon"), (BatchNorm(epsilon=float("nan")), "epsilon"),
    (BatchNorm(momentum=float("nan")), "momentum"), (BatchNorm(momentum=float("inf")), "momentum"),
    (Dropout(float("nan")), "rate"), (Dropout(float("-inf")), "rate"), (Dropout("0.5"), "rate"),
])
def test_numeric_fields_must_be_finite(layer, field):
    with pytest.raises(SpecError, match=f"layer 0 .*: field '{field}'"):
        ModelSpec("m", (4,), (layer, Dense(2)))


@pytest.mark.parametrize("build,message", [
    (lambda: ModelSpec("m", (4,), (Dense(10**12),)), "layer 0 (dense_0): field 'units': output (1000000000000,) is about 4.0 TB"),
    (lambda: ModelSpec("m", (100_000,), (Dense(1_000_000),)), "layer 0 (dense_0): field 'units': about 400.0 GB of float32 weights"),
    (lambda: ModelSpec("m", (4,), (Dense(40_000), Dense(40_000), Dense(40_000), Dense(2))), "(with the layers before it)"),
    (lambda: ModelSpec("m", (1, 4, 4), (Conv2D(2, 1, padding=10**4), Flatten(), Dense(2))),
     "layer 0 (conv2d_0): field 'padding': padded input 1x20004x20004 is about 1.6 GB of float32 per sample"),
    # a 200-byte spec: 12 params and 30 FLOPs, but a 3.6 GB padded input per sample (a check: 54 GiB)
    (lambda: ModelSpec.from_dict({"name": "m", "input_shape": [1, 1, 1], "layers": [
        {"type": "conv2d", "filters": 1, "kernel_size": 1, "strides": 30001, "padding": 15000},
        {"type": "flatten"}, {"type": "dense", "units": 5}]}),
     "layer 0 (conv2d_0): field 'padding': padded input 1x30001x30001 is about 3.6 GB of float32 per sample"),
    # small input and output, but every output position reads 200x200 cells: the oracle's window matrix
    (lambda: ModelSpec("m", (1, 400, 400), (Conv2D(1, 200), Flatten(), Dense(2))),
     "layer 0 (conv2d_0): field 'kernel_size': its window matrix (40000 values for each of 40401 output "
     "positions) is about 6.5 GB of float32 per sample"),
    (lambda: ModelSpec("m", (2, 600, 600), (MaxPool2D(300, strides=1), Flatten(), Dense(2))),
     "layer 0 (maxpool2d_0): field 'pool_size': its window matrix"),
    (lambda: ModelSpec("m", (1, 600, 600), (AvgPool2D(300, strides=1, padding="same"), Flatten(), Dense(2))),
     "layer 0 (avgpool2d_0): field 'pool_size': its window matrix"),
    (lambda: ModelSpec("m", (1, 12000, 12000), (Flatten(), Dense(2))),
     "model 'm': field 'input_shape': (1, 12000, 12000) is about 576.0 MB of float32 per sample"),
    (lambda: ModelSpec("m", (3, 100_000, 100_000), (Flatten(), Dense(2))), "field 'input_shape'"),
    (lambda: ModelSpec("m", (3, 100, 100), (Conv2D(10**6, 1), Flatten(), Dense(2))), "field 'filters'"),
])
def test_sizes_that_cannot_fit_are_refused_with_the_estimate(build, message):
    with pytest.raises(SpecError) as e:
        build()
    assert message in str(e.value)


# --- hostile spec files -------------------------------------------------------------------------
GOOD = '{"name": "m", "input_shape": [4], "layers": [{"type": "dense", "units": 2}]}'


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert ModelSpec.load(path).layers == (Dense(2),)


@pytest.mark.parametrize("content,message", [
    (b'{"name": "m\xff"}', "not UTF-8 text (byte 0xff at offset 11)"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (GOOD.replace('"units": 2', '"units": ' + "9" * 5000).encode(), "not a usable spec: Exceeds the limit"),
    (GOOD.replace('"dense"', '["dense"]').encode(), "layer 0 (?): field 'type': unknown layer kind ['dense']"),
    (GOOD.replace('"dense"', '{"a": 1}').encode(), "field 'type': unknown layer kind {'a': 1}"),
    (GOOD.replace('"units": 2', '"units": 2, "name": ["x"]').encode(), "field 'name': must be 1 to 64"),
    (GOOD.replace('"units": 2', '"units": 2, "activation": {"relu": 1}').encode(), "field 'activation': must be an activation name"),
    (GOOD.replace('"units": 2', '"units": 2, "inputs": "input"').encode(), "field 'inputs': must be a list"),
    (GOOD.replace('"units": 2', '"units": 2, "inputs": [["input"]]').encode(), "field 'inputs': must be a list"),
    (GOOD.replace('"m"', '{"n": 1}').encode(), "model: field 'name'"),
    (GOOD.replace('"units": 2', '"units": 1e999').encode(), "field 'units': must be a positive int, got inf"),
    (GOOD.replace('"units": 2', '"units": 2}, {"type": "batchnorm", "epsilon": Infinity').encode(), "field 'epsilon'"),
    (GOOD.replace('"units": 2', '"units": 2, "activation": "leaky_relu(NaN)"').encode(), "leaky_relu slope"),
    (GOOD.replace("[4]", "[[4]]").encode(), "field 'input_shape'"),
    (GOOD.replace('"layers": [', '"layers": {"a": [').replace("}]}", "}]}}").encode(), "field 'layers'"),
    (GOOD.replace('"m",', '"m", "x" : 1,').encode(), "model: field 'x': unknown field"),
])
def test_hostile_spec_files_give_one_spec_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(SpecError) as e:
        ModelSpec.load(path)
    assert message in str(e.value) and str(e.value).startswith(str(path))
    assert len(str(e.value)) < 400


def test_a_directory_is_not_a_spec_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec file"):
        ModelSpec.load(tmp_path)


# --- the zoo's graphs ---------------------------------------------------------------------------
def test_resnet20_parameter_count_is_exact_and_explained():
    """Option A (published 0.27M) has 269,722 trainable weights: 267,696 conv kernels, 650 in the Dense, 1,376
    BatchNorm gamma/beta. Option B's two 1x1 projections add 16*32 + 32*64 = 2,560 kernel weights and
    2 * (32 + 64) = 192 BatchNorm weights; the moving statistics add 2 * (688 + 96) = 1,568 non-trainable."""
    spec = zoo.get("resnet20")
    kernels = sum(math.prod(s) for k, s in spec.param_shapes().items() if k.endswith("/kernel"))
    assert kernels == 267_696 + 2_560 + 64 * 10
    assert spec.trainable_params == 269_722 + 2_560 + 192 == 272_474
    assert spec.params == 272_474 + 1_568 == 274_042
    assert not any(k.startswith(("s", "conv")) and k.endswith("/bias") for k in spec.param_shapes())
    convs = [i for i in spec.infos if isinstance(i.layer, Conv2D) and i.layer.kernel_size == 3]
    assert len(convs) == 19 and {i.layer.filters for i in convs} == {16, 32, 64}
    assert [i.out_shape for i in spec.infos if isinstance(i.layer, Add)][::3] == [(16, 32, 32), (32, 16, 16),
                                                                                  (64, 8, 8)]
    assert sum(isinstance(i.layer, Add) for i in spec.infos) == 9 and spec.output_shape == (10,)


def test_inception_mini_concatenates_four_branches():
    spec = zoo.get("inception_mini")
    cats = {i.name: i for i in spec.infos if isinstance(i.layer, Concatenate)}
    assert {n: i.out_shape for n, i in cats.items()} == {"inc1": (28, 16, 16), "inc2": (44, 16, 16),
                                                        "inc3": (56, 8, 8)}
    assert all(len(i.inputs) == 4 for i in cats.values())
    pools = [i.layer for i in spec.infos if i.name.startswith("inc") and i.name.endswith("_pool")]
    assert len(pools) == 3 and all(p.padding == "same" and p.window()[1] == (1, 1) for p in pools)


def test_zoo_keeps_old_models_first_and_graphs_round_trip():
    assert zoo.names()[:6] == ["perceptron", "mlp", "lenet5", "cifar_cnn", "digits_mlp", "digits_cnn"]
    for name in ("resnet20", "inception_mini", "residual_mlp"):
        spec = zoo.get(name)
        assert spec.is_graph and ModelSpec.from_dict(json.loads(spec.to_json())) == spec


# --- further hostile inputs found while testing -------------------------------------------------
BIG = int("1" + "0" * 4000)  # within json's 4300-digit limit, beyond float


@pytest.mark.parametrize("spec,message", [
    ({"input_shape": [4], "layers": [{"type": "dense", "units": BIG}]}, "field 'units': output (1000"),
    ({"input_shape": [BIG], "layers": [{"type": "dense", "units": 2}]}, "about 10^4000 bytes"),
    ({"input_shape": [4], "layers": [{"type": "batchnorm", "epsilon": BIG}, {"type": "dense", "units": 2}]},
     "field 'epsilon': must be a finite positive number at most 1"),
    ({"input_shape": [1, 4, 4], "layers": [{"type": "conv2d", "filters": 1, "kernel_size": 1, "strides": BIG},
                                           {"type": "flatten"}, {"type": "dense", "units": 2}]},
     "field 'strides': must be at most 65536"),
    ({"input_shape": [1, 4, 4], "layers": [{"type": "maxpool2d", "pool_size": 10**9, "padding": "same"},
                                           {"type": "flatten"}, {"type": "dense", "units": 2}]},
     "field 'pool_size': must be at most 65536"),
    ({"input_shape": [1, 4, 4], "layers": [{"type": "maxpool2d", "pool_size": 60000, "padding": "same"},
                                           {"type": "flatten"}, {"type": "dense", "units": 2}]},
     "field 'pool_size': padded input 1x60000x60000 is about 14.4 GB"),
    ({"input_shape": [1, 4, 4], "layers": [{"type": "conv2d", "filters": 1, "kernel_size": 60000, "padding": "same"},
                                           {"type": "flatten"}, {"type": "dense", "units": 2}]},
     "field 'kernel_size': padded input"),
])
def test_huge_integers_are_spec_errors_with_short_messages(spec, message):
    with pytest.raises(SpecError) as e:
        ModelSpec.from_dict({"name": "m", **spec})
    assert message in str(e.value) and len(str(e.value)) < 300


def test_duplicate_json_keys_are_refused(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text(GOOD.replace('"units": 2', '"units": 2, "units": 3'))
    with pytest.raises(SpecError, match="duplicate key 'units'"):
        ModelSpec.load(path)


def test_unreadable_paths_are_spec_errors(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(17 * 2 ** 20)  # sparse: a huge regular file read only as far as the bound
    with pytest.raises(SpecError, match="larger than 16 MiB"):
        ModelSpec.load(big)
    for device in ("/dev/zero", "/dev/null"):
        with pytest.raises(SpecError, match="not a regular file"):
            ModelSpec.load(device)
    with pytest.raises(SpecError, match="embedded null byte"):
        ModelSpec.load("a\0b.json")


def test_sequential_json_is_byte_for_byte_what_it_was_before_graphs():
    assert zoo.get("digits_cnn").to_json() == json.dumps({"name": "digits_cnn", "input_shape": [1, 8, 8], "layers": [
        {"type": "conv2d", "filters": 16, "kernel_size": 3, "strides": 1, "padding": "same", "activation": "relu"},
        {"type": "maxpool2d", "pool_size": 2, "strides": None},
        {"type": "conv2d", "filters": 32, "kernel_size": 3, "strides": 1, "padding": "same", "activation": "relu"},
        {"type": "avgpool2d", "pool_size": 2, "strides": None},
        {"type": "flatten"},
        {"type": "dense", "units": 64, "activation": "relu"},
        {"type": "dense", "units": 10, "activation": "linear"}]}, indent=2)


@pytest.mark.parametrize("layer,field", [
    (Conv2D(1, 1, strides=2**31 - 2), "strides"),  # TensorFlow segfaults on this stride
    (Conv2D(1, 1, strides=(1, 65537)), "strides"), (Conv2D(1, 1, padding=65537), "padding"),
    (MaxPool2D(1, strides=2**31 - 1), "strides"),  # MXNet refuses it
    (AvgPool2D((1, 65537)), "pool_size"),
])
def test_windows_strides_and_padding_are_bounded(layer, field):
    with pytest.raises(SpecError, match=f"layer 0 .*: field '{field}': must be at most 65536, got"):
        ModelSpec("m", (1, 4, 4), (layer, Flatten(), Dense(2)))
    assert ModelSpec("m", (1, 4, 4), (Conv2D(1, 2, strides=65536, padding=1), Flatten(), Dense(2))).output_shape == (2,)


@pytest.mark.parametrize("layer,message", [
    (BatchNorm(epsilon=1e-6), "field 'epsilon': must be at least 1e-05 (float32 frameworks part from the float64 oracle"),
    (BatchNorm(epsilon=1e-300), "field 'epsilon': must be at least 1e-05"),  # float32: 0, Keras gave inf
    (Dense(2, activation="leaky_relu(1e39)"), "field 'activation': leaky_relu slope must be 0 or between 1e-30 and "
                                              "1e+38, got '1e39'"),  # float32: inf; torch and MXNet raised
    (Activation("leaky_relu(1e-40)"), "leaky_relu slope must be 0 or between"),  # MXNet raised
])
def test_numbers_float32_frameworks_cannot_follow_are_refused(layer, message):
    with pytest.raises(SpecError, match=f"layer 0 .*: {re.escape(message)}"):
        ModelSpec("m", (4,), (layer, Dense(2)))
    assert ModelSpec("m", (4,), (BatchNorm(epsilon=1e-5), Activation("leaky_relu(0)"), Dense(2)))
