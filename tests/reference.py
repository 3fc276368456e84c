"""Plain float64 NumPy reference for normkit's five normalization ops.

Written from SPEC.md section 1 and STYLE.md section 3, on purpose without any
cleverness: every input is cast to float64 here, statistics use two passes
(mean, then the mean of squared deviations: the biased / population variance),
``rstd = 1 / sqrt(var + eps)``.  Nothing is imported from normkit.

Forwards return ``RefOutput(y, mean, rstd, running_mean, running_var)``; the
running statistics are the *updated copies* (the reference never writes into
its arguments), or ``None`` when none were given.  Backwards take the saved
``mean``/``rstd`` as arguments (so a test can feed the statistics a library
returned, e.g. float32-rounded ones) and return ``RefGrads(dx, dweight, dbias)``
with ``dweight = sum(dy * xhat)`` and ``dbias = sum(dy)`` over every axis but
the affine ones.

Canonical views (STYLE.md section 2):
  * channel norms move the channel axis to position 1 and use
    ``(N, C, S)`` (S = product of the spatial axes), GroupNorm ``(N, G, D, S)``;
  * row norms use ``(M, K)`` with K = product of the normalized axes.

Backward for a group of n elements sharing mean/rstd (held constant when
``training=False``):
    xhat = (x - mean) * rstd,  g = dy * w
    c1 = sum(g * xhat) / n,    c2 = sum(g) / n      (c2 = 0 for RMSNorm)
    dx = rstd * (g - c2 - xhat * c1)                 (training)
    dx = rstd * g                                    (statistics constant)
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import numpy as np

__all__ = [
    "RefOutput",
    "RefGrads",
    "as_f64",
    "stats_dtype",
    "rms_default_eps",
    "batch_norm",
    "batch_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "rms_norm",
    "rms_norm_backward",
]


class RefOutput(NamedTuple):
    y: np.ndarray
    mean: Optional[np.ndarray]
    rstd: np.ndarray
    running_mean: Optional[np.ndarray]
    running_var: Optional[np.ndarray]


class RefGrads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray
    dbias: Optional[np.ndarray]


# ----------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------


def _ieee(fn):
    """Run ``fn`` with IEEE semantics and no NumPy warnings (NaN/Inf inputs,
    ``var + eps == 0``): the reference must not trip ``filterwarnings=error``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return wrapper


def as_f64(a):
    """``a`` as a new float64 ndarray (``None`` stays ``None``).

    Works for float16 and for ml_dtypes' bfloat16, whose values are all
    exactly representable in float64.
    """
    if a is None:
        return None
    return np.array(np.asarray(a), dtype=np.float64, copy=True)


# Fused activations (activation="relu" | "silu") and their derivatives, in float64.
def relu(z):
    return np.where(z < 0, 0.0, z)


def relu_grad(z):
    return (z > 0).astype(np.float64)


def sigmoid(z):
    # two branches, neither overflows
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def silu(z):
    return z * sigmoid(z)


def silu_grad(z):
    s = sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


ACTIVATIONS = {"relu": (relu, relu_grad), "silu": (silu, silu_grad)}


def stats_dtype(x_dtype) -> np.dtype:
    """SPEC section 2: float64 statistics for float64 x, else float32."""
    return np.dtype(np.float64) if np.dtype(x_dtype) == np.float64 else np.dtype(np.float32)


def rms_default_eps(x_dtype) -> float:
    """SPEC section 1, rms_norm ``eps=None``: float32's machine epsilon for
    float32/float16/bfloat16 inputs, float64's for float64 inputs."""
    if np.dtype(x_dtype) == np.float64:
        return float(np.finfo(np.float64).eps)
    return float(np.finfo(np.float32).eps)


def _check_channel_axis(channel_axis):
    if channel_axis not in (1, -1):
        raise ValueError(f"reference: channel_axis must be 1 or -1, got {channel_axis!r}")


