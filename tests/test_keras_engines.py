"""keras-jax and keras-torch against the float64 NumPy oracle, and weight transfers to and from them.

Keras hosts one engine per process and this one runs Keras on TensorFlow, so each engine's checks run in one
subprocess (tests/keras_worker.py) that writes every result as JSON; the cases below assert on those results,
one per (engine, model, check), so one failure never hides another.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nncompare.backends import SGD, get_adapter
from nncompare.backends.check import TOLERANCE, sample_batch, scaled_diff

from .conftest import require
from .keras_worker import TRANSFER_SPECS, export, load_weights, models, set_statistics

# the fast lane (-m 'not slow') leaves out this file's real processes and clusters
pytestmark = pytest.mark.slow

ENGINES = ["keras-jax", "keras-torch"]
CHECKS = ("logits", "loss", "grads", "sgd", "adam")
MODELS = sorted(models())
IN_PROCESS = ["keras", "torch", "mxnet", "numpy"]  # frameworks this (TensorFlow-Keras) process can host
WORKER = Path(__file__).with_name("keras_worker.py")


def _worker(*args) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}  # the registry sets it per engine
    p = subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True,
                       timeout=3600, env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert p.returncode == 0, f"keras_worker {' '.join(map(str, args))} failed:\n{p.stderr[-4000:]}"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """engine -> the worker's check results, run once per engine on first use."""
    cache = {}

    def get(engine: str) -> dict:
        require(engine)
        if engine not in cache:
            out = tmp_path_factory.mktemp(engine) / "checks.json"
            try:
                _worker("check", engine, out)
                cache[engine] = json.loads(out.read_text())
            except AssertionError as e:
                cache[engine] = {"crash": str(e)}
        assert "crash" not in cache[engine], cache[engine]["crash"]
        return cache[engine]
    return get


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("engine", ENGINES)
def test_matches_the_oracle(results, engine, model, check):
    r = results(engine)["models"][model]
    assert "error" not in r, r.get("error")
    where = f" (worst: {r['where'][check]})" if r["where"].get(check) else ""
    assert r["diffs"][check] <= TOLERANCE, f"{engine} {model} {check}: scaled diff {r['diffs'][check]:.2e}{where}"


@pytest.mark.parametrize("engine", ENGINES)
def test_weights_round_trip_exactly(results, engine):
    r = results(engine)["extras"]["round_trip"]
    assert r == {"keys_equal": True, "exact": True}, r


@pytest.mark.parametrize("engine", ENGINES)
def test_loss_and_grads_changes_no_state(results, engine):
    assert results(engine)["extras"]["loss_and_grads_keeps_state"] == {"unchanged": True}


@pytest.mark.parametrize("engine", ENGINES)
def test_dropout_is_off_in_inference_and_drops_its_rate_in_training(results, engine):
    r = results(engine)["extras"]["dropout"]
    assert "error" not in r, r.get("error")
    assert r["inference_diff"] <= TOLERANCE
    assert abs(r["dropped_fraction"] - 0.3) < 0.04


