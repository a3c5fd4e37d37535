"""The adapter contract every framework implements, optimizer configs, and shared helpers."""
from __future__ import annotations

import inspect
import math
import numbers
import platform
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Iterator

import numpy as np

from ..models import ModelSpec, init_weights


class BackendError(RuntimeError):
    """A backend that cannot be used as asked: unknown, not installed, a device it cannot see, or bad
    arguments (inputs, labels, weights, optimizer, training settings) at the adapter boundary."""


# field -> (lowest, whether the lowest is allowed, highest or None, whether the highest is allowed)
_OPTIMIZER_RANGES = {"lr": (0.0, True, None, False), "momentum": (0.0, True, 1.0, False),
                     "beta1": (0.0, True, 1.0, False), "beta2": (0.0, True, 1.0, False),
                     "epsilon": (0.0, False, None, False)}
MAX_LR = 1e6  # and at most MAX_LR for epsilon: far past any useful value, far below float32's 3.4e38
MIN_EPSILON = 1e-30  # float32 holds it (and MXNet's bias-scaled copy of it) as a normal number
MIN_ONE_MINUS_BETA = 1e-7  # float32 rounds a beta within 3e-8 of 1 to 1: its moments would never move


def _check_optimizer_fields(opt) -> None:
    """Every field a finite real number in its range (lr >= 0: lr=0 is a deliberate no-op step), stored as a
    Python float: ints, Fractions and NumPy scalars reach no framework as such."""
    for f in fields(opt):
        v, (lo, lo_ok, hi, hi_ok) = getattr(opt, f.name), _OPTIMIZER_RANGES[f.name]
        what = f"{type(opt).__name__}: field {f.name!r}: must be"
        try:
            x = float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else None
        except (OverflowError, ValueError, TypeError):  # an int past float's range
            x = None
        ok = (x is not None and math.isfinite(x) and (x >= lo if lo_ok else x > lo)
              and (hi is None or (x <= hi if hi_ok else x < hi)))
        if not ok:
            want = f"{'>=' if lo_ok else '>'} {lo:g}" if hi is None else \
                f"in {'[' if lo_ok else '('}{lo:g}, {hi:g}{']' if hi_ok else ')'}"
            raise BackendError(f"{what} a finite number {want}, got {v!r}"[:300])
        if f.name in ("lr", "epsilon") and x > MAX_LR:
            raise BackendError(f"{what} at most {MAX_LR:g}, got {v!r}")
        if f.name == "epsilon" and x < MIN_EPSILON:
            raise BackendError(f"{what} at least {MIN_EPSILON:g} (float32 flushes smaller values to 0), got {v!r}")
        if f.name.startswith("beta") and x > 1 - MIN_ONE_MINUS_BETA:
            raise BackendError(f"{what} at most {1 - MIN_ONE_MINUS_BETA!r} (1 - {MIN_ONE_MINUS_BETA:g}): the "
                               f"frameworks keep Adam's moments in float32, which rounds betas this close to 1 to 1 "
                               f"or near it, got {v!r}")
        object.__setattr__(opt, f.name, x)


@dataclass(frozen=True)
class SGD:
    """SGD with momentum, PyTorch's form: v = momentum * v + g; w -= lr * v (Keras/MXNet agree at fixed lr).
    lr in [0, 1e6], momentum in [0, 1); any real number, stored as a float."""

    lr: float = 0.01
    momentum: float = 0.0

    def __post_init__(self):
        _check_optimizer_fields(self)