def _channels_to_axis1(x, channel_axis):
    """(N, *spatial, C) -> (N, C, *spatial) for channel_axis=-1; identity for 1."""
    _check_channel_axis(channel_axis)
    if x.ndim < 2:
        raise ValueError("reference: channel norms need x.ndim >= 2")
    return np.moveaxis(x, -1, 1) if channel_axis == -1 else x


def _channels_from_axis1(y, channel_axis):
    return np.moveaxis(y, 1, -1) if channel_axis == -1 else y


def _ncs(x):
    """(N, C, *spatial) -> (N, C, S), a copy in float64."""
    n, c = x.shape[0], x.shape[1]
    s = int(np.prod(x.shape[2:], dtype=np.int64))
    return np.ascontiguousarray(x).reshape(n, c, s)


def _moments(x, axes):
    """Two-pass mean and biased variance over ``axes`` (keepdims); NaN for an empty group."""
    n = 1
    for a in (axes if isinstance(axes, tuple) else (axes,)):
        n *= x.shape[a]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.sum(x, axis=axes, keepdims=True) / n
        var = np.sum((x - mean) ** 2, axis=axes, keepdims=True) / n
    return mean, var


def _rstd(var, eps):
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 / np.sqrt(var + eps)


def _vec(a, n, name):
    """A per-channel / per-feature parameter as float64, or ``None``."""
    if a is None:
        return None
    a = as_f64(a)
    if a.shape != (n,):
        raise ValueError(f"reference: {name} has shape {a.shape}, expected {(n,)}")
    return a


def _backward_core(dy, x, mean, rstd, w, group_axes, *, center, training):
    """Shared backward on already-broadcastable float64 arrays.

    ``mean``/``rstd``/``w`` broadcast against ``x``; ``group_axes`` are the
    axes of one statistic group.  Returns ``(dx, xhat)``.
    """
    xhat = (x - mean) * rstd
    g = dy * w
    if training:
        n = 1
        for a in group_axes:
            n *= x.shape[a]
        c1 = np.sum(g * xhat, axis=group_axes, keepdims=True) / n
        if center:
            c2 = np.sum(g, axis=group_axes, keepdims=True) / n
        else:
            c2 = 0.0
        dx = rstd * (g - c2 - xhat * c1)
    else:
        dx = g * rstd
    return dx, xhat


# ----------------------------------------------------------------------------
# BatchNorm
# ----------------------------------------------------------------------------


@_ieee
def batch_norm(
    x,
    weight=None,
    bias=None,
    running_mean=None,
    running_var=None,
    *,
    training=True,
    momentum=0.1,
    eps=1e-5,
    channel_axis=1,
):
    """Reference BatchNorm forward; statistics over every axis but the channel axis."""
    x1 = _channels_to_axis1(as_f64(x), channel_axis)
    shape1 = x1.shape
    xs = _ncs(x1)  # (N, C, S)
    n_, c, s = xs.shape
    w = _vec(weight, c, "weight")
    b = _vec(bias, c, "bias")
    rm = _vec(running_mean, c, "running_mean")
    rv = _vec(running_var, c, "running_var")
    if (rm is None) != (rv is None):
        raise ValueError("reference: give both running_mean and running_var or neither")

    if training:
        m = n_ * s  # values per channel
        mean3, var3 = _moments(xs, (0, 2))
        mean = mean3.reshape(c)
        var = var3.reshape(c)
        if rm is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                unbiased = var * m / (m - 1)
            rm = (1.0 - momentum) * rm + momentum * mean
            rv = (1.0 - momentum) * rv + momentum * unbiased
    else:
        if rm is None:
            raise ValueError("reference: training=False needs running statistics")
        mean = rm.copy()
        var = rv.copy()
    rstd = _rstd(var, eps)

    y = (xs - mean[None, :, None]) * rstd[None, :, None]
    if w is not None:
        y = y * w[None, :, None]
    if b is not None:
        y = y + b[None, :, None]
    y = _channels_from_axis1(y.reshape(shape1), channel_axis)
    return RefOutput(y, mean, rstd, rm, rv)


