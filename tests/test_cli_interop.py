"""compare.py on model files: a .keras or .onnx file works wherever a model is named, its own weights reach every
cell (run, train, check, under Ray too), check shows the source model itself beside the ports, export writes the
ONNX file, and a bad model file is one line and exit 2."""
import json
import os
import sys

import numpy as np
import pytest

from nncompare import cli
from nncompare.backends import get_adapter
from nncompare.backends.bench import batch_pool
from nncompare.backends.check import TOLERANCE, scaled_diff
from nncompare.cell import Task, load_weights, weights_digest, write_weights
from nncompare.models import BatchNorm, Conv2D, Dense, GlobalAveragePooling2D, ModelSpec, init_weights, zoo

from .conftest import compare, require

FAST = ["--steps", "1", "--repeats", "1", "--warmup", "0", "--threads", "1", "--quiet"]


def keras_module():
    require("keras")
    get_adapter("keras")  # chooses Keras' engine (TensorFlow) before keras is first imported
    import keras
    return keras


def onnx_module():
    require("onnxruntime")
    import onnx
    return onnx


def randomized(model, seed: int):
    """Every weight of a Keras model drawn afresh (variances and scales in [0.5, 1.5]): nothing is the seeded init."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        positive = v.name in ("gamma", "moving_variance")
        v.assign(rng.uniform(0.5, 1.5, v.shape) if positive else rng.uniform(-0.5, 0.5, v.shape))
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Model files a user would have: a Keras CNN (BatchNorm, softmax head) and MLP, and an ONNX export."""
    folder = tmp_path_factory.mktemp("models")
    keras = keras_module()
    onnx_module()
    from nncompare.interop import to_onnx
    L = keras.layers
    keras.utils.set_random_seed(0)
    i = keras.Input((6, 6, 2))
    x = L.Conv2D(3, 3, padding="same", activation="relu", name="c1")(i)
    x = L.BatchNormalization(name="bn")(x)
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.Dense(4, activation="softmax", name="fc")(L.Flatten(name="flat")(x))
    cnn = randomized(keras.Model(i, x, name="tiny_cnn"), 1)
    cnn.save(folder / "tiny_cnn.keras")
    mlp = randomized(keras.Sequential([keras.Input((5,)), L.Dense(6, activation="relu", name="hidden"),
                                       L.Dense(3, name="out")], name="tiny_mlp"), 2)
    mlp.save(folder / "tiny_mlp.keras")
    spec = ModelSpec("tiny_onnx", (2, 5, 5), (Conv2D(3, 3, padding="same", activation="relu", name="conv"),
                                               BatchNorm(name="bn"), GlobalAveragePooling2D(name="gap"),
                                               Dense(3, name="fc")))
    rng = np.random.default_rng(3)
    w = {k: rng.uniform(0.5, 1.5, v.shape).astype(np.float32) if k.endswith(("gamma", "moving_var"))
         else rng.uniform(-0.5, 0.5, v.shape).astype(np.float32) for k, v in init_weights(spec, 0).items()}
    to_onnx(spec, w, folder / "tiny.onnx")
    return {"cnn": str(folder / "tiny_cnn.keras"), "mlp": str(folder / "tiny_mlp.keras"),
            "onnx": str(folder / "tiny.onnx"), "cnn_model": cnn, "mlp_model": mlp}


def imported(path: str):
    from nncompare.model_files import import_file
    return import_file(path)


