"""The oracle against the definitions, written out as plain loops here: when the oracle and a framework share a
slip (say "same" padding with the odd pixel on top), the frameworks agree with it, so it is checked on its own."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from nncompare.backends import get_adapter
from nncompare.models import (INPUT, AdaptiveAvgPool2D, AvgPool2D, Conv2D, Flatten, GlobalAveragePooling2D, MaxPool2D,
                              ModelSpec, Multiply)


def tf_same(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's "same": ceil(n / s) outputs, the padding split with the odd cell after."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def explicit_pads(shape, extent, s, padding):
    """((top, bottom), (left, right)) for "valid", "same" (over the window's extent), an int or the 2x2 form."""
    if padding == "same":
        return tf_same(shape[0], extent[0], s[0]), tf_same(shape[1], extent[1], s[1])
    if padding == "valid":
        padding = 0
    return ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding


def out_size(n, extent, s, before, after, ceil_mode):
    """Floor, or torch's ceil_mode: ceil, then one fewer if the last window would start past the input."""
    if not ceil_mode:
        return (n + before + after - extent) // s + 1
    out = math.ceil((n + before + after - extent) / s) + 1
    return out - 1 if (out - 1) * s >= n + before else out


def windows(shape, k, s, padding, dilation=(1, 1), ceil_mode=False):
    """(out_h, out_w, [(row, col) origin of every window] in unpadded coordinates, the pads)."""
    (h, w), (kh, kw), (sh, sw), (dh, dw) = shape, k, s, dilation
    extent = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    pads = explicit_pads(shape, extent, s, padding)
    (pt, pb), (pl, pr) = pads
    if padding == "same":
        oh, ow = math.ceil(h / sh), math.ceil(w / sw)
    else:
        oh, ow = out_size(h, extent[0], sh, pt, pb, ceil_mode), out_size(w, extent[1], sw, pl, pr, ceil_mode)
    return oh, ow, [[(i * sh - pt, j * sw - pl) for j in range(ow)] for i in range(oh)], pads


def conv_loops(x, kernel, bias, s, padding, groups=1, dilation=(1, 1)):
    n, c, h, w = x.shape
    o, cg, kh, kw = kernel.shape
    oh, ow, origin, _ = windows((h, w), (kh, kw), s, padding, dilation)
    y = np.zeros((n, o, oh, ow))
    for b, f, i, j in itertools.product(range(n), range(o), range(oh), range(ow)):
        r0, c0 = origin[i][j]
        g = f // (o // groups)  # filter f reads only its group's input channels
        total = bias[f]
        for ch, di, dj in itertools.product(range(cg), range(kh), range(kw)):
            r, q = r0 + di * dilation[0], c0 + dj * dilation[1]
            if 0 <= r < h and 0 <= q < w:  # outside the input: a zero of the padding
                total += x[b, g * cg + ch, r, q] * kernel[f, ch, di, dj]
        y[b, f, i, j] = total
    return y


def pool_loops(x, k, s, padding, reduce, ceil_mode=False, count_include_pad=False):
    n, c, h, w = x.shape
    oh, ow, origin, ((pt, pb), (pl, pr)) = windows((h, w), k, s, padding, ceil_mode=ceil_mode)
    y = np.zeros((n, c, oh, ow))
    for b, ch, i, j in itertools.product(range(n), range(c), range(oh), range(ow)):
        r0, c0 = origin[i][j]
        cells = [x[b, ch, r, q] for r in range(r0, r0 + k[0]) for q in range(c0 + 0, c0 + k[1])
                 if 0 <= r < h and 0 <= q < w]  # padded cells take no part (TensorFlow's "same")
        if count_include_pad:  # the divisor: the window clipped to the padded input (padding counts, overhang not)
            rows = min(r0 + k[0], h + pb) - max(r0, -pt)
            cols = min(c0 + k[1], w + pr) - max(c0, -pl)
            y[b, ch, i, j] = sum(cells) / (rows * cols)
        else:
            y[b, ch, i, j] = reduce(cells)
    return y


def adaptive_loops(x, out):
    n, c, h, w = x.shape
    y = np.zeros((n, c) + out)
    for i, j in itertools.product(range(out[0]), range(out[1])):
        r0, r1 = math.floor(i * h / out[0]), math.ceil((i + 1) * h / out[0])
        c0, c1 = math.floor(j * w / out[1]), math.ceil((j + 1) * w / out[1])
        y[:, :, i, j] = x[:, :, r0:r1, c0:c1].sum(axis=(2, 3)) / ((r1 - r0) * (c1 - c0))
    return y


def normal(seed, shape):
    """Standard normal float64 values that float32 holds exactly (the oracle takes float32 batches)."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32).astype(np.float64)


def oracle_output(spec, x, seed=0):
    """The oracle's output of the spec's first layer (float64)."""
    return get_adapter("numpy").build(spec, seed=seed).layer_outputs(x)[spec.infos[0].name]


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((2, 6, 5), (3, 2), (2, 1), "same"),   # padded unevenly on the rows only
    ((1, 7, 6), (4, 4), (2, 3), "same"),   # an even kernel: the extra pad is after
    ((2, 5, 7), (3, 3), (1, 2), 2),        # int padding
    ((1, 6, 6), (2, 3), (3, 2), "valid"),  # floor output size
    ((2, 6, 5), (3, 2), (1, 2), ((2, 0), (1, 3))),  # explicit asymmetric padding
])
def test_conv2d_follows_its_definition(shape, kernel, strides, padding):
    spec = ModelSpec("conv", shape, (Conv2D(3, kernel, strides=strides, padding=padding),))
    oracle = get_adapter("numpy").build(spec)
    w = oracle.get_weights()
    w["conv2d_0/bias"] = np.arange(3, dtype=np.float32) - 1.0
    oracle.set_weights(w)
    x = np.random.default_rng(0).standard_normal((2,) + shape).astype(np.float32)
    want = conv_loops(x.astype(np.float64), w["conv2d_0/kernel"].astype(np.float64), w["conv2d_0/bias"], strides,
                      padding)
    np.testing.assert_allclose(oracle.logits(x), want, rtol=1e-6, atol=1e-6)  # logits come back as float32


@pytest.mark.parametrize("kind,reduce", [(MaxPool2D, max), (AvgPool2D, lambda cells: sum(cells) / len(cells))])
@pytest.mark.parametrize("shape,pool,strides,padding", [
    ((2, 6, 5), (3, 3), (2, 2), "same"),   # uneven on the rows only (pads (0, 1) and (1, 1))
    ((1, 5, 7), (2, 3), (2, 2), "same"),
    ((2, 7, 5), (3, 2), (2, 2), "valid"),  # odd sizes: floor
    ((1, 4, 6), (2, 2), (1, 3), "same"),
])
def test_pooling_follows_its_definition(kind, reduce, shape, pool, strides, padding):
    spec = ModelSpec("pool", shape, (kind(pool, strides=strides, padding=padding),))
    x = np.random.default_rng(1).standard_normal((2,) + shape).astype(np.float32)
    # negative inputs everywhere: a max pool that let a padded zero win would show
    x = -np.abs(x) - 0.1 if kind is MaxPool2D else x
    want = pool_loops(x.astype(np.float64), pool, strides, padding, reduce)
    np.testing.assert_allclose(get_adapter("numpy").build(spec).logits(x), want, rtol=1e-6, atol=1e-6)  # logits come back as float32


@pytest.mark.parametrize("shape,filters,kernel,strides,padding,groups,dilation", [
    ((2, 7, 6), 3, (3, 3), (1, 1), "same", 1, (2, 2)),       # dilation 2 with "same": extent 5, pads (2, 2)
    ((1, 8, 7), 2, (2, 3), (1, 1), "same", 1, (2, 3)),       # an even dilated extent (3 by 7): the odd pad after
    ((4, 6, 5), 6, (3, 2), (1, 1), 1, 2, (1, 1)),            # groups 2: filters 0-2 read channels 0-1 only
    ((3, 7, 6), 6, (3, 3), (2, 2), "same", 3, (1, 1)),       # depthwise, multiplier 2, stride 2
    ((4, 7, 8), 4, (2, 2), (1, 1), ((0, 1), (2, 0)), 4, (3, 2)),  # depthwise, dilated, explicit padding
])
def test_grouped_and_dilated_conv2d_follows_its_definition(shape, filters, kernel, strides, padding, groups, dilation):
    layer = Conv2D(filters, kernel, strides=strides, padding=padding, groups=groups, dilation=dilation)
    spec = ModelSpec("conv", shape, (layer,))
    oracle = get_adapter("numpy").build(spec)
    w = oracle.get_weights()
    w["conv2d_0/bias"] = np.arange(filters, dtype=np.float32) - 1.0
    oracle.set_weights(w)
    assert w["conv2d_0/kernel"].shape == (filters, shape[0] // groups) + kernel
    x = normal(0, (2,) + shape)
    want = conv_loops(x, w["conv2d_0/kernel"].astype(np.float64), w["conv2d_0/bias"], strides, padding, groups,
                      dilation)
    got = oracle.layer_outputs(x)["conv2d_0"]
    assert got.shape == want.shape == (2,) + spec.infos[0].out_shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,reduce", [(MaxPool2D, max), (AvgPool2D, lambda cells: sum(cells) / len(cells))])
@pytest.mark.parametrize("shape,pool,strides,padding,ceil_mode", [
    ((2, 5, 7), (2, 2), (2, 2), "valid", True),            # no padding: the last windows hang past the input
    ((1, 5, 8), (3, 3), (3, 3), 1, True),                  # the last-window rule fires on the columns: 4 -> 3
    ((2, 7, 6), (3, 3), (2, 2), 1, True),                  # padding and an overhang on the columns
    ((1, 4, 5), (2, 2), (2, 2), ((0, 1), (1, 0)), True),   # the rule fires on the rows: explicit padding
    ((2, 6, 5), (3, 2), (2, 1), ((1, 1), (0, 1)), False),  # explicit padding, floor
    ((1, 5, 7), (3, 3), (2, 3), 1, False),                 # int padding, floor
])
def test_padded_and_ceil_mode_pooling_follows_its_definition(kind, reduce, shape, pool, strides, padding, ceil_mode):
    spec = ModelSpec("pool", shape, (kind(pool, strides=strides, padding=padding, ceil_mode=ceil_mode),))
    x = normal(1, (2,) + shape)
    x = (-np.abs(x) - 0.1).astype(np.float32).astype(np.float64) if kind is MaxPool2D else x  # no padded 0 wins
    want = pool_loops(x, pool, strides, padding, reduce, ceil_mode)
    got = oracle_output(spec, x)
    assert got.shape == want.shape == (2,) + spec.output_shape
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("shape,pool,strides,padding,ceil_mode", [
    ((1, 4, 4), (3, 3), (1, 1), 1, False),                  # int: a corner window's divisor 9, not 4
    ((2, 5, 6), (3, 2), (2, 2), ((1, 1), (0, 1)), False),   # explicit, asymmetric
    ((1, 5, 6), (3, 3), (2, 2), "same", False),             # "same" pads count too
    ((2, 7, 6), (3, 3), (2, 2), 1, True),                   # ceil_mode: the overhang past the padding never counts
    ((1, 5, 5), (2, 2), (2, 2), "valid", True),             # ceil_mode without padding: the divisor 1 at the corner
])
def test_average_pooling_counts_padding_with_count_include_pad(shape, pool, strides, padding, ceil_mode):
    spec = ModelSpec("pool", shape, (AvgPool2D(pool, strides=strides, padding=padding, ceil_mode=ceil_mode,
                                               count_include_pad=True),))
    x = normal(2, (2,) + shape)
    want = pool_loops(x, pool, strides, padding, None, ceil_mode, count_include_pad=True)
    np.testing.assert_allclose(oracle_output(spec, x), want, rtol=1e-12)
    ones = oracle_output(spec, np.ones((1,) + shape))
    assert ones.min() < 1 if padding != "valid" else ones.max() == 1  # padded zeros pull an edge window down


def test_count_include_pad_edge_windows_by_hand():
    x = np.arange(1, 17, dtype=np.float64).reshape(1, 1, 4, 4)
    include = ModelSpec("p", (1, 4, 4), (AvgPool2D(3, strides=1, padding=1, count_include_pad=True),))
    exclude = ModelSpec("p", (1, 4, 4), (AvgPool2D(3, strides=1, padding=1),))
    assert oracle_output(include, x)[0, 0, 0, 0] == pytest.approx((1 + 2 + 5 + 6) / 9)   # torch's default
    assert oracle_output(exclude, x)[0, 0, 0, 0] == pytest.approx((1 + 2 + 5 + 6) / 4)   # TensorFlow's "same"
    # ceil_mode: the window at column 4 covers the pad cell 4 and hangs one past it: divisor 3 x 2, not 3 x 3
    ceil = ModelSpec("p", (1, 4, 4), (AvgPool2D(3, strides=2, padding=1, ceil_mode=True, count_include_pad=True),))
    out = oracle_output(ceil, x)
    assert out.shape == (1, 1, 3, 3)
    assert out[0, 0, 1, 2] == pytest.approx((8 + 12 + 16) / 6)


@pytest.mark.parametrize("size,pool,stride,pad,want", [
    (5, 3, 3, 1, 2),   # ceil((5 + 2 - 3) / 3) + 1 = 3, but the third window would start in the after-padding
    (8, 3, 3, 1, 3),
    (5, 2, 2, 0, 3),   # no padding: the last window starts on the input's last cell
    (4, 2, 2, 1, 3),
    (7, 3, 2, 1, 4),
])
def test_ceil_mode_output_sizes_follow_torch(size, pool, stride, pad, want):
    from nncompare.models import pool_output_size
    assert pool_output_size(size, pool, stride, pad, pad, True) == want
    spec = ModelSpec("p", (1, size, size), (MaxPool2D(pool, strides=stride, padding=pad, ceil_mode=True),))
    assert spec.output_shape == (1, want, want)


@pytest.mark.parametrize("shape,out", [
    ((2, 1, 1), (7, 7)),   # every bin is the one cell
    ((1, 7, 7), (3, 3)),   # overlapping bins: rows 0-2, 2-4, 4-6
    ((2, 5, 7), (3, 2)),
    ((1, 3, 4), (5, 6)),   # larger than the input: bins repeat cells
])
def test_adaptive_average_pooling_follows_torchs_bins(shape, out):
    spec = ModelSpec("a", shape, (AdaptiveAvgPool2D(out),))
    x = normal(3, (2,) + shape)
    want = adaptive_loops(x, out)
    np.testing.assert_allclose(oracle_output(spec, x), want, rtol=1e-12)
    if shape[1:] == (1, 1):
        np.testing.assert_array_equal(want, np.broadcast_to(x, want.shape))


def test_adaptive_bins_overlap_as_torchs_do():
    from nncompare.models import adaptive_bins
    assert adaptive_bins(7, 3) == ((0, 3), (2, 5), (4, 7))
    assert adaptive_bins(1, 3) == ((0, 1),) * 3
    assert adaptive_bins(6, 3) == ((0, 2), (2, 4), (4, 6))  # divisible: plain non-overlapping windows


def test_a_broadcast_gate_multiplies_every_cell_of_its_channel():
    spec = ModelSpec("g", (3, 4, 5), (GlobalAveragePooling2D(keepdims=True, name="gate"),
                                      Multiply(name="mul", inputs=(INPUT, "gate"))))
    x = normal(4, (2, 3, 4, 5))
    want = np.zeros_like(x)
    for b, c, i, j in itertools.product(range(2), range(3), range(4), range(5)):
        want[b, c, i, j] = x[b, c, i, j] * x[b, c].mean()
    np.testing.assert_allclose(get_adapter("numpy").build(spec).layer_outputs(x)["mul"], want, rtol=1e-12)


def test_same_padding_puts_the_odd_cell_after():
    from nncompare.models.spec import same_padding
    for n, k, s in itertools.product(range(1, 12), range(1, 6), range(1, 4)):
        assert same_padding(n, k, s) == tf_same(n, k, s), (n, k, s)
