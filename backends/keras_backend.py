"""Keras 3 adapter on TensorFlow: a channels-last functional model, canonical weights, tf.function steps."""
from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

from ..models import Activation, AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D  # noqa: E402

from .base import Adam, Adapter, BackendError, SGD, as_inputs, gpu_index  # noqa: E402

tf.get_logger().setLevel("ERROR")


class KingmaBaAdam(keras.optimizers.Adam):
    """Adam with the canonical epsilon: w -= lr * m_hat / (sqrt(v_hat) + epsilon).

    keras.optimizers.Adam folds the bias corrections into the step size and adds epsilon to sqrt(v)
    before correcting, i.e. it uses epsilon * sqrt(1 - beta2^t) in place of epsilon.
    """

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr, g = ops.cast(learning_rate, dtype), ops.cast(gradient, dtype)
        t = ops.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = ops.cast(self.beta_1, dtype), ops.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        self.assign_add(m, ops.multiply(ops.subtract(g, m), 1 - beta_1))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(g), v), 1 - beta_2))
        m_hat = ops.divide(m, 1 - ops.power(beta_1, t))
        v_hat = ops.divide(v, 1 - ops.power(beta_2, t))
        self.assign_sub(variable, ops.divide(ops.multiply(lr, m_hat), ops.add(ops.sqrt(v_hat), self.epsilon)))


def _hwc_order(shape: tuple) -> np.ndarray | None:
    """For a (C, H, W) image: canonical flat index of each position of Keras' channels-last flat vector.

    Keras flattens NHWC in (H, W, C) order, the canonical order is (C, H, W): keras_flat = canonical_flat[perm].
    None when both orders agree (C == 1 or H * W == 1).
    """
    perm = np.arange(np.prod(shape)).reshape(shape).transpose(1, 2, 0).ravel()
    return None if np.array_equal(perm, np.arange(perm.size)) else perm