@_ieee
def batch_norm_backward(dy, x, mean, rstd, weight=None, *, training=True, channel_axis=1):
    """Reference BatchNorm backward from saved per-channel ``mean``/``rstd`` (C,)."""
    x1 = _channels_to_axis1(as_f64(x), channel_axis)
    dy1 = _channels_to_axis1(as_f64(dy), channel_axis)
    shape1 = x1.shape
    xs = _ncs(x1)
    dys = _ncs(dy1)
    c = xs.shape[1]
    mean = as_f64(mean).reshape(c)[None, :, None]
    rstd = as_f64(rstd).reshape(c)[None, :, None]
    w = _vec(weight, c, "weight")
    w3 = 1.0 if w is None else w[None, :, None]
    dx, xhat = _backward_core(dys, xs, mean, rstd, w3, (0, 2), center=True, training=training)
    dweight = np.sum(dys * xhat, axis=(0, 2))
    dbias = np.sum(dys, axis=(0, 2))
    dx = _channels_from_axis1(dx.reshape(shape1), channel_axis)
    return RefGrads(dx, dweight, dbias)


# ----------------------------------------------------------------------------
# LayerNorm / RMSNorm (row norms)
# ----------------------------------------------------------------------------


def _normalized_shape(normalized_shape):
    if isinstance(normalized_shape, (int, np.integer)):
        return (int(normalized_shape),)
    return tuple(int(d) for d in normalized_shape)


def _rows(x, normalized_shape):
    """x -> (M, K) float64 view/copy, with the leading shape and K."""
    ns = _normalized_shape(normalized_shape)
    k = len(ns)
    if k > x.ndim or tuple(x.shape[x.ndim - k :]) != ns:
        raise ValueError(
            f"reference: normalized_shape {ns} does not match trailing axes of {x.shape}"
        )
    lead = x.shape[: x.ndim - k]
    m = int(np.prod(lead, dtype=np.int64))
    kk = int(np.prod(ns, dtype=np.int64))
    return np.ascontiguousarray(x).reshape(m, kk), lead, ns, kk


def _feat(a, ns, kk, name):
    if a is None:
        return None
    a = as_f64(a)
    if a.shape != ns:
        raise ValueError(f"reference: {name} has shape {a.shape}, expected {ns}")
    return a.reshape(kk)


@_ieee
def layer_norm(x, normalized_shape, weight=None, bias=None, *, eps=1e-5):
    """Reference LayerNorm forward over the trailing ``normalized_shape`` axes."""
    xf = as_f64(x)
    xr, lead, ns, kk = _rows(xf, normalized_shape)
    w = _feat(weight, ns, kk, "weight")
    b = _feat(bias, ns, kk, "bias")
    mean2, var2 = _moments(xr, (1,))
    rstd2 = _rstd(var2, eps)
    y = (xr - mean2) * rstd2
    if w is not None:
        y = y * w[None, :]
    if b is not None:
        y = y + b[None, :]
    return RefOutput(y.reshape(xf.shape), mean2.reshape(lead), rstd2.reshape(lead), None, None)


@_ieee
def layer_norm_backward(dy, x, mean, rstd, weight=None):
    """Reference LayerNorm backward; ``k = x.ndim - mean.ndim`` normalized axes."""
    xf = as_f64(x)
    mean = as_f64(mean)
    k = xf.ndim - mean.ndim
    ns = tuple(xf.shape[xf.ndim - k :])
    xr, lead, ns, kk = _rows(xf, ns)
    dyr = np.ascontiguousarray(as_f64(dy)).reshape(xr.shape)
    m = xr.shape[0]
    mean2 = mean.reshape(m, 1)
    rstd2 = as_f64(rstd).reshape(m, 1)
    w = _feat(weight, ns, kk, "weight")
    w2 = 1.0 if w is None else w[None, :]
    dx, xhat = _backward_core(dyr, xr, mean2, rstd2, w2, (1,), center=True, training=True)
    dweight = np.sum(dyr * xhat, axis=0).reshape(ns)
    dbias = np.sum(dyr, axis=0).reshape(ns)
    return RefGrads(dx.reshape(xf.shape), dweight, dbias)


