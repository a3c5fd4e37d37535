"""Real networks imported exactly: keras.applications, Hugging Face transformers' PyTorch vision models (built from
their configs with random weights, offline) and torchvision's models. Every backend predicts what the source model
predicts (1e-3 of its scale), the float64 oracle too (1e-5), and to_onnx then from_onnx gives back the same function.

Each source model is built, given random BatchNorm statistics (those of a calibration batch, so no BatchNorm is an
identity and the input still reaches the logits), imported and run once per module; keras-jax and keras-torch
predict every network in one process of their own each. Slow lane only."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from nncompare.backends import get_adapter
from nncompare.backends.check import scaled_diff

from .conftest import REQUIRED, ROOT, require
from .test_interop import structure

pytestmark = pytest.mark.slow

ORACLE_TOL, FRAMEWORK_TOL = 1e-5, 1e-3
FLOAT64_TOL = 1e-6  # the source computed in float64 against the oracle: rounding of the float32 output only
BATCH = 2
CALIBRATION = 32  # samples whose statistics the BatchNorms take
IN_PROCESS = ("torch", "keras", "mxnet", "onnxruntime")
KERAS_ENGINES = ("keras-jax", "keras-torch")  # one Keras engine per process: these run in a worker each
TORCHVISION_SKIP = ("torchvision does not import here: its registry wheels are built against CUDA torch and fail "
                    "beside the CPU torch (operator torchvision::nms does not exist)")


@dataclass(frozen=True)
class Network:
    source: str  # keras, transformers, torchvision
    model: str  # the constructor's name
    size: int  # the smallest input side its family accepts
    # a deep float32 source's own rounding, where it exceeds ORACLE_TOL: the test then shows the same model in
    # float64 within FLOAT64_TOL of the oracle, so the import is exact and the gap is the source's float32 arithmetic
    oracle_tol: float = ORACLE_TOL
    pixels: bool = False  # the model rescales [0, 255] pixels itself (fed pixels, not standard normal values)


NETWORKS = {
    "keras-VGG16": Network("keras", "VGG16", 32),
    "keras-ResNet50": Network("keras", "ResNet50", 32, oracle_tol=3e-4),
    "keras-MobileNetV2": Network("keras", "MobileNetV2", 32, oracle_tol=3e-5),
    "keras-DenseNet121": Network("keras", "DenseNet121", 32, oracle_tol=5e-5),
    "keras-InceptionV3": Network("keras", "InceptionV3", 75, oracle_tol=3e-4),
    # 64x64: at 32x32 its last stages run on 1x1 maps, where a calibration batch leaves BatchNorm variances down to
    # 3e-11, and every pair of engines is 5e-4 apart by float32 rounding alone
    "keras-EfficientNetB0": Network("keras", "EfficientNetB0", 64, oracle_tol=3e-5, pixels=True),
    "keras-MobileNetV3Small": Network("keras", "MobileNetV3Small", 32, pixels=True),
    "keras-ConvNeXtTiny": Network("keras", "ConvNeXtTiny", 32, pixels=True),
    "hf-ResNet50": Network("transformers", "ResNet", 32, oracle_tol=1e-4),
    "hf-MobileNetV1": Network("transformers", "MobileNetV1", 32, oracle_tol=3e-5),
    "hf-MobileNetV2": Network("transformers", "MobileNetV2", 32, oracle_tol=3e-5),
    "hf-EfficientNetB0": Network("transformers", "EfficientNet", 32),
    "hf-RegNet": Network("transformers", "RegNet", 32, oracle_tol=2e-4),
    # torchvision 0.28 checked from its wheel with its CUDA op registrations stubbed out: float32 oracle gaps
    # googlenet 3.0e-5, efficientnet_b0 1.5e-5, mnasnet0_5 1.2e-5, inception_v3 5.1e-5
    **{f"tv-{n}": Network("torchvision", n, 75 if n == "inception_v3" else 32, oracle_tol=tol)
       for n, tol in (("vgg11_bn", ORACLE_TOL), ("resnet18", ORACLE_TOL), ("mobilenet_v2", 3e-5),
                      ("densenet121", 3e-5), ("squeezenet1_1", ORACLE_TOL), ("googlenet", 1e-4),
                      ("efficientnet_b0", 5e-5), ("mnasnet0_5", 5e-5), ("inception_v3", 2e-4))},
}


# --- building the source models ------------------------------------------------------------------------------------
def keras_module():
    require("keras")
    get_adapter("keras")  # chooses Keras' engine (TensorFlow) before keras is first imported
    import keras
    return keras


def keras_layers(model) -> list:
    """Every layer of the model, those of the models nested in it (ConvNeXt's Sequential stem) included."""
    out = []
    for layer in model.layers:
        out += keras_layers(layer) if hasattr(layer, "layers") else [layer]
    return out


def keras_network(net: Network):
    """A keras.applications network (weights=None, 10 classes, logits out), random gamma and beta (LayerNorm's
    too), ConvNeXt's layer scales random near 1 (not 1e-6: the blocks must count), and BatchNorm statistics those
    of a calibration batch; its own momentum kept."""
    keras = keras_module()
    keras.utils.set_random_seed(0)
    model = keras_constructor(keras, net)
    rng = np.random.default_rng(1)
    layers = keras_layers(model)
    norms = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    for layer in layers:
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization)):
            for v, (lo, hi) in ((layer.gamma, (0.5, 1.5)), (layer.beta, (-0.3, 0.3))):
                if v is not None:
                    v.assign(rng.uniform(lo, hi, v.shape))
        if type(layer).__name__ == "LayerScale":
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
    for layer in norms:
        layer.momentum = 0.0
    for layer in layers:
        if isinstance(layer, keras.layers.Normalization) and hasattr(layer, "adapt_mean"):
            # ImageNet's statistics, as the pretrained model has (ConvNeXt's are constants already)
            layer.adapt_mean.assign([0.485, 0.456, 0.406])
            layer.adapt_variance.assign([0.052, 0.050, 0.051])
            layer.finalize_state()
    model(network_inputs(net, CALIBRATION, seed=5).transpose(0, 2, 3, 1), training=True)
    for layer, m in zip(norms, momenta):
        layer.momentum = m
    return model