@dataclass(frozen=True)
class Adam:
    """Adam as in Kingma & Ba, Algorithm 1: w -= lr * m_hat / (sqrt(v_hat) + epsilon), bias-corrected.
    lr in [0, 1e6]; beta1, beta2 in [0, 1 - 1e-7] (float32 rounds betas closer to 1 to 1); epsilon in [1e-30, 1e6]."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8

    def __post_init__(self):
        _check_optimizer_fields(self)


Optimizer = SGD | Adam


def check_optimizer(optimizer: Any) -> Optimizer:
    """`optimizer` itself if it is an SGD or Adam config, else a BackendError saying what to pass."""
    if isinstance(optimizer, (SGD, Adam)):
        return optimizer
    hint = f"; make_optimizer({optimizer!r}) builds one from a name" if isinstance(optimizer, str) else ""
    raise BackendError(f"optimizer: must be an SGD(...) or Adam(...) config from nncompare.backends, "
                       f"got {type(optimizer).__name__} {optimizer!r}"[:300] + hint)


def make_optimizer(name: str, lr: float | None = None, momentum: float = 0.9) -> Optimizer:
    """An optimizer config from a CLI-style name ("sgd", "adam")."""
    if name == "sgd":
        return SGD(lr=0.01 if lr is None else lr, momentum=momentum)
    if name == "adam":
        return Adam(lr=1e-3 if lr is None else lr)
    raise BackendError(f"unknown optimizer {name!r} (known: sgd, adam)")


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' -> ('cpu', 0); 'gpu', 'cuda', 'gpu:1', 'cuda:1' -> ('gpu', index)."""
    if not isinstance(device, str):
        raise BackendError(f"device must be a string (cpu, gpu, gpu:N or cuda:N), "
                           f"got {type(device).__name__} {device!r}"[:200])
    m = re.fullmatch(r"(cpu|gpu|cuda)(?::(\d{1,4}))?", device.strip().lower(), re.ASCII)
    if not m or (m.group(1) == "cpu" and int(m.group(2) or 0) != 0):  # "cpu:5" would silently mean the CPU
        raise BackendError(f"unknown device {device!r} (use cpu, gpu, gpu:N or cuda:N)"[:200])
    return ("cpu" if m.group(1) == "cpu" else "gpu"), int(m.group(2) or 0)