def main(capsys, *args) -> tuple[int, str, str]:
    """compare.py in this process (its model files already read here): exit code, stdout, stderr."""
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_exit_2(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


# --- reading model files --------------------------------------------------------------------------------
@pytest.mark.parametrize("which,layers", [("cnn", "c1 (Conv2D)"), ("mlp", "hidden (Dense)"), ("onnx", "conv (Conv2D)")])
def test_summary_reads_keras_and_onnx_files(files, capsys, which, layers):
    code, out, err = main(capsys, "summary", files[which])
    assert code == 0, err
    assert layers in out


def test_the_imported_spec_computes_what_the_keras_file_computes(files):
    spec, w = imported(files["cnn"])
    x = np.random.default_rng(0).standard_normal((3, *spec.input_shape)).astype(np.float32)
    ref = files["cnn_model"].predict(x.transpose(0, 2, 3, 1), verbose=0)
    assert spec.input_shape == (2, 6, 6) and spec.head == "softmax"
    assert scaled_diff(get_adapter("numpy").build(spec, weights=w).predict(x), ref) <= 1e-5


def test_a_model_file_that_is_no_model_is_one_line(tmp_path, capsys):
    for name, content in (("junk.keras", b"not a zip"), ("junk.onnx", b"\x08\x07 not protobuf \xff")):
        (tmp_path / name).write_bytes(content)
        code, _, err = main(capsys, "summary", str(tmp_path / name))
        one_line_exit_2(code, err, "junk.")
    (tmp_path / "empty.onnx").write_bytes(b"")
    one_line_exit_2(*main(capsys, "summary", str(tmp_path / "empty.onnx"))[::2], "empty.onnx' is empty: no model")


@pytest.mark.parametrize("command", [["summary"], ["check"], ["run", "--quiet", "--models"], ["train", "--model"],
                                     ["export"]])
def test_a_missing_file_a_folder_or_a_fifo_named_as_a_model_file_is_refused(tmp_path, capsys, command):
    os.mkfifo(tmp_path / "fifo.keras")
    (tmp_path / "folder.onnx").mkdir()
    for path, message in ((tmp_path / "missing.onnx", "No such file or directory"),
                          (tmp_path / "folder.onnx", "is not a regular file"),
                          (tmp_path / "fifo.keras", "is not a regular file")):
        args = ["export", str(path), "--onnx", str(tmp_path / "out.onnx")] if command[0] == "export" \
            else [*command, str(path)]
        one_line_exit_2(*main(capsys, *args)[::2], message)


@pytest.mark.parametrize("module,extra", [("onnx", "onnx"), ("keras", "keras"), ("tensorflow", "keras")])
def test_a_missing_reader_names_the_extra_to_install(files, capsys, monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # importlib.util.find_spec now finds no such package
    path = files["onnx" if module == "onnx" else "cnn"]
    one_line_exit_2(*main(capsys, "summary", path)[::2],
                    f"needs {module}, which is not installed: pip install 'nncompare[{extra}]'")


def test_a_keras_layer_that_cannot_be_imported_is_named(tmp_path, capsys):
    keras = keras_module()
    L = keras.layers
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, name="dense"), L.Lambda(keras.ops.negative,
                                                                                    name="negate")])
    model.save(tmp_path / "lambda.keras")
    one_line_exit_2(*main(capsys, "summary", str(tmp_path / "lambda.keras"))[::2], "Lambda")


def test_an_onnx_node_that_cannot_be_imported_is_named(tmp_path, capsys):
    onnx = onnx_module()
    h = onnx.helper
    graph = h.make_graph([h.make_node("Sin", ["input"], ["output"], name="the_sine")], "g",
                         [h.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 3])],
                         [h.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["N", 3])])
    onnx.save_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "sine.onnx")
    one_line_exit_2(*main(capsys, "summary", str(tmp_path / "sine.onnx"))[::2], "the_sine")


# --- weights to the cells -------------------------------------------------------------------------------
def test_a_tasks_identity_holds_its_weights_hash_not_their_files_path(tmp_path):
    w = init_weights(zoo.get("perceptron"), 0)
    digest = write_weights(str(tmp_path / "a.npz"), w)
    assert digest == weights_digest(w) == write_weights(str(tmp_path / "b.npz"), w)
    task = Task("measure", backend="numpy", weights=str(tmp_path / "a.npz"), weights_sha256=digest)
    same = Task("measure", backend="numpy", weights=str(tmp_path / "b.npz"), weights_sha256=digest)
    other = {**w, "dense_0/bias": w["dense_0/bias"] + 1}
    changed = Task("measure", backend="numpy", weights=str(tmp_path / "a.npz"), weights_sha256=weights_digest(other))
    assert task.key == same.key != changed.key != Task("measure", backend="numpy").key
    loaded = load_weights(task)
    assert loaded.keys() == w.keys() and all(np.array_equal(loaded[k], w[k]) for k in w)
    with pytest.raises(ValueError, match="does not hold the weights this cell was given"):
        load_weights(changed)


def first_loss(spec: ModelSpec, weights: dict, batch: int) -> float:
    """The loss run reports with --warmup 0: the first training step's, on the first batch of the timing pool."""
    return float(get_adapter("numpy").build(spec, weights=weights).loss_and_grads(*batch_pool(spec, batch)[0])[0])