def keras_constructor(keras, net: Network):
    return getattr(keras.applications, net.model)(input_shape=(net.size, net.size, 3), weights=None, classes=10,
                                                  classifier_activation=None)


def keras_float64(model, net: Network) -> np.ndarray:
    """The Keras network rebuilt in float64 with the float32 model's weights: its output on x."""
    keras = keras_module()
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        twin = keras_constructor(keras, net)
    finally:
        keras.config.set_dtype_policy(policy)
    twin.set_weights(model.get_weights())
    for layer in keras_layers(twin):
        if isinstance(layer, keras.layers.Normalization) and hasattr(layer, "adapt_mean"):
            layer.finalize_state()  # it computes with constants taken from its statistics (docs/design.md trap 37)
    return lambda x: np.asarray(twin(x.transpose(0, 2, 3, 1).astype(np.float64), training=False))


def torch_calibrated(module, net: Network):
    """The module in eval mode with random BatchNorm affine parameters and the statistics of a calibration batch."""
    import torch
    from torch import nn
    g = torch.Generator().manual_seed(1)
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    module.eval()
    with torch.no_grad():
        for m in norms:
            if m.affine:
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.3, 0.3, generator=g)
            m.momentum = 1.0  # the running statistics become the calibration batch's
            m.train()
        module(torch.from_numpy(network_inputs(net, CALIBRATION, seed=5)))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return module.eval()


