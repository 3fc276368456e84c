"""End to end: small NumPy networks built from plain matmuls and normkit layers, in float64.

* The whole-network gradient (every Linear weight and bias, every norm weight and bias, and
  the input) from the layers' ``backward`` matches central finite differences of the loss.
* A few hundred SGD steps on a synthetic problem make the loss fall substantially, and the
  eval-mode network (running statistics) is about as good as the training-mode one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

nk = pytest.importorskip("normkit")


# ----------------------------------------------------------------------------
# a tiny framework: modules with forward / backward / params
# ----------------------------------------------------------------------------


class Linear:
    def __init__(self, rng, n_in, n_out):
        self.weight = rng.standard_normal((n_in, n_out)) / math.sqrt(n_in)
        self.bias = 0.1 * rng.standard_normal(n_out)
        self.grad_weight = self.grad_bias = None

    def __call__(self, x):
        self.x = x
        return x @ self.weight + self.bias

    def backward(self, dy):
        self.grad_weight = self.x.T @ dy
        self.grad_bias = dy.sum(axis=0)
        return dy @ self.weight.T

    def train(self, mode=True):
        return self


class Tanh:
    def __call__(self, x):
        self.y = np.tanh(x)
        return self.y

    def backward(self, dy):
        return dy * (1.0 - self.y * self.y)

    def train(self, mode=True):
        return self


class Reshape:
    def __init__(self, *shape):
        self.shape = shape

    def __call__(self, x):
        self.in_shape = x.shape
        return x.reshape((x.shape[0],) + self.shape)

    def backward(self, dy):
        return dy.reshape(self.in_shape)

    def train(self, mode=True):
        return self


class Net:
    def __init__(self, *modules):
        self.modules = modules

    def __call__(self, x):
        for m in self.modules:
            x = m(x)
        return x

    def backward(self, dy):
        for m in reversed(self.modules):
            dy = m.backward(dy)
        return dy

    def train(self, mode=True):
        for m in self.modules:
            m.train(mode)
        return self

    def params(self):
        """(name, array, gradient getter) of every parameter, in module order."""
        out = []
        for i, m in enumerate(self.modules):
            for p in ("weight", "bias"):
                a = getattr(m, p, None)
                if isinstance(a, np.ndarray):
                    out.append((f"{i}:{type(m).__name__}.{p}", a,
                                lambda m=m, p=p: getattr(m, "grad_" + p)))
        return out

    def state(self):
        return [m.state_dict() if hasattr(m, "state_dict") else None for m in self.modules]

    def load(self, state):
        for m, s in zip(self.modules, state):
            if s is not None:
                m.load_state_dict(s)


def mse(out, target):
    d = out - target
    return 0.5 * float(np.mean(d * d)), d / d.size


def cross_entropy(logits, labels):
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    loss = -float(logp[np.arange(n), labels].mean())
    g = np.exp(logp)
    g[np.arange(n), labels] -= 1.0
    return loss, g / n


def bn_ln_net(rng, n_in=5, hidden=8, n_out=3):
    """Linear -> BatchNorm -> tanh -> Linear -> LayerNorm -> tanh -> Linear."""
    f64 = dict(dtype=np.float64)
    return Net(Linear(rng, n_in, hidden), nk.BatchNorm(hidden, **f64), Tanh(),
               Linear(rng, hidden, hidden), nk.LayerNorm(hidden, **f64), Tanh(),
               Linear(rng, hidden, n_out))


def in_gn_rms_net(rng, n_in=6, n_out=4):
    """Linear -> (N, 3, 4) -> InstanceNorm -> tanh -> Linear -> GroupNorm -> tanh -> Linear
    -> RMSNorm -> Linear."""
    f64 = dict(dtype=np.float64)
    return Net(Linear(rng, n_in, 12), Reshape(3, 4),
               nk.InstanceNorm(3, affine=True, track_running_stats=True, **f64),
               Reshape(12), Tanh(), Linear(rng, 12, 8), nk.GroupNorm(2, 8, **f64), Tanh(),
               Linear(rng, 8, 8), nk.RMSNorm(8, **f64), Linear(rng, 8, n_out))


def randomize_norms(net, rng):
    for name, a, _ in net.params():
        if "Norm" in name:
            a[...] = (1.0 if name.endswith("weight") else 0.0) + 0.3 * rng.standard_normal(a.shape)


# ----------------------------------------------------------------------------
# gradient check
# ----------------------------------------------------------------------------


def rel_error(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-300))


def check_gradients(net, loss_fn, x, h=1e-5):
    loss0, dout = loss_fn(net(x))
    dx = net.backward(dout)
    analytic = [(name, getter().copy(), a) for name, a, getter in net.params()]
    analytic.append(("input", dx, x))
    assert len(analytic) > 1
    report = {}
    for name, grad, arr in analytic:
        assert grad.shape == arr.shape, name
        fd = np.empty_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + h
            lp, _ = loss_fn(net(x))
            arr[i] = old - h
            lm, _ = loss_fn(net(x))
            arr[i] = old
            fd[i] = (lp - lm) / (2 * h)
        if np.linalg.norm(fd) < 1e-8:
            # a Linear bias right before BatchNorm / InstanceNorm: the normalization removes
            # any per-channel constant, so its gradient is exactly zero.
            assert np.linalg.norm(grad) < 1e-12, f"{name}: gradient should vanish"
            report[name] = 0.0
            continue
        report[name] = rel_error(grad, fd)
    bad = {k: v for k, v in report.items() if not v < 1e-5}
    assert not bad, f"relative gradient errors above 1e-5: {bad}"
    return report


def test_bn_ln_network_gradient_matches_finite_differences():
    rng = np.random.default_rng(11)
    net = bn_ln_net(rng)
    randomize_norms(net, rng)
    x = rng.standard_normal((10, 5))
    target = rng.standard_normal((10, 3))
    report = check_gradients(net, lambda out: mse(out, target), x)
    # the first Linear's bias feeds BatchNorm: its gradient vanishes; the others do not
    assert report["0:Linear.bias"] == 0.0
    assert sum(1 for v in report.values() if v > 0.0) == len(report) - 1


def test_in_gn_rms_network_gradient_matches_finite_differences():
    rng = np.random.default_rng(12)
    net = in_gn_rms_net(rng)
    randomize_norms(net, rng)
    x = rng.standard_normal((6, 6))
    labels = rng.integers(0, 4, size=6)
    check_gradients(net, lambda out: cross_entropy(out, labels), x)


def test_eval_mode_network_gradient_matches_finite_differences():
    """In eval mode the running statistics are constants of the network: the backward with
    training=False must be the exact derivative of that function."""
    rng = np.random.default_rng(13)
    net = bn_ln_net(rng)
    randomize_norms(net, rng)
    for _ in range(3):  # non-trivial running statistics
        net(rng.standard_normal((16, 5)))
    net.train(False)
    x = rng.standard_normal((7, 5))
    target = rng.standard_normal((7, 3))
    report = check_gradients(net, lambda out: mse(out, target), x)
    assert report["0:Linear.bias"] > 0.0  # no longer removed by batch statistics


# ----------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------


def full_loss(net, loss_fn, x, y, training):
    """Loss on all of x without disturbing the running statistics."""
    saved = net.state()
    net.train(training)
    loss, _ = loss_fn(net(x), y)
    net.load(saved)
    net.train(True)
    return loss


def sgd(net, loss_fn, x, y, rng, steps=200, batch=32, lr=0.1):
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(x), size=batch, replace=False)
        loss, dout = loss_fn(net(x[idx]), y[idx])
        net.backward(dout)
        for _, a, getter in net.params():
            a -= lr * getter()
        losses.append(loss)
    return losses


def test_sgd_training_reduces_regression_loss():
    rng = np.random.default_rng(2024)
    x = rng.standard_normal((256, 5))
    teacher = rng.standard_normal((5, 3))
    y = np.tanh(x @ teacher) + 0.5 * np.sin(2.0 * x[:, :3])
    net = bn_ln_net(rng)
    initial = full_loss(net, mse, x, y, training=True)
    bn = net.modules[1]
    losses = sgd(net, mse, x, y, rng, steps=200, lr=0.2)
    assert all(np.isfinite(losses))
    final = full_loss(net, mse, x, y, training=True)
    final_eval = full_loss(net, mse, x, y, training=False)
    assert final < 0.5 * initial, (initial, final)
    assert final_eval < 0.5 * initial, (initial, final_eval)
    assert bn.num_batches_tracked == 200
    # the running statistics track the pre-BatchNorm activations of the data (loosely: they
    # average recent minibatches of a network that was still changing)
    h = net.modules[0](x)
    assert np.allclose(bn.running_mean, h.mean(axis=0), atol=0.3)
    assert np.allclose(bn.running_var, h.var(axis=0, ddof=1), rtol=0.3)


def test_sgd_training_reduces_classification_loss():
    rng = np.random.default_rng(7)
    centers = 2.0 * rng.standard_normal((4, 6))
    labels = rng.integers(0, 4, size=256)
    x = centers[labels] + rng.standard_normal((256, 6))
    net = in_gn_rms_net(rng)
    initial = full_loss(net, cross_entropy, x, labels, training=True)
    losses = sgd(net, cross_entropy, x, labels, rng, steps=200, lr=0.2)
    assert all(np.isfinite(losses))
    final = full_loss(net, cross_entropy, x, labels, training=True)
    assert final < 0.5 * initial, (initial, final)
    net.train(False)
    accuracy = float(np.mean(np.argmax(net(x), axis=1) == labels))
    assert accuracy > 0.8