@pytest.mark.slow
def test_run_times_model_files_from_their_own_weights(files, tmp_path):
    require("torch")
    (tmp_path / "tmp").mkdir()
    out = compare("run", "--models", files["cnn"], files["onnx"], "--backends", "numpy", "torch", "--batch-sizes",
                  "4", *FAST, "--json", str(tmp_path / "r.json"), env={"TMPDIR": str(tmp_path / "tmp")})
    assert out.returncode == 0, out.stderr
    assert not [p for p in os.listdir(tmp_path / "tmp") if p.startswith("nncompare-weights-")]  # removed at the end
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert sorted((r["model"], r["backend"]) for r in rows) == [
        ("tiny_cnn", "numpy"), ("tiny_cnn", "torch"), ("tiny_onnx", "numpy"), ("tiny_onnx", "torch")]
    for r in rows:
        spec, w = imported(r["spec_file"])
        expected, seeded = first_loss(spec, w, 4), first_loss(spec, init_weights(spec, 0), 4)
        assert abs(expected - seeded) > 1e-2 * abs(expected)  # the seeded init would show
        assert abs(r["loss"] - expected) <= 1e-5 * abs(expected), (r["model"], r["backend"], r["loss"], expected)


@pytest.mark.slow
def test_train_on_a_model_file_starts_from_its_weights(files, tmp_path):
    from nncompare.models.data import synthetic
    out = compare("train", "--model", files["mlp"], "--dataset", "synthetic", "--backends", "numpy", "--epochs", "1",
                  "--batch-size", "256", "--optimizer", "sgd", "--lr", "1e-9", "--quiet", "--json",
                  str(tmp_path / "t.json"))
    assert out.returncode == 0, out.stderr
    (row,) = json.loads((tmp_path / "t.json").read_text())["results"]
    spec, w = imported(files["mlp"])
    data = synthetic(spec)
    expected = get_adapter("numpy").build(spec, weights=w).evaluate(data.x_test, data.y_test)[0]
    seeded = get_adapter("numpy").build(spec).evaluate(data.x_test, data.y_test)[0]
    assert abs(expected - seeded) > 1e-3 * expected  # the seeded init would show
    assert abs(row["test_loss"][0] - expected) <= 1e-6 * expected  # lr 1e-9: the imported weights, barely moved


def test_the_original_row_holds_the_source_model_against_the_oracle(files):
    from nncompare.model_files import original_row
    for which in ("cnn", "onnx"):
        spec, w = imported(files[which])
        row, ran = original_row(files[which], spec, w)
        assert row["backend"] == f"{'keras' if which == 'cnn' else 'onnx'} (original)"
        assert row["ok"] and row["diffs"]["logits"] <= TOLERANCE, row
        assert ("Keras" if which == "cnn" else "ONNX Runtime") in ran
        wrong, _ = original_row(files[which], spec, init_weights(spec, 0))  # a port on the seeded init: caught
        assert not wrong["ok"] and wrong["diffs"]["logits"] > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("which", ["cnn", "onnx"])
