"""PyTorch adapter: one nn.Module walking the spec's graph in NCHW, canonical weights, torch.optim SGD/Adam.
Layer kinds map to torch modules through CONVERTERS."""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.spec import (INPUT, Activation, AdaptiveAvgPool2D, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D,
                           Dense, Dropout, Flatten, GlobalAveragePooling2D, LayerNormalization, MaxPool2D, Multiply,
                           NORMALIZATION_EPSILON, Normalization, Rescaling, ZeroPadding2D, parse_activation)

from .base import Adam, Adapter, BackendError, SGD, as_inputs, converter, gpu_index, inference_inputs

# channels_last memory format, per device type. CPU, measured (interleaved A/B, CPU seconds of 1 thread on the
# shared 2-core machine): cifar_cnn b64 +27% (364 -> 462 samples/s), lenet5 b64 +7% (noise-level). Not used: its
# batch-norm kernel sums the batch statistics less accurately (relative error 1e-6..3e-6 at 16k-65k elements per
# channel, nchw 1e-7), enough to flip ReLU kinks in resnet20: gradients 1e-2 off the oracle, tolerance 1e-4.
# CUDA: not measured here, so the default layout.
CHANNELS_LAST = {"cpu": False, "cuda": False}
_MODULE_DICT_ATTRS = nn.ModuleDict()  # ModuleDict refuses keys that are its attribute names ("keys", "to", ...)