@_ieee
def rms_norm(x, normalized_shape, weight=None, *, eps=None):
    """Reference RMSNorm forward: ``y = x * rstd * w``, ``rstd = 1/sqrt(mean(x^2) + eps)``.

    ``eps=None`` follows SPEC (decided from the *input* dtype, before the cast).
    The returned ``mean`` is ``None``.
    """
    x_dtype = np.asarray(x).dtype
    if eps is None:
        eps = rms_default_eps(x_dtype)
    xf = as_f64(x)
    xr, lead, ns, kk = _rows(xf, normalized_shape)
    w = _feat(weight, ns, kk, "weight")
    ms = np.mean(xr * xr, axis=1, keepdims=True)
    rstd2 = _rstd(ms, eps)
    y = xr * rstd2
    if w is not None:
        y = y * w[None, :]
    return RefOutput(y.reshape(xf.shape), None, rstd2.reshape(lead), None, None)


@_ieee
def rms_norm_backward(dy, x, rstd, weight=None):
    """Reference RMSNorm backward; ``k = x.ndim - rstd.ndim``; ``dbias`` is ``None``."""
    xf = as_f64(x)
    rstd = as_f64(rstd)
    k = xf.ndim - rstd.ndim
    ns = tuple(xf.shape[xf.ndim - k :])
    xr, lead, ns, kk = _rows(xf, ns)
    dyr = np.ascontiguousarray(as_f64(dy)).reshape(xr.shape)
    rstd2 = rstd.reshape(xr.shape[0], 1)
    w = _feat(weight, ns, kk, "weight")
    w2 = 1.0 if w is None else w[None, :]
    dx, xhat = _backward_core(dyr, xr, 0.0, rstd2, w2, (1,), center=False, training=True)
    dweight = np.sum(dyr * xhat, axis=0).reshape(ns)
    return RefGrads(dx.reshape(xf.shape), dweight, None)


# ----------------------------------------------------------------------------
# GroupNorm / InstanceNorm
# ----------------------------------------------------------------------------


@_ieee
def group_norm(x, num_groups, weight=None, bias=None, *, eps=1e-5, channel_axis=1):
    """Reference GroupNorm forward; statistics per sample over C/G channels and space."""
    x1 = _channels_to_axis1(as_f64(x), channel_axis)
    shape1 = x1.shape
    xs = _ncs(x1)
    n_, c, s = xs.shape
    g = int(num_groups)
    if g < 1 or c % g != 0:
        raise ValueError(f"reference: bad num_groups {num_groups} for {c} channels")
    d = c // g
    w = _vec(weight, c, "weight")
    b = _vec(bias, c, "bias")
    xg = xs.reshape(n_, g, d, s)
    mean4, var4 = _moments(xg, (2, 3))
    rstd4 = _rstd(var4, eps)
    y = ((xg - mean4) * rstd4).reshape(n_, c, s)
    if w is not None:
        y = y * w[None, :, None]
    if b is not None:
        y = y + b[None, :, None]
    y = _channels_from_axis1(y.reshape(shape1), channel_axis)
    return RefOutput(y, mean4.reshape(n_, g), rstd4.reshape(n_, g), None, None)


@_ieee
def group_norm_backward(dy, x, mean, rstd, weight=None, *, channel_axis=1):
    """Reference GroupNorm backward from saved ``(N, G)`` statistics."""
    x1 = _channels_to_axis1(as_f64(x), channel_axis)
    dy1 = _channels_to_axis1(as_f64(dy), channel_axis)
    shape1 = x1.shape
    xs = _ncs(x1)
    dys = _ncs(dy1)
    n_, c, s = xs.shape
    mean = as_f64(mean)
    g = mean.shape[1]
    d = c // g
    mean4 = mean.reshape(n_, g, 1, 1)
    rstd4 = as_f64(rstd).reshape(n_, g, 1, 1)
    w = _vec(weight, c, "weight")
    w4 = 1.0 if w is None else w.reshape(1, g, d, 1)
    xg = xs.reshape(n_, g, d, s)
    dyg = dys.reshape(n_, g, d, s)
    dx, xhat = _backward_core(dyg, xg, mean4, rstd4, w4, (2, 3), center=True, training=True)
    dweight = np.sum(dyg * xhat, axis=(0, 3)).reshape(c)
    dbias = np.sum(dyg, axis=(0, 3)).reshape(c)
    dx = _channels_from_axis1(dx.reshape(shape1), channel_axis)
    return RefGrads(dx, dweight, dbias)