@pytest.mark.parametrize("engine", ENGINES)
def test_fit_follows_the_oracle_over_the_shared_batch_order(results, engine):
    r = results(engine)["extras"]["fit"]
    assert "error" not in r, r.get("error")
    np.testing.assert_allclose(r["loss"], r["ref"], rtol=1e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_resident_batches_train_like_host_batches_and_settings_name_the_engine(results, engine):
    r = results(engine)["extras"]["resident"]
    assert "error" not in r, r.get("error")
    assert r["equal"]
    assert r["settings"]["engine"] == engine.split("-")[1]
    assert r["version"].startswith("keras 3.") and engine.split("-")[1] in r["version"]


@pytest.mark.parametrize("engine", ENGINES)
def test_same_average_pooling_excludes_padded_cells_even_where_keras_own_layer_does_not(results, engine):
    # docs/design.md trap 17: Keras 3.15 on torch pads an odd "same" pool by replicating edge cells, which the mean
    # then counts; the adapter builds that pool itself there. Should Keras fix it, drop _SameAvgPool.
    r = results(engine)["extras"]["same_avg_pool"]
    assert "error" not in r, r.get("error")
    assert r["adapter_diff"] <= TOLERANCE
    assert (r["keras_own_diff"] > 0.01) == (engine == "keras-torch"), r


@pytest.mark.parametrize("engine", ENGINES)
def test_keras_random_initialisers_run_only_where_their_weights_are_kept(results, engine):
    r = results(engine)["extras"]["initialisers"]
    assert "error" not in r, r.get("error")
    assert r["canonical"] == 0 and r["native"] > 0, r  # canonical weights overwrite them at once


def test_jax_training_step_compiles_once(results):
    # the state read from the Keras variables was uncommitted, the step's outputs committed: a second compile
    r = results("keras-jax")["extras"]["compiles"]
    assert "error" not in r, r.get("error")
    for data in ("host", "resident"):
        assert r[data]["first_step"] >= 1, r  # the listener sees compiles at all
        assert r[data]["later_steps"] == 0, r


@pytest.mark.parametrize("engine", ENGINES)
def test_unsupported_device_names_what_the_engine_sees(results, engine):
    message = results(engine)["extras"]["bad_device"]["message"]
    assert message is not None and "gpu:7" in message and "cpu" in message


@pytest.mark.parametrize("engine", ENGINES)
def test_a_second_keras_engine_in_one_process_is_refused(results, engine):
    outcome = results(engine)["extras"]["second_engine"]
    if outcome.get("skip"):
        pytest.skip(outcome["skip"])
    message = outcome["message"]
    assert message is not None and "own process" in message and engine.split("-")[1] in message


def test_this_process_refuses_keras_engines_other_than_its_own():
    require("keras")
    from nncompare.backends import BackendError
    get_adapter("keras")  # this process runs Keras on TensorFlow from here on
    for engine in ENGINES:
        with pytest.raises(BackendError, match="own process: this one already runs Keras on tensorflow"):
            get_adapter(engine)


# --- transfers: weights trained in one framework, loaded into another, give the same predictions ---------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """framework -> .npz of weights after 3 SGD steps and predictions (Keras engines: from a worker)."""
    cache = {}

    def get(src: str) -> Path:
        require(src)
        if src not in cache:
            path = tmp_path_factory.mktemp(f"export-{src}") / "weights.npz"
            if src in ENGINES:
                _worker("export", src, path)
            else:
                export(src, path)
            cache[src] = path
        return cache[src]
    return get


def _predictions(path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k.split("|")[0]: f[k] for k in f.files if k.endswith("|predict")}


@pytest.mark.parametrize("spec_name", TRANSFER_SPECS)
@pytest.mark.parametrize("dst", IN_PROCESS)
@pytest.mark.parametrize("src", ENGINES)
def test_weights_from_a_keras_engine_load_into_another_framework(exported, src, dst, spec_name):
    require(dst)
    from .keras_worker import EVERY_LAYER, GRAPHS
    spec = {**EVERY_LAYER, **GRAPHS}[spec_name]
    path = exported(src)
    net = get_adapter(dst).build(spec, weights=load_weights(path, spec_name))
    got = net.predict(sample_batch(spec, 8, seed=99)[0])
    assert scaled_diff(got, _predictions(path)[spec_name]) <= TOLERANCE


@pytest.fixture(scope="module")
def imported(exported, tmp_path_factory):
    """(src, dst engine) -> predictions of dst from src's weights; one worker per dst engine for all sources."""
    cache = {}

    def get(src: str, dst: str) -> dict[str, np.ndarray]:
        require(dst)
        if dst not in cache:
            pairs, sources = [], [s for s in ["keras", "torch", "mxnet", *ENGINES] if s != dst and _installed(s)]
            folder = tmp_path_factory.mktemp(f"import-{dst}")
            for s in sources:
                pairs += [exported(s), folder / f"{s}.npz"]
            _worker("predict", dst, *pairs)
            cache[dst] = {s: _predictions(folder / f"{s}.npz") for s in sources}
        require(src)
        return cache[dst][src]
    return get


def _installed(backend: str) -> bool:
    from nncompare.backends import available_backends
    return available_backends()[backend]["installed"]


@pytest.mark.parametrize("src,dst", [(s, d) for d in ENGINES for s in ["keras", "torch", "mxnet", *ENGINES] if s != d])
def test_weights_from_another_framework_load_into_a_keras_engine(exported, imported, src, dst):
    got = imported(src, dst)
    ref = _predictions(exported(src))
    for name in TRANSFER_SPECS:
        assert scaled_diff(got[name], ref[name]) <= TOLERANCE, name


# --- benchmarks/gpu_check.sh: the GPU proof, rehearsed on this CPU --------------------------------------
GPU_CHECK = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


def _gpu_check(*args, timeout=900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["PYTHON"] = sys.executable  # the suite's interpreter, not whichever python3 comes first on PATH
    return subprocess.run(["bash", str(GPU_CHECK), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_gpu_check_refuses_bad_usage():
    p = _gpu_check()
    assert p.returncode == 2 and "usage" in p.stderr


def test_gpu_check_without_a_gpu_says_so_and_checks_nothing(tmp_path):
    for engine in ENGINES:
        require(engine)
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the no-GPU guard does not apply")
    p = _gpu_check(tmp_path)
    assert p.returncode == 3, p.stdout + p.stderr
    assert "no GPU visible" in p.stdout and "--cpu-dry-run" in p.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["ok"] is False
    assert not list(tmp_path.glob("check_*.txt"))


def test_gpu_check_cpu_dry_run_runs_every_step_and_writes_results(tmp_path):
    for backend in ["torch", *ENGINES]:
        require(backend)
    p = _gpu_check(tmp_path, "--cpu-dry-run", "--jobs", "2")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["dry_run"] and summary["checks"] == {"perceptron": True, "mlp": True}
    for name in ("perceptron", "mlp"):
        table = (tmp_path / f"check_{name}.txt").read_text()
        assert all(f"\n{b} " in table for b in ["torch", *ENGINES]), table
    env = json.loads((tmp_path / "env.json").read_text())
    assert {b: env["backends"][b]["settings"]["engine"] for b in ENGINES} == {"keras-jax": "jax",
                                                                              "keras-torch": "torch"}
    rows = json.loads((tmp_path / "run.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == {"torch", *ENGINES} and all("error" not in r for r in rows), rows
    assert "all ok" in (tmp_path / "gpu_check.log").read_text()


# --- semantics (tests/test_semantics.py in this process's frameworks) -----------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_adam_with_betas_near_one_follows_the_oracle(results, engine):
    r = results(engine)["extras"]["adam_near_one"]
    assert "error" not in r, r.get("error")
    assert r["diff"] <= TOLERANCE, r


@pytest.mark.parametrize("engine", ENGINES)
def test_weights_given_as_negative_stride_views_load_exactly(results, engine):
    assert results(engine)["extras"]["flipped_weights"] == {"diff": 0}


@pytest.mark.parametrize("engine", ENGINES)
def test_weights_set_after_training_replace_the_trained_ones(results, engine):
    # keras-jax keeps its state in arrays between steps: set_weights must push the new weights past them
    r = results(engine)["extras"]["set_after_training"]
    assert "error" not in r, r.get("error")
    assert r["weights"] == 0 and r["predict"] <= TOLERANCE, r


@pytest.mark.parametrize("engine", ["keras", *ENGINES])
def test_normalization_statistics_set_after_the_build_are_the_ones_used(results, engine):
    # keras.layers.Normalization reads constants it snapshots from its variables when built: set_weights would not
    # reach them (the adapter's own layer reads its variables)
    if engine == "keras":
        require("keras")
        diff = set_statistics(get_adapter("keras"), get_adapter("numpy"))
    else:
        r = results(engine)["extras"]["statistics_set"]
        assert "error" not in r, r.get("error")
        diff = r["diff"]
    assert diff <= TOLERANCE


def test_keras_builds_a_spec_deeper_than_the_default_recursion_limit(results):
    # Keras maps its functional graph recursively: 1,200 layers failed at Python's default limit of 1000
    r = results("keras-torch")["extras"]["deep"]
    assert "error" not in r, r.get("error")
    assert r["diff"] <= TOLERANCE and r["limit_after"] == 1000, r