def transformers_network(net: Network):
    """A Hugging Face image classifier from its config (random weights, no download), wrapped as a user would to
    hand it to from_torch: a module returning the output's logits."""
    require("torch")
    try:
        import transformers
    except ImportError as e:
        if "torch" in REQUIRED:  # the full environment ([all]) installs transformers
            pytest.fail(f"transformers does not import ({e}), but the full environment includes it")
        pytest.skip(f"transformers is not installed: {e}")
    import torch
    from torch import nn

    class Logits(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x).logits

    config = {"ResNet": {}, "MobileNetV1": {}, "MobileNetV2": {}, "RegNet": {},  # ResNet's default is ResNet-50
              "EfficientNet": {"width_coefficient": 1.0, "depth_coefficient": 1.0, "hidden_dim": 1280}}[net.model]
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{net.model}Config")(num_labels=10, **config)
    model = getattr(transformers, f"{net.model}ForImageClassification")(cfg)
    return torch_calibrated(Logits(model), net)


def torchvision_network(net: Network):
    require("torch")
    try:
        import torchvision
    except Exception as e:  # ImportError, or RuntimeError from a wheel built against another torch
        pytest.skip(f"{TORCHVISION_SKIP}: {str(e).splitlines()[0][:200]}")
    import torch
    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": True} if net.model in ("googlenet", "inception_v3") else {}
    model = getattr(torchvision.models, net.model)(weights=None, num_classes=10, **extra)
    return torch_calibrated(model, net)


def network_inputs(net: Network, n: int, seed: int) -> np.ndarray:
    """NCHW float32: pixels in [0, 255] for a model that rescales them itself, standard normal values otherwise."""
    rng = np.random.default_rng(seed)
    shape = (n, 3, net.size, net.size)
    return (rng.uniform(0, 255, shape) if net.pixels else rng.standard_normal(shape)).astype(np.float32)


@dataclass
class Imported:
    spec: object
    weights: dict
    x: np.ndarray
    source: np.ndarray  # the source model's own output on x
    oracle: np.ndarray  # the float64 oracle's on the imported spec
    source64: np.ndarray | None  # the source model's in float64, where the float32 one is ORACLE_TOL from the oracle


_CACHE: dict[str, Imported] = {}


def imported(name: str) -> Imported:
    """The network built, imported and run by its source and by the oracle, once per module."""
    if name not in _CACHE:
        from nncompare.interop import from_keras, from_torch
        net = NETWORKS[name]
        x = network_inputs(net, BATCH, seed=0)
        if net.source == "keras":
            model = keras_network(net)
            spec, w = from_keras(model)
            source = np.asarray(model(x.transpose(0, 2, 3, 1), training=False))
            float64 = lambda: keras_float64(model, net)(x)  # noqa: E731
        else:
            require("torch")
            import torch
            model = (transformers_network if net.source == "transformers" else torchvision_network)(net)
            spec, w = from_torch(model, (3, net.size, net.size))
            with torch.no_grad():
                source = model(torch.from_numpy(x)).numpy()

            def float64():
                with torch.no_grad():
                    return copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
        oracle = get_adapter("numpy").build(spec, weights=w).predict(x)
        with_float64 = scaled_diff(oracle, source) > ORACLE_TOL
        _CACHE[name] = Imported(spec, w, x, source, oracle, float64() if with_float64 else None)
    return _CACHE[name]


# --- every backend, against the source ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NETWORKS)
def test_the_oracle_computes_what_the_source_model_computes(name):
    net = imported(name)
    assert scaled_diff(net.source[0], net.source[1]) > 0.05  # the input reaches the logits
    assert scaled_diff(net.oracle, net.source) <= NETWORKS[name].oracle_tol
    if net.source64 is not None:  # past ORACLE_TOL: the source's own float32 rounding, not the import
        assert scaled_diff(net.oracle, net.source64) <= FLOAT64_TOL


@pytest.mark.parametrize("backend", IN_PROCESS)
@pytest.mark.parametrize("name", NETWORKS)
def test_every_backend_predicts_what_the_source_model_predicts(name, backend):
    net = imported(name)
    require(backend)
    got = get_adapter(backend).build(net.spec, weights=net.weights).predict(net.x)
    assert scaled_diff(got, net.source) <= FRAMEWORK_TOL


