"""ONNX Runtime adapter, inference only: the spec's logits graph exported by nncompare.interop's ONNX writer
(weights as initializers) and run in an InferenceSession, the head activation as a second output of the same run
(in NumPy it costs 6 us a call, a fifth of a small net's batch-1 latency). It does not train: the training
methods raise.

layer_outputs is complete: a second session, made on first use, has every logits layer as a graph output.
"""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from ..interop.onnx_export import CONVERTERS, OPSET, build  # CONVERTERS: every layer kind's ONNX nodes
from ..models import INPUT, init_weights

from .base import (Adapter, BackendError, as_inputs, converter, cpu_name, cpu_processors, gpu_index, inference_inputs,
                   physical_cores)

__all__ = ["CONVERTERS", "OnnxRuntimeAdapter"]
_HEAD = "head:predict"  # the head activation's output, where the spec has one; no layer name has a ":"
_NO_TRAINING = ("the onnxruntime backend runs inference only: it does not train (no loss_and_grads, train_step "
                "or fit); use it for predict, logits, layer_outputs and evaluate")


def default_intra_op_threads() -> int | None:
    """ONNX Runtime's own intra-op thread count, one per physical core, when this process may use every CPU;
    else None (also where /proc/cpuinfo does not say)."""
    try:
        if len(os.sched_getaffinity(0)) != os.cpu_count():
            return None
    except AttributeError:
        return None
    return physical_cores(cpu_processors())


class OnnxRuntimeAdapter(Adapter):
    """An InferenceSession over the exported logits graph; set_weights re-exports it. The optimizer a build sets
    is recorded only."""

    name = "onnxruntime"
    _threads: int | None = None  # intra-op threads for sessions made from now on (None: ONNX Runtime's choice)

    @classmethod
    def version(cls) -> str:
        return f"onnxruntime {ort.__version__}"

    @classmethod
    def _set_threads(cls, n: int) -> None:
        cls._threads = n

    @property
    def execution_path(self) -> str:
        return "inference session"

    def _intra_op_threads(self) -> int:
        """0 (ONNX Runtime's default) where the count asked for is its default, one per physical core: only then
        does it pin its threads to cores, as a plain session's are (docs/performance.md)."""
        return 0 if self._threads is None or self._threads == default_intra_op_threads() else self._threads

    @property
    def settings(self) -> dict:
        """The performance settings in effect, recorded with each timing."""
        n = self._options.intra_op_num_threads
        default = f"0: ONNX Runtime's default ({default_intra_op_threads() or '?'}, pinned to cores)"
        return {"intra_op_threads": n or default, "inter_op_threads": 1,
                "execution_mode": "sequential", "graph_optimization": "all", "providers": self.native.get_providers(),
                "opset": OPSET}

    @property
    def device_name(self) -> str:
        return cpu_name() if self._gpu is None else f"CUDA device {self._gpu} (onnxruntime)"

    def _build(self) -> None:
        if self.compile:
            raise BackendError("onnxruntime has no compiled path apart from its default: every session's graph is "
                               "optimized already")
        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        self._gpu = gpu_index(self.device, "onnxruntime", 1 if cuda else 0)
        self._providers = ["CPUExecutionProvider"] if self._gpu is None else [
            ("CUDAExecutionProvider", {"device_id": self._gpu}), "CPUExecutionProvider"]
        self._infos = self.spec.logits_infos()
        for info in self.spec.infos:  # refused here, as every backend does, not deep inside the export
            converter(CONVERTERS, info, "onnxruntime")
        self._all = None  # the session with every layer's output, made on first use
        # there is no framework initialisation to keep: init="native" gets the canonical seeded init
        self._load(init_weights(self.spec, 0))

    def _session(self, outputs: tuple[str, ...] | None = None, head: str | None = None) -> ort.InferenceSession:
        model = build(self.spec, self._weights, self._infos, outputs, head)
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = self._intra_op_threads()
        self._options.inter_op_num_threads = 1
        self._options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(model.SerializeToString(), self._options, providers=self._providers)

    def _load(self, weights) -> None:
        self._weights = {k: np.array(weights[k], np.float32) for k in self.spec.param_shapes()}
        self.native = self._session(head=_HEAD)
        self._outputs = [o.name for o in self.native.get_outputs()]  # named: run() would list them every call
        self._all = None

    # --- weights ---------------------------------------------------------------------------------
    def get_weights(self):
        return {k: v.copy() for k, v in self._weights.items()}

    def _set_weights(self, weights):
        self._load(weights)

    # --- inference -------------------------------------------------------------------------------
    def logits(self, x):
        return self.native.run(self._outputs, {INPUT: inference_inputs(self.spec, x)})[0]

    def _predict(self, x):
        return self.native.run(self._outputs, {INPUT: inference_inputs(self.spec, x)})[-1]

    def layer_outputs(self, x):
        if self._all is None:
            self._all = self._session(tuple(i.name for i in self._infos))
        names = [o.name for o in self._all.get_outputs()]
        return dict(zip(names, self._all.run(None, {INPUT: as_inputs(self.spec, x)})))

    # --- training: none --------------------------------------------------------------------------
    def _set_optimizer(self, optimizer):
        self.optimizer = optimizer

    def _loss_and_grads(self, x, y):
        raise BackendError(_NO_TRAINING)

    def _train_batch(self, x, y):
        raise BackendError(_NO_TRAINING)