@_ieee
def instance_norm(
    x,
    weight=None,
    bias=None,
    running_mean=None,
    running_var=None,
    *,
    training=True,
    momentum=0.1,
    eps=1e-5,
    channel_axis=1,
):
    """Reference InstanceNorm forward.

    ``training=True``: per-(sample, channel) statistics over the spatial axes,
    returned with shape (N, C); running statistics, if given, move towards the
    batch average of the per-instance means and of the per-instance *unbiased*
    variances.  ``training=False``: the running statistics are used and returned
    with shape (C,).
    """
    x1 = _channels_to_axis1(as_f64(x), channel_axis)
    shape1 = x1.shape
    xs = _ncs(x1)
    n_, c, s = xs.shape
    w = _vec(weight, c, "weight")
    b = _vec(bias, c, "bias")
    rm = _vec(running_mean, c, "running_mean")
    rv = _vec(running_var, c, "running_var")
    if (rm is None) != (rv is None):
        raise ValueError("reference: give both running_mean and running_var or neither")

    if training:
        mean3, var3 = _moments(xs, (2,))  # (N, C, 1)
        rstd3 = _rstd(var3, eps)
        mean_out = mean3.reshape(n_, c)
        rstd_out = rstd3.reshape(n_, c)
        if rm is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                unbiased = var3.reshape(n_, c) * s / (s - 1)
            rm = (1.0 - momentum) * rm + momentum * np.mean(mean_out, axis=0)
            rv = (1.0 - momentum) * rv + momentum * np.mean(unbiased, axis=0)
    else:
        if rm is None:
            raise ValueError("reference: training=False needs running statistics")
        mean_out = rm.copy()
        rstd_out = _rstd(rv, eps)
        mean3 = mean_out[None, :, None]
        rstd3 = rstd_out[None, :, None]
    y = (xs - mean3) * rstd3
    if w is not None:
        y = y * w[None, :, None]
    if b is not None:
        y = y + b[None, :, None]
    y = _channels_from_axis1(y.reshape(shape1), channel_axis)
    return RefOutput(y, mean_out, rstd_out, rm, rv)


@_ieee
def instance_norm_backward(dy, x, mean, rstd, weight=None, *, training=True, channel_axis=1):
    """Reference InstanceNorm backward: (N, C) statistics when training, (C,) constants else."""
    x1 = _channels_to_axis1(as_f64(x), channel_axis)
    dy1 = _channels_to_axis1(as_f64(dy), channel_axis)
    shape1 = x1.shape
    xs = _ncs(x1)
    dys = _ncs(dy1)
    n_, c, s = xs.shape
    if training:
        mean3 = as_f64(mean).reshape(n_, c, 1)
        rstd3 = as_f64(rstd).reshape(n_, c, 1)
    else:
        mean3 = as_f64(mean).reshape(1, c, 1)
        rstd3 = as_f64(rstd).reshape(1, c, 1)
    w = _vec(weight, c, "weight")
    w3 = 1.0 if w is None else w[None, :, None]
    dx, xhat = _backward_core(dys, xs, mean3, rstd3, w3, (2,), center=True, training=training)
    dweight = np.sum(dys * xhat, axis=(0, 2))
    dbias = np.sum(dys, axis=(0, 2))
    dx = _channels_from_axis1(dx.reshape(shape1), channel_axis)
    return RefGrads(dx, dweight, dbias)
