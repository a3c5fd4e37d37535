"""Model files on the command line: a .keras or .onnx file is imported as (spec, canonical weights) wherever a model
is named, its weights travel to every cell, `check` runs the source model itself beside the ports, and `export`
writes the ONNX file of any model. Nothing here imports a framework until a model file is read."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import stat
import sys
import tempfile
import zipfile

import numpy as np

from .backends import BackendError
from .cell import write_weights
from .errors import UsageError
from .files import open_input, short
from .models import ModelSpec, SpecError

# A model file larger than this is refused before any reader loads it (Keras' VGG16 is 0.5 GiB; an ONNX file
# holds at most 2 GiB, larger weights sit in a .data file beside it).
MAX_MODEL_BYTES = 4 * 2 ** 30
MAX_CONFIG_BYTES = 64 * 2 ** 20  # a .keras file's config.json: ResNet50's is 0.3 MiB
SOURCES = {".keras": "keras", ".onnx": "onnx"}  # a model file's extension -> the framework it comes from
WHAT = {"keras": "Keras model file", "onnx": "ONNX model file"}
# KERAS_BACKEND -> (the package it needs, the extra that installs it)
KERAS_ENGINES = {"tensorflow": ("tensorflow", "keras"), "jax": ("jax", "jax"), "torch": ("torch", "torch")}


def source_of(argument: str) -> str | None:
    """"keras" or "onnx" for a model file argument (by its extension), None for a zoo name or a spec file."""
    return SOURCES.get(os.path.splitext(argument)[1].lower())


def require(packages: list[tuple[str, str]], why: str) -> None:
    """[(import name, pip extra)] all importable, else one BackendError naming the missing ones and the extra."""
    missing = [(m, e) for m, e in packages if importlib.util.find_spec(m) is None]
    if missing:
        extra = missing[0][1]
        verb = "is" if len(missing) == 1 else "are"
        raise BackendError(f"{why} needs {', '.join(m for m, _ in missing)}, which {verb} not installed: "
                           f"pip install 'nncompare[{extra}]' (or pip install -e '.[{extra}]' from a checkout)")


def _readers(source: str) -> list[tuple[str, str]]:
    if source == "onnx":
        return [("onnx", "onnx")]
    engine = KERAS_ENGINES.get(os.environ.get("KERAS_BACKEND") or "tensorflow")
    return [("keras", "keras")] + ([engine] if engine else [])


@contextlib.contextmanager
def quiet_stderr():
    """Standard error's descriptor on /dev/null while a framework loads or first runs in this process: TensorFlow's
    C++ start-up lines (absl, oneDNN) ignore TF_CPP_MIN_LOG_LEVEL. Errors come out as exceptions, after it."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 to begin with: nothing to quiet
        yield
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)
        os.close(saved)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def _keras_code_layer(path: str) -> tuple[str, str] | None:
    """(name, class) of the first layer in a .keras file's config that is Python code rather than a Keras layer (a
    Lambda, a custom class): Keras' safe loading refuses those with a message that names neither."""
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("config.json")
            if info.file_size > MAX_CONFIG_BYTES:
                return None
            config = json.loads(z.read(info))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, RecursionError):
        return None  # not a readable .keras archive: Keras' own error says so
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))
        elif isinstance(node, dict):
            for layer in node.get("layers") if isinstance(node.get("layers"), list) else []:
                if isinstance(layer, dict) and isinstance(layer.get("config"), dict):
                    module, kind = str(layer.get("module")), str(layer.get("class_name"))
                    if kind == "Lambda" or not (module == "keras" or module.startswith("keras.")):
                        return str(layer["config"].get("name")), kind
            stack.extend(reversed([v for v in node.values() if isinstance(v, (dict, list))]))
    return None


