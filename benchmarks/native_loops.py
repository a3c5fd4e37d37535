#!/usr/bin/env python3
"""Hand-written, idiomatic training, inference and batch-1 latency loops of mlp, lenet5, cifar_cnn, resnet20 and
inception_mini in each framework: the independent reference benchmarks/native_vs_adapter.py holds nncompare's
adapters against. Never imports nncompare.

    python benchmarks/native_loops.py FRAMEWORK MODEL BATCH [--mode train|infer|latency] [--steps 10]
                                      [--repeats 5] [--budget 2] [--keras-infer call|predict_on_batch|compiled]
    python benchmarks/native_loops.py FRAMEWORK MODEL 1 --params     # the parameter count, moving statistics included

FRAMEWORK: torch, keras (TensorFlow), keras-jax, keras-torch, mxnet; onnxruntime (infer and latency: a plain
InferenceSession on the hand-written torch model exported by torch.onnx.export). Each run is one fresh process;
it prints one JSON line. train: samples/s (median of the settled repeats), spread, repeats, page faults per
timed step (data in memory as separate per-batch native tensors; SGD with momentum 0.9; softmax cross-entropy
from logits). infer: samples/s of inference-mode calls on host NumPy batches, the result fetched to the host
as NumPy. latency (BATCH 1): p50 and p99 milliseconds of single-sample calls, host in and out. Each also
reports what the framework says about its thread pools.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import numpy as np

SHAPES = {"mlp": (784,), "lenet5": (1, 28, 28), "cifar_cnn": (3, 32, 32), "resnet20": (3, 32, 32),
          "inception_mini": (3, 32, 32)}
MODES = ("train", "infer", "latency")
N_BATCHES = 4
MIN_REPEAT_S = 0.05  # a timed repeat (or latency block) shorter than this is mostly timer and scheduler jitter
MIN_LATENCY_CALLS = 200  # at least this many timed single calls: enough that the 99th percentile means something
LATENCY_WARMUP = 20
LR, MOMENTUM = 0.01, 0.9


def host_batches(model: str, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((batch,) + SHAPES[model]).astype(np.float32),
             rng.integers(0, 10, batch).astype(np.int64)) for _ in range(N_BATCHES)]


def channels_last(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if x.ndim == 4 else x


# --- PyTorch: eager nn.Module, nn.BatchNorm2d, torch.optim.SGD; inference in eval mode under inference_mode ------
def torch_net(model: str):
    """The model as a torch nn.Module, as one writes it in torch (torchvision's style for the residual and
    Inception nets). BatchNorm is the spec's: momentum 0.99 on the old value (torch's 0.01 on the new), epsilon
    1e-3. TF's "same" padding of a stride-2 3x3 conv on an even size puts the odd pixel bottom/right: a
    ZeroPad2d before an unpadded conv; a stride-2 "same" 3x3 max pool there is torch's ceil_mode."""
    import torch
    from torch import nn

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)

    def conv3x3(cin, cout, stride=1, bias=False):
        if stride == 1:
            return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
        return nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(cin, cout, 3, stride, bias=bias))

    class BasicBlock(nn.Module):
        """conv-BN-ReLU, conv-BN, plus the input (or its 1x1 stride-2 projection + BN), then ReLU."""

        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1, self.bn1 = conv3x3(cin, cout, stride), bn(cout)
            self.conv2, self.bn2 = conv3x3(cout, cout), bn(cout)
            self.relu = nn.ReLU(inplace=True)
            self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout)) if stride != 1
                             else nn.Identity())

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += self.shortcut(x)
            return self.relu(out)

    class ResNet20(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(conv3x3(3, 16), bn(16), nn.ReLU(inplace=True))
            blocks, cin = [], 16
            for stage, cout in enumerate((16, 32, 64)):
                for b in range(3):
                    blocks.append(BasicBlock(cin, cout, 2 if stage and not b else 1))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))

    def conv_relu(cin, cout, k):
        return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.ReLU(inplace=True))

    class Inception(nn.Module):
        """1x1, 1x1->3x3, 1x1->5x5 and 3x3 max pool->1x1 branches, concatenated over channels."""

        def __init__(self, cin, c1, r3, c3, r5, c5, cp):
            super().__init__()
            self.b1 = conv_relu(cin, c1, 1)
            self.b3 = nn.Sequential(conv_relu(cin, r3, 1), conv_relu(r3, c3, 3))
            self.b5 = nn.Sequential(conv_relu(cin, r5, 1), conv_relu(r5, c5, 5))
            self.bp = nn.Sequential(nn.MaxPool2d(3, 1, padding=1), conv_relu(cin, cp, 1))

        def forward(self, x):
            return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)

    class InceptionMini(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(conv_relu(3, 16, 3), nn.MaxPool2d(2))
            self.inc1 = Inception(16, 8, 8, 12, 4, 4, 4)
            self.inc2 = Inception(28, 12, 12, 16, 4, 8, 8)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.inc3 = Inception(44, 16, 16, 24, 4, 8, 8)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(56, 10)

        def forward(self, x):
            x = self.inc2(self.inc1(self.stem(x)))
            x = self.inc3(self.pool2(x))
            return self.fc(torch.flatten(self.pool(x), 1))

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), bn(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), bn(cout), nn.ReLU(),
                nn.MaxPool2d(2), nn.Dropout(0.25)]
    layers = {
        "mlp": lambda: [nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)],
        "lenet5": lambda: [nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                           nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
                           nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10)],
        "cifar_cnn": lambda: block(3, 32) + block(32, 64) + [nn.Flatten(), nn.Linear(64 * 8 * 8, 256), nn.ReLU(),
                                                            nn.Dropout(0.5), nn.Linear(256, 10)],
    }
    if model == "resnet20":
        return ResNet20()
    if model == "inception_mini":
        return InceptionMini()
    return nn.Sequential(*layers[model]())


