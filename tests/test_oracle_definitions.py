"""The oracle against the definitions, written out as plain loops here: when the oracle and a framework share a
slip (say "same" padding with the odd pixel on top), the frameworks agree with it, so it is checked on its own."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from nncompare.backends import get_adapter
from nncompare.models import AvgPool2D, Conv2D, MaxPool2D, ModelSpec


def tf_same(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's "same": ceil(n / s) outputs, the padding split with the odd cell after."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def windows(shape, k, s, padding):
    """(out_h, out_w, [(row range, col range)] in unpadded coordinates) for every output cell."""
    (h, w), (kh, kw), (sh, sw) = shape, k, s
    if padding == "same":
        (pt, _), (pl, _) = tf_same(h, kh, sh), tf_same(w, kw, sw)
        oh, ow = math.ceil(h / sh), math.ceil(w / sw)
    else:
        pt = pl = padding if isinstance(padding, int) else 0
        oh, ow = (h + 2 * pt - kh) // sh + 1, (w + 2 * pl - kw) // sw + 1
    return oh, ow, [[(i * sh - pt, j * sw - pl) for j in range(ow)] for i in range(oh)]


def conv_loops(x, kernel, bias, s, padding):
    n, c, h, w = x.shape
    o, _, kh, kw = kernel.shape
    oh, ow, origin = windows((h, w), (kh, kw), s, padding)
    y = np.zeros((n, o, oh, ow))
    for b, f, i, j in itertools.product(range(n), range(o), range(oh), range(ow)):
        r0, c0 = origin[i][j]
        total = bias[f]
        for ch, di, dj in itertools.product(range(c), range(kh), range(kw)):
            r, q = r0 + di, c0 + dj
            if 0 <= r < h and 0 <= q < w:  # outside the input: a zero of the padding
                total += x[b, ch, r, q] * kernel[f, ch, di, dj]
        y[b, f, i, j] = total
    return y


def pool_loops(x, k, s, padding, reduce):
    n, c, h, w = x.shape
    oh, ow, origin = windows((h, w), k, s, padding)
    y = np.zeros((n, c, oh, ow))
    for b, ch, i, j in itertools.product(range(n), range(c), range(oh), range(ow)):
        r0, c0 = origin[i][j]
        cells = [x[b, ch, r, q] for r in range(r0, r0 + k[0]) for q in range(c0 + 0, c0 + k[1])
                 if 0 <= r < h and 0 <= q < w]  # padded cells take no part (TensorFlow's "same")
        y[b, ch, i, j] = reduce(cells)
    return y


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((2, 6, 5), (3, 2), (2, 1), "same"),   # padded unevenly on the rows only
    ((1, 7, 6), (4, 4), (2, 3), "same"),   # an even kernel: the extra pad is after
    ((2, 5, 7), (3, 3), (1, 2), 2),        # int padding
    ((1, 6, 6), (2, 3), (3, 2), "valid"),  # floor output size
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


def test_same_padding_puts_the_odd_cell_after():
    from nncompare.models.spec import same_padding
    for n, k, s in itertools.product(range(1, 12), range(1, 6), range(1, 4)):
        assert same_padding(n, k, s) == tf_same(n, k, s), (n, k, s)