def batch_indices(n: int, batch_size: int, epoch: int, seed: int = 0, shuffle: bool = True) -> Iterator[np.ndarray]:
    """The batch order every framework shares: a seeded permutation per epoch, last partial batch kept."""
    n, batch_size = _check_int("n", n, 0), _check_int("batch_size", batch_size, 1)
    epoch, seed = _check_int("epoch", epoch, 0), _check_int("seed", seed, 0)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def gpu_index(device: str, framework: str, count: int) -> int | None:
    """The GPU index `device` asks for (None for the CPU), or an error naming the devices the framework sees."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return None
    if index >= count:
        seen = ", ".join(["cpu"] + [f"gpu:{i}" for i in range(count)])
        raise BackendError(f"{framework} cannot use {device!r}: it sees {seen}")
    return index


def cpu_name() -> str:
    """The CPU model name, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_processors(cpuinfo: str | None = None) -> list[dict[str, str]]:
    """/proc/cpuinfo (or the text given) as one {field: value} per processor; [] where there is none."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return []
    procs = []
    for block in cpuinfo.split("\n\n"):
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)}
        if "processor" in fields:
            procs.append(fields)
    return procs


def physical_cores(processors: list[dict[str, str]]) -> int | None:
    """Distinct (physical id, core id) pairs among `processors`; None where one has no core id or there are none."""
    if not processors or any("core id" not in p for p in processors):
        return None
    return len({(p.get("physical id"), p["core id"]) for p in processors})


def _first_bad(mask: np.ndarray) -> int | tuple[int, ...]:
    """The index of the first True in `mask`, an int for a vector."""
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))
    return idx[0] if len(idx) == 1 else idx


def _numeric(what: str, a: Any) -> np.ndarray:
    """`a` as a bool, integer or float array, or a BackendError naming `what`."""
    if a is None or isinstance(a, (str, bytes)):
        raise BackendError(f"{what}: must be a numeric array, got {type(a).__name__}")
    try:
        arr = np.asarray(a)
    except (ValueError, TypeError, RuntimeError) as e:  # ragged nesting, tensors that refuse conversion
        raise BackendError(f"{what}: not a numeric array ({e})") from None
    if arr.dtype.kind not in "biuf":
        raise BackendError(f"{what}: dtype {arr.dtype} is not numeric (bool, int or float)")
    return arr


def _as_float32(what: str, a: np.ndarray) -> np.ndarray:
    """`a` as a C-contiguous float32 array whose every value is finite, or a BackendError naming the first
    value that is not (NaN, inf, or a float64 beyond float32's range)."""
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: reported below
        a32 = np.ascontiguousarray(a, dtype=np.float32)
    # A float64 sum of float32 values cannot overflow, and NaN/inf propagate: one pass, no temporary array.
    if a.dtype.kind == "f" and not math.isfinite(a32.sum(dtype=np.float64)):
        i = _first_bad(~np.isfinite(a32))
        v = a[i].item()
        why = "is not finite" if not math.isfinite(v) else "is outside float32's range"
        raise BackendError(f"{what}: value {v!r} at index {i} {why}")
    return a32


def _check_int(what: str, v: Any, lowest: int) -> int:
    """`v` as an int, if it is an integer (not a bool) >= lowest."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lowest:
        raise BackendError(f"{what}: must be an integer >= {lowest}, got {v!r}"[:200])
    return int(v)


def _check_bool(what: str, v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise BackendError(f"{what}: must be True or False, got {v!r}"[:200])
    return bool(v)


def as_inputs(spec: ModelSpec, x: Any) -> np.ndarray:
    """Validate inputs and convert them to canonical float32 (N, *input_shape), C-contiguous and writable:
    a non-empty batch of finite numbers."""
    a = _numeric("inputs", x)
    if a.shape[1:] != spec.input_shape:
        hint = ""
        if a.shape == spec.input_shape:
            hint = " (one sample needs a batch axis: x[None])"
        elif len(spec.input_shape) == 3 and a.shape[1:] == spec.input_shape[1:] + spec.input_shape[:1]:
            hint = " (channels-last? inputs are NCHW: x.transpose(0, 3, 1, 2))"
        raise BackendError(f"inputs: shape {a.shape} does not match the spec's input_shape: expected "
                           f"(N, {', '.join(map(str, spec.input_shape))}){hint}")
    if len(a) == 0:
        raise BackendError("inputs: empty (0 samples)")
    x32 = _as_float32("inputs", a)
    return x32 if x32.flags.writeable else x32.copy()  # torch.from_numpy warns on a read-only array


_FLOAT32 = np.dtype(np.float32)


def inference_inputs(spec: ModelSpec, x: Any) -> np.ndarray:
    """Inputs for logits and predict. A non-empty, C-contiguous, aligned, writable float32 ndarray of the spec's
    shape goes to the engine as it is, its values unscanned (a NaN gives NaN outputs, as the frameworks themselves
    do): the scan costs more than a batch-1 call of a small net in ONNX Runtime. Anything else goes through
    as_inputs."""
    # carray: C-contiguous, aligned and writeable in one flag; `is`: float32 in native byte order (a singleton)
    if type(x) is np.ndarray and x.dtype is _FLOAT32 and x.shape[1:] == spec.input_shape and len(x) and x.flags.carray:
        return x
    return as_inputs(spec, x)


def as_labels(spec: ModelSpec, y: Any, n: int | None = None) -> np.ndarray:
    """Validate class labels for `spec` (and `n` inputs) and convert them to int64 (N,).

    Labels are shape (N,) or (N, 1); integers, or floats holding whole numbers (1.0 is class 1, 1.5 is an
    error); in 0..outputs-1, or 0/1 for a one-output (binary) head.
    """
    a = _numeric("labels", y)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise BackendError(f"labels: shape {a.shape}: expected (N,) or (N, 1) class indices "
                           f"(not one-hot rows or probabilities)")
    if n is not None and len(a) != n:
        raise BackendError(f"labels: {len(a)} labels for {n} input samples (x and y must have the same length)")
    if a.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(a) | (a != np.trunc(a))
        if bad.any():
            i = _first_bad(bad)
            raise BackendError(f"labels: {a[i].item()!r} at index {i} is not a class index "
                               f"(labels are integers, or floats holding whole numbers)")
    classes = spec.num_classes
    top = 1 if classes == 1 else classes - 1
    bad = (a < 0) | (a > top)
    if bad.any():
        i = _first_bad(bad)
        where = "a binary head (1 output: labels 0 or 1)" if classes == 1 else f"{classes} outputs (0..{top})"
        raise BackendError(f"labels: class {int(a[i])} at index {i} is out of range for {where}")
    return a.astype(np.int64)


def converter(table: Mapping, info, backend: str, error: type[Exception] = BackendError):
    """`backend`'s converter for the layer kind of `info` (a LayerInfo), or one error naming the kind, the layer
    and the kinds the backend converts: the one lookup every backend's graph walk makes."""
    convert = table.get(type(info.layer))
    if convert is None:
        known = ", ".join(sorted(cls.kind for cls in table))
        raise error(f"{backend}: no converter for layer kind {info.layer.kind!r} (layer {info.index}, {info.name!r}); "
                    f"it converts {known}")
    return convert


class Adapter(ABC):
    """One framework's build of a ModelSpec, speaking the canonical weight layout.

    The public methods live here and check their arguments once, for every framework, then call the backend's
    implementation: `_build`, `get_weights`, `_set_weights`, `logits`, `layer_outputs`, `_loss_and_grads`,
    `_set_optimizer`, `_train_batch`, and where it has them `_to_device`, `_set_threads`, `thread_choices`,
    `use_threads`, `settings`. logits checks its inputs with `inference_inputs`, layer_outputs with `as_inputs`.
    """

    name: ClassVar[str] = ""

    def __init__(self, spec: ModelSpec, device: str = "cpu", compile: bool = False, native_init: bool = True):
        """native_init=False: weights are loaded right after, so the framework may skip its own initialisers."""
        if not isinstance(spec, ModelSpec):
            raise BackendError(f"spec: must be a ModelSpec (nncompare.models), got {type(spec).__name__}")
        self.spec = spec
        kind, index = parse_device(device)
        self.device = "cpu" if kind == "cpu" else f"gpu:{index}"  # " CPU" or "cuda:01" is stored as one name
        self.compile = _check_bool("compile", compile)
        self.native_init = native_init
        self.optimizer: Optimizer | None = None
        self.native: Any = None
        self._build()

    @classmethod
    def build(cls, spec: ModelSpec, device: str = "cpu", seed: int = 0,
              weights: dict[str, np.ndarray] | None = None, optimizer: Optimizer | None = None,
              init: str = "canonical", compile: bool = False) -> "Adapter":
        """Build `spec` on `device`, load weights (given, else the canonical seeded init; init="native"
        keeps the framework's own initialisation), and set the optimizer. compile=True uses the
        framework's compiler for training and inference where it has one (XLA, torch.compile)."""
        if inspect.isabstract(cls):
            raise BackendError(f"{cls.__name__} is the abstract contract: build a backend's adapter, "
                               f"get_adapter(name).build(spec)")
        if not isinstance(init, str) or init not in ("canonical", "native"):
            raise BackendError(f"unknown init {init!r} (known: canonical, native)"[:200])
        seed = _check_int("seed", seed, 0)
        if optimizer is not None:
            check_optimizer(optimizer)
        if weights is not None and not isinstance(weights, Mapping):  # before the (slow) build
            raise BackendError(f"weights: must be a dict of canonical key -> array (as get_weights() returns), "
                               f"got {type(weights).__name__}")
        net = cls(spec, device, compile, native_init=weights is None and init == "native")
        net._seed(seed)
        if weights is not None or init == "canonical":
            net.set_weights(init_weights(spec, seed) if weights is None else weights)
        if spec.trainable_keys():  # frameworks refuse an optimizer over no parameters
            net.set_optimizer(SGD() if optimizer is None else optimizer)
        return net

    # --- what each backend implements --------------------------------------------------------------
    @abstractmethod
    def _build(self) -> None:
        """Create the native network on self.device."""

    def _seed(self, seed: int) -> None:
        """Seed the framework's random draws (dropout masks) so a run repeats itself; none by default."""

    @abstractmethod
    def get_weights(self) -> dict[str, np.ndarray]:
        """All weights (BatchNorm statistics included) as a canonical ordered dict of float32 arrays."""

    @abstractmethod
    def _set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Load a canonical weight dict that _check_weights has checked."""

    @abstractmethod
    def logits(self, x: np.ndarray) -> np.ndarray:
        """Inference-mode outputs before the head activation."""

    @abstractmethod
    def layer_outputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Inference-mode output of every logits layer, keyed by layer name, in canonical (NCHW) layout."""

    @abstractmethod
    def _loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Training-mode mean loss and canonical gradients on checked float32 inputs and int64 (N,) labels."""

    @abstractmethod
    def _set_optimizer(self, optimizer: Optimizer) -> None:
        """Use a checked `optimizer` (fresh state) for training."""

    @abstractmethod
    def _train_batch(self, x: Any, y: Any) -> Any:
        """One optimizer step on checked inputs (host arrays, or what _to_device returned); returns the loss
        as a framework value, not yet fetched to the host."""

    def _to_device(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        """Checked host arrays as the framework's resident tensors; by default they stay host arrays."""
        return x, y

    @classmethod
    def _set_threads(cls, n: int) -> None:
        """Size the framework's CPU thread pools to a checked n (its variables are set before it loads)."""

    # --- the contract: public, checked once here ----------------------------------------------------
    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Load a canonical weight dict (every key and shape of the spec, finite float32 values)."""
        self._set_weights(self._check_weights(weights))

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Training-mode mean loss and canonical gradients of the trainable weights; changes no state."""
        self._check_trainable()
        x = as_inputs(self.spec, x)
        return self._loss_and_grads(x, as_labels(self.spec, y, len(x)))

    def set_optimizer(self, optimizer: Optimizer) -> None:
        """Use `optimizer` (fresh state) for train_step and fit."""
        optimizer = check_optimizer(optimizer)
        self._check_trainable()  # frameworks refuse an optimizer over no parameters, each its own way
        self._set_optimizer(optimizer)

    def to_device(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        """A batch as the framework's own tensors on its device, for train_batch (the timer keeps them resident)."""
        x = as_inputs(self.spec, x)
        return self._to_device(x, as_labels(self.spec, y, len(x)))

    def train_batch(self, x: Any, y: Any) -> Any:
        """One optimizer step on a batch from to_device, unchecked: the timer's call. Returns the loss as a
        framework value (float() fetches it)."""
        return self._train_batch(x, y)

    @classmethod
    def set_threads(cls, n: int) -> None:
        """Size the framework's CPU thread pools, n >= 1 (the environment variables are set before it loads)."""
        cls._set_threads(_check_int("threads", n, 1))

    def thread_choices(self, threads: int) -> list[int]:
        """Operator thread counts worth timing for a cell of `threads` (first: the framework's own choice);
        empty where the framework's count is fixed once it has loaded."""
        return []

    def use_threads(self, n: int) -> None:
        """Run the framework's operators on n threads from now on (only counts thread_choices offered)."""
        raise BackendError(f"{self.name}: its operator thread count cannot change after it loaded")

    @property
    def settings(self) -> dict:
        """What the adapter chose for speed or numerics (recorded in every result row)."""
        return {}

    def sync(self) -> None:
        """Wait until all queued work on the device is done."""

    @property
    def execution_path(self) -> str:
        """How the framework runs the training step (e.g. 'hybridized', 'compiled train function', 'eager')."""
        return "eager"

    @classmethod
    def version(cls) -> str:
        return ""

    @property
    def device_name(self) -> str:
        """Human-readable name of the device this network runs on."""
        return cpu_name()

    def peak_device_memory(self) -> int | None:
        """Peak accelerator memory in bytes, where the framework reports it (None on CPU)."""
        return None

    # --- shared behaviour --------------------------------------------------------------------------
    def _check_trainable(self) -> None:
        if not self.spec.trainable_keys():
            raise BackendError(f"model {self.spec.name!r} has no trainable parameters: nothing to train "
                               f"(no gradients, no optimizer)")

    def _check_optimizer_set(self) -> None:
        if not isinstance(self.optimizer, (SGD, Adam)):
            raise BackendError("no optimizer set: build(..., optimizer=SGD(...)) or call set_optimizer first")

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One optimizer step on a batch; returns its loss."""
        self._check_trainable()
        self._check_optimizer_set()
        x = as_inputs(self.spec, x)
        return float(self._train_batch(x, as_labels(self.spec, y, len(x))))

    def fit(self, x: np.ndarray, y: np.ndarray, epochs: int = 1, batch_size: int = 32,
            optimizer: Optimizer | None = None, seed: int = 0, shuffle: bool = True,
            start_epoch: int = 0) -> dict[str, list[float]]:
        """Train epochs start_epoch .. start_epoch + epochs - 1 over the shared seeded batch order;
        returns {"loss": [mean batch loss per epoch]}."""
        self._check_trainable()
        epochs, batch_size = _check_int("epochs", epochs, 0), _check_int("batch_size", batch_size, 1)
        seed, start_epoch = _check_int("seed", seed, 0), _check_int("start_epoch", start_epoch, 0)
        shuffle = _check_bool("shuffle", shuffle)
        x = as_inputs(self.spec, x)
        y = as_labels(self.spec, y, len(x))
        if optimizer is not None:
            self.set_optimizer(optimizer)
        self._check_optimizer_set()
        history = []
        for epoch in range(start_epoch, start_epoch + epochs):
            handles, sizes = [], []
            for idx in batch_indices(len(x), batch_size, epoch, seed, shuffle):
                handles.append(self._train_batch(x[idx], y[idx]))
                sizes.append(len(idx))
            losses = np.array([float(h) for h in handles])
            history.append(float(np.average(losses, weights=sizes)))
        return {"loss": history}

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Inference-mode outputs for canonical NCHW inputs: the logits with the head activation applied."""
        return self._predict(x)

    def _predict(self, x) -> np.ndarray:
        """predict's work; an engine that runs the head itself overrides it (NumPy here: 6 us a small call)."""
        z = self.logits(x)
        if self.spec.head is None:
            return z
        z = z.astype(np.float64)
        if self.spec.head == "sigmoid":
            return (0.5 * (1 + np.tanh(0.5 * z))).astype(np.float32)  # 1 / (1 + exp(-z)) without overflow
        e = np.exp(z - z.max(axis=1, keepdims=True))  # softmax over channels/features: canonical axis 1
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> tuple[float, float]:
        """Inference-mode (mean loss, accuracy) over a dataset, in batches."""
        batch_size = _check_int("batch_size", batch_size, 1)
        x = as_inputs(self.spec, x)
        y = as_labels(self.spec, y, len(x))
        z = np.concatenate([self.logits(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        z = z.reshape(len(z), -1).astype(np.float64)
        predicted = (z[:, 0] > 0).astype(np.int64) if z.shape[1] == 1 else z.argmax(axis=1)
        return float(loss_and_dlogits(z, y)[0]), float((predicted == y).mean())

    def _check_weights(self, weights: Any) -> dict[str, np.ndarray]:
        """The weights as {canonical key: numeric array} in the spec's key order, after checking them: a
        mapping with exactly the spec's keys and shapes, every value finite in float32, and non-negative
        BatchNorm variances. Arrays keep their dtype (the float64 oracle keeps float64 weights)."""
        if not isinstance(weights, Mapping):
            raise BackendError(f"weights: must be a dict of canonical key -> array (as get_weights() returns), "
                               f"got {type(weights).__name__}")
        expected = self.spec.param_shapes()
        missing = [k for k in expected if k not in weights]
        extra = [k for k in weights if k not in expected]
        if missing or extra:
            raise BackendError(f"weights do not fit model {self.spec.name!r}: "
                               f"missing {missing[:3]}, unexpected {extra[:3]}"[:400])
        checked = {}
        for k, shape in expected.items():
            a = _numeric(f"weight {k!r}", weights[k])
            if a.shape != tuple(shape):
                raise BackendError(f"weight {k!r}: shape {a.shape}, the spec needs {tuple(shape)}")
            a32 = _as_float32(f"weight {k!r}", a)
            if k.endswith(("/moving_var", "/variance")) and (a32 < 0).any():
                i = _first_bad(a32 < 0)
                raise BackendError(f"weight {k!r}: variance {a[i].item()!r} at index {i} is negative")
            checked[k] = np.ascontiguousarray(a)  # a view with negative strides (np.flip) reaches no framework
        return checked


def loss_and_dlogits(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy (or binary cross-entropy for one output) from logits, and d loss / d z.
    Labels are class indices, (N,) or (N, 1)."""
    n = len(z)
    z = z.reshape(n, -1)
    y = np.asarray(y).reshape(-1)  # (N, 1) labels would broadcast against arange(n) into an (N, N) pick
    if len(y) != n:
        raise BackendError(f"labels: {len(y)} labels for {n} logits")
    if z.shape[1] == 1:
        t = y.reshape(n, 1).astype(z.dtype)
        loss = np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))
        return float(loss.mean()), (1 / (1 + np.exp(-z)) - t) / n
    shifted = z - z.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    y = y.astype(np.int64)
    d = np.exp(logp)
    d[np.arange(n), y] -= 1
    return float(-logp[np.arange(n), y].mean()), d / n