def torch_settings() -> dict:
    import torch
    return {"torch.get_num_threads": torch.get_num_threads(),
            "torch.get_num_interop_threads": torch.get_num_interop_threads()}


def torch_loop(model: str, batch: int):
    import torch
    from torch import nn
    net = torch_net(model)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    loss_fn = nn.CrossEntropyLoss()
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in host_batches(model, batch)]

    def step(i):
        x, y = data[i % N_BATCHES]
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        return loss

    return step, lambda loss: float(loss.detach()), f"torch {torch.__version__}", torch_settings()


def torch_infer(model: str, batch: int):
    """model.eval() and torch.inference_mode(): host NumPy in, NumPy out."""
    import torch
    net = torch_net(model).eval()
    data = [x for x, _ in host_batches(model, batch)]

    def call(i):
        with torch.inference_mode():
            return net(torch.from_numpy(data[i % N_BATCHES])).numpy()

    return call, f"torch {torch.__version__}", torch_settings()


def torch_params(net) -> int:
    """Parameters plus BatchNorm's moving statistics (the spec counts them; num_batches_tracked it has not)."""
    return (sum(p.numel() for p in net.parameters())
            + sum(b.numel() for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var"))))


def export_onnx(model: str, path: str) -> None:
    """The hand-written torch model in eval mode as an ONNX file with a dynamic batch axis (TorchScript
    exporter: the dynamo one needs onnxscript)."""
    import torch
    net = torch_net(model).eval()
    torch.onnx.export(net, (torch.zeros((1,) + SHAPES[model]),), path, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)


# --- ONNX Runtime: a plain InferenceSession on the torch model's export, default session options ------------------
def onnxruntime_infer(model: str, batch: int):
    """The file is exported by a child process (this one never loads torch: its thread pools would sit beside
    ONNX Runtime's); the session has ONNX Runtime's default options."""
    import subprocess
    import tempfile
    import onnxruntime as ort
    with tempfile.TemporaryDirectory(prefix="native_onnx_") as tmp:
        path = os.path.join(tmp, f"{model}.onnx")
        env = {k: v for k, v in os.environ.items() if k != "NNCOMPARE_TURNS"}
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "torch", model, "1", "--export-onnx", path],
                             env=env, capture_output=True, text=True)
        if out.returncode or not os.path.exists(path):
            last = (out.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"torch.onnx.export of {model} failed (exit code {out.returncode}): {last}")
        providers = [p for p in ort.get_available_providers() if p == "CPUExecutionProvider"]
        sess = ort.InferenceSession(path, providers=providers)
    name = sess.get_inputs()[0].name
    data = [x for x, _ in host_batches(model, batch)]

    def call(i):
        return sess.run(None, {name: data[i % N_BATCHES]})[0]

    threads = sess.get_session_options().intra_op_num_threads
    return call, f"onnxruntime {ort.__version__}", {"onnxruntime.intra_op_num_threads": threads,
                                                    "onnxruntime.providers": sess.get_providers()}