def test_check_of_a_model_file_shows_the_original_beside_every_engine(files, which):
    require("torch")
    out = compare("check", files[which], "--backends", "torch", "onnxruntime", "--steps", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    label = "keras (original)" if which == "cnn" else "onnx (original)"
    rows = {name: next(l for l in lines if l.startswith(name)) for name in (label, "torch", "onnxruntime")}
    assert all(l.rstrip().endswith("ok") for l in rows.values()), out.stdout
    assert lines.index(rows[label]) < lines.index(rows["torch"])  # the original first, then the ports
    assert "run by " + ("Keras" if which == "cnn" else "ONNX Runtime") in out.stdout


@pytest.mark.slow
def test_a_ray_cell_writes_the_weights_it_is_sent_and_ignores_the_drivers_path(files, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'nncompare[ray]')")
    from nncompare.cell import forwarded_env
    from nncompare.ray_executor import ray_cell
    spec, w = imported(files["cnn"])
    digest = write_weights(str(tmp_path / "w.npz"), w)
    task = Task("measure", threads=1, backend="numpy", model_name="tiny_cnn", spec=spec.to_dict(), batch_size=4,
                optimizer={"type": "sgd", "args": {"lr": 0.01, "momentum": 0.0}}, steps=1, repeats=1, warmup=0,
                weights="/nonexistent/driver/w.npz", weights_sha256=digest)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        payload = ray.put((tmp_path / "w.npz").read_bytes())
        result = ray.get(ray.remote(ray_cell).remote(task.to_json(), 300, False, forwarded_env(), payload))
    finally:
        ray.shutdown()
    assert "error" not in result, result
    assert abs(result["loss"] - first_loss(spec, w, 4)) <= 1e-9 * abs(result["loss"])


@pytest.mark.slow
def test_run_under_ray_carries_the_weights(files, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'nncompare[ray]')")
    out = compare("run", "--executor", "ray", "--models", files["onnx"], "--backends", "numpy", "--batch-sizes", "4",
                  *FAST, "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    (row,) = json.loads((tmp_path / "r.json").read_text())["rows"]
    spec, w = imported(files["onnx"])
    assert abs(row["loss"] - first_loss(spec, w, 4)) <= 1e-9 * abs(row["loss"])


# --- export ----------------------------------------------------------------------------------------------
def onnx_predict(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_export_of_a_model_file_computes_what_the_source_computes(files, tmp_path, capsys):
    code, out, err = main(capsys, "export", files["cnn"], "--onnx", str(tmp_path / "cnn.onnx"))
    assert code == 0, err
    assert f"with the weights of {files['cnn']}" in out
    spec, w = imported(files["cnn"])
    x = np.random.default_rng(4).standard_normal((5, *spec.input_shape)).astype(np.float32)
    got = onnx_predict(tmp_path / "cnn.onnx", x)
    assert scaled_diff(got, get_adapter("numpy").build(spec, weights=w).predict(x)) <= 1e-5
    assert scaled_diff(got, files["cnn_model"].predict(x.transpose(0, 2, 3, 1), verbose=0)) <= 1e-5


def test_export_of_a_spec_writes_its_seeded_initial_weights(tmp_path, capsys):
    onnx_module()
    for seed in (None, 3):
        target = tmp_path / f"lenet5_{seed}.onnx"
        seeded = ["--seed", str(seed)] if seed else []
        code, out, err = main(capsys, "export", "lenet5", "--onnx", str(target), *seeded)
        assert code == 0, err
        assert f"the spec's initial weights, seed {seed or 0}" in out and "N dynamic" in out
        spec = zoo.get("lenet5")
        x = np.random.default_rng(0).standard_normal((2, *spec.input_shape)).astype(np.float32)
        ref = get_adapter("numpy").build(spec, weights=init_weights(spec, seed or 0)).predict(x)
        assert scaled_diff(onnx_predict(target, x), ref) <= 1e-5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_export_past_protobufs_limit_writes_external_data_beside_the_file(tmp_path, capsys, monkeypatch):
    onnx_module()
    from nncompare.interop import onnx_export
    monkeypatch.setattr(onnx_export, "PROTO_LIMIT", 0)
    code, _, err = main(capsys, "export", "mlp", "--onnx", str(tmp_path / "p.onnx"))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.onnx", "p.onnx.data"]
    assert os.path.getsize(tmp_path / "p.onnx") < 10_000 < os.path.getsize(tmp_path / "p.onnx.data")
    spec = zoo.get("mlp")
    x = np.random.default_rng(0).standard_normal((3, 784)).astype(np.float32)
    assert scaled_diff(onnx_predict(tmp_path / "p.onnx", x),
                       get_adapter("numpy").build(spec).predict(x)) <= 1e-5


def test_export_refuses_bad_targets_and_options(files, tmp_path, capsys, monkeypatch):
    onnx_module()
    os.mkfifo(tmp_path / "fifo.onnx")
    (tmp_path / "folder.onnx").mkdir()
    one_line_exit_2(*main(capsys, "export", "mlp", "--onnx", str(tmp_path / "folder.onnx"))[::2], "is a directory")
    one_line_exit_2(*main(capsys, "export", "mlp", "--onnx", str(tmp_path / "fifo.onnx"))[::2],
                    "it is not a regular file")
    one_line_exit_2(*main(capsys, "export", files["onnx"], "--onnx", files["onnx"])[::2], "it is also the input")
    one_line_exit_2(*main(capsys, "export", files["onnx"], "--onnx", str(tmp_path / "x.onnx"), "--seed", "1")[::2],
                    "holds its own weights")
    one_line_exit_2(*main(capsys, "export", "resnet9000", "--onnx", str(tmp_path / "x.onnx"))[::2], "unknown model")
    monkeypatch.setitem(sys.modules, "onnx", None)
    one_line_exit_2(*main(capsys, "export", "mlp", "--onnx", str(tmp_path / "x.onnx"))[::2],
                    "export --onnx needs onnx, which is not installed: pip install 'nncompare[onnx]'")
    assert not (tmp_path / "x.onnx").exists()
