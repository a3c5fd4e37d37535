"""Central finite differences on the NumPy oracle, float64."""
import numpy as np

from nncompare.backends.base import loss_and_dlogits


def max_relative_fd_error(net, x, y, per_param: int = 12, h: float = 1e-6, seed: int = 0) -> float:
    """max |fd - analytic| over sampled weights, relative to the largest gradient entry of the model."""
    rng = np.random.default_rng(seed)
    _, grads = net.loss_and_grads(x, y)
    scale = max(np.abs(g).max() for g in grads.values())

    def loss():  # training mode (batch statistics), forward only
        return loss_and_dlogits(net.forward(np.asarray(x, np.float64), training=True), np.asarray(y))[0]

    worst = 0.0
    for key, g in grads.items():
        w = net.w[key]
        flat = rng.choice(w.size, min(per_param, w.size), replace=False)
        for ix in (np.unravel_index(i, w.shape) for i in flat):
            old = w[ix]
            w[ix] = old + h
            plus = loss()
            w[ix] = old - h
            minus = loss()
            w[ix] = old
            worst = max(worst, abs((plus - minus) / (2 * h) - g[ix]) / scale)
    return worst
