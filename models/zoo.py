"""Named reference architectures: `get(name)` and `names()`."""
from __future__ import annotations

from .spec import (INPUT, Activation, Add, AvgPool2D, BatchNorm, Concatenate, Conv2D, Dense, Dropout, Flatten,
                   GlobalAveragePooling2D, Layer, MaxPool2D, ModelSpec, Multiply, Normalization, Rescaling, SpecError,
                   ZeroPadding2D)


def perceptron() -> ModelSpec:
    """The single neuron: logistic regression sigma(w.x + b) on 2 features."""
    return ModelSpec("perceptron", (2,), (Dense(1, activation="sigmoid"),))


def mlp() -> ModelSpec:
    """MNIST-sized dense net: 784 -> 256 -> 128 -> 10."""
    return ModelSpec("mlp", (784,), (Dense(256, activation="relu"), Dense(128, activation="relu"), Dense(10)))


def lenet5() -> ModelSpec:
    """LeCun's LeNet-5 on 1x28x28 (first conv "same", max pooling): 61,706 parameters."""
    return ModelSpec("lenet5", (1, 28, 28), (
        Conv2D(6, 5, padding="same", activation="relu"), MaxPool2D(2),
        Conv2D(16, 5, activation="relu"), MaxPool2D(2),
        Flatten(), Dense(120, activation="relu"), Dense(84, activation="relu"), Dense(10)))


def cifar_cnn() -> ModelSpec:
    """VGG-style CIFAR-10 net: two conv-conv-pool blocks with batch-norm and dropout, dense head."""
    def block(filters):
        return (Conv2D(filters, 3, padding="same"), BatchNorm(), Activation("relu"),
                Conv2D(filters, 3, padding="same"), BatchNorm(), Activation("relu"),
                MaxPool2D(2), Dropout(0.25))
    return ModelSpec("cifar_cnn", (3, 32, 32), block(32) + block(64) + (
        Flatten(), Dense(256, activation="relu"), Dropout(0.5), Dense(10)))


def digits_mlp() -> ModelSpec:
    """Dense net for scikit-learn's 8x8 digits (64 features)."""
    return ModelSpec("digits_mlp", (64,), (Dense(64, activation="relu"), Dense(10)))


def digits_cnn() -> ModelSpec:
    """Small CNN for scikit-learn's 1x8x8 digits."""
    return ModelSpec("digits_cnn", (1, 8, 8), (
        Conv2D(16, 3, padding="same", activation="relu"), MaxPool2D(2),
        Conv2D(32, 3, padding="same", activation="relu"), AvgPool2D(2),
        Flatten(), Dense(64, activation="relu"), Dense(10)))


def resnet20() -> ModelSpec:
    """CIFAR-10 ResNet-20 (He et al. 2016, section 4.2): a 3x3 conv, 3 stages of 3 basic blocks with 16/32/64
    filters (the first block of stages 2 and 3 halves the size with stride 2), global average pooling, Dense(10).

    Every conv is conv-BN(-ReLU) without a bias (BatchNorm's beta is the bias). Shortcuts: identity where the
    shape is kept; where it changes, option B of the paper (a 1x1 stride-2 conv projection + BatchNorm), since
    option A (identity with zero-padded channels and stride-2 subsampling) needs pad/slice layers the spec does
    not have. Option A's published figure is 0.27M (269,722 trainable); the two projections add 2,560 kernel
    and 192 BatchNorm weights: 272,474 trainable, 274,042 with the BatchNorm moving statistics.
    """
    layers: list[Layer] = [Conv2D(16, 3, padding="same", use_bias=False, name="conv1"), BatchNorm(name="bn1"),
                           Activation("relu", name="relu1")]
    previous = "relu1"
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(1, 4):
            p, stride = f"s{stage}b{block}_", (2 if stage > 1 and block == 1 else 1)
            layers += [Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=p + "conv1",
                              inputs=(previous,)),
                       BatchNorm(name=p + "bn1"), Activation("relu", name=p + "relu1"),
                       Conv2D(filters, 3, padding="same", use_bias=False, name=p + "conv2"), BatchNorm(name=p + "bn2")]
            shortcut = previous
            if stride != 1:
                layers += [Conv2D(filters, 1, strides=stride, use_bias=False, name=p + "proj", inputs=(previous,)),
                           BatchNorm(name=p + "proj_bn")]
                shortcut = p + "proj_bn"
            layers += [Add(name=p + "add", inputs=(p + "bn2", shortcut)), Activation("relu", name=p + "relu2")]
            previous = p + "relu2"
    return ModelSpec("resnet20", (3, 32, 32), tuple(layers) + (GlobalAveragePooling2D(name="pool"),
                                                               Dense(10, name="fc")))