def import_file(path: str) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """The (spec, canonical weights) of a .keras or .onnx file: a regular file of at most MAX_MODEL_BYTES, read by
    nncompare.interop; what it cannot import exactly is one error naming the layer or node."""
    source = source_of(path)
    what = WHAT[source]
    fd = open_input(path, what)  # a missing file, a folder or a FIFO: refused before a reader blocks on it
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size > MAX_MODEL_BYTES:
        raise UsageError(f"{short(path)} is larger than {MAX_MODEL_BYTES // 2 ** 30} GiB: refused as a {what}")
    if not size:
        raise UsageError(f"{short(path)} is empty: no model in it")
    require(_readers(source), f"reading {short(path)}")
    code = _keras_code_layer(path) if source == "keras" else None
    if code:
        from .interop.keras_import import SUPPORTED
        raise SpecError(f"{path}: layer {code[0]!r} ({code[1]}): layer type {code[1]} is not supported: a layer "
                        f"that is Python code cannot be imported exactly (supported: {', '.join(SUPPORTED)})")
    from . import interop
    try:
        with quiet_stderr():
            return interop.from_keras(path) if source == "keras" else interop.from_onnx(path)
    except (SpecError, BackendError, UsageError):
        raise
    except ImportError as e:
        raise BackendError(f"reading {short(path)}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001  (a reader's own failure on a malformed file: one line, no traceback)
        raise SpecError(f"{path}: cannot import the {what}: {type(e).__name__}: {_first_line(e)}") from None


class ImportedWeights:
    """Imported models' weights on their way to the cells: one .npz per model in a private temporary folder, written
    once and removed when the command ends (close). A task carries the file's path and the weights' hash, which is
    what its --resume identity holds of them."""

    def __init__(self):
        self.folder: str | None = None
        self.arrays: dict[str, dict[str, np.ndarray]] = {}  # label -> weights
        self._fields: dict[str, dict] = {}

    def add(self, label: str, weights: dict[str, np.ndarray]) -> None:
        try:
            if self.folder is None:
                self.folder = tempfile.mkdtemp(prefix="nncompare-weights-")
            path = os.path.join(self.folder, f"model{len(self._fields)}.npz")
            self._fields[label] = {"weights": path, "weights_sha256": write_weights(path, weights)}
        except OSError as e:
            raise UsageError(f"cannot write the weights of {label!r} for the cells to a temporary folder: "
                             f"{e.strerror or e}") from None
        self.arrays[label] = weights

    def fields(self, label: str) -> dict:
        """The Task fields carrying `label`'s weights: none for a zoo model or spec file (their seeded init)."""
        return self._fields.get(label, {})

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


# --- check: the source model itself ------------------------------------------------------------------
def _in_batches(run, x: np.ndarray, fixed) -> np.ndarray:
    """run(x), in slices of a model's fixed batch size where it has one."""
    if not isinstance(fixed, int) or fixed <= 0 or fixed == len(x):
        return np.asarray(run(x))
    if len(x) % fixed:
        raise ValueError(f"the model's fixed batch size {fixed} does not divide check's {len(x)} samples")
    return np.concatenate([np.asarray(run(x[i:i + fixed])) for i in range(0, len(x), fixed)])


def original_output(path: str, x: np.ndarray) -> tuple[np.ndarray, str]:
    """The source model's own output for canonical (NCHW) inputs and what ran it: Keras on the .keras file
    (channels-last images), ONNX Runtime on the .onnx file."""
    if source_of(path) == "keras":
        with quiet_stderr():
            import keras
            model = keras.saving.load_model(path, compile=False)
            image = x.ndim == 4

            def run(batch):
                return keras.ops.convert_to_numpy(model(batch.transpose(0, 2, 3, 1) if image else batch,
                                                        training=False))
            out = _in_batches(run, x, model.inputs[0].shape[0])
        return (out.transpose(0, 3, 1, 2) if out.ndim == 4 else out), f"Keras {keras.__version__} on " \
                                                                     f"{keras.backend.backend()}"
    require([("onnxruntime", "onnx")], f"running {short(path)} itself")
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name, fixed = session.get_inputs()[0].name, session.get_inputs()[0].shape[0]
    return _in_batches(lambda batch: session.run(None, {name: batch})[0], x, fixed), \
        f"ONNX Runtime {ort.__version__} on the file"


def original_row(path: str, spec: ModelSpec, weights: dict, n: int = 8, seed: int = 0) -> tuple[dict, str]:
    """check's row for the source model (its own output on check's input against the float64 oracle's, judged as
    an engine's logits are) and a line saying what ran it. The source's output includes a softmax or sigmoid head,
    so the oracle's does too."""
    from .backends import get_adapter
    from .backends.check import TOLERANCE, sample_batch, scaled_diff
    label = f"{source_of(path)} (original)"
    x, _ = sample_batch(spec, n, seed)  # the input every engine's logits are checked on
    try:
        got, ran = original_output(path, x)
    except BackendError as e:
        return {"backend": label, "error": _first_line(e)}, ""
    except Exception as e:  # noqa: BLE001  (the source framework's own failure: this row's error)
        return {"backend": label, "error": f"{type(e).__name__}: {_first_line(e)}"}, ""
    ref = get_adapter("numpy").build(spec, weights=weights).predict(x)
    diff = scaled_diff(got, ref)  # a shape that differs is inf: never reshaped into agreement
    head = f" after its {spec.head} head" if spec.head else ""
    return ({"backend": label, "diffs": {"logits": diff}, "where": {}, "jitter": {}, "ok": diff <= TOLERANCE,
             "tolerance": TOLERANCE},
            f"{label}: {short(path, 60)} run by {ran}; its output{head} against the oracle's, from the imported "
            "weights")


# --- export --------------------------------------------------------------------------------------------
def write_onnx(spec: ModelSpec, weights: dict, path: str) -> None:
    """The ONNX model of (spec, weights) at `path`, written whole or not at all: into a temporary folder beside
    it, then moved into place (weights past protobuf's 2 GiB go to `path`.data, moved first)."""
    from . import interop
    parent, name = os.path.dirname(path) or ".", os.path.basename(path)
    folder = tempfile.mkdtemp(dir=parent, prefix=f".{name[:64]}.")
    try:
        interop.to_onnx(spec, weights, os.path.join(folder, name))
        mode = stat.S_IMODE(os.stat(path).st_mode) if os.path.isfile(path) else None  # a replaced file keeps its own
        moves = [(data, os.path.join(parent, data)) for data in [name + ".data"]
                 if os.path.exists(os.path.join(folder, data))] + [(name, path)]
        for written, target in moves:
            if os.path.lexists(target) and (os.path.islink(target) or not os.path.isfile(target)):
                raise OSError(f"will not write over {target!r}: it is not a regular file")
            with open(os.path.join(folder, written), "rb+") as f:
                if mode is not None:
                    os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
        for written, target in moves:
            os.replace(os.path.join(folder, written), target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
