"""Property tests (hypothesis): any spec either validates or raises SpecError; valid specs round-trip and
their inferred shapes, parameter counts and FLOP totals agree with what the NumPy oracle computes."""
import json
import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nncompare.backends import get_adapter
from nncompare.models import LAYER_KINDS, ModelSpec, SpecError

sizes = st.sampled_from([1, 2, 3, 4, 5, 2, 3, 0, -1])  # mostly valid, sometimes not
explicit_pads = st.lists(st.lists(st.sampled_from([0, 1, 2, -1]), min_size=2, max_size=2), min_size=2, max_size=2)
paddings = st.one_of(st.sampled_from(["valid", "same", "same", 1, 0, "full"]), explicit_pads)
layer_dicts = st.one_of(
    st.fixed_dictionaries({"type": st.just("dense"), "units": sizes,
                           "activation": st.sampled_from(["linear", "relu", "tanh", "softmax", "swish", "relu6",
                                                          "hard_sigmoid", "hard_swish", "elu(0.5)"])}),
    st.fixed_dictionaries({"type": st.just("conv2d"), "filters": sizes,
                           "kernel_size": st.one_of(sizes, st.lists(sizes, min_size=2, max_size=2)),
                           "strides": st.sampled_from([1, 2, 3, 0]), "padding": paddings},
                          optional={"groups": st.sampled_from([1, 2, 3, 0]), "dilation": st.sampled_from([1, 2, 0])}),
    st.fixed_dictionaries({"type": st.sampled_from(["maxpool2d", "avgpool2d"]), "pool_size": sizes},
                          optional={"strides": st.sampled_from([1, 2, 3]), "padding": paddings,
                                    "ceil_mode": st.booleans(), "count_include_pad": st.booleans()}),
    st.fixed_dictionaries({"type": st.just("zeropadding2d"), "padding": st.one_of(sizes, explicit_pads)}),
    st.fixed_dictionaries({"type": st.just("adaptiveavgpool2d"),
                           "output_size": st.one_of(sizes, st.lists(sizes, min_size=2, max_size=2))}),
    st.fixed_dictionaries({"type": st.just("globalavgpool2d")}, optional={"keepdims": st.booleans()}),
    st.fixed_dictionaries({"type": st.sampled_from(["normalization", "layernorm"])}),
    st.fixed_dictionaries({"type": st.just("rescaling"), "scale": st.floats(-3, 3)}),
    st.fixed_dictionaries({"type": st.just("flatten")}),
    st.fixed_dictionaries({"type": st.just("dropout"), "rate": st.floats(-0.5, 1.5)}),
    st.fixed_dictionaries({"type": st.just("batchnorm"), "momentum": st.floats(0, 1.2)}),
    st.fixed_dictionaries({"type": st.sampled_from(["lstm", "activation"])}),
)
spec_dicts = st.fixed_dictionaries({
    "name": st.just("h"),
    "input_shape": st.one_of(st.lists(st.integers(1, 9), min_size=3, max_size=3),
                             st.lists(st.integers(1, 9), min_size=1, max_size=1),
                             st.lists(st.integers(0, 7), min_size=1, max_size=3)),
    "layers": st.lists(layer_dicts, min_size=1, max_size=5),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_dicts)
def test_any_spec_validates_or_raises_spec_error_naming_the_place(d):
    try:
        spec = ModelSpec.from_dict(d)
    except SpecError as e:
        message = str(e)
        assert message.startswith(("layer ", "model")) and "field '" in message
        return
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert set(LAYER_KINDS) >= {l.kind for l in spec.layers}


@settings(max_examples=100, deadline=None)
@given(spec_dicts)
def test_inferred_shapes_and_counts_match_the_oracle(d):
    try:
        spec = ModelSpec.from_dict(d)
    except SpecError:
        return
    net = get_adapter("numpy").build(spec)
    outputs = net.layer_outputs(np.zeros((2,) + spec.input_shape, np.float32))
    for info in spec.infos[:len(spec.logits_layers())]:
        assert outputs[info.name].shape == (2,) + info.out_shape, info.name
    assert spec.params == sum(math.prod(w.shape) for w in net.get_weights().values())
    assert spec.flops == sum(i.flops for i in spec.infos) and spec.flops >= 0


def test_random_graphs_are_valid_graphs_covering_every_layer_kind():
    from .randspec import random_graph_spec
    kinds, graphs = set(), 0
    for seed in range(200):
        spec = random_graph_spec(seed)
        assert ModelSpec.from_dict(json.loads(spec.to_json())) == spec
        graphs += spec.is_graph
        kinds |= {type(l) for l in spec.layers}
        net = get_adapter("numpy").build(spec)
        outputs = net.layer_outputs(np.zeros((2,) + spec.input_shape, np.float32))
        assert [i.name for i in spec.logits_infos()] == list(outputs)
        for info in spec.logits_infos():
            assert outputs[info.name].shape == (2,) + info.out_shape, (spec.name, info.name)
    assert kinds == set(LAYER_KINDS.values()) and graphs > 100


# --- hostile values in every field, and random graph wiring -------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=8) | st.sampled_from(["same", "valid", "relu", "leaky_relu(0.1)", "input", "a", "b"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=6)
node_names = st.sampled_from(["input", "a", "b", "c", "dense_0", "zz"])
any_layer = st.builds(
    lambda kind, fields, name, inputs: {"type": kind, **fields, **name, **inputs},
    st.sampled_from(sorted(LAYER_KINDS)),
    st.dictionaries(st.sampled_from(["units", "filters", "kernel_size", "strides", "padding", "activation",
                                     "use_bias", "pool_size", "rate", "momentum", "epsilon", "groups", "dilation",
                                     "ceil_mode", "count_include_pad", "keepdims", "output_size", "scale", "offset"]),
                    json_values, max_size=3),
    st.one_of(st.just({}), st.fixed_dictionaries({"name": st.one_of(st.sampled_from(["a", "b", "c"]), json_values)})),
    st.one_of(st.just({}), st.fixed_dictionaries({"inputs": st.one_of(st.lists(node_names, max_size=3),
                                                                      json_values)})))
hostile_specs = st.fixed_dictionaries({
    "name": st.one_of(st.just("h"), json_values),
    "input_shape": st.one_of(st.lists(st.integers(1, 6), min_size=1, max_size=3), json_values),
    "layers": st.one_of(st.lists(any_layer, min_size=1, max_size=5), json_values),
})


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_specs)
def test_hostile_values_in_any_field_give_one_spec_error(d):
    try:
        spec = ModelSpec.from_dict(d)
    except SpecError as e:
        message = str(e)
        assert message.startswith(("layer ", "model")) and "field " in message and len(message) < 500
        return
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    spec.summary()
