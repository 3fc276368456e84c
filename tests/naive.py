"""Naive same-dtype NumPy computations, the yardstick for half-precision tolerances.

STYLE.md section 7: for float16/bfloat16 the error of normkit's ``y``/``dx``
against the float64 reference may be at most twice the error of a naive
computation done entirely in the input's own dtype (plus a small atol).
These functions are that naive computation: every intermediate (sums, mean,
variance, rstd, the affine step) is kept in ``x.dtype``.  They are not a
reference for anything else and are never compared with tight tolerances.

Only ``y`` (forwards) or ``dx`` (backwards) is returned.
"""

from __future__ import annotations

import numpy as np


def _c(a, dt):
    return None if a is None else np.asarray(a).astype(dt)


def _to_ncs(x, channel_axis):
    x1 = np.moveaxis(x, -1, 1) if channel_axis == -1 else x
    n, c = x1.shape[0], x1.shape[1]
    s = int(np.prod(x1.shape[2:], dtype=np.int64))
    return np.ascontiguousarray(x1).reshape(n, c, s), x1.shape


def _from_ncs(y, shape1, channel_axis):
    y = y.reshape(shape1)
    return np.moveaxis(y, 1, -1) if channel_axis == -1 else y


def _mean(a, axes, dt):
    n = 1
    for ax in axes:
        n *= a.shape[ax]
    return np.add.reduce(a, axis=axes, dtype=dt, keepdims=True) / dt.type(n)


def _fwd(xg, axes, dt, eps, center=True):
    mean = _mean(xg, axes, dt) if center else dt.type(0)
    xc = xg - mean
    var = _mean(xc * xc, axes, dt)
    rstd = dt.type(1) / np.sqrt(var + dt.type(eps))
    return xc * rstd


def _bwd(dyg, xg, mean, rstd, w, axes, dt, center=True, training=True):
    xhat = (xg - mean) * rstd
    g = dyg * w
    if not training:
        return g * rstd
    c1 = _mean(g * xhat, axes, dt)
    c2 = _mean(g, axes, dt) if center else dt.type(0)
    return rstd * (g - c2 - xhat * c1)


def _affine(y, w, b):
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def batch_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *,
               training=True, eps=1e-5, channel_axis=1):
    x = np.asarray(x)
    dt = x.dtype
    xs, shape1 = _to_ncs(x, channel_axis)
    w = None if weight is None else _c(weight, dt)[None, :, None]
    b = None if bias is None else _c(bias, dt)[None, :, None]
    with np.errstate(all="ignore"):
        if training:
            y = _fwd(xs, (0, 2), dt, eps)
        else:
            mean = _c(running_mean, dt)[None, :, None]
            var = _c(running_var, dt)[None, :, None]
            y = (xs - mean) * (dt.type(1) / np.sqrt(var + dt.type(eps)))
        y = _affine(y, w, b)
    return _from_ncs(y, shape1, channel_axis)


def batch_norm_backward(dy, x, mean, rstd, weight=None, *, training=True, channel_axis=1):
    x = np.asarray(x)
    dt = x.dtype
    xs, shape1 = _to_ncs(x, channel_axis)
    dys, _ = _to_ncs(_c(dy, dt), channel_axis)
    w = dt.type(1) if weight is None else _c(weight, dt)[None, :, None]
    with np.errstate(all="ignore"):
        dx = _bwd(dys, xs, _c(mean, dt)[None, :, None], _c(rstd, dt)[None, :, None], w,
                  (0, 2), dt, training=training)
    return _from_ncs(dx, shape1, channel_axis)


def _rows(x, k):
    lead = x.shape[: x.ndim - k]
    m = int(np.prod(lead, dtype=np.int64))
    kk = int(np.prod(x.shape[x.ndim - k:], dtype=np.int64))
    return np.ascontiguousarray(x).reshape(m, kk)


def layer_norm(x, normalized_shape, weight=None, bias=None, *, eps=1e-5):
    x = np.asarray(x)
    dt = x.dtype
    k = len(tuple(normalized_shape))
    xr = _rows(x, k)
    w = None if weight is None else _c(weight, dt).reshape(1, -1)
    b = None if bias is None else _c(bias, dt).reshape(1, -1)
    with np.errstate(all="ignore"):
        y = _affine(_fwd(xr, (1,), dt, eps), w, b)
    return y.reshape(x.shape)