class CanonicalBatchNorm(nn.Module):
    """BatchNorm with the spec's meaning: moving = m * moving + (1 - m) * batch, biased variance.

    nn.BatchNorm uses momentum = weight of the new value and the unbiased variance for running_var.
    """

    def __init__(self, channels: int, momentum: float, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.momentum, self.eps = momentum, eps

    def forward(self, x):
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        # The fused kernel without running stats: it returns the batch mean and 1/sqrt(biased var + eps),
        # from which the canonical (biased, old-value-weighted) moving statistics follow.
        out, mean, invstd = torch.native_batch_norm(x, self.weight, self.bias, None, None, True, 0.0, self.eps)
        with torch.no_grad():
            self.running_mean.lerp_(mean, 1 - self.momentum)
            # clamp: for a constant channel, rounding of 1/invstd^2 - eps can give a variance of -1 ulp(eps)
            self.running_var.lerp_((invstd.pow(-2) - self.eps).clamp_(min=0), 1 - self.momentum)
        return out


class Softmax1(nn.Module):
    """Softmax over channels/features (dim 1 of the canonical layout)."""

    def forward(self, x):
        return torch.softmax(x, dim=1)


class _Add(nn.Module):
    def forward(self, x, *rest):
        for t in rest:
            x = x + t
        return x


class _Concat(nn.Module):
    """Concatenation along canonical axis 1 (channels of NCHW, features of flat)."""

    def forward(self, *xs):
        return torch.cat(xs, dim=1)


class _Multiply(nn.Module):
    """Elementwise product; with a per-channel gate (index `gate`) it broadcasts over H and W."""

    def __init__(self, gate: int | None):
        super().__init__()
        self.gate = gate

    def forward(self, x, *rest):
        if self.gate is not None:
            xs = (x,) + rest
            image, gate = xs[1 - self.gate], xs[self.gate]
            return image * gate.reshape(gate.shape[0], gate.shape[1], 1, 1)
        for t in rest:
            x = x * t
        return x


class _GlobalAvgPool(nn.Module):
    def __init__(self, keepdims: bool = False):
        super().__init__()
        self.keepdims = keepdims

    def forward(self, x):
        return x.mean(dim=(2, 3), keepdim=self.keepdims)


class _Rescaling(nn.Module):
    def __init__(self, scale: float, offset: float):
        super().__init__()
        self.scale, self.offset = scale, offset

    def forward(self, x):
        return x * self.scale + self.offset


class _Normalization(nn.Module):
    """(x - mean) / max(sqrt(variance), 1e-7) per channel or feature; mean and variance are buffers (no gradient)."""

    def __init__(self, channels: int, image: bool):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("variance", torch.ones(channels))
        self.shape = (1, channels, 1, 1) if image else (1, channels)

    def forward(self, x):
        scale = self.variance.sqrt().clamp(min=NORMALIZATION_EPSILON)
        return (x - self.mean.reshape(self.shape)) / scale.reshape(self.shape)


class _LayerNorm(nn.LayerNorm):
    """LayerNorm over dim 1: the channels of an NCHW image at each position (moved last for torch's kernel, which
    normalises trailing dims), or the features of a flat input."""

    def forward(self, x):
        if self.normalized_shape[0] == 1:
            # x - mean is exactly 0 over one channel; the fused kernel's x * rstd - mean * rstd leaves rounding
            # noise there, whose gamma gradient Adam scales up to a step of its own
            xc = x - x.mean(dim=1, keepdim=True)
            shape = (1, 1) + (1,) * (x.dim() - 2)
            y = xc * torch.rsqrt(xc.square().mean(dim=1, keepdim=True) + self.eps)
            return y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if x.dim() == 2:
            return super().forward(x)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _PaddedMaxPool(nn.Module):
    """Max pooling with asymmetric pads (TF "same", explicit) and any ceil_mode overhang padded here with -inf, so
    padded cells never win; then a plain floor pool."""

    def __init__(self, pads, kernel, strides):
        super().__init__()
        (pt, pb), (pl, pr) = pads
        self.pad, self.kernel, self.strides = (pl, pr, pt, pb), kernel, strides

    def forward(self, x):
        return F.max_pool2d(F.pad(x, self.pad, value=float("-inf")), self.kernel, self.strides)


class _PaddedAvgPool(nn.Module):
    """Average pooling with asymmetric pads (and any ceil_mode overhang) padded here: a window sum over the
    zero-padded input divided by the cells the spec counts under each window (`counted`: 1 on a counted cell of
    the padded input), computed once: the input size is fixed by the spec."""

    def __init__(self, pads, kernel, strides, counted: torch.Tensor):
        super().__init__()
        (pt, pb), (pl, pr) = pads
        self.pad, self.kernel, self.strides = (pl, pr, pt, pb), kernel, strides
        self.register_buffer("count", F.avg_pool2d(counted[None, None], kernel, strides, divisor_override=1),
                             persistent=False)

    def forward(self, x):
        return F.avg_pool2d(F.pad(x, self.pad), self.kernel, self.strides, divisor_override=1) / self.count


# --- converters: spec layer -> (module, {param: (getter of the native tensor, transposed Dense kernel?)}) -----
# Getters, not tensors: Module.to() replaces buffers (BatchNorm statistics) with new tensors.
def _binding(module: nn.Module, attr: str, transposed: bool = False):
    return functools.partial(getattr, module, attr), transposed


def _activation(spec: str, inplace: bool = False) -> nn.Module | None:
    """The module computing one spec activation (None for linear). inplace: ReLU and ReLU6 overwrite their input,
    which must be a tensor nothing else reads (a Dense's or Conv2D's own output); their gradient reads only
    their result. inception_mini's out-of-place ReLUs cost 5 % of a batch-32 inference call."""
    kind, alpha = parse_activation(spec)
    if kind == "linear":
        return None
    if inplace and kind in ("relu", "relu6"):
        return (nn.ReLU if kind == "relu" else nn.ReLU6)(inplace=True)
    return {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "softmax": Softmax1,
            "leaky_relu": lambda: nn.LeakyReLU(alpha),  # torch's default slope is 0.01, the spec's 0.2
            "elu": lambda: nn.ELU(alpha), "softplus": nn.Softplus, "silu": nn.SiLU,
            "gelu": lambda: nn.GELU(approximate="none"), "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
            "relu6": nn.ReLU6, "hard_sigmoid": nn.Hardsigmoid,  # relu6(x + 3) / 6: the spec's (trap 28)
            "hard_swish": nn.Hardswish}[kind]()


def _sequence(*parts: nn.Module | None) -> nn.Module:
    parts = [p for p in parts if p is not None]
    return nn.Identity() if not parts else parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def _dense(layer: Dense, info):
    core = nn.Linear(info.in_shape[0], layer.units)  # weight (out, in): the canonical kernel is (in, out)
    params = {"kernel": _binding(core, "weight", True), "bias": _binding(core, "bias")}
    return _sequence(core, _activation(layer.activation, inplace=True)), params


def _conv2d(layer: Conv2D, info):
    (pt, pb), (pl, pr) = layer.pads(info.in_shape)
    symmetric = pt == pb and pl == pr
    kh, kw = layer.param_shapes(info.in_shape)["kernel"][2:]
    # torch pads symmetrically only: TF "same" puts the odd pixel bottom/right (and torch's padding="same"
    # refuses stride > 1), explicit pads may differ on every side
    pad = None if symmetric else nn.ZeroPad2d((pl, pr, pt, pb))
    # weight (out, in // groups, kh, kw): the canonical layout, grouped and depthwise included
    core = nn.Conv2d(info.in_shape[0], layer.filters, (kh, kw), layer.strides, (pt, pl) if symmetric else 0,
                     dilation=layer.dilation, groups=layer.groups, bias=layer.use_bias)
    params = {"kernel": _binding(core, "weight")} | ({"bias": _binding(core, "bias")} if layer.use_bias else {})
    return _sequence(pad, core, _activation(layer.activation, inplace=True)), params


def _pool(layer, info):
    (k, s), ((pt, pb), (pl, pr)) = layer.window(), layer.pads(info.in_shape)
    is_max = isinstance(layer, MaxPool2D)
    if pt == pb and pl == pr:
        # torch's own: -inf padding for max; its ceil_mode is the spec's, and its average divisor clips a ceil_mode
        # window to the padded input, as the spec does (count_include_pad=False is TF's average, trap 17)
        if is_max:
            return nn.MaxPool2d(k, s, (pt, pl), ceil_mode=layer.ceil_mode), {}
        return nn.AvgPool2d(k, s, (pt, pl), ceil_mode=layer.ceil_mode, count_include_pad=layer.count_include_pad), {}
    eh, ew = layer.overhang(info.in_shape)
    pads = (pt, pb + eh), (pl, pr + ew)  # the overhang of a ceil_mode window padded too: then a floor pool
    if is_max:
        return _PaddedMaxPool(pads, k, s), {}
    h, w = info.in_shape[1:]
    if layer.count_include_pad:  # the explicit pads count, the overhang never does
        counted = F.pad(torch.ones(h + pt + pb, w + pl + pr), (0, ew, 0, eh))
    else:
        counted = F.pad(torch.ones(h, w), (pl, pr + ew, pt, pb + eh))
    return _PaddedAvgPool(pads, k, s, counted), {}


def _multiply(layer: Multiply, info):
    return _Multiply(Multiply.gate(info.in_shapes)), {}


def _normalization(layer: Normalization, info):
    norm = _Normalization(info.in_shape[0], len(info.in_shape) == 3)
    return norm, {"mean": _binding(norm, "mean"), "variance": _binding(norm, "variance")}


def _layernorm(layer: LayerNormalization, info):
    ln = _LayerNorm(info.in_shape[0], eps=layer.epsilon)  # biased variance, as the spec's
    return ln, {"gamma": _binding(ln, "weight"), "beta": _binding(ln, "bias")}


def _batchnorm(layer: BatchNorm, info):
    bn = CanonicalBatchNorm(info.in_shape[0], layer.momentum, layer.epsilon)
    return bn, {"gamma": _binding(bn, "weight"), "beta": _binding(bn, "bias"),
                "moving_mean": _binding(bn, "running_mean"), "moving_var": _binding(bn, "running_var")}


CONVERTERS = {
    Dense: _dense,
    Conv2D: _conv2d,
    MaxPool2D: _pool,
    AvgPool2D: _pool,
    GlobalAveragePooling2D: lambda layer, info: (_GlobalAvgPool(layer.keepdims), {}),
    AdaptiveAvgPool2D: lambda layer, info: (nn.AdaptiveAvgPool2d(info.out_shape[1:]), {}),  # the spec's bins
    ZeroPadding2D: lambda layer, info: (nn.ZeroPad2d(tuple(v for p in layer.pads()[::-1] for v in p)), {}),
    Flatten: lambda layer, info: (nn.Flatten(), {}),  # logical (C, H, W) order, whatever the memory format
    Activation: lambda layer, info: (_sequence(_activation(layer.activation)), {}),
    Dropout: lambda layer, info: (nn.Dropout(layer.rate), {}),
    BatchNorm: _batchnorm,
    Add: lambda layer, info: (_Add(), {}),
    Concatenate: lambda layer, info: (_Concat(), {}),
    Multiply: _multiply,
    Rescaling: lambda layer, info: (_Rescaling(layer.scale, layer.offset), {}),
    Normalization: _normalization,
    LayerNormalization: _layernorm,
}


class Graph(nn.Module):
    """The spec's graph: a ModuleDict of nodes run in topological order, each on the outputs of its inputs;
    a value is dropped once no later node needs it."""

    def __init__(self, nodes: list[tuple[str, nn.Module, tuple[str, ...]]]):
        super().__init__()
        # ":" never occurs in a spec name: the escaped key cannot collide with another node's
        self.keys = [f":{name}" if hasattr(_MODULE_DICT_ATTRS, name) else name for name, _, _ in nodes]
        self.nodes = nn.ModuleDict({key: module for key, (_, module, _) in zip(self.keys, nodes)})
        self.names = [name for name, _, _ in nodes]
        self.inputs = [inputs for _, _, inputs in nodes]
        last_use = {}
        for i, inputs in enumerate(self.inputs):
            last_use.update({name: i for name in inputs})
        self.free = [[n for n in dict.fromkeys(inputs) if last_use[n] == i] for i, inputs in enumerate(self.inputs)]
        # A plain chain runs as one flat list of modules, as nn.Sequential does: the name bookkeeping of walk()
        # and the (Dense, activation) Sequential wrappers cost 3-4 % of mlp b32's step (docs/performance.md).
        chain = all(inputs == ((INPUT,) if i == 0 else (self.names[i - 1],)) for i, inputs in enumerate(self.inputs))
        self.chain = [m for module in self.nodes.values()
                      for m in (module if isinstance(module, nn.Sequential) else (module,))] if chain else None

    def walk(self, x, keep: bool = False) -> dict[str, torch.Tensor]:
        """The last node's output by name; with keep=True every node's output."""
        values = {INPUT: x}
        for key, name, inputs, free in zip(self.keys, self.names, self.inputs, self.free):
            values[name] = self.nodes[key](*(values[i] for i in inputs))
            if not keep:
                for n in free:
                    del values[n]
        values.pop(INPUT, None)
        return values

    def forward(self, x):
        if self.chain is None:
            return self.walk(x)[self.names[-1]]
        for module in self.chain:
            x = module(x)
        return x


class TorchAdapter(Adapter):
    """A Graph module, eager (or torch.compile'd); weights are mapped by canonical key through the
    converters' bindings."""

    name = "torch"

    @classmethod
    def version(cls) -> str:
        return f"torch {torch.__version__}"

    @property
    def execution_path(self) -> str:
        return "torch.compile" if self.compile else "eager"

    @property
    def settings(self) -> dict:
        """The performance settings in effect, recorded with each timing."""
        s = {"memory_format": self.memory_format, "bn": "native_batch_norm", "cudnn_benchmark": self.cudnn_benchmark,
             "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}
        if self.dev.type == "cuda":
            s |= {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32}
        return s

    @classmethod
    def _set_threads(cls, n: int) -> None:
        torch.set_num_threads(n)

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else super().device_name

    def peak_device_memory(self):
        return torch.cuda.max_memory_allocated(self.dev) if self.dev.type == "cuda" else None

    def _seed(self, seed: int) -> None:
        torch.manual_seed(seed)  # torch seeds its global generator afresh in every process

    def _build(self) -> None:
        index = gpu_index(self.device, "torch", torch.cuda.device_count())
        if index is not None:
            self.dev = torch.device("cuda", index)
            torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would break float32 equivalence
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = True  # input shapes are fixed per cell: pick the fastest algorithms
        else:
            self.dev = torch.device("cpu")
        self.cudnn_benchmark = self.dev.type == "cuda"
        channels_last = CHANNELS_LAST[self.dev.type]
        self._format = torch.channels_last if channels_last else torch.contiguous_format
        self.memory_format = "channels_last" if channels_last else "contiguous"
        self._host_inputs = self.dev.type == "cpu" and not channels_last  # from_numpy's tensor is ready as it is
        self.infos = self.spec.logits_infos()
        self._binary, self._flat_logits = self.spec.num_classes == 1, len(self.spec.output_shape) == 1
        self._params = {}  # canonical key -> (getter of the native tensor, whether it is a transposed Dense kernel)
        nodes = []
        for info in self.infos:
            module, params = converter(CONVERTERS, info, "torch")(info.layer, info)
            nodes.append((info.name, module, info.inputs))
            self._params.update({f"{info.name}/{k}": b for k, b in params.items()})
        self.native = Graph(nodes).to(self.dev, memory_format=self._format)
        self._run = torch.compile(self.native) if self.compile else self.native  # shares native's parameters

    # --- weights ---------------------------------------------------------------------------------
    def get_weights(self):
        out = {}
        for k, (get, tr) in self._params.items():
            t = get().detach()
            out[k] = (t.T if tr else t).cpu().numpy().astype(np.float32, copy=True)
        return out

    def _set_weights(self, weights):
        with torch.no_grad():
            for k, (get, tr) in self._params.items():
                a = np.asarray(weights[k], np.float32)
                # torch warns on a read-only array (a broadcast view) though copy_ only reads it
                w = torch.as_tensor(a if a.flags.writeable else a.copy())
                get().copy_(w.T if tr else w)

    # --- data ------------------------------------------------------------------------------------
    def _place(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dev, non_blocking=True)
        return x.contiguous(memory_format=self._format) if x.dim() == 4 else x

    def _tensor(self, x) -> torch.Tensor:
        return self._place(torch.from_numpy(as_inputs(self.spec, x)))

    def _to_device(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch as tensors on this network's device (and memory format), for _train_batch; copies, so
        the tensors never alias the host arrays (on the CPU from_numpy would share their memory)."""
        x = self._place(torch.tensor(as_inputs(self.spec, x)))
        return x, torch.tensor(np.asarray(y, np.int64), device=self.dev)

    def _mode(self, training: bool) -> None:
        """Switch training/inference mode only when it changes: Module.train() walks every submodule."""
        if self.native.training != training:
            self.native.train(training)

    # --- inference -------------------------------------------------------------------------------
    def logits(self, x):
        self._mode(False)
        t = torch.from_numpy(inference_inputs(self.spec, x))
        with torch.inference_mode():  # no autograd bookkeeping at all: cheaper per call than no_grad
            z = self._run(t if self._host_inputs else self._place(t))
        return z.numpy() if self._host_inputs else z.cpu().numpy()

    @torch.no_grad()
    def layer_outputs(self, x):
        self._mode(False)
        return {name: np.ascontiguousarray(v.cpu().numpy())
                for name, v in self.native.walk(self._tensor(x), keep=True).items()}

    # --- training --------------------------------------------------------------------------------
    def _loss(self, z, y):
        """Mean loss from logits and int64 labels (placed as int64 once, not converted every step)."""
        if self._binary:
            return F.binary_cross_entropy_with_logits(z.reshape(-1), y.to(z.dtype))
        return F.cross_entropy(z if self._flat_logits else z.reshape(len(z), -1), y)

    def _loss_and_grads(self, x, y):
        tensors = {k: (get(), tr) for k, (get, tr) in self._params.items()}
        saved = {k: t.detach().clone() for k, (t, _) in tensors.items() if not t.requires_grad}
        self._mode(True)
        self.native.zero_grad(set_to_none=True)
        xt, yt = self._to_device(x, y)
        loss = self._loss(self.native(xt), yt)
        loss.backward()
        with torch.no_grad():  # a training forward moved the BatchNorm statistics: put them back
            for k, v in saved.items():
                tensors[k][0].copy_(v)
        grads = {}
        for k in self.spec.trainable_keys():
            t, tr = tensors[k]
            grads[k] = (t.grad.T if tr else t.grad).cpu().numpy().copy()
        self.native.zero_grad(set_to_none=True)
        return float(loss.detach()), grads

    def _set_optimizer(self, optimizer):
        self.optimizer = optimizer
        params = self.native.parameters()
        if isinstance(optimizer, SGD):
            self.opt = torch.optim.SGD(params, lr=optimizer.lr, momentum=optimizer.momentum)
        elif isinstance(optimizer, Adam):
            self.opt = torch.optim.Adam(params, lr=optimizer.lr, betas=(optimizer.beta1, optimizer.beta2),
                                        eps=optimizer.epsilon)
        else:
            raise BackendError(f"torch backend: unsupported optimizer {optimizer!r}")

    def _train_batch(self, x, y):
        """One step on NumPy arrays, or on tensors already placed by to_device."""
        self._mode(True)
        xt = x if isinstance(x, torch.Tensor) else self._place(torch.from_numpy(np.ascontiguousarray(x)))
        if not isinstance(y, torch.Tensor):
            y = torch.from_numpy(np.asarray(y, np.int64)).to(self.dev, non_blocking=True)
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss(self._run(xt), y)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
