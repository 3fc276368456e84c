"""BatchNorm pieces for data split into shards (SPEC section 7): ``normkit.distributed`` (MPI
ranks) and ``normkit.dask`` (array chunks) both compute per-channel partial statistics of each
shard, combine them in a fixed order, then normalize every shard with the combined statistics.

The elementwise work stays in the C++ kernels. Its one tool is :func:`affine_about`,
``(x - center) * scale + shift`` per channel, which is the eval-mode BatchNorm kernel with
``running_mean = center``, ``running_var = 1``, ``eps = 0`` (so the kernel's rstd is exactly 1),
``weight = scale`` and ``bias = shift``:

* forward: ``y = affine_about(x, mean, rstd * w, b)``;
* backward, with the global sums ``Sdy = sum(dy)`` and ``Sdyxh = sum(dy * xhat)`` over the
  ``n`` values of each channel on every shard:
  ``dx = rstd * w * (dy - Sdy/n - xhat * Sdyxh/n)
       = [dy * w * rstd]                                   (eval-mode backward kernel)
       + affine_about(x, mean, -rstd**2 * w * Sdyxh/n, -rstd * w * Sdy/n)``.

The eval kernel holds ``running_mean`` in the statistics dtype (float32 for float32 and 16-bit
inputs); the part of the float64 mean that float32 cannot hold is folded into ``shift`` so large
means with a small spread keep their precision.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from . import _plan as P
from . import functional as F
from .stats import Moments

_F64 = np.dtype(np.float64)


def channel_axes(ndim: int, ca: int):
    """Every axis but the channel axis: what BatchNorm reduces over."""
    return tuple(a for a in range(ndim) if a != ca % ndim)


def channel_moments(x: np.ndarray, ca: int, omega=None) -> Moments:
    """Count, mean and m2 of every channel of x, in float64 (empty x: count 0); weighted by
    ``omega`` (x's shape without the channel axis) when given."""
    return Moments((x.shape[ca],)).update(x, axis=channel_axes(x.ndim, ca), sample_weight=omega)


def position_weights(fn: str, plan: P.ChannelPlan, x: np.ndarray, mask, sample_weight):
    """This shard's weights ``(N, *spatial)`` in float64 from ``mask``/``sample_weight``
    (checked as :func:`normkit.batch_norm` checks them), or None without them or in eval mode.
    The global checks (a statistic's weighted values) follow the exchange."""
    if (mask is None and sample_weight is None) or not plan.training:
        return None
    mask = None if mask is None else F.host_array(mask, fn, "mask")
    sample_weight = None if sample_weight is None else F.host_array(sample_weight, fn, "sample_weight")
    P.position_weights(fn, x, plan.ca, mask, sample_weight)
    spatial = P.spatial_shape(x, plan.ca)
    omega = np.ones((x.shape[0], *spatial))
    if mask is not None:
        omega = omega * np.broadcast_to(mask, omega.shape)
    if sample_weight is not None:
        sw = P.weight_values(fn, sample_weight)
        omega = omega * sw.reshape((-1,) + (1,) * len(spatial))
    return omega


def merge_in_order(parts) -> Moments:
    """A new Moments with ``parts`` merged one after the other (Chan's formula): the same order
    gives the same bits on every process."""
    total = parts[0].copy()
    for m in parts[1:]:
        total.merge(m)
    return total


rstd_of = P.rstd_of


def update_running(running_mean: np.ndarray, running_var: np.ndarray, m: Moments,
                   momentum: float) -> None:
    """The kernels' in-place running-statistics rule with the unbiased variance:
    ``running = (1 - momentum) * running + momentum * batch_stat`` in float64."""
    P.update_running(running_mean, running_var, m.mean, m.var(ddof=1), momentum)


def work_dtype(x: np.ndarray) -> np.dtype:
    """float32/float64 as they are; 16-bit inputs are widened to float32 where the elementwise
    work is split into several kernel calls, so that only the final result is rounded."""
    return x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float32)


def affine_about(x: np.ndarray, center: np.ndarray, scale: np.ndarray,
                 shift: Optional[np.ndarray], ca: int, out: Optional[np.ndarray] = None):
    """``(x - center) * scale + shift`` per channel (float64 ``(C,)`` vectors; ``shift=None``
    means 0) by the eval-mode BatchNorm kernel, in x's dtype; writes ``out`` when given."""
    C = x.shape[ca]
    sd = P.stat_dtype(x.dtype)
    hi = center.astype(sd)
    with np.errstate(all="ignore"):
        lo = center - hi  # what the statistics dtype cannot hold of the centre
        if shift is not None or np.any(lo != 0):
            fold = np.where(lo != 0, lo * scale, 0.0)
            shift = (np.zeros(C) if shift is None else shift) - fold
    return F.batch_norm(
        x, scale.astype(sd), None if shift is None else shift.astype(sd), running_mean=hi, running_var=np.ones(C, sd),
        training=False, eps=0.0, channel_axis=ca, out=out,
    ).y


def normalize(x, mean, rstd, weight, bias, ca: int, out=None):
    """y = (x - mean) * rstd * weight + bias with float64 global statistics (forward)."""
    scale = rstd if weight is None else rstd * weight.astype(_F64)
    return affine_about(x, mean, scale, None if bias is None else bias.astype(_F64), ca, out)


def input_grad(dx_eval: np.ndarray, x: np.ndarray, mean, rstd, weight, sum_dy, sum_dy_xhat,
               n, ca: int, omega=None) -> np.ndarray:
    """Training-mode dx from the eval-mode one (``dy * w * rstd``, x's work dtype) and the global
    float64 sums; ``mean``/``rstd`` float64. Adds into ``dx_eval`` and returns it. With weights
    ``omega`` (x's shape without the channel axis), ``n`` is the global total weight and the
    statistics' part of the gradient is scaled by each position's weight."""
    w = 1.0 if weight is None else weight.astype(_F64)
    with np.errstate(all="ignore"):
        scale = -(rstd * rstd) * w * (sum_dy_xhat / n)
        shift = -rstd * w * (sum_dy / n)
    corr = affine_about(x, mean, scale, shift, ca)
    if omega is not None:
        corr *= np.expand_dims(omega, ca % x.ndim).astype(corr.dtype)
    dx_eval += corr
    return dx_eval