def layer_norm_backward(dy, x, mean, rstd, weight=None):
    x = np.asarray(x)
    dt = x.dtype
    mean = np.asarray(mean)
    k = x.ndim - mean.ndim
    xr = _rows(x, k)
    dyr = _rows(_c(dy, dt), k)
    w = dt.type(1) if weight is None else _c(weight, dt).reshape(1, -1)
    with np.errstate(all="ignore"):
        dx = _bwd(dyr, xr, _c(mean, dt).reshape(-1, 1), _c(rstd, dt).reshape(-1, 1), w,
                  (1,), dt)
    return dx.reshape(x.shape)


def rms_norm(x, normalized_shape, weight=None, *, eps):
    x = np.asarray(x)
    dt = x.dtype
    k = len(tuple(normalized_shape))
    xr = _rows(x, k)
    w = None if weight is None else _c(weight, dt).reshape(1, -1)
    with np.errstate(all="ignore"):
        y = _affine(_fwd(xr, (1,), dt, eps, center=False), w, None)
    return y.reshape(x.shape)


def rms_norm_backward(dy, x, rstd, weight=None):
    x = np.asarray(x)
    dt = x.dtype
    rstd = np.asarray(rstd)
    k = x.ndim - rstd.ndim
    xr = _rows(x, k)
    dyr = _rows(_c(dy, dt), k)
    w = dt.type(1) if weight is None else _c(weight, dt).reshape(1, -1)
    with np.errstate(all="ignore"):
        dx = _bwd(dyr, xr, dt.type(0), _c(rstd, dt).reshape(-1, 1), w, (1,), dt,
                  center=False)
    return dx.reshape(x.shape)


def group_norm(x, num_groups, weight=None, bias=None, *, eps=1e-5, channel_axis=1):
    x = np.asarray(x)
    dt = x.dtype
    xs, shape1 = _to_ncs(x, channel_axis)
    n, c, s = xs.shape
    g = int(num_groups)
    xg = xs.reshape(n, g, c // g, s)
    w = None if weight is None else _c(weight, dt)[None, :, None]
    b = None if bias is None else _c(bias, dt)[None, :, None]
    with np.errstate(all="ignore"):
        y = _affine(_fwd(xg, (2, 3), dt, eps).reshape(n, c, s), w, b)
    return _from_ncs(y, shape1, channel_axis)


def group_norm_backward(dy, x, mean, rstd, weight=None, *, channel_axis=1):
    x = np.asarray(x)
    dt = x.dtype
    xs, shape1 = _to_ncs(x, channel_axis)
    dys, _ = _to_ncs(_c(dy, dt), channel_axis)
    n, c, s = xs.shape
    g = np.asarray(mean).shape[1]
    d = c // g
    w = dt.type(1) if weight is None else _c(weight, dt).reshape(1, g, d, 1)
    with np.errstate(all="ignore"):
        dx = _bwd(dys.reshape(n, g, d, s), xs.reshape(n, g, d, s),
                  _c(mean, dt).reshape(n, g, 1, 1), _c(rstd, dt).reshape(n, g, 1, 1), w,
                  (2, 3), dt)
    return _from_ncs(dx.reshape(n, c, s), shape1, channel_axis)


def instance_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                  training=True, eps=1e-5, channel_axis=1):
    x = np.asarray(x)
    dt = x.dtype
    xs, shape1 = _to_ncs(x, channel_axis)
    w = None if weight is None else _c(weight, dt)[None, :, None]
    b = None if bias is None else _c(bias, dt)[None, :, None]
    with np.errstate(all="ignore"):
        if training:
            y = _fwd(xs, (2,), dt, eps)
        else:
            mean = _c(running_mean, dt)[None, :, None]
            var = _c(running_var, dt)[None, :, None]
            y = (xs - mean) * (dt.type(1) / np.sqrt(var + dt.type(eps)))
        y = _affine(y, w, b)
    return _from_ncs(y, shape1, channel_axis)


def instance_norm_backward(dy, x, mean, rstd, weight=None, *, training=True, channel_axis=1):
    x = np.asarray(x)
    dt = x.dtype
    xs, shape1 = _to_ncs(x, channel_axis)
    dys, _ = _to_ncs(_c(dy, dt), channel_axis)
    n, c, s = xs.shape
    shp = (n, c, 1) if training else (1, c, 1)
    w = dt.type(1) if weight is None else _c(weight, dt)[None, :, None]
    with np.errstate(all="ignore"):
        dx = _bwd(dys, xs, _c(mean, dt).reshape(shp), _c(rstd, dt).reshape(shp), w, (2,), dt,
                  training=training)
    return _from_ncs(dx, shape1, channel_axis)