# --- Keras 3: channels-last, a compiled train step per the Keras guides ------------------------------------------
def keras_net(model: str):
    """The model in Keras, channels-last: Sequential for the stacks, the functional API for the residual and
    Inception nets. Keras' BatchNormalization defaults are the spec's (momentum 0.99, epsilon 1e-3), its "same"
    padding TF's."""
    import keras
    from keras import layers as L

    if model == "resnet20":
        def conv_bn(x, filters, k, stride=1):
            x = L.Conv2D(filters, k, strides=stride, padding="same" if k > 1 else "valid", use_bias=False)(x)
            return L.BatchNormalization()(x)
        inputs = keras.Input((32, 32, 3))
        x = L.ReLU()(conv_bn(inputs, 16, 3))
        for stage, filters in enumerate((16, 32, 64)):
            for b in range(3):
                stride = 2 if stage and not b else 1
                y = conv_bn(L.ReLU()(conv_bn(x, filters, 3, stride)), filters, 3)
                shortcut = conv_bn(x, filters, 1, stride) if stride != 1 else x
                x = L.ReLU()(L.Add()([y, shortcut]))
        return keras.Model(inputs, L.Dense(10)(L.GlobalAveragePooling2D()(x)), name="resnet20")
    if model == "inception_mini":
        def conv(x, filters, k):
            return L.Conv2D(filters, k, padding="same", activation="relu")(x)

        def inception(x, c1, r3, c3, r5, c5, cp):
            pooled = L.MaxPooling2D(3, strides=1, padding="same")(x)
            return L.Concatenate()([conv(x, c1, 1), conv(conv(x, r3, 1), c3, 3), conv(conv(x, r5, 1), c5, 5),
                                    conv(pooled, cp, 1)])
        inputs = keras.Input((32, 32, 3))
        x = L.MaxPooling2D(2)(conv(inputs, 16, 3))
        x = inception(inception(x, 8, 8, 12, 4, 4, 4), 12, 12, 16, 4, 8, 8)
        x = inception(L.MaxPooling2D(3, strides=2, padding="same")(x), 16, 16, 24, 4, 8, 8)
        return keras.Model(inputs, L.Dense(10)(L.GlobalAveragePooling2D()(x)), name="inception_mini")

    def block(filters):
        return [L.Conv2D(filters, 3, padding="same"), L.BatchNormalization(), L.ReLU(),
                L.Conv2D(filters, 3, padding="same"), L.BatchNormalization(), L.ReLU(),
                L.MaxPooling2D(2), L.Dropout(0.25)]
    stack = {
        "mlp": lambda: [keras.Input((784,)), L.Dense(256, activation="relu"), L.Dense(128, activation="relu"),
                        L.Dense(10)],
        "lenet5": lambda: [keras.Input((28, 28, 1)), L.Conv2D(6, 5, padding="same", activation="relu"),
                           L.MaxPooling2D(2), L.Conv2D(16, 5, activation="relu"), L.MaxPooling2D(2), L.Flatten(),
                           L.Dense(120, activation="relu"), L.Dense(84, activation="relu"), L.Dense(10)],
        "cifar_cnn": lambda: [keras.Input((32, 32, 3))] + block(32) + block(64) + [
            L.Flatten(), L.Dense(256, activation="relu"), L.Dropout(0.5), L.Dense(10)],
    }[model]
    return keras.Sequential(stack())


def keras_model(model: str):
    import keras
    return (keras_net(model), keras.optimizers.SGD(LR, momentum=MOMENTUM),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def keras_tf_loop(model: str, batch: int):
    """"Writing a training loop from scratch in TensorFlow": GradientTape in a tf.function."""
    import keras
    import tensorflow as tf
    net, opt, loss_fn = keras_model(model)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, net(x, training=True))
        grads = tape.gradient(loss, net.trainable_weights)
        opt.apply(grads, net.trainable_weights)
        return loss

    data = [(tf.constant(channels_last(x)), tf.constant(y)) for x, y in host_batches(model, batch)]
    return (lambda i: train_step(*data[i % N_BATCHES]), float,
            f"keras {keras.__version__} / tensorflow {tf.__version__}", keras_settings())


