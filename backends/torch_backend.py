"""PyTorch adapter: nn.Sequential in NCHW, canonical weights, torch.optim SGD/Adam."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models import Activation, AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D

from .base import Adam, Adapter, BackendError, SGD, as_inputs, gpu_index


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
            self.running_var.lerp_(invstd.pow(-2) - self.eps, 1 - self.momentum)
        return out


class Softmax1(nn.Module):
    """Softmax over channels/features (dim 1 of the canonical layout)."""

    def forward(self, x):
        return torch.softmax(x, dim=1)


_ACTS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "softmax": Softmax1}


def _act(kind: str) -> list[nn.Module]:
    return [] if kind == "linear" else [_ACTS[kind]()]


class TorchAdapter(Adapter):
    """nn.Sequential, eager mode; each spec layer is one child module (a Sequential when it has parts)."""

    name = "torch"

    @classmethod
    def version(cls) -> str:
        return f"torch {torch.__version__}"

    @property
    def execution_path(self) -> str:
        return "torch.compile" if self.compile else "eager"

    @classmethod
    def set_threads(cls, n: int) -> None:
        torch.set_num_threads(n)

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else super().device_name

    def peak_device_memory(self):
        return torch.cuda.max_memory_allocated(self.dev) if self.dev.type == "cuda" else None

    def _build(self) -> None:
        index = gpu_index(self.device, "torch", torch.cuda.device_count())
        if index is not None:
            self.dev = torch.device("cuda", index)
            torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would break float32 equivalence
            torch.backends.cudnn.allow_tf32 = False
        else:
            self.dev = torch.device("cpu")
        self.layers = self.spec.logits_layers()
        self.infos = self.spec.infos[:len(self.layers)]
        self.native = nn.Sequential(*(self._module(l, i.in_shape) for l, i in zip(self.layers, self.infos))).to(self.dev)
        self._run = torch.compile(self.native) if self.compile else self.native  # shares native's parameters

    @staticmethod
    def _module(layer, in_shape) -> nn.Module:
        if isinstance(layer, Dense):
            return nn.Sequential(nn.Linear(in_shape[0], layer.units), *_act(layer.activation))
        if isinstance(layer, Conv2D):
            (pt, pb), (pl, pr) = layer.pads(in_shape)
            kh, kw = layer.param_shapes(in_shape)["kernel"][2:]
            parts = []
            if pt == pb and pl == pr:
                padding = (pt, pl)
            else:  # TF "same" puts the odd pixel bottom/right; torch's padding="same" refuses stride > 1
                parts.append(nn.ZeroPad2d((pl, pr, pt, pb)))
                padding = 0
            parts.append(nn.Conv2d(in_shape[0], layer.filters, (kh, kw), layer.strides, padding))
            return nn.Sequential(*parts, *_act(layer.activation))
        if isinstance(layer, (MaxPool2D, AvgPool2D)):
            k, s = layer.window()
            return (nn.MaxPool2d if isinstance(layer, MaxPool2D) else nn.AvgPool2d)(k, s)
        if isinstance(layer, Flatten):
            return nn.Flatten()
        if isinstance(layer, Activation):
            return nn.Sequential(*_act(layer.activation))
        if isinstance(layer, Dropout):
            return nn.Dropout(layer.rate)
        if isinstance(layer, BatchNorm):
            return CanonicalBatchNorm(in_shape[0], layer.momentum, layer.epsilon)
        raise BackendError(f"torch backend: unsupported layer {type(layer).__name__}")

    # --- weights: canonical key -> (tensor, to canonical, from canonical) ------------------------
    def _params(self) -> dict[str, tuple[torch.Tensor, bool]]:
        """Canonical key -> (native tensor, whether it is a transposed Dense kernel)."""
        out = {}
        for layer, info, module in zip(self.layers, self.infos, self.native):
            name = info.name
            if isinstance(layer, (Dense, Conv2D)):
                core = next(m for m in module if isinstance(m, (nn.Linear, nn.Conv2d)))
                out[f"{name}/kernel"] = (core.weight, isinstance(layer, Dense))  # Linear is (out, in)
                out[f"{name}/bias"] = (core.bias, False)
            elif isinstance(layer, BatchNorm):
                for key, t in (("gamma", module.weight), ("beta", module.bias),
                               ("moving_mean", module.running_mean), ("moving_var", module.running_var)):
                    out[f"{name}/{key}"] = (t, False)
        return out

    def get_weights(self):
        return {k: (t.detach().T if tr else t.detach()).cpu().numpy().astype(np.float32, copy=True)
                for k, (t, tr) in self._params().items()}

    def set_weights(self, weights):
        self._check_weights(weights)
        with torch.no_grad():
            for k, (t, tr) in self._params().items():
                w = torch.as_tensor(np.asarray(weights[k], np.float32))
                t.copy_(w.T if tr else w)

    # --- inference ------------------------------------------------------------------------------
    def _tensor(self, x):
        return torch.from_numpy(as_inputs(self.spec, x)).to(self.dev)

    @torch.no_grad()
    def logits(self, x):
        self.native.eval()
        return self._run(self._tensor(x)).cpu().numpy()

    @torch.no_grad()
    def layer_outputs(self, x):
        self.native.eval()
        h, out = self._tensor(x), {}
        for info, module in zip(self.infos, self.native):
            h = module(h)
            out[info.name] = h.cpu().numpy()
        return out

    # --- training -------------------------------------------------------------------------------
    def _loss(self, z, y):
        if z.shape[1] == 1:
            return F.binary_cross_entropy_with_logits(z.reshape(-1), y.to(z.dtype))
        return F.cross_entropy(z.reshape(len(z), -1), y.long())

    def loss_and_grads(self, x, y):
        params = self._params()
        saved = {k: t.detach().clone() for k, (t, _) in params.items() if not t.requires_grad}
        self.native.train()
        self.native.zero_grad(set_to_none=True)
        loss = self._loss(self.native(self._tensor(x)), torch.as_tensor(np.asarray(y), device=self.dev))
        loss.backward()
        with torch.no_grad():  # a training forward moved the BatchNorm statistics: put them back
            for k, v in saved.items():
                params[k][0].copy_(v)
        grads = {k: (params[k][0].grad.T if params[k][1] else params[k][0].grad).cpu().numpy().copy()
                 for k in self.spec.trainable_keys()}
        self.native.zero_grad(set_to_none=True)
        return float(loss.detach()), grads

    def set_optimizer(self, optimizer):
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
        self.native.train()
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(self.dev, non_blocking=True)
        yt = torch.from_numpy(np.asarray(y)).to(self.dev, non_blocking=True)
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss(self._run(xt), yt)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
