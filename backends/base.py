"""The adapter contract every framework implements, optimizer configs, and shared helpers."""
from __future__ import annotations

import platform
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import numpy as np

from ..models import ModelSpec, init_weights


class BackendError(RuntimeError):
    """A backend that cannot be used as asked: unknown, not installed, or a device it cannot see."""


@dataclass(frozen=True)
class SGD:
    """SGD with momentum, PyTorch's form: v = momentum * v + g; w -= lr * v (Keras/MXNet agree at fixed lr)."""

    lr: float = 0.01
    momentum: float = 0.0


@dataclass(frozen=True)
class Adam:
    """Adam as in Kingma & Ba, Algorithm 1: w -= lr * m_hat / (sqrt(v_hat) + epsilon), bias-corrected."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8


Optimizer = SGD | Adam


def make_optimizer(name: str, lr: float | None = None, momentum: float = 0.9) -> Optimizer:
    """An optimizer config from a CLI-style name ("sgd", "adam")."""
    if name == "sgd":
        return SGD(lr=0.01 if lr is None else lr, momentum=momentum)
    if name == "adam":
        return Adam(lr=1e-3 if lr is None else lr)
    raise BackendError(f"unknown optimizer {name!r} (known: sgd, adam)")


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' -> ('cpu', 0); 'gpu', 'cuda', 'gpu:1', 'cuda:1' -> ('gpu', index)."""
    m = re.fullmatch(r"(cpu|gpu|cuda)(?::(\d+))?", str(device).strip().lower())
    if not m:
        raise BackendError(f"unknown device {device!r} (use cpu, gpu, gpu:N or cuda:N)")
    return ("cpu" if m.group(1) == "cpu" else "gpu"), int(m.group(2) or 0)


def batch_indices(n: int, batch_size: int, epoch: int, seed: int = 0, shuffle: bool = True) -> Iterator[np.ndarray]:
    """The batch order every framework shares: a seeded permutation per epoch, last partial batch kept."""
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


def as_inputs(spec: ModelSpec, x: Any) -> np.ndarray:
    """Validate and convert inputs to canonical float32 (N, *input_shape)."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[1:] != spec.input_shape:
        raise BackendError(f"input shape {x.shape[1:]} does not match the spec's input_shape {spec.input_shape}")
    return x


class Adapter(ABC):
    """One framework's build of a ModelSpec, speaking the canonical weight layout.

    Subclasses build their native network in `_build` and keep it in `self.native`.
    """

    name: ClassVar[str] = ""

    def __init__(self, spec: ModelSpec, device: str = "cpu", compile: bool = False):
        self.spec = spec
        self.device = device
        self.compile = compile
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
        if init not in ("canonical", "native"):
            raise BackendError(f"unknown init {init!r} (known: canonical, native)")
        net = cls(spec, device, compile)
        if weights is not None or init == "canonical":
            net.set_weights(init_weights(spec, seed) if weights is None else weights)
        if spec.trainable_keys():  # frameworks refuse an optimizer over no parameters
            net.set_optimizer(optimizer or SGD())
        return net

    # --- the contract ------------------------------------------------------------------------------
    @abstractmethod
    def _build(self) -> None:
        """Create the native network on self.device."""

    @abstractmethod
    def get_weights(self) -> dict[str, np.ndarray]:
        """All weights (BatchNorm statistics included) as a canonical ordered dict of float32 arrays."""

    @abstractmethod
    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Load a canonical weight dict."""

    @abstractmethod
    def logits(self, x: np.ndarray) -> np.ndarray:
        """Inference-mode outputs before the head activation."""

    @abstractmethod
    def layer_outputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Inference-mode output of every logits layer, keyed by layer name, in canonical (NCHW) layout."""

    @abstractmethod
    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Training-mode mean loss and canonical gradients of the trainable weights; changes no state."""

    @abstractmethod
    def set_optimizer(self, optimizer: Optimizer) -> None:
        """Use `optimizer` (fresh state) for train_step and fit."""

    @abstractmethod
    def _train_batch(self, x: np.ndarray, y: np.ndarray) -> Any:
        """One optimizer step; returns the loss as a framework value (not yet fetched to host)."""

    def sync(self) -> None:
        """Wait until all queued work on the device is done."""

    @property
    def execution_path(self) -> str:
        """How the framework runs the training step (e.g. 'hybridized', 'compiled train function', 'eager')."""
        return "eager"

    @classmethod
    def version(cls) -> str:
        return ""

    @classmethod
    def set_threads(cls, n: int) -> None:
        """Size the framework's CPU thread pools (the environment variables are set before it loads)."""

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
            raise BackendError(f"model {self.spec.name!r} has no trainable parameters: nothing to train")

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One optimizer step on a batch; returns its loss."""
        self._check_trainable()
        return float(self._train_batch(as_inputs(self.spec, x), np.asarray(y)))

    def fit(self, x: np.ndarray, y: np.ndarray, epochs: int = 1, batch_size: int = 32,
            optimizer: Optimizer | None = None, seed: int = 0, shuffle: bool = True,
            start_epoch: int = 0) -> dict[str, list[float]]:
        """Train epochs start_epoch .. start_epoch + epochs - 1 over the shared seeded batch order;
        returns {"loss": [mean batch loss per epoch]}."""
        self._check_trainable()
        if optimizer is not None:
            self.set_optimizer(optimizer)
        x, y = as_inputs(self.spec, x), np.asarray(y)
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
        z = self.logits(x)
        if self.spec.head is None:
            return z
        z = z.astype(np.float64)
        if self.spec.head == "sigmoid":
            return (1 / (1 + np.exp(-z))).astype(np.float32)
        e = np.exp(z - z.max(axis=1, keepdims=True))  # softmax over channels/features: canonical axis 1
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> tuple[float, float]:
        """Inference-mode (mean loss, accuracy) over a dataset, in batches."""
        z = np.concatenate([self.logits(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        z = z.reshape(len(z), -1).astype(np.float64)
        y = np.asarray(y)
        predicted = (z[:, 0] > 0).astype(np.int64) if z.shape[1] == 1 else z.argmax(axis=1)
        return float(loss_and_dlogits(z, y)[0]), float((predicted == y).mean())

    def _check_weights(self, weights: dict[str, np.ndarray]) -> None:
        expected = self.spec.param_shapes()
        missing = [k for k in expected if k not in weights]
        extra = [k for k in weights if k not in expected]
        if missing or extra:
            raise BackendError(f"weights do not fit model {self.spec.name!r}: "
                               f"missing {missing[:3]}, unexpected {extra[:3]}")
        for k, shape in expected.items():
            if tuple(np.shape(weights[k])) != tuple(shape):
                raise BackendError(f"weight {k!r}: shape {np.shape(weights[k])}, the spec needs {shape}")


def loss_and_dlogits(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy (or binary cross-entropy for one output) from logits, and d loss / d z."""
    n = len(z)
    z = z.reshape(n, -1)
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