def _inception(name: str, source: str, c1: int, r3: int, c3: int, r5: int, c5: int, cp: int) -> tuple[Layer, ...]:
    """An Inception-v1 module reading `source`: 1x1, 1x1->3x3, 1x1->5x5 and 3x3-max-pool->1x1 branches,
    concatenated over channels (ReLU after every conv, as in GoogLeNet)."""
    def conv(filters, k, suffix, inputs=None):
        return Conv2D(filters, k, padding="same", activation="relu", name=f"{name}_{suffix}", inputs=inputs)
    return (conv(c1, 1, "1x1", (source,)),
            conv(r3, 1, "3x3_reduce", (source,)), conv(c3, 3, "3x3"),
            conv(r5, 1, "5x5_reduce", (source,)), conv(c5, 5, "5x5"),
            MaxPool2D(3, strides=1, padding="same", name=f"{name}_pool", inputs=(source,)), conv(cp, 1, "pool_proj"),
            Concatenate(name=name, inputs=(f"{name}_1x1", f"{name}_3x3", f"{name}_5x5", f"{name}_pool_proj")))


def inception_mini() -> ModelSpec:
    """A small CIFAR-10 net of Inception-v1 modules (Szegedy et al. 2014): a conv stem, two modules at 16x16,
    a stride-2 "same" max pool, a third module at 8x8, global average pooling and Dense(10)."""
    return ModelSpec("inception_mini", (3, 32, 32), (
        Conv2D(16, 3, padding="same", activation="relu", name="stem"), MaxPool2D(2, name="stem_pool"))
        + _inception("inc1", "stem_pool", 8, 8, 12, 4, 4, 4)            # -> 28 channels
        + _inception("inc2", "inc1", 12, 12, 16, 4, 8, 8)               # -> 44 channels
        + (MaxPool2D(3, strides=2, padding="same", name="pool2"),)
        + _inception("inc3", "pool2", 16, 16, 24, 4, 8, 8)              # -> 56 channels
        + (GlobalAveragePooling2D(name="gap"), Dense(10, name="fc")))


def residual_mlp() -> ModelSpec:
    """A residual MLP for the 8x8 digits (64 features): Dense(64) then two blocks x + Dense(Dense(x)), ReLU after
    each sum, Dense(10)."""
    layers: list[Layer] = [Dense(64, activation="relu", name="fc_in")]
    previous = "fc_in"
    for b in (1, 2):
        layers += [Dense(64, activation="relu", name=f"b{b}_fc1", inputs=(previous,)), Dense(64, name=f"b{b}_fc2"),
                   Add(name=f"b{b}_add", inputs=(f"b{b}_fc2", previous)), Activation("relu", name=f"b{b}_relu")]
        previous = f"b{b}_relu"
    return ModelSpec("residual_mlp", (64,), tuple(layers) + (Dense(10, name="fc_out"),))


def every_kind() -> ModelSpec:
    """A small graph with every layer kind, activation and padding mode on odd, non-square shapes: a "same"
    conv and average pool padded unevenly on one axis only, a floor-size valid max pool, a "same" max pool,
    a non-square kernel and stride, int padding, flattened images that are added (a 3-input Add) and
    concatenated with flat features, softmax over channels, BatchNorm on images and features, a softmax head.
    It is what `compare.py check` runs to catch what the test suite catches."""
    return ModelSpec("every_kind", (3, 11, 9), (
        Conv2D(4, (3, 2), strides=(2, 1), padding="same", use_bias=False, name="stem"),        # (4, 6, 9)
        BatchNorm(name="stem_bn"), Activation("leaky_relu", name="stem_act"),
        MaxPool2D(3, strides=2, name="pool_valid"),                                             # (4, 2, 4)
        Flatten(name="flat_pool"),                                                             # 32
        AvgPool2D(3, strides=2, padding="same", name="pool_same", inputs=("stem_act",)),        # (4, 3, 5)
        Conv2D(3, 3, strides=2, padding="same", activation="silu", name="conv_s2", inputs=("stem_act",)),
        Concatenate(name="cat_img", inputs=("pool_same", "conv_s2")),                          # (7, 3, 5)
        Activation("softmax", name="channel_softmax"),
        MaxPool2D(2, strides=1, padding="same", name="pool_max_same"),                         # (7, 3, 5)
        Flatten(name="flat_img"),                                                              # 105
        Conv2D(5, (2, 3), padding=1, activation="softplus", name="conv_pad", inputs=("stem_act",)),  # (5, 7, 9)
        Dropout(0.1, name="drop_img"), GlobalAveragePooling2D(name="gap"),                     # 5
        Dense(32, activation="tanh", name="fc_tanh"),
        Dense(32, activation="sigmoid", name="fc_sigmoid", inputs=("gap",)),
        Add(name="add3", inputs=("flat_pool", "fc_tanh", "fc_sigmoid")),                       # 32
        Activation("elu", name="add_act"),
        Concatenate(name="cat_flat", inputs=("flat_img", "add_act")),                          # 137
        BatchNorm(momentum=0.9, epsilon=1e-3, name="flat_bn"),
        Dense(12, activation="gelu", name="fc_gelu"), Dropout(0.2, name="drop"),
        Dense(8, activation="gelu_tanh", name="fc_gelu_tanh"), Activation("relu", name="relu"),
        Dense(6, activation="leaky_relu(0.05)", name="fc_leaky"), Activation("linear", name="linear"),
        Dense(3, activation="softmax", name="out")))