def keras_jax_loop(model: str, batch: int):
    """"Writing a training loop from scratch in JAX": stateless_call in one jax.jit step, state threaded."""
    import jax
    import keras
    net, opt, loss_fn = keras_model(model)
    opt.build(net.trainable_variables)

    def compute_loss(trainable, non_trainable, x, y):
        logits, non_trainable = net.stateless_call(trainable, non_trainable, x, training=True)
        return loss_fn(y, logits), non_trainable

    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)

    @jax.jit
    def train_step(state, x, y):
        trainable, non_trainable, opt_vars = state
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, x, y)
        trainable, opt_vars = opt.stateless_apply(opt_vars, grads, trainable)
        return loss, (trainable, non_trainable, opt_vars)

    state = [([v.value for v in net.trainable_variables], [v.value for v in net.non_trainable_variables],
              [v.value for v in opt.variables])]
    data = [(jax.device_put(channels_last(x)), jax.device_put(y)) for x, y in host_batches(model, batch)]

    def step(i):
        loss, state[0] = train_step(state[0], *data[i % N_BATCHES])
        return loss

    return step, float, f"keras {keras.__version__} / jax {jax.__version__}", {"jax.devices": str(jax.devices())}


def keras_torch_loop(model: str, batch: int):
    """"Writing a training loop from scratch in PyTorch": eager, loss.backward(), the Keras optimizer."""
    import keras
    import torch
    net, opt, loss_fn = keras_model(model)
    opt.build(net.trainable_weights)
    data = [(torch.from_numpy(channels_last(x)), torch.from_numpy(y)) for x, y in host_batches(model, batch)]

    def step(i):
        x, y = data[i % N_BATCHES]
        loss = loss_fn(y, net(x, training=True))
        net.zero_grad()
        loss.backward()
        grads = [v.value.grad for v in net.trainable_weights]
        with torch.no_grad():
            opt.apply(grads, net.trainable_weights)
        return loss

    return (step, lambda loss: float(loss.detach()), f"keras {keras.__version__} / torch {torch.__version__}",
            torch_settings())


# Keras' inference idioms: model(x, training=False) (the Keras FAQ's advice for inputs that fit one batch),
# predict_on_batch (Keras' own predict step, NumPy out), or "compiled": the forward compiled as the engine's
# training guide compiles the step (TensorFlow: tf.function; JAX: jax.jit of stateless_call; torch: the eager call
# under torch.no_grad). The default is the fastest here, on every engine and for batch 64 and batch 1 alike:
# lenet5, interleaved in one process (samples/s, a busy 2-core host), call / predict_on_batch / compiled:
# TensorFlow b64 2,084 / 7,136 / 7,900, b1 77 / 481 / 557; JAX b64 2,002 / 4,389 / 4,101, b1 128 / 1,211 /
# 2,492; torch b64 633 / 612 / 845. predict_on_batch runs the same compiled forward behind Keras' data handling.
KERAS_INFER_HOW = ("call", "predict_on_batch", "compiled")
KERAS_INFER = "compiled"


def keras_settings() -> dict:
    import keras
    engine = keras.backend.backend()
    if engine == "tensorflow":
        import tensorflow as tf
        return {"tf.intra_op_parallelism_threads": tf.config.threading.get_intra_op_parallelism_threads(),
                "tf.inter_op_parallelism_threads": tf.config.threading.get_inter_op_parallelism_threads()}
    if engine == "jax":
        import jax
        return {"jax.devices": str(jax.devices())}
    return torch_settings()


def keras_infer(model: str, batch: int, how: str = KERAS_INFER):
    """Inference on host NumPy batches, channels-last (a Keras user's data), NumPy out."""
    import keras
    net = keras_net(model)
    data = [channels_last(x) for x, _ in host_batches(model, batch)]
    engine = keras.backend.backend()
    if how == "predict_on_batch":
        def call(i):
            return net.predict_on_batch(data[i % N_BATCHES])
    elif how == "call":
        def call(i):
            return keras.ops.convert_to_numpy(net(data[i % N_BATCHES], training=False))
    elif how == "compiled" and engine == "tensorflow":
        import tensorflow as tf
        forward = tf.function(lambda x: net(x, training=False))

        def call(i):
            return forward(data[i % N_BATCHES]).numpy()
    elif how == "compiled" and engine == "jax":
        import jax
        forward = jax.jit(lambda tv, ntv, x: net.stateless_call(tv, ntv, x, training=False)[0])
        tv, ntv = [v.value for v in net.trainable_variables], [v.value for v in net.non_trainable_variables]

        def call(i):
            return np.asarray(forward(tv, ntv, data[i % N_BATCHES]))
    elif how == "compiled":  # torch: eager, without autograd's bookkeeping
        import torch

        def call(i):
            with torch.no_grad():
                return keras.ops.convert_to_numpy(net(data[i % N_BATCHES], training=False))
    else:
        raise ValueError(f"--keras-infer must be one of {', '.join(KERAS_INFER_HOW)}, got {how!r}")
    engine_version = __import__(engine).__version__
    return call, f"keras {keras.__version__} / {engine} {engine_version}", {**keras_settings(), "keras.infer": how}


