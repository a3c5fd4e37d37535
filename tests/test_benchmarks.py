"""The reference benchmark's hand-written side (benchmarks/native_loops.py) and its driver
(benchmarks/native_vs_adapter.py): the hand-written models are the zoo's (parameter counts; the torch and MXNet
ones compute the spec's function, padding included), the latency turns answer calls/s at the median, and a quick
run of each mode gives every engine its row. native_loops.py never imports nncompare: these tests compare the
two from outside."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

from nncompare.backends import BACKENDS, available_backends, get_adapter
from nncompare.models import zoo

from .conftest import ROOT, require

sys.path.insert(0, str(ROOT / "benchmarks"))
import native_loops  # noqa: E402

MODELS = list(native_loops.SHAPES)


# --- the hand-written models are the zoo's ------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("framework", ["torch", "keras", "mxnet"])
def test_hand_written_models_have_the_specs_parameter_count(framework, model):
    """Every parameter the spec counts (BatchNorm's moving statistics included), in each framework's own model;
    the Keras engines share one model definition."""
    require(framework)
    assert native_loops.param_count(framework, model) == zoo.get(model).params


def _oracle(model: str, x: np.ndarray):
    """The float64 oracle's inference logits of `model` at x, its canonical weights with random moving
    statistics (BatchNorm in inference mode reads them)."""
    spec = zoo.get(model)
    net = get_adapter("numpy").build(spec, seed=0)
    rng = np.random.default_rng(1)
    weights = net.get_weights()
    for k, v in weights.items():
        if k.endswith(("/beta", "/moving_mean")):
            weights[k] = rng.standard_normal(v.shape) * 0.1
        elif k.endswith(("/gamma", "/moving_var")):
            weights[k] = rng.uniform(0.5, 1.5, v.shape)
    net.set_weights(weights)
    return net.logits(x), weights


@pytest.mark.parametrize("model", ["resnet20", "inception_mini"])
@pytest.mark.parametrize("framework", ["torch", "mxnet"])
def test_hand_written_residual_and_inception_nets_compute_the_specs_function(framework, model):
    """With the spec's weights loaded in order (the modules are written in the spec's layer order), the
    hand-written net's inference output is the oracle's: the same layers, strides, TF "same" padding (the odd
    pixel bottom/right) and BatchNorm epsilon, not only the same shapes."""
    require(framework)
    x = np.random.default_rng(0).standard_normal((2,) + native_loops.SHAPES[model]).astype(np.float32)
    expected, weights = _oracle(model, x)
    values = [np.asarray(v, np.float32) for v in weights.values()]
    if framework == "torch":
        import torch
        net = native_loops.torch_net(model).eval()
        native = [t for name, t in net.state_dict().items() if not name.endswith("num_batches_tracked")]
        with torch.no_grad():
            for t, v in zip(native, values, strict=True):
                t.copy_(torch.from_numpy(v.T.copy() if v.ndim == 2 else v))  # Dense (in, out) -> (out, in)
            got = net(torch.from_numpy(x)).numpy()
    else:
        mx = native_loops.mxnet_import()
        net = native_loops.mxnet_net(model)
        net.initialize()
        net(mx.nd.zeros((1,) + native_loops.SHAPES[model]))
        for p, v in zip(net.collect_params().values(), values, strict=True):
            p.set_data(mx.nd.array(v.T if v.ndim == 2 else v))
        got = net(mx.nd.array(x)).asnumpy()
    scale = np.abs(expected).max()
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4 * scale


@pytest.mark.parametrize("framework, how", [("torch", None), ("mxnet", None)]
                         + [("keras", how) for how in native_loops.KERAS_INFER_HOW])
def test_inference_calls_take_host_numpy_and_return_host_numpy_logits(framework, how):
    require(framework)
    call, version, settings = native_loops.INFER[framework]("lenet5", 3, **({"how": how} if how else {}))
    for i in range(2):
        out = call(i)
        assert isinstance(out, np.ndarray) and out.shape == (3, 10) and np.isfinite(out).all()
    assert version and settings and settings.get("keras.infer") == how


# --- the latency protocol ---------------------------------------------------------------------------------
def test_latency_turn_is_a_block_of_at_least_50ms_answered_with_calls_per_second_at_its_median(monkeypatch):
    """A fake clock: each call takes the next of the durations; a block ends with the call that reaches 50 ms."""
    now, durations = [0.0], iter([0.010, 0.030, 0.020, 0.005] * 100)
    monkeypatch.setattr(native_loops.time, "perf_counter", lambda: now[0])

    def call(i):
        now[0] += next(durations)

    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    monkeypatch.setenv("NNCOMPARE_TURNS", f"{go_r},{done_w}")
    result = {}
    side = threading.Thread(target=lambda: result.update(native_loops.time_latency(call, budget=0, warmup=0)))
    side.start()
    reader = os.fdopen(done_r, "r")
    try:
        assert reader.readline().strip() == "ready"
        answers = []
        for _ in range(2):
            os.write(go_w, b"g")
            answers.append(float(reader.readline()))
    finally:
        os.close(go_w)
        side.join(10)
        reader.close()
        os.close(go_r)
        os.close(done_w)
    # block 1: 10, 30, 20 ms (60 ms >= 50); block 2: 5, 10, 30, 20 ms (65 ms)
    assert answers == pytest.approx([1 / 0.020, 1 / 0.015])
    assert result["latency_calls"] == 7 and result["latency_p50_ms"] == pytest.approx(20)
    assert result["latency_p99_ms"] == pytest.approx(30)
    assert "NNCOMPARE_TURNS" not in os.environ


def test_latency_without_turns_times_at_least_the_minimum_calls(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(native_loops.time, "perf_counter", lambda: now[0])

    def call(i):
        now[0] += 0.001 * (1 + i % 3)

    out = native_loops.time_latency(call, budget=0, min_calls=200, warmup=0)
    assert out["latency_calls"] >= 200 and out["latency_p50_ms"] == pytest.approx(2)
    assert out["latency_p99_ms"] == pytest.approx(3)


@pytest.mark.parametrize("args, message", [
    (["onnxruntime", "lenet5", "8"], "onnxruntime does not train"),
    (["torch", "lenet5", "8", "--mode", "latency"], "latency is timed on single samples: batch 1, got 8"),
    (["torch", "lenet5", "8", "--mode", "infer", "--keras-infer", "call"], "--keras-infer is for a Keras engine"),
])
def test_native_loops_refuse_what_they_cannot_time_in_one_line(args, message):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "native_loops.py"), *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr and message in out.stderr


# --- the driver: every engine joins every table it supports ---------------------------------------------------
def test_every_registered_engine_but_the_reference_has_its_hand_written_loops():
    """An engine added to the registry shows up here until native_loops.py has its loops."""
    for b in BACKENDS.values():
        if b.reference:
            continue
        assert b.name in native_loops.INFER, b.name
        assert (b.name in native_loops.LOOPS) == b.trains, b.name


def _quick(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "native_vs_adapter.py"), "--quick", *args],
                          capture_output=True, text=True, timeout=1800, cwd=ROOT)


def _table(stdout: str, title: str) -> list[list[str]]:
    """The data rows of the table printed under `title`."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows = []
    for line in lines[start + 3:]:  # title, header, rule
        if not line.strip() or line.startswith("worst "):
            break
        rows.append(line.split())
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train", "infer", "latency"])
def test_a_quick_run_of_each_mode_gives_every_installed_engine_a_row(mode):
    installed = [b for b, info in available_backends().items() if info["installed"] and not BACKENDS[b].reference]
    expected = [b for b in installed if mode != "train" or BACKENDS[b].trains]
    if not expected:
        pytest.skip("no engine installed")
    out = _quick("--modes", mode, "--models", "mlp", "--batch-sizes", "8")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    title = {"train": "Training samples/s", "infer": "Inference samples/s", "latency": "Batch-1 latency"}[mode]
    rows = _table(out.stdout, title)
    framework = 1 if mode == "latency" else 2
    assert sorted(r[framework] for r in rows) == sorted(expected), out.stdout
    for r in rows:
        assert r[0] == "mlp" and re.fullmatch(r"\d+\.\d{3}", r[-2]), r  # adapter / best native, not an ERROR
        if mode != "latency":
            assert r[1] == "8"
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"worst adapter / best native: \d+\.\d{{3}} \({mode}: [\w-]+, mlp, batch "
                        rf"{1 if mode == 'latency' else 8}\)", last), last
    if mode == "train":
        assert any(l.startswith("note: train: onnxruntime has no row (inference only)") for l in
                   out.stdout.splitlines()) == ("onnxruntime" in installed)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet20", "inception_mini"])
def test_a_quick_run_of_the_residual_and_inception_nets_trains_and_infers(model):
    require("torch")
    out = _quick("--backends", "torch", "--models", model, "--batch-sizes", "4")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    for title in ("Training samples/s", "Inference samples/s", "Batch-1 latency"):
        assert [r[0] for r in _table(out.stdout, title)] == [model], out.stdout