def _inverted_residual(name: str, source: str, c_in: int, expand: int, c_out: int, stride: int) -> tuple[Layer, ...]:
    """A MobileNetV2 block reading `source`: 1x1 expand (unless expand == 1) -> BN -> relu6 -> 3x3 depthwise ->
    BN -> relu6 -> 1x1 linear projection -> BN, plus the input when the shape is kept. A stride-2 depthwise conv
    is "valid" after ZeroPadding2D ((0, 1), (0, 1)), as Keras' MobileNetV2 pads an even input."""
    c, layers = c_in * expand, []
    if expand != 1:
        layers += [Conv2D(c, 1, use_bias=False, name=f"{name}_expand", inputs=(source,)),
                   BatchNorm(name=f"{name}_expand_bn"), Activation("relu6", name=f"{name}_expand_relu")]
    first = {"inputs": (source,)} if expand == 1 else {}
    if stride == 2:
        layers += [ZeroPadding2D(((0, 1), (0, 1)), name=f"{name}_pad", **first),
                   Conv2D(c, 3, strides=2, groups=c, use_bias=False, name=f"{name}_dw")]
    else:
        layers += [Conv2D(c, 3, padding="same", groups=c, use_bias=False, name=f"{name}_dw", **first)]
    layers += [BatchNorm(name=f"{name}_dw_bn"), Activation("relu6", name=f"{name}_dw_relu"),
               Conv2D(c_out, 1, use_bias=False, name=f"{name}_project"), BatchNorm(name=f"{name}_project_bn")]
    if stride == 1 and c_in == c_out:
        layers += [Add(name=f"{name}_add", inputs=(source, f"{name}_project_bn"))]
    return tuple(layers)


def mobilenet_mini() -> ModelSpec:
    """A small CIFAR-10 MobileNetV2 (Sandler et al. 2018): a stride-2 conv stem, five inverted residual blocks
    (depthwise 3x3 convs, relu6, linear bottlenecks, two stride-2 blocks, two residual Adds), a 1x1 conv to 64
    channels, global average pooling and Dense(10). No biases before BatchNorm.

    Parameters (BatchNorm: 4 per channel, 2 of them the non-trainable moving statistics):
      stem    16*3*9 + 4*16                                                  =    496
      b1 (16 -> 16, t 1 -> 8)   dw 16*9 + 64, project 8*16 + 32             =    368
      b2 (8 -> 48 -> 12, s2)    expand 48*8 + 192, dw 48*9 + 192, project 12*48 + 48   =  1,824
      b3 (12 -> 72 -> 12, add)  expand 72*12 + 288, dw 72*9 + 288, project 12*72 + 48  =  3,000
      b4 (12 -> 72 -> 16, s2)   expand 864 + 288, dw 648 + 288, project 16*72 + 64     =  3,304
      b5 (16 -> 96 -> 16, add)  expand 96*16 + 384, dw 96*9 + 384, project 16*96 + 64 =  4,768
      head    64*16 + 4*64 = 1,280; Dense 64*10 + 10 = 650                  =  1,930
      total                                                                   15,690
    """
    layers: list[Layer] = [Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem"),  # (16, 16, 16)
                           BatchNorm(name="stem_bn"), Activation("relu6", name="stem_relu")]
    previous, c_in = "stem_relu", 16
    for i, (expand, c_out, stride) in enumerate(((1, 8, 1), (6, 12, 2), (6, 12, 1), (6, 16, 2), (6, 16, 1)), 1):
        block = _inverted_residual(f"b{i}", previous, c_in, expand, c_out, stride)
        layers += block
        previous, c_in = block[-1].name, c_out
    return ModelSpec("mobilenet_mini", (3, 32, 32), tuple(layers) + (          # (16, 4, 4) here
        Conv2D(64, 1, use_bias=False, name="head", inputs=(previous,)), BatchNorm(name="head_bn"),
        Activation("relu6", name="head_relu"), GlobalAveragePooling2D(name="pool"), Dense(10, name="fc")))