# --- MXNet Gluon: hybridized with static_alloc, gluon.Trainer, one NDArray per batch ------------------------
def mxnet_import():
    if "bool" not in vars(np):
        np.bool = bool  # MXNet 1.9 uses the alias NumPy 1.24 removed
    import warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import mxnet as mx
    return mx


def mxnet_net(model: str):
    """The model as a Gluon HybridBlock (HybridSequential for the stacks, blocks as GluonCV writes them for the
    residual and Inception nets), uninitialised. BatchNorm is the spec's (momentum 0.99 on the old value,
    epsilon 1e-3); TF's "same" padding of a stride-2 3x3 conv on an even size (the odd pixel bottom/right) is
    an explicit pad, a stride-2 "same" 3x3 max pool there is MXNet's ceil_mode."""
    mxnet_import()
    from mxnet import gluon
    from mxnet.gluon import nn

    def bn():
        return nn.BatchNorm(momentum=0.99, epsilon=1e-3)

    def sequence(*blocks):
        seq = nn.HybridSequential()
        seq.add(*blocks)
        return seq

    class PadBottomRight(gluon.HybridBlock):
        def hybrid_forward(self, F, x):
            return F.pad(x, mode="constant", pad_width=(0, 0, 0, 0, 0, 1, 0, 1))

    def conv3x3(filters, stride=1):
        if stride == 1:
            return nn.Conv2D(filters, 3, padding=1, use_bias=False)
        return sequence(PadBottomRight(), nn.Conv2D(filters, 3, strides=stride, use_bias=False))

    class BasicBlock(gluon.HybridBlock):
        """conv-BN-ReLU, conv-BN, plus the input (or its 1x1 stride-2 projection + BN), then ReLU."""

        def __init__(self, filters, stride, **kwargs):
            super().__init__(**kwargs)
            with self.name_scope():
                self.body = sequence(conv3x3(filters, stride), bn(), nn.Activation("relu"), conv3x3(filters), bn())
                self.shortcut = (sequence(nn.Conv2D(filters, 1, strides=stride, use_bias=False), bn())
                                 if stride != 1 else None)

        def hybrid_forward(self, F, x):
            shortcut = x if self.shortcut is None else self.shortcut(x)
            return F.Activation(self.body(x) + shortcut, act_type="relu")

    def conv_relu(filters, k):
        return nn.Conv2D(filters, k, padding=k // 2, activation="relu")

    class Inception(gluon.HybridBlock):
        """1x1, 1x1->3x3, 1x1->5x5 and 3x3 max pool->1x1 branches, concatenated over channels."""

        def __init__(self, c1, r3, c3, r5, c5, cp, **kwargs):
            super().__init__(**kwargs)
            with self.name_scope():
                self.b1 = conv_relu(c1, 1)
                self.b3 = sequence(conv_relu(r3, 1), conv_relu(c3, 3))
                self.b5 = sequence(conv_relu(r5, 1), conv_relu(c5, 5))
                self.bp = sequence(nn.MaxPool2D(3, 1, padding=1), conv_relu(cp, 1))

        def hybrid_forward(self, F, x):
            return F.concat(self.b1(x), self.b3(x), self.b5(x), self.bp(x), dim=1)

    def block(filters):
        return [nn.Conv2D(filters, 3, padding=1), bn(), nn.Activation("relu"),
                nn.Conv2D(filters, 3, padding=1), bn(), nn.Activation("relu"),
                nn.MaxPool2D(2), nn.Dropout(0.25)]

    def resnet20():
        blocks = [conv3x3(16), bn(), nn.Activation("relu")]
        for stage, filters in enumerate((16, 32, 64)):
            blocks += [BasicBlock(filters, 2 if stage and not b else 1) for b in range(3)]
        return blocks + [nn.GlobalAvgPool2D(), nn.Dense(10)]

    layers = {
        "mlp": lambda: [nn.Dense(256, activation="relu"), nn.Dense(128, activation="relu"), nn.Dense(10)],
        "lenet5": lambda: [nn.Conv2D(6, 5, padding=2, activation="relu"), nn.MaxPool2D(2),
                           nn.Conv2D(16, 5, activation="relu"), nn.MaxPool2D(2), nn.Flatten(),
                           nn.Dense(120, activation="relu"), nn.Dense(84, activation="relu"), nn.Dense(10)],
        "cifar_cnn": lambda: block(32) + block(64) + [nn.Flatten(), nn.Dense(256, activation="relu"),
                                                      nn.Dropout(0.5), nn.Dense(10)],
        "resnet20": resnet20,
        "inception_mini": lambda: [conv_relu(16, 3), nn.MaxPool2D(2), Inception(8, 8, 12, 4, 4, 4),
                                   Inception(12, 12, 16, 4, 8, 8), nn.MaxPool2D(3, 2, ceil_mode=True),
                                   Inception(16, 16, 24, 4, 8, 8), nn.GlobalAvgPool2D(), nn.Dense(10)],
    }[model]
    net = nn.HybridSequential()
    with net.name_scope():
        net.add(*layers())
    return net


def mxnet_array(mx):
    """Host NumPy to an NDArray copied by the engine thread: mx.nd.array of a large array starts an OpenMP team
    on this thread, after which every operator runs slower (trap 21)."""
    def nd(a):
        return mx.nd.from_numpy(np.array(a, np.float32, order="C"), zero_copy=True).copyto(mx.cpu())
    return nd


def mxnet_settings() -> dict:
    return {"mxnet.cpu_workers": int(os.environ.get("MXNET_CPU_WORKER_NTHREADS") or 1),
            "mxnet.engine": os.environ.get("MXNET_ENGINE_TYPE", "ThreadedEnginePerDevice")}


def mxnet_loop(model: str, batch: int, sliced: bool = False):
    mx = mxnet_import()
    from mxnet import autograd, gluon

    net = mxnet_net(model)
    net.initialize(mx.init.Xavier())
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": LR, "momentum": MOMENTUM})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    loss_fn.hybridize(static_alloc=True, static_shape=True)
    # one NDArray per batch: slicing one big NDArray inside autograd.record halves the speed (trap 14)
    nd = mxnet_array(mx)
    data = [(nd(x), nd(y)) for x, y in host_batches(model, batch)]
    big_x = mx.nd.concat(*(x for x, _ in data), dim=0)  # only for --sliced, the trap's demonstration
    big_y = mx.nd.concat(*(y for _, y in data), dim=0)

    def step(i):
        x, y = data[i % N_BATCHES]
        with autograd.record():
            if sliced:
                j = i % N_BATCHES
                x, y = big_x[j * batch:(j + 1) * batch], big_y[j * batch:(j + 1) * batch]
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(batch)
        return loss

    def fetch(loss):
        # the engine runs the last step's backward and update after its loss is ready: a repeat that ended on
        # the loss alone left up to 13 % of its work (cifar_cnn b32) to spill into the next process's turn
        mx.nd.waitall()
        return float(loss.mean().asscalar())

    return step, fetch, f"mxnet {mx.__version__}", mxnet_settings()


def mxnet_infer(model: str, batch: int):
    """The hybridized net outside autograd.record (inference mode): host NumPy in, .asnumpy() out."""
    mx = mxnet_import()
    net = mxnet_net(model)
    net.initialize(mx.init.Xavier())
    net.hybridize(static_alloc=True, static_shape=True)
    nd = mxnet_array(mx)
    data = [x for x, _ in host_batches(model, batch)]

    def call(i):
        return net(nd(data[i % N_BATCHES])).asnumpy()

    return call, f"mxnet {mx.__version__}", mxnet_settings()


def param_count(framework: str, model: str) -> int:
    """The hand-written model's parameters, BatchNorm's moving statistics included (as the spec counts them)."""
    if framework in ("torch", "onnxruntime"):
        return torch_params(torch_net(model))
    if framework in KERAS_BACKEND:
        return keras_net(model).count_params()
    if framework == "mxnet":
        mx = mxnet_import()
        net = mxnet_net(model)
        net.initialize(mx.init.Xavier())
        net(mx.nd.zeros((1,) + SHAPES[model]))  # deferred shapes
        return sum(p.data().size for p in net.collect_params().values())
    raise ValueError(f"unknown framework {framework!r}")


LOOPS = {"torch": torch_loop, "keras": keras_tf_loop, "keras-jax": keras_jax_loop, "keras-torch": keras_torch_loop,
         "mxnet": mxnet_loop}
INFER = {"torch": torch_infer, "keras": keras_infer, "keras-jax": keras_infer, "keras-torch": keras_infer,
         "mxnet": mxnet_infer, "onnxruntime": onnxruntime_infer}
KERAS_BACKEND = {"keras": "tensorflow", "keras-jax": "jax", "keras-torch": "torch"}


def spread(values: list[float]) -> float:
    med = statistics.median(values)
    return (max(values) - min(values)) / 2 / med if med else 0.0


class Turns:
    """Lockstep with other processes (benchmarks/native_vs_adapter.py): $NNCOMPARE_TURNS="GO_FD,DONE_FD"; each
    timed repeat waits for a byte on GO and answers its samples/s ("-" if dropped as too short) on DONE (a
    latency turn: a block of single calls lasting >= 50 ms, answered with its calls/s at the median); EOF on GO
    ends the turns. The same protocol as nncompare's cells, written out again to keep this file independent."""

    def __init__(self, text: str):
        self.go, self.done = (int(v) for v in text.split(","))
        self.say("ready")

    def say(self, text: str) -> None:
        os.write(self.done, (text + "\n").encode())

    def wait(self) -> bool:
        return os.read(self.go, 1) != b""

    @classmethod
    def from_env(cls) -> "Turns | None":
        text = os.environ.pop("NNCOMPARE_TURNS", None)  # popped: a child process never inherits the pipes
        return cls(text) if text else None


def time_loop(step, fetch, batch: int, steps: int, repeats: int, budget: float, k: int = 5, bound: float = 0.03,
              min_repeat_s: float = MIN_REPEAT_S, key: str = "train_samples_s") -> dict:
    """Repeats of `steps` steps until the last k agree within `bound` or `budget` seconds pass (the same rule
    as nncompare's cells, written out again here so this file stays independent); under Turns, until the
    driver ends the turns. `key` names the samples/s in the result (training or inference)."""
    fetch(step(0))  # trace / compile / allocate
    for i in range(2):
        loss = step(i)
    fetch(loss)
    turns = Turns.from_env()
    values: list[float] = []
    faults, ran = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, 0
    start = time.perf_counter()
    while True:
        if turns is not None and not turns.wait():
            break
        t0 = time.perf_counter()
        for i in range(steps):
            loss = step(i)
        fetch(loss)  # every queued step done, the last loss on the host (MXNet's engine is asynchronous)
        seconds = time.perf_counter() - t0
        ran += steps
        short = seconds < min_repeat_s and (turns is not None or time.perf_counter() - start < budget)
        if turns is not None:
            turns.say("-" if short else repr(steps * batch / seconds))
        if short:
            steps = math.ceil(steps * 1.2 * min_repeat_s / max(seconds, 1e-6))
            continue
        values.append(steps * batch / seconds)
        window = values[-k:]
        if turns is None and len(values) >= repeats and (len(window) == k and spread(window) <= bound
                                                          or time.perf_counter() - start >= budget):
            break
    window = values[-k:] or [math.nan]
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / max(ran, 1)
    return {key: statistics.median(window), "spread": spread(window), "repeats": len(values),
            "steps": steps, "noisy": spread(window) > bound, "page_faults_per_step": faults}


def time_latency(call, budget: float, min_calls: int = MIN_LATENCY_CALLS, block_s: float = MIN_REPEAT_S,
                 warmup: int = LATENCY_WARMUP) -> dict:
    """Single calls, each timed alone, in blocks of at least `block_s`, until at least `min_calls` are timed and
    `budget` seconds have passed; under Turns one block per turn, answered with 1 / (median seconds per call
    in the block) (calls/s at the median, so higher is faster, as samples/s), until the driver ends the turns."""
    t0, n = time.perf_counter(), 0
    while n < warmup or (warmup and time.perf_counter() - t0 < block_s):  # caches, allocator, thread pools awake
        call(n)
        n += 1
    turns = Turns.from_env()
    times: list[float] = []
    start = time.perf_counter()
    while True:
        if turns is not None and not turns.wait():
            break
        block, i = [], 0
        end = time.perf_counter() + block_s
        while True:
            t0 = time.perf_counter()
            call(i)
            t1 = time.perf_counter()
            block.append(t1 - t0)
            i += 1
            if t1 >= end:
                break
        if turns is not None:
            turns.say(repr(1 / max(statistics.median(block), 1e-9)))
        times += block
        if turns is None and len(times) >= min_calls and time.perf_counter() - start >= budget:
            break
    if not times:
        return {"latency_p50_ms": math.nan, "latency_p99_ms": math.nan, "latency_calls": 0}
    ordered = sorted(times)  # the 99th percentile by nearest rank, as nncompare's cells take it
    p99 = ordered[max(math.ceil(0.99 * len(ordered)), 1) - 1]
    return {"latency_p50_ms": 1e3 * statistics.median(times), "latency_p99_ms": 1e3 * p99,
            "latency_calls": len(times)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("framework", choices=sorted(set(LOOPS) | set(INFER)))
    p.add_argument("model", choices=sorted(SHAPES))
    p.add_argument("batch", type=int)
    p.add_argument("--mode", choices=MODES, default="train")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=2.0,
                   help="seconds of timing after warm-up (as a cell gives training)")
    p.add_argument("--sliced", action="store_true",
                   help="MXNet only: slice the batches out of one big NDArray inside autograd.record (trap 14)")
    p.add_argument("--keras-infer", choices=KERAS_INFER_HOW,
                   help="Keras engines, infer and latency: model(x, training=False), predict_on_batch or the "
                        f"compiled forward (default: {KERAS_INFER}, the fastest here)")
    p.add_argument("--params", action="store_true", help="print the parameter count (moving statistics included)")
    p.add_argument("--export-onnx", metavar="PATH", help="torch only: write the model as ONNX to PATH and exit")
    args = p.parse_args()
    if args.batch < 1:
        p.error(f"batch must be >= 1, got {args.batch}")
    if args.framework in KERAS_BACKEND:
        os.environ["KERAS_BACKEND"] = KERAS_BACKEND[args.framework]
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.sliced and (args.framework != "mxnet" or args.mode != "train"):
        p.error("--sliced is an MXNet training experiment")
    if args.keras_infer and (args.framework not in KERAS_BACKEND or args.mode == "train"):
        p.error("--keras-infer is for a Keras engine's infer or latency mode")
    if args.export_onnx:
        if args.framework != "torch":
            p.error("--export-onnx exports the hand-written torch model: framework torch")
        export_onnx(args.model, args.export_onnx)
        return 0
    if args.params:
        print(json.dumps({"params": param_count(args.framework, args.model)}))
        return 0
    if args.mode == "train" and args.framework not in LOOPS:
        p.error(f"{args.framework} does not train: --mode infer or latency")
    if args.mode == "latency" and args.batch != 1:
        p.error(f"latency is timed on single samples: batch 1, got {args.batch}")

    if args.mode == "train":
        kw = {"sliced": True} if args.sliced else {}
        step, fetch, version, settings = LOOPS[args.framework](args.model, args.batch, **kw)
        result = time_loop(step, fetch, args.batch, args.steps, args.repeats, args.budget)
    else:
        kw = {}
        if args.framework in KERAS_BACKEND:
            kw["how"] = args.keras_infer or KERAS_INFER
        call, version, settings = INFER[args.framework](args.model, args.batch, **kw)
        if args.mode == "infer":
            result = time_loop(call, lambda out: out, args.batch, args.steps, args.repeats, args.budget,
                               key="infer_samples_s")
        else:
            result = time_latency(call, args.budget)
    env = {v: os.environ[v] for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                                      "TF_NUM_INTEROP_THREADS", "MXNET_CPU_WORKER_NTHREADS",
                                      "MXNET_OMP_MAX_THREADS", "MALLOC_MMAP_THRESHOLD_",
                                      "MALLOC_TRIM_THRESHOLD_") if v in os.environ}
    print(json.dumps({"mode": args.mode, **result, "version": version, "settings": {**env, **settings}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