# keras-jax and keras-torch in a process of their own (one Keras engine per process): every network's spec, weights
# and input in, its predictions out (an error per network, so one failure does not hide the others)
WORKER = """
import json, sys, traceback
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[3])
from nncompare.backends import get_adapter
from nncompare.models import ModelSpec
engine, folder = sys.argv[1], Path(sys.argv[2])
cls = get_adapter(engine)
for path in sorted(folder.glob("*.json")):
    try:
        spec = ModelSpec.from_dict(json.loads(path.read_text()))
        with np.load(path.with_suffix(".npz")) as f:
            weights = {k: f[k] for k in f.files if k != "input"}
            x = f["input"]
        np.save(path.with_suffix(f".{engine}.npy"), cls.build(spec, weights=weights).predict(x))
    except Exception:
        path.with_suffix(f".{engine}.err").write_text(traceback.format_exc(limit=8))
"""


@pytest.fixture(scope="module")
def keras_engines(request, tmp_path_factory):
    """engine -> {network: predictions or an error text}, for every network a selected test asks for."""
    folder = tmp_path_factory.mktemp("networks")
    selected = {item.callspec.params["name"] for item in request.session.items
                if "keras_engines" in getattr(item, "fixturenames", ()) and "name" in item.callspec.params}
    built = []
    for name in (n for n in NETWORKS if n in selected):
        try:
            net = imported(name)
        except pytest.skip.Exception:
            continue
        (folder / f"{name}.json").write_text(json.dumps(net.spec.to_dict()))
        np.savez(folder / f"{name}.npz", input=net.x, **net.weights)
        built.append(name)
    out = {}

    def get(engine: str) -> dict:
        if engine not in out:
            p = subprocess.run([sys.executable, "-c", WORKER, engine, str(folder), str(ROOT)], capture_output=True,
                               text=True, timeout=1800)
            assert p.returncode == 0, f"{engine} worker failed:\n{p.stderr[-4000:]}"
            out[engine] = {n: (np.load(folder / f"{n}.{engine}.npy") if (folder / f"{n}.{engine}.npy").exists()
                               else (folder / f"{n}.{engine}.err").read_text()) for n in built}
        return out[engine]
    return get


@pytest.mark.parametrize("engine", KERAS_ENGINES)
@pytest.mark.parametrize("name", NETWORKS)
def test_every_keras_engine_predicts_what_the_source_model_predicts(name, engine, keras_engines):
    net = imported(name)
    require(engine)
    got = keras_engines(engine)[name]
    assert not isinstance(got, str), got
    assert scaled_diff(got, net.source) <= FRAMEWORK_TOL


# --- ONNX -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NETWORKS)
def test_onnx_export_imports_back_the_same_function_and_runs_like_the_source(name):
    net = imported(name)
    require("onnxruntime")
    import onnxruntime
    from nncompare.interop import from_onnx, to_onnx
    model = to_onnx(net.spec, net.weights)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert scaled_diff(session.run(None, {"input": net.x})[0], net.source) <= FRAMEWORK_TOL
    back, w = from_onnx(model)  # the same layers, names, fields (Rescaling and Dropout: float32 in ONNX) and weights
    rates = lambda spec: [(*s[:3], {k: np.float32(v) if k == "rate" else v for k, v in s[3].items()})  # noqa: E731
                          for s in structure(spec)]
    assert rates(back) == rates(net.spec)
    assert list(w) == list(net.weights) and all(np.array_equal(w[k], net.weights[k]) for k in w)
    # the oracle on it: the same, but for Rescaling's float32 scale (EfficientNetB0's 1 / 255: 2.7e-6 at its logits)
    assert scaled_diff(get_adapter("numpy").build(back, weights=w).predict(net.x), net.oracle) <= ORACLE_TOL