def _mbconv(name: str, source: str, c_in: int, c_out: int, kernel: int, stride: int, expand: int = 1,
            multiplier: int = 1) -> tuple[Layer, ...]:
    """An EfficientNet MBConv block reading `source`: 1x1 expand (expand > 1) -> BN -> silu -> depthwise conv
    (channel multiplier `multiplier`) -> BN -> silu -> squeeze-and-excitation (global pool kept 1x1 -> 1x1 conv
    to c_in / 4 channels, silu -> 1x1 conv back, sigmoid -> Multiply) -> 1x1 projection -> BN, plus the input
    when the shape is kept."""
    c, layers = c_in * expand, []
    if expand != 1:
        layers += [Conv2D(c, 1, use_bias=False, name=f"{name}_expand", inputs=(source,)),
                   BatchNorm(name=f"{name}_expand_bn"), Activation("silu", name=f"{name}_expand_act")]
    first = {"inputs": (source,)} if expand == 1 else {}
    layers += [Conv2D(c * multiplier, kernel, strides=stride, padding="same", groups=c, use_bias=False,
                      name=f"{name}_dw", **first),
               BatchNorm(name=f"{name}_dw_bn"), Activation("silu", name=f"{name}_dw_act"),
               GlobalAveragePooling2D(keepdims=True, name=f"{name}_se_squeeze"),
               Conv2D(max(1, c_in // 4), 1, activation="silu", name=f"{name}_se_reduce"),
               Conv2D(c * multiplier, 1, activation="sigmoid", name=f"{name}_se_expand"),
               Multiply(name=f"{name}_se_excite", inputs=(f"{name}_dw_act", f"{name}_se_expand")),
               Conv2D(c_out, 1, use_bias=False, name=f"{name}_project"), BatchNorm(name=f"{name}_project_bn")]
    if stride == 1 and c_in == c_out and multiplier == 1:
        layers += [Add(name=f"{name}_add", inputs=(f"{name}_project_bn", source))]
    return tuple(layers)


def efficientnet_mini() -> ModelSpec:
    """A small CIFAR-10 EfficientNet (Tan & Le 2019): Rescaling(1/255) and Normalization at the input (its mean
    and variance are weights, 0 and 1 until set), a stride-2 conv stem, three MBConv blocks with
    squeeze-and-excitation and silu (the second a stride-2 depthwise conv with channel multiplier 2, the third a
    5x5 depthwise conv after a 1x1 expansion to 96 channels), a 1x1 conv to 64 channels, global average pooling
    and Dense(10).

    Parameters (BatchNorm: 4 per channel; Normalization: 2 per channel, all non-trainable statistics):
      normalize  2*3                                                                    =      6
      stem       16*3*9 + 4*16                                                          =    496
      mb1 (16 -> 16, add)  dw 16*9 + 64, se 4*16+4 + 16*4+16, project 16*16 + 64       =    676
      mb2 (16 -> 32 by multiplier 2, s2 -> 24)  dw 32*1*9 + 128, se 4*32+4 + 32*4+32,
                           project 24*32 + 96                                           =  1,572
      mb3 (24 -> 96 -> 24, 5x5, add)  expand 96*24 + 384, dw 96*25 + 384,
                           se 6*96+6 + 96*6+96, project 24*96 + 96                      =  9,126
      head       64*24 + 4*64 = 1,792; Dense 64*10 + 10 = 650                           =  2,442
      total                                                                                14,318
    """
    layers: list[Layer] = [Rescaling(1 / 255, name="rescale"), Normalization(name="normalize"),
                           Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem"),  # (16, 16, 16)
                           BatchNorm(name="stem_bn"), Activation("silu", name="stem_act")]
    layers += _mbconv("mb1", "stem_act", 16, 16, 3, 1)
    layers += _mbconv("mb2", layers[-1].name, 16, 24, 3, 2, multiplier=2)                   # (24, 8, 8)
    layers += _mbconv("mb3", layers[-1].name, 24, 24, 5, 1, expand=4)
    return ModelSpec("efficientnet_mini", (3, 32, 32), tuple(layers) + (
        Conv2D(64, 1, use_bias=False, name="head", inputs=(layers[-1].name,)), BatchNorm(name="head_bn"),
        Activation("silu", name="head_act"), GlobalAveragePooling2D(name="pool"), Dense(10, name="fc")))


_ZOO = {f.__name__: f for f in (perceptron, mlp, lenet5, cifar_cnn, digits_mlp, digits_cnn, resnet20, inception_mini,
                                residual_mlp, every_kind, mobilenet_mini, efficientnet_mini)}


def names() -> list[str]:
    return list(_ZOO)


def get(name: str) -> ModelSpec:
    if name not in _ZOO:
        raise SpecError(f"unknown zoo model {name!r} (known: {', '.join(_ZOO)})")
    return _ZOO[name]()