class KerasAdapter(Adapter):
    """A keras.Model in NHWC (TensorFlow's CPU Conv2D runs channels-last only); inputs are transposed in the graph.

    One Keras layer per spec layer, named after it (a nested Sequential where a spec layer needs two, e.g.
    explicit zero padding before a valid convolution). Weights are mapped through kept layer references.
    """

    name = "keras"

    @classmethod
    def version(cls) -> str:
        return f"keras {keras.__version__} / tensorflow {tf.__version__}"

    @property
    def execution_path(self) -> str:
        return "tf.function + XLA" if self.compile else "tf.function graph"

    @classmethod
    def set_threads(cls, n: int) -> None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(n)
        except RuntimeError:  # the runtime already started: the TF_NUM_*_THREADS variables have applied
            pass

    @property
    def device_name(self) -> str:
        if self._dev.startswith("/GPU"):
            gpu = tf.config.list_physical_devices("GPU")[int(self._dev.rsplit(":", 1)[1])]
            return tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
        return super().device_name

    def peak_device_memory(self):
        return tf.config.experimental.get_memory_info(self._dev[1:])["peak"] if self._dev.startswith("/GPU") else None

    # --- build ------------------------------------------------------------------------------------
    def _build(self) -> None:
        if keras.backend.backend() != "tensorflow":
            raise BackendError(f"keras backend needs KERAS_BACKEND=tensorflow, this process runs "
                               f"Keras on {keras.backend.backend()!r}")
        index = gpu_index(self.device, "tensorflow", len(tf.config.list_physical_devices("GPU")))
        if index is not None:
            tf.config.experimental.enable_tensor_float32_execution(False)  # TF32 would break float32 equivalence
            self._dev = f"/GPU:{index}"
        else:
            self._dev = "/CPU:0"
        spec = self.spec
        self.layers = spec.logits_layers()
        self.infos = spec.infos[:len(self.layers)]
        self._image_input = len(spec.input_shape) == 3
        self._binary = spec.num_classes == 1

        with tf.device(self._dev):
            in_shape = spec.input_shape
            input_name = "input"  # Keras wants unique names across the model's layers
            while input_name in {i.name for i in self.infos}:
                input_name += "_"
            inputs = keras.Input((*in_shape[1:], in_shape[0]) if self._image_input else in_shape, name=input_name)
            h, outputs = inputs, []
            self._core: dict[str, keras.layers.Layer] = {}       # spec layer name -> Keras layer holding its weights
            self._perm_in: dict[str, np.ndarray | None] = {}     # flat input in Keras (H, W, C) order, else None
            self._perm_out: list[np.ndarray | None] = []
            perm = None
            for layer, info in zip(self.layers, self.infos):
                self._perm_in[info.name] = perm
                block, core = self._keras_layer(layer, info.name, info.in_shape)
                if core is not None:
                    self._core[info.name] = core
                h = block(h)
                outputs.append(h)
                if isinstance(layer, Flatten) and len(info.in_shape) == 3:
                    perm = _hwc_order(info.in_shape)
                elif isinstance(layer, Dense):  # its kernel rows absorb the permutation
                    perm = None
                self._perm_out.append(perm)
            self.native = keras.Model(inputs, h, name=spec.name.replace("/", "_"))
            self._probe = keras.Model(inputs, outputs)
        self._params = self._param_map()
        trainable = spec.trainable_keys()
        self._trainable = [self._params[k][0] for k in trainable]
        self._stats = [v for k, (v, _, _) in self._params.items() if k not in trainable]  # BatchNorm statistics

        # Stable signatures: one trace each, whatever the batch size (the last partial batch included).
        x_sig = tf.TensorSpec((None, *in_shape), tf.float32)
        y_sig = tf.TensorSpec((None,), tf.float32 if self._binary else tf.int64)
        self._sigs = [x_sig, y_sig]
        self._logits_fn = tf.function(self._logits_graph, input_signature=[x_sig], jit_compile=self.compile)
        self._layers_fn = tf.function(self._layers_graph, input_signature=[x_sig])
        self._grads_fn = tf.function(self._grads_graph, input_signature=self._sigs)
        self._step_fn = None

    @staticmethod
    def _keras_layer(layer, name: str, in_shape: tuple):
        """(Keras layer or block to call, the Keras layer holding the weights or None)."""
        if isinstance(layer, Dense):
            core = keras.layers.Dense(layer.units, activation=layer.activation, name=name)
            return core, core
        if isinstance(layer, Conv2D):
            kernel = layer.param_shapes(in_shape)["kernel"][2:]
            pad = 0 if layer.padding == "valid" else layer.padding
            if pad in (0, "same"):  # Keras "same" is TensorFlow's: the spec's meaning
                core = keras.layers.Conv2D(layer.filters, kernel, layer.strides, "valid" if pad == 0 else "same",
                                           activation=layer.activation, name=name)
                return core, core
            core = keras.layers.Conv2D(layer.filters, kernel, layer.strides, "valid", activation=layer.activation,
                                       name="conv")
            return keras.Sequential([keras.layers.ZeroPadding2D(pad, name="pad"), core], name=name), core
        if isinstance(layer, (MaxPool2D, AvgPool2D)):
            k, s = layer.window()
            cls = keras.layers.MaxPooling2D if isinstance(layer, MaxPool2D) else keras.layers.AveragePooling2D
            return cls(k, s, "valid", name=name), None
        if isinstance(layer, Flatten):
            return keras.layers.Flatten(name=name), None
        if isinstance(layer, Activation):  # softmax acts on the last axis: channels in NHWC, as canonical axis 1
            return keras.layers.Activation(layer.activation, name=name), None
        if isinstance(layer, Dropout):
            return keras.layers.Dropout(layer.rate, name=name), None
        if isinstance(layer, BatchNorm):
            # Same moving-average meaning and biased variance as the spec. Numerically TF normalises as
            # x * inv + (beta - mean * inv), which loses float32 digits where |mean| >> std (vs (x - mean) * inv).
            core = keras.layers.BatchNormalization(axis=-1, momentum=layer.momentum, epsilon=layer.epsilon,
                                                   name=name)
            return core, core
        raise BackendError(f"keras backend: unsupported layer {type(layer).__name__}")

    # --- weights ----------------------------------------------------------------------------------
    def _param_map(self) -> dict[str, tuple]:
        """Canonical key -> (Keras variable, conv kernel?, flat permutation of axis 0 or None), spec order."""
        out = {}
        for layer, info in zip(self.layers, self.infos):
            name, core, perm = info.name, self._core.get(info.name), self._perm_in[info.name]
            if isinstance(layer, (Dense, Conv2D)):
                out[f"{name}/kernel"] = (core.kernel, isinstance(layer, Conv2D), perm)
                out[f"{name}/bias"] = (core.bias, False, None)
            elif isinstance(layer, BatchNorm):  # flat BatchNorm after a Flatten has per-feature params in HWC order
                for key, var in (("gamma", core.gamma), ("beta", core.beta), ("moving_mean", core.moving_mean),
                                 ("moving_var", core.moving_variance)):
                    out[f"{name}/{key}"] = (var, False, perm)
        return out

    @staticmethod
    def _to_canonical(a: np.ndarray, conv: bool, perm: np.ndarray | None) -> np.ndarray:
        if conv:
            a = a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif perm is not None:
            a = a[np.argsort(perm)]
        return np.ascontiguousarray(a, dtype=np.float32)

    @staticmethod
    def _to_native(a: np.ndarray, conv: bool, perm: np.ndarray | None) -> np.ndarray:
        if conv:
            return a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        return a if perm is None else a[perm]

    def get_weights(self):
        return {k: self._to_canonical(v.numpy(), conv, perm) for k, (v, conv, perm) in self._params.items()}

    def set_weights(self, weights):
        self._check_weights(weights)
        with tf.device(self._dev):
            for k, (v, conv, perm) in self._params.items():
                v.assign(self._to_native(np.asarray(weights[k], np.float32), conv, perm))

    # --- graph pieces -----------------------------------------------------------------------------
    def _nhwc(self, x):
        return tf.transpose(x, (0, 2, 3, 1)) if self._image_input else x

    @staticmethod
    def _canonical_output(h, perm):
        """A Keras output in the canonical layout: NCHW for images, CHW order for a flattened image."""
        if h.shape.rank == 4:
            return tf.transpose(h, (0, 3, 1, 2))
        return h if perm is None else tf.gather(h, np.argsort(perm), axis=1)

    def _logits_graph(self, x, training=False):
        return self._canonical_output(self.native(self._nhwc(x), training=training), self._perm_out[-1])

    def _layers_graph(self, x):
        outs = self._probe(self._nhwc(x), training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]  # a one-layer model returns a bare tensor
        return [self._canonical_output(h, p) for h, p in zip(outs, self._perm_out)]

    def _loss_graph(self, x, y):
        """Training-mode mean loss, as backends.base.loss_and_dlogits (labels index the canonical flat logits)."""
        z = self._logits_graph(x, training=True)
        z = tf.reshape(z, (tf.shape(z)[0], -1))
        if self._binary:
            return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=z[:, 0]))
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=z))

    def _grads_graph(self, x, y):
        saved = [tf.identity(v.value) for v in self._stats]  # the training call moves the BatchNorm statistics
        with tf.GradientTape() as tape:
            loss = self._loss_graph(x, y)
        grads = tape.gradient(loss, self._trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        for v, s in zip(self._stats, saved):
            v.assign(s)
        return loss, grads

    def _step_graph(self, x, y):
        with tf.GradientTape() as tape:
            loss = self._loss_graph(x, y)
        grads = tape.gradient(loss, self._trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        self._opt.apply_gradients(zip(grads, self._trainable))
        return loss

    def _labels(self, y) -> np.ndarray:
        return np.asarray(y).reshape(-1).astype(np.float32 if self._binary else np.int64, copy=False)

    # --- inference --------------------------------------------------------------------------------
    def logits(self, x):
        with tf.device(self._dev):
            return self._logits_fn(as_inputs(self.spec, x)).numpy()

    def layer_outputs(self, x):
        with tf.device(self._dev):
            outs = self._layers_fn(as_inputs(self.spec, x))
        return {i.name: o.numpy() for i, o in zip(self.infos, outs)}

    # --- training ---------------------------------------------------------------------------------
    def loss_and_grads(self, x, y):
        with tf.device(self._dev):
            loss, grads = self._grads_fn(as_inputs(self.spec, x), self._labels(y))
        keys = self.spec.trainable_keys()
        return float(loss), {k: self._to_canonical(g.numpy(), *self._params[k][1:]) for k, g in zip(keys, grads)}

    def set_optimizer(self, optimizer):
        if isinstance(optimizer, SGD):  # Keras: m = mu*m - lr*g; w += m. The canonical form at constant lr
            opt = keras.optimizers.SGD(learning_rate=optimizer.lr, momentum=optimizer.momentum)
        elif isinstance(optimizer, Adam):
            opt = KingmaBaAdam(learning_rate=optimizer.lr, beta_1=optimizer.beta1, beta_2=optimizer.beta2,
                               epsilon=optimizer.epsilon)
        else:
            raise BackendError(f"keras backend: unsupported optimizer {optimizer!r}")
        with tf.device(self._dev):
            opt.build(self._trainable)  # slots created eagerly, outside the traced step
        self.optimizer, self._opt = optimizer, opt
        self._step_fn = tf.function(self._step_graph, input_signature=self._sigs,  # traces against the new slots
                                    jit_compile=self.compile)

    def _train_batch(self, x, y):
        with tf.device(self._dev):
            return self._step_fn(x, self._labels(y))

    def sync(self):
        # CPU kernels of a tf.function call have run when it returns; GPU kernels may still be queued.
        if self._dev.startswith("/GPU"):
            tf.test.experimental.sync_devices()
