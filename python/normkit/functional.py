"""Stateless normalization kernels on host (NumPy) arrays.

Every function checks its arguments with the operation's plan (``normkit._plan``: every rule,
shared with the CUDA, MPI and Dask paths) before any memory is written, converts what the C++
core needs (native byte order, statistics dtype, a dense view), and calls ``normkit._core`` on
one of its two canonical views:

* row view ``(M, N)``: LayerNorm (and RMSNorm), one statistic per row;
* channel view ``(B, C, S)`` or channels-last ``(B, S, C)``: BatchNorm (one statistic per
  channel), GroupNorm (one per sample and group) and InstanceNorm (GroupNorm with G = C).

C-contiguous inputs, and channels-last memory with ``channel_axis=1``, are used without a copy;
any other strides are copied once to a dense array first. CUDA arrays are handed to
``normkit._cuda_dispatch``.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence, Union

import numpy as np

from . import _core
from . import _cuda_dispatch as _cuda
from . import _plan as P
from ._plan import AddNormOutput, NormGrads, NormOutput

__all__ = [
    "NormOutput",
    "NormGrads",
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
    "AddNormOutput",
    "add_layer_norm",
    "add_layer_norm_backward",
    "add_rms_norm",
    "add_rms_norm_backward",
]

ShapeLike = Union[int, Sequence[int]]

# The C++ fast paths build NormOutput themselves (they return None for anything unusual).
_core._set_result_types(NormOutput, NormGrads)
_row_fast = _core.row_norm_fast
_batch_fast = _core.batch_norm_fast
_row_backward_fast = _core.row_norm_backward_fast
_batch_backward_fast = _core.batch_norm_backward_fast

# --------------------------------------------------------------------------------------------
# host arrays


def host_array(a, fn: str, name: str) -> np.ndarray:
    """``np.asarray(a)``; TypeError for a CUDA array (x is a host array)."""
    if type(a) is np.ndarray:
        return a
    P.same_kind(fn, np.empty(0), **{name: a})
    return np.asarray(a)


def data_array(x, fn: str, name: str = "x") -> np.ndarray:
    """x (or dy) as an ndarray of a supported float dtype in native byte order: non-native data is
    converted once (the kernels read native floats only), so its values are used correctly."""
    if type(x) is not np.ndarray:
        x = host_array(x, fn, name)
    P.data_dtype(P.arg(x), fn, name)
    if not x.dtype.isnative:
        x = x.astype(P.native_dtype(x.dtype))
    elif not x.flags.aligned:  # e.g. a view at an odd byte offset: the kernels read aligned data
        x = x.copy()
    return x


def param(v, sd: np.dtype) -> Optional[np.ndarray]:
    """weight, bias, saved statistics (already checked): dense, in the statistics dtype."""
    if v is None:
        return None
    if v.dtype != sd or not v.flags.c_contiguous or not v.flags.aligned:
        v = np.array(v, dtype=sd, order="C")  # a copy: contiguous, aligned
    return v


def hide_varargs(f):
    """Show ``f``'s signature without the ``*args`` that only exists to catch a positional
    running_mean (help() and inspect then list running_mean/running_var as keyword-only)."""
    sig = inspect.signature(f)
    f.__signature__ = sig.replace(
        parameters=[q for q in sig.parameters.values() if q.kind is not q.VAR_POSITIONAL]
    )
    return f


def _host_args(fn, **arrays):
    """The array arguments as ndarrays (lists etc. converted), None kept; TypeError for a CUDA
    array among them."""
    for k, v in arrays.items():
        if v is not None and type(v) is not np.ndarray:
            arrays[k] = host_array(v, fn, k)
    return arrays


# --------------------------------------------------------------------------------------------
# views and outputs

def _inverse(perm: Tuple[int, ...]) -> Tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _channel_view(x: np.ndarray, channel_axis: int):
    """(dense 3-D view, channels_last, perm) with x.transpose(perm) the dense array's layout."""
    nd = x.ndim
    if channel_axis == 1:
        first = tuple(range(nd))
        last = (0, *range(2, nd), 1)
    else:
        first = (0, nd - 1, *range(1, nd - 1))
        last = tuple(range(nd))
    B, C = x.shape[0], x.shape[channel_axis]
    S = P.prod(x.shape[1:-1]) if channel_axis == -1 else P.prod(x.shape[2:])
    xf = x.transpose(first)
    if xf.flags.c_contiguous:
        return xf.reshape(B, C, S), False, first
    xl = x.transpose(last)
    if xl.flags.c_contiguous:
        return xl.reshape(B, S, C), True, last
    # Any other strides: one dense copy, keeping the caller's channel placement.
    if channel_axis == 1:
        return _dense(xf).reshape(B, C, S), False, first
    return _dense(xl).reshape(B, S, C), True, last


def _empty(shape, dtype) -> np.ndarray:
    """An uninitialized C-contiguous array for an output or temporary. Buffers of 256 KiB or more
    come from normkit's bounded cache of freed buffers (``set_buffer_cache_limit``), which
    spares the page faults of mapping fresh memory on every call."""
    a = _core.empty(shape, dtype)
    return np.empty(shape, dtype) if a is None else a  # None: NumPy raises MemoryError itself


def _dense(a: np.ndarray) -> np.ndarray:
    """``a`` itself when C-contiguous and aligned, else a C-contiguous copy."""
    if a.flags.c_contiguous and a.flags.aligned:
        return a
    c = _empty(a.shape, a.dtype)
    np.copyto(c, a)
    return c


def _like_view(a: np.ndarray, perm, shape3) -> np.ndarray:
    return _dense(a.transpose(perm)).reshape(shape3)


def _output(out: Optional[np.ndarray], x: np.ndarray, xp: np.ndarray, perm, others=()):
    """(yp, y, copy_back): yp is the dense buffer the kernel writes (xp's shape), y the array
    returned to the caller; copy_back is None or a dense temporary to copy into ``out``.

    ``out`` is written directly when it is in native byte order, its memory has the kernel's
    layout, it does not overlap any of
    ``others`` (the other inputs the kernel reads: weight, bias, running statistics), and either
    does not overlap ``xp`` or is exactly ``xp`` (in place, safe because every group is reduced
    before any of its outputs is written); otherwise the kernel writes a temporary first.
    """
    pshape = tuple(x.shape[p] for p in perm)
    if out is None:
        yp = _empty(xp.shape, x.dtype)
        return yp, yp.reshape(pshape).transpose(_inverse(perm)), None
    op = out.transpose(perm)
    if out.dtype.isnative and out.flags.aligned and op.flags.c_contiguous and not any(
        o is not None and np.may_share_memory(out, o) for o in others
    ):
        yp = op.reshape(xp.shape)
        if not np.may_share_memory(yp, xp) or (
            yp.__array_interface__["data"][0] == xp.__array_interface__["data"][0]
        ):
            return yp, out, None
    tmp = _empty(xp.shape, x.dtype)
    return tmp, out, tmp.reshape(pshape).transpose(_inverse(perm))



# --------------------------------------------------------------------------------------------
# channel norms: BatchNorm, GroupNorm, InstanceNorm


def _native_running(r: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The array the kernel updates: ``r`` itself, or a native-order copy of a non-native ``r``
    (copied back into ``r``, in its own byte order, after the kernel)."""
    if r is None or (r.dtype.isnative and r.flags.aligned):
        return r
    return np.array(r, dtype=P.native_dtype(r.dtype))  # aligned, native; copied back after


def check_running(plan: P.ChannelPlan, x, w, b, rm, rv) -> None:
    """The data-dependent rules on running statistics (their plan-level rules have passed)."""
    if rm is None:
        return
    if np.may_share_memory(rm, rv):
        P.running_overlap(plan.fn, "running_mean", "running_var")
    if plan.updates_running:  # written while these are read
        for rname, r in (("running_mean", rm), ("running_var", rv)):
            for name, a in (("x", x), ("weight", w), ("bias", b)):
                if a is not None and np.may_share_memory(r, a):
                    P.running_overlap(plan.fn, rname, name)
    if plan.uses_running and np.any(rv < 0):
        P.negative_running_var(plan.fn)


def _affine_for(plan: P.ChannelPlan, w, b, weighted: bool = False):
    """With a fused activation or weighted statistics the kernels take weight and bias always:
    ones / zeros for absent ones (the same values the kernels otherwise assume)."""
    if plan.activation or weighted:
        w = np.ones(plan.C, plan.sd) if w is None else w
        b = np.zeros(plan.C, plan.sd) if b is None else b
    return w, b


class _Weights:
    """Position weights of a weighted call (mask= / sample_weight=): omega (N * S,) in the
    statistics dtype, shared by the channels, and what the statistics need of it, per sample
    (total weight, weighted positions, sum of squared weights), in float64."""

    def __init__(self, plan: P.ChannelPlan, omega, w, count, sq):
        self.omega, self.sq = omega, sq
        if plan.groups:  # GroupNorm / InstanceNorm: (N, G) groups of C / G channels each
            D = plan.C // plan.groups
            self.group_w = np.repeat(w * D, plan.groups)
            self.count = np.repeat(count, plan.groups)
        else:  # BatchNorm: every channel over the whole batch
            self.group_w = np.full(plan.C, w.sum())
            self.count = np.full(plan.C, count.sum())


def position_weights(plan: P.ChannelPlan, x, mask, sample_weight) -> Optional[_Weights]:
    """The weights of a training-mode call with ``mask``/``sample_weight``, checked; None when
    there are none or every weight is 1 (then the unweighted kernels run: the same bits)."""
    if (mask is None and sample_weight is None) or not plan.training:
        return None
    fn, N, S = plan.fn, plan.N, plan.S
    m = None
    if mask is not None:
        m = np.broadcast_to(mask, (N, *P.spatial_shape(x, plan.ca))).reshape(N, S)
    if sample_weight is None:  # a mask: 0/1 weights, counted without converting
        count = np.count_nonzero(m, axis=1).astype(np.float64)
        if np.all(count == S):
            return None
        omega = _empty((N * S,), plan.sd)  # from the buffer cache: no page faults per call
        np.copyto(omega.reshape(N, S), m)
        wts = _Weights(plan, omega, count, count, count)
    else:
        sw = P.weight_values(fn, sample_weight)
        omega = np.broadcast_to(sw[:, None], (N, S)) if m is None else m * sw[:, None]
        if np.all(omega == 1.0):
            return None
        wts = _Weights(plan, np.ascontiguousarray(omega, plan.sd).reshape(-1), omega.sum(axis=1),
                       np.count_nonzero(omega, axis=1), (omega * omega).sum(axis=1))
    need = 1 if plan.fn.startswith("group_norm") else 2  # BatchNorm / InstanceNorm: > 1 value
    if plan.C and np.any(wts.count < need):
        what = "a weighted value" if need == 1 else "more than one weighted value"
        raise ValueError(f"{fn}: mask/sample_weight leave a statistic without {what} "
                         "(every group needs one; BatchNorm and InstanceNorm more than one)")
    return wts


def _weighted_running(plan: P.ChannelPlan, wts: _Weights, moments: np.ndarray, rm, rv) -> None:
    """Running statistics from the weighted moments: the weighted mean and the unbiased
    weighted variance with reliability weights, M2 / (W - sum(w^2) / W) (README)."""
    n = moments.size // 3
    W, mean, m2 = moments[:n], moments[n:2 * n], moments[2 * n:]
    if plan.groups:  # InstanceNorm: per (sample, channel), then averaged over the batch
        sq = np.repeat(wts.sq, plan.C)
        var_u = (m2 / (W - sq / W)).reshape(plan.N, plan.C)
        P.update_running(rm, rv, mean.reshape(plan.N, plan.C).mean(axis=0), var_u.mean(axis=0),
                         plan.momentum)
    else:
        P.update_running(rm, rv, mean, m2 / (W - wts.sq.sum() / W), plan.momentum)


def _channel_forward(plan: P.ChannelPlan, x, weight, bias, rm, rv, out, wts=None) -> NormOutput:
    x = data_array(x, plan.fn)
    sd = plan.sd
    w, b = param(weight, sd), param(bias, sd)
    check_running(plan, x, w, b, rm, rv)
    if x.dtype != np.float64 and plan.eps < _TINY_EPS:
        return _channel_forward_wide(plan, x, w, b, rm, rv, out, wts)
    xp, channels_last, perm = _channel_view(x, plan.ca)
    yp, y, copy_back = _output(out, x, xp, perm, (w, b, rm, rv))
    mean = np.empty(plan.stat_shape, sd)
    rstd = np.empty(plan.stat_shape, sd)
    if mean.size or x.size:  # else nothing to compute (e.g. InstanceNorm with zero channels)
        rm_k, rv_k = _native_running(rm), _native_running(rv)
        wk, bk = _affine_for(plan, w, b, wts is not None)
        omega = moments = None
        if wts is not None:  # running statistics are updated here, from the weighted moments
            omega = wts.omega if wts.omega.dtype == sd else wts.omega.astype(sd)
            moments = np.empty(3 * mean.size)
            rm_k = rv_k = None
        _core.channel_norm_forward(
            xp, channels_last, wk, bk, rm_k, rv_k, plan.training, plan.momentum, plan.eps, yp,
            mean.reshape(-1), rstd.reshape(-1), plan.groups, plan.activation, omega, moments,
        )
        if wts is not None and rm is not None:
            _weighted_running(plan, wts, moments, rm, rv)
        for r, r_k in ((rm, rm_k), (rv, rv_k)):
            if r_k is not None and r is not r_k:
                np.copyto(r, r_k)
    if copy_back is not None:
        np.copyto(out, copy_back)
    return NormOutput(y, mean, rstd)


# Below this eps, rstd = 1/sqrt(var + eps) of a float32/half group can exceed float32's range
# (var + eps < 2**-256), and the float32 kernels would compute (x - mean) * rstd as inf. Such
# calls (in practice eps=0 on data whose spread is below about 1e-38) run the float64 kernels on
# a float64 copy of x: y comes from the float64 statistics and is right; the saved mean and rstd
# are their float32 roundings, so rstd may hold inf (the backward then gives inf/NaN for that
# group: pass float64 data to differentiate through such statistics).
_TINY_EPS = 2.0 ** -250


def _channel_forward_wide(plan, x, w, b, rm, rv, out, wts=None) -> NormOutput:
    f64 = np.dtype(np.float64)
    wide = lambda v: None if v is None else v.astype(f64)  # noqa: E731
    rm64, rv64 = wide(rm), wide(rv)
    r = _channel_forward(plan._replace(sd=f64), x.astype(f64), wide(w), wide(b), rm64, rv64, None,
                         wts)
    for dst, src in ((rm, rm64), (rv, rv64)):
        if dst is not None:
            np.copyto(dst, src, casting="unsafe")
    return _narrow(r, x.dtype, out)


def _narrow(r: NormOutput, dtype: np.dtype, out: Optional[np.ndarray]) -> NormOutput:
    """A float64 result given back in ``dtype`` (y, into ``out`` when given) and its statistics
    dtype; a statistic beyond float32's range becomes inf, on purpose (see _TINY_EPS)."""
    sd = P.stat_dtype(dtype)
    with np.errstate(over="ignore"):
        y = r.y.astype(dtype)
        mean = None if r.mean is None else r.mean.astype(sd)
        rstd = r.rstd.astype(sd)
    if out is not None:
        np.copyto(out, y, casting="unsafe")
        y = out
    return NormOutput(y, mean, rstd)


def _channel_backward(plan: P.ChannelPlan, dy, x, mean, rstd, weight, bias=None,
                      wts=None) -> NormGrads:
    x = data_array(x, plan.fn)
    dy = data_array(dy, plan.fn, "dy")
    if dy.dtype != x.dtype:
        dy = dy.astype(x.dtype)
    sd = plan.sd
    mean, rstd, w = param(mean, sd), param(rstd, sd), param(weight, sd)
    w, b = _affine_for(plan, w, param(bias, sd), wts is not None)
    xp, channels_last, perm = _channel_view(x, plan.ca)
    dyp = _like_view(dy, perm, xp.shape)
    dxp, dx, _ = _output(None, x, xp, perm)
    C = plan.C
    if mean.size == 0 and x.size == 0:  # no data (e.g. InstanceNorm with zero channels)
        return NormGrads(dx, np.zeros(C, sd), np.zeros(C, sd))
    dweight = np.empty(C, sd)
    dbias = np.empty(C, sd)
    omega = group_w = None
    if wts is not None:
        omega = wts.omega if wts.omega.dtype == sd else wts.omega.astype(sd)
        group_w = wts.group_w
    _core.channel_norm_backward(
        dyp, xp, channels_last, mean.reshape(-1), rstd.reshape(-1), w, plan.training, dxp,
        dweight, dbias, plan.groups, b, plan.activation, omega, group_w,
    )
    return NormGrads(dx, dweight, dbias)


@hide_varargs
def batch_norm(
    x,
    weight=None,
    bias=None,
    *args,
    running_mean=None,
    running_var=None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    channel_axis: int = 1,
    out: Optional[np.ndarray] = None,
    activation: Optional[str] = None,
    mask=None,
    sample_weight=None,
) -> NormOutput:
    """Batch normalization: statistics per channel over every other axis.

    Parameters
    ----------
    x : array_like
        ``(N, C, *spatial)`` (``channel_axis=1``) or ``(N, *spatial, C)``
        (``channel_axis=-1``); float32, float64, float16 or bfloat16, any byte order.
    weight, bias : array_like of shape ``(C,)``, optional
        Affine parameters (None: 1 and 0); any float dtype, converted to the statistics dtype.
    running_mean, running_var : ndarray of shape ``(C,)``, optional, keyword-only
        Running statistics in the statistics dtype (float64 for float64 x, else float32),
        writeable. With ``training=True`` they are updated in place:
        ``running = (1 - momentum) * running + momentum * batch_stat`` with the unbiased batch
        variance. With ``training=False`` they are the statistics used (required).
    training : bool
        Batch statistics (True) or the running statistics (False).
    momentum : float in [0, 1]
    eps : float >= 0
    channel_axis : {1, -1}
    out : ndarray, optional
        Receives y (x's shape and dtype; may be x itself or overlap it).
    activation : {None, 'relu', 'silu'}
        Fused activation: ``y = act(xhat * weight + bias)`` in the same pass over memory. Its
        backward is :func:`batch_norm_backward` with the same ``activation`` and ``bias``.
    mask : array_like of bool, optional
        Broadcastable to x's shape without the channel axis, ``(N, *spatial)``: the training
        statistics use only the positions where it is True (padding excluded); y is computed at
        every position from them. Ignored with ``training=False``. Pass the same mask to the
        backward.
    sample_weight : array_like of shape ``(N,)``, optional
        Real weights >= 0 per sample: weighted training statistics (with ``mask``, the product).
        Running statistics get the weighted mean and the unbiased weighted variance (README).

    Returns
    -------
    NormOutput
        ``(y, mean, rstd)``: y in x's dtype (it is ``out`` when given); mean and rstd ``(C,)`` in
        the statistics dtype (the running statistics used when ``training=False``).

    Raises
    ------
    TypeError
        Unsupported dtypes; a CUDA array mixed with host arrays; ``training`` not a bool;
        ``eps``/``momentum`` not real numbers; running statistics of another dtype; a 4th
        positional argument (running statistics are keyword-only).
    ValueError
        Wrong ranks or shapes; ``channel_axis`` not 1/-1; one value per channel when training;
        ``eps < 0``; ``momentum`` outside [0, 1]; ``training=False`` without running statistics
        or with a negative ``running_var``; read-only or overlapping outputs; ``out`` of the
        wrong shape or dtype. Nothing is written when an error is raised.
    """
    if args:
        P.positional_running("batch_norm", args)
    if type(x) is not np.ndarray and P.is_device(x):
        _host_only_weights("batch_norm", mask is not None or sample_weight is not None)
        return _cuda.batch_norm(x, weight, bias, running_mean, running_var, training, momentum,
                                eps, channel_axis, out, activation)
    if activation is mask is sample_weight is None:
        r = _batch_fast(x, weight, bias, running_mean, running_var, training, momentum, eps,
                        channel_axis, out)
        if r is not None:
            return r
    fn = "batch_norm"
    P.training_flag(training, fn)
    a = _host_args(fn, x=x, weight=weight, bias=bias, out=out, mask=mask,
                   sample_weight=sample_weight)
    P.same_kind(fn, a["x"], running_mean=running_mean, running_var=running_var)
    plan = P.batch_norm(fn, a["x"], a["weight"], a["bias"], running_mean, running_var, training,
                        momentum, eps, channel_axis, a["out"], activation=activation)
    P.position_weights(fn, a["x"], plan.ca, a["mask"], a["sample_weight"])
    wts = position_weights(plan, a["x"], a["mask"], a["sample_weight"])
    return _channel_forward(plan, a["x"], a["weight"], a["bias"], running_mean, running_var,
                            a["out"], wts)


def _host_only_weights(fn: str, weighted: bool) -> None:
    if weighted:
        raise TypeError(f"{fn}: mask and sample_weight take host (NumPy) arrays only")


def batch_norm_backward(
    dy, x, mean, rstd, weight=None, *, training: bool = True, channel_axis: int = 1, bias=None,
    activation: Optional[str] = None, mask=None, sample_weight=None,
) -> NormGrads:
    """Gradients of :func:`batch_norm`.

    Parameters
    ----------
    dy : array_like
        Upstream gradient, x's shape.
    x : array_like
        The forward's input.
    mean, rstd : array_like of shape ``(C,)``
        The forward's saved statistics.
    weight : array_like of shape ``(C,)``, optional
    training : bool
        False treats the statistics as constants (``dx = dy * weight * rstd``).
    channel_axis : {1, -1}
    bias : array_like of shape ``(C,)``, optional
        The forward's bias; read only with an ``activation``.
    activation : {None, 'relu', 'silu'}
        The forward's fused activation: ``dy`` is then the gradient of its output, and the
        pre-activation ``xhat * weight + bias`` is recomputed from x and the statistics (ReLU's
        derivative is taken as 0 where it is exactly 0).
    mask, sample_weight : optional
        The forward's (weighted statistics): the statistics' gradient reaches each position in
        proportion to its weight.

    Returns
    -------
    NormGrads
        ``(dx, dweight, dbias)``: dx in x's dtype; ``dweight = sum(dy * xhat)`` and
        ``dbias = sum(dy)`` of shape ``(C,)`` in the statistics dtype.

    Raises
    ------
    TypeError
        Unsupported dtypes, mixed CUDA/host arrays, ``training`` not a bool.
    ValueError
        Shapes that do not match x, ``channel_axis`` not 1/-1, an empty reduction.
    """
    if activation is bias is mask is sample_weight is None and (
            type(x) is np.ndarray or not P.is_device(x)):
        r = _batch_backward_fast(dy, x, mean, rstd, weight, training, channel_axis)
        if r is not None:
            return r
    if P.is_device(x):
        _host_only_weights("batch_norm_backward", mask is not None or sample_weight is not None)
        return _cuda.channel_backward("batch_norm_backward", "batch", dy, x, mean, rstd, weight,
                                      training, channel_axis, bias, activation)
    return _channel_backward_host("batch_norm_backward", "batch", dy, x, mean, rstd, weight,
                                  training, channel_axis, bias, activation, mask, sample_weight)


def _channel_backward_host(fn, kind, dy, x, mean, rstd, weight, training, channel_axis,
                           bias=None, activation=None, mask=None, sample_weight=None):
    a = _host_args(fn, dy=dy, x=x, mean=mean, rstd=rstd, weight=weight, bias=bias, mask=mask,
                   sample_weight=sample_weight)
    plan = P.channel_backward(fn, kind, a["dy"], a["x"], a["mean"], a["rstd"], a["weight"],
                              training, channel_axis, a["bias"], activation)
    P.position_weights(fn, a["x"], plan.ca, a["mask"], a["sample_weight"])
    wts = position_weights(plan._replace(N=a["x"].shape[0]), a["x"], a["mask"], a["sample_weight"])
    return _channel_backward(plan, a["dy"], a["x"], a["mean"], a["rstd"], a["weight"],
                             a["bias"], wts)


def group_norm(
    x,
    num_groups: int,
    weight=None,
    bias=None,
    *,
    eps: float = 1e-5,
    channel_axis: int = 1,
    out: Optional[np.ndarray] = None,
    activation: Optional[str] = None,
    mask=None,
) -> NormOutput:
    """Group normalization: per sample, statistics over each group of ``C / num_groups``
    channels and all spatial positions.

    Parameters
    ----------
    x : array_like
        ``(N, C, *spatial)`` or channels-last with ``channel_axis=-1``.
    num_groups : int
        A divisor of C.
    weight, bias : array_like of shape ``(C,)``, optional
    eps : float >= 0
    channel_axis : {1, -1}
    out : ndarray, optional
    activation : {None, 'relu', 'silu'}
        Fused activation, as in :func:`batch_norm` (GroupNorm + SiLU is the diffusion U-Net's
        block).
    mask : array_like of bool, optional
        As in :func:`batch_norm`: ``(N, *spatial)`` or broadcastable to it; each sample's
        statistics use only its positions where it is True. Pass it to the backward too.

    Returns
    -------
    NormOutput
        ``(y, mean, rstd)`` with mean and rstd of shape ``(N, num_groups)``.

    Raises
    ------
    TypeError
        Unsupported dtypes; ``num_groups`` not an int (bools included); mixed CUDA/host arrays.
    ValueError
        ``num_groups < 1`` or not dividing C; wrong shapes; an empty reduction; ``eps < 0``;
        a bad ``out``.
    """
    if P.is_device(x):
        _host_only_weights("group_norm", mask is not None)
        return _cuda.group_norm(x, num_groups, weight, bias, eps, channel_axis, out, activation)
    fn = "group_norm"
    a = _host_args(fn, x=x, weight=weight, bias=bias, out=out, mask=mask)
    plan = P.group_norm(fn, a["x"], num_groups, a["weight"], a["bias"], eps, channel_axis,
                        a["out"], activation)
    P.position_weights(fn, a["x"], plan.ca, a["mask"], None)
    wts = position_weights(plan, a["x"], a["mask"], None)
    return _channel_forward(plan, a["x"], a["weight"], a["bias"], None, None, a["out"], wts)


def group_norm_backward(dy, x, mean, rstd, weight=None, *, channel_axis: int = 1, bias=None,
                        activation: Optional[str] = None, mask=None) -> NormGrads:
    """Gradients of :func:`group_norm`; the number of groups is ``mean.shape[1]``. ``bias``,
    ``activation`` and ``mask``: the forward's, as in :func:`batch_norm_backward`.

    Returns
    -------
    NormGrads
        ``(dx, dweight, dbias)``, dweight and dbias of shape ``(C,)``.

    Raises
    ------
    TypeError, ValueError
        As :func:`batch_norm_backward`.
    """
    if P.is_device(x):
        _host_only_weights("group_norm_backward", mask is not None)
        return _cuda.channel_backward("group_norm_backward", "group", dy, x, mean, rstd, weight,
                                      True, channel_axis, bias, activation)
    return _channel_backward_host("group_norm_backward", "group", dy, x, mean, rstd, weight,
                                  True, channel_axis, bias, activation, mask)


@hide_varargs
def instance_norm(
    x,
    weight=None,
    bias=None,
    *args,
    running_mean=None,
    running_var=None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    channel_axis: int = 1,
    out: Optional[np.ndarray] = None,
    mask=None,
) -> NormOutput:
    """Instance normalization: per sample and channel, statistics over the spatial axes
    (GroupNorm with one group per channel). ``mask``: as in :func:`group_norm` (training mode;
    running statistics get the masked per-instance statistics).

    Parameters
    ----------
    x, weight, bias, eps, channel_axis, out
        As :func:`batch_norm`.
    running_mean, running_var : ndarray of shape ``(C,)``, optional, keyword-only
        With ``training=True`` they are updated with the batch averages of the per-instance
        means and unbiased variances (same momentum rule as :func:`batch_norm`); with
        ``training=False`` they are used (and required).
    training : bool
    momentum : float in [0, 1]

    Returns
    -------
    NormOutput
        ``(y, mean, rstd)``: mean/rstd ``(N, C)`` when training, else the running statistics
        used, ``(C,)``.

    Raises
    ------
    TypeError, ValueError
        As :func:`batch_norm`; also one spatial element when training.
    """
    if args:
        P.positional_running("instance_norm", args)
    if P.is_device(x):
        _host_only_weights("instance_norm", mask is not None)
        return _cuda.instance_norm(x, weight, bias, running_mean, running_var, training, momentum,
                                   eps, channel_axis, out)
    fn = "instance_norm"
    P.training_flag(training, fn)
    a = _host_args(fn, x=x, weight=weight, bias=bias, out=out, mask=mask)
    P.same_kind(fn, a["x"], running_mean=running_mean, running_var=running_var)
    plan = P.instance_norm(fn, a["x"], a["weight"], a["bias"], running_mean, running_var,
                           training, momentum, eps, channel_axis, a["out"])
    P.position_weights(fn, a["x"], plan.ca, a["mask"], None)
    wts = position_weights(plan, a["x"], a["mask"], None)
    return _channel_forward(plan, a["x"], a["weight"], a["bias"], running_mean, running_var,
                            a["out"], wts)


def instance_norm_backward(
    dy, x, mean, rstd, weight=None, *, training: bool = True, channel_axis: int = 1, mask=None
) -> NormGrads:
    """Gradients of :func:`instance_norm`. training=True: mean/rstd ``(N, C)``; training=False:
    the running statistics used, ``(C,)``, held constant. ``mask``: the forward's.

    Returns
    -------
    NormGrads
        ``(dx, dweight, dbias)``.

    Raises
    ------
    TypeError, ValueError
        As :func:`batch_norm_backward`.
    """
    if P.is_device(x):
        _host_only_weights("instance_norm_backward", mask is not None)
        return _cuda.channel_backward("instance_norm_backward", "instance", dy, x, mean, rstd,
                                      weight, training, channel_axis)
    return _channel_backward_host("instance_norm_backward", "instance", dy, x, mean, rstd,
                                  weight, training, channel_axis, None, None, mask)


# --------------------------------------------------------------------------------------------
# row norms: LayerNorm, RMSNorm


def _row_forward(fn, x, normalized_shape, weight, bias, eps, out, center: bool) -> NormOutput:
    a = _host_args(fn, x=x, weight=weight, bias=bias, out=out)
    plan = P.row_forward(fn, a["x"], normalized_shape, a["weight"], a["bias"], eps, a["out"],
                         center)
    return _row_forward_planned(plan, data_array(a["x"], fn), a["weight"], a["bias"], a["out"])


def _row_forward_planned(plan: P.RowPlan, x, weight, bias, out) -> NormOutput:
    sd, M, N = plan.sd, plan.M, plan.N
    w, b = param(weight, sd), param(bias, sd)
    if x.dtype != np.float64 and plan.eps < _TINY_EPS:  # rstd may exceed float32: see _TINY_EPS
        f64 = np.dtype(np.float64)
        r = _row_forward_planned(plan._replace(sd=f64), x.astype(f64),
                                 None if w is None else w.astype(f64),
                                 None if b is None else b.astype(f64), None)
        return _narrow(r, x.dtype, out)
    xp = _dense(x).reshape(M, N)
    yp, y, copy_back = _output(out, x, xp, tuple(range(x.ndim)), (w, b))
    mean = np.empty(plan.lead, sd) if plan.center else None
    rstd = np.empty(plan.lead, sd)
    _core.row_norm_forward(
        xp, _flat(w, N), _flat(b, N), plan.eps, yp, _flat(mean, M), rstd.reshape(M)
    )
    if copy_back is not None:
        np.copyto(out, copy_back)
    return NormOutput(y, mean, rstd)


def _flat(v: Optional[np.ndarray], n: int) -> Optional[np.ndarray]:
    return None if v is None else v.reshape(n)


def _row_backward(fn, dy, x, mean, rstd, weight, center: bool) -> NormGrads:
    a = _host_args(fn, dy=dy, x=x, mean=mean, rstd=rstd, weight=weight)
    plan = P.row_backward(fn, a["dy"], a["x"], a["mean"], a["rstd"], a["weight"], center)
    x = data_array(a["x"], fn)
    dy = data_array(a["dy"], fn, "dy")
    if dy.dtype != x.dtype:
        dy = dy.astype(x.dtype)
    sd, M, N = plan.sd, plan.M, plan.N
    rstd = param(a["rstd"], sd)
    mean = param(a["mean"], sd) if center else None
    w = param(a["weight"], sd)
    dx = _empty(x.shape, x.dtype)
    dweight = np.empty(plan.ns, sd)
    dbias = np.empty(plan.ns, sd) if center else None
    _core.row_norm_backward(
        _dense(dy).reshape(M, N), _dense(x).reshape(M, N), _flat(mean, M), rstd.reshape(M),
        _flat(w, N), dx.reshape(M, N), dweight.reshape(N), _flat(dbias, N),
    )
    return NormGrads(dx, dweight, dbias)


def layer_norm(
    x,
    normalized_shape: ShapeLike,
    weight=None,
    bias=None,
    *,
    eps: float = 1e-5,
    out: Optional[np.ndarray] = None,
) -> NormOutput:
    """Layer normalization over the trailing ``normalized_shape`` axes of x.

    Parameters
    ----------
    x : array_like
        float32, float64, float16 or bfloat16, any byte order.
    normalized_shape : int or sequence of int
        The trailing axes of x.
    weight, bias : array_like of shape ``normalized_shape``, optional
    eps : float >= 0
    out : ndarray, optional
        Receives y (may be x itself or overlap it).

    Returns
    -------
    NormOutput
        ``(y, mean, rstd)``: y in x's dtype (``out`` when given); mean and rstd of shape
        ``x.shape[:-len(normalized_shape)]``, float64 for float64 x, else float32.

    Raises
    ------
    TypeError
        Unsupported dtypes; ``normalized_shape`` not ints; ``eps`` not a real number; mixed
        CUDA/host arrays.
    ValueError
        ``normalized_shape`` not matching x's trailing axes (integers of any size); wrong
        weight/bias shapes; an empty reduction; ``eps < 0``; a bad ``out``.
    """
    if P.is_device(x):
        return _cuda.row_forward("layer_norm", x, normalized_shape, weight, bias, eps, out, True)
    r = _row_fast(x, normalized_shape, weight, bias, eps, out, True)
    if r is not None:
        return r
    return _row_forward("layer_norm", x, normalized_shape, weight, bias, eps, out, True)


def layer_norm_backward(dy, x, mean, rstd, weight=None) -> NormGrads:
    """Gradients of :func:`layer_norm`. The normalized axes are the trailing
    ``k = x.ndim - mean.ndim`` axes.

    Returns
    -------
    NormGrads
        ``(dx, dweight, dbias)``, dweight and dbias of shape ``x.shape[-k:]`` in the statistics
        dtype.

    Raises
    ------
    TypeError, ValueError
        Unsupported dtypes, mixed CUDA/host arrays, shapes that do not match x.
    """
    if P.is_device(x):
        return _cuda.row_backward("layer_norm_backward", dy, x, mean, rstd, weight, True)
    r = _row_backward_fast(dy, x, mean, rstd, weight, True)
    if r is not None:
        return r
    return _row_backward("layer_norm_backward", dy, x, mean, rstd, weight, True)


def rms_norm(
    x,
    normalized_shape: ShapeLike,
    weight=None,
    *,
    eps: Optional[float] = None,
    out: Optional[np.ndarray] = None,
) -> NormOutput:
    """Root-mean-square normalization over the trailing axes: ``y = x * rstd * weight`` with
    ``rstd = 1 / sqrt(mean(x**2) + eps)``.

    Parameters
    ----------
    x, normalized_shape, weight, out
        As :func:`layer_norm`.
    eps : float >= 0 or None
        None: float32's machine epsilon for float32 and 16-bit inputs, float64's for float64.

    Returns
    -------
    NormOutput
        ``(y, None, rstd)``.

    Raises
    ------
    TypeError, ValueError
        As :func:`layer_norm`.
    """
    if P.is_device(x):
        return _cuda.row_forward("rms_norm", x, normalized_shape, weight, None, eps, out, False)
    r = _row_fast(x, normalized_shape, weight, None, eps, out, False)
    if r is not None:
        return r
    return _row_forward("rms_norm", x, normalized_shape, weight, None, eps, out, False)


def rms_norm_backward(dy, x, rstd, weight=None) -> NormGrads:
    """Gradients of :func:`rms_norm`.

    Returns
    -------
    NormGrads
        ``(dx, dweight, None)``.

    Raises
    ------
    TypeError, ValueError
        As :func:`layer_norm_backward`.
    """
    if P.is_device(x):
        return _cuda.row_backward("rms_norm_backward", dy, x, None, rstd, weight, False)
    r = _row_backward_fast(dy, x, None, rstd, weight, False)
    if r is not None:
        return r
    return _row_backward("rms_norm_backward", dy, x, None, rstd, weight, False)


# --------------------------------------------------------------------------------------------
# fused residual add + row norm (pre-norm transformer blocks)


def _add_row_forward(fn, x, residual, normalized_shape, weight, bias, eps, out, h_out,
                     center: bool) -> AddNormOutput:
    if P.is_device(x):
        return _cuda.add_row_forward(fn, x, residual, normalized_shape, weight, bias, eps, out,
                                     h_out, center)
    a = _host_args(fn, x=x, residual=residual, weight=weight, bias=bias, out=out, h_out=h_out)
    plan = P.add_row_forward(fn, a["x"], a["residual"], normalized_shape, a["weight"], a["bias"],
                             eps, a["out"], a["h_out"], center)
    x = data_array(a["x"], fn)
    res = data_array(a["residual"], fn, "residual")
    if res.dtype != x.dtype:
        res = res.astype(x.dtype)
    out, h_out = a["out"], a["h_out"]
    sd, M, N = plan.sd, plan.M, plan.N
    w, b = param(a["weight"], sd), param(a["bias"], sd)
    if x.dtype != np.float64 and plan.eps < _TINY_EPS:  # see _TINY_EPS: the sum, then float64
        h = np.add(x, res, dtype=x.dtype)
        r = _row_forward_planned(plan, h, w, b, out)
        if h_out is not None:
            np.copyto(h_out, h)
            h = h_out
        return AddNormOutput(r.y, h, r.mean, r.rstd)
    xp, rp = _dense(x).reshape(M, N), _dense(res).reshape(M, N)
    inputs = (xp, rp)
    # h and y: written directly when dense, native and either exactly an input or disjoint from
    # every array the kernel reads; otherwise into temporaries copied back (as if fresh)
    hp, h, h_back = _fused_output(h_out, x, inputs, (w, b))
    yp, y, y_back = _fused_output(out, x, inputs + ((hp,) if h_back is None else ()), (w, b),
                                  exact_ok=(hp,))
    mean = np.empty(plan.lead, sd) if center else None
    rstd = np.empty(plan.lead, sd)
    _core.row_norm_forward(xp, _flat(w, N), _flat(b, N), plan.eps, yp, _flat(mean, M),
                           rstd.reshape(M), rp, hp)
    if h_back is not None:
        np.copyto(h_out, h_back)
    if y_back is not None:
        np.copyto(out, y_back)
    return AddNormOutput(y, h, mean, rstd)


def _fused_output(dst, x, inputs, others, exact_ok=()):
    """(buffer the kernel writes (M, N), array returned, temporary to copy into dst or None)."""
    M, N = inputs[0].shape
    if dst is None:
        buf = _empty((M, N), x.dtype)
        return buf, buf.reshape(x.shape), None
    d2 = (dst.reshape(M, N) if dst.flags.c_contiguous and dst.flags.aligned and dst.dtype.isnative
          else None)
    if d2 is not None and not any(o is not None and np.may_share_memory(d2, o) for o in others):
        ptr = d2.__array_interface__["data"][0]
        same = [a for a in inputs + tuple(exact_ok)
                if a.__array_interface__["data"][0] == ptr and a.strides == d2.strides]
        clash = [a for a in inputs if np.may_share_memory(d2, a) and not any(a is s for s in same)]
        if not clash:
            return d2, dst, None
    tmp = _empty((M, N), x.dtype)
    return tmp, dst, tmp.reshape(x.shape)


def add_layer_norm(
    x,
    residual,
    normalized_shape: ShapeLike,
    weight=None,
    bias=None,
    *,
    eps: float = 1e-5,
    out: Optional[np.ndarray] = None,
    h_out: Optional[np.ndarray] = None,
) -> AddNormOutput:
    """Fused residual add and layer normalization: ``h = x + residual``, ``y = layer_norm(h)``,
    in one pass over memory (each row is summed, kept in cache, normalized).

    Parameters
    ----------
    x, residual : array_like
        The same shape; residual of any float dtype is converted to x's dtype. The sum is
        rounded to x's dtype, as ``x + residual`` in NumPy.
    normalized_shape, weight, bias, eps
        As :func:`layer_norm`.
    out, h_out : ndarray, optional
        Receive y and h (x's shape and dtype); either may be ``x`` or ``residual`` itself.

    Returns
    -------
    AddNormOutput
        ``(y, h, mean, rstd)``: h is the next block's input; mean and rstd as
        :func:`layer_norm`'s, of h.

    Raises
    ------
    TypeError, ValueError
        As :func:`layer_norm`, for residual and h_out as for x and out.
    """
    return _add_row_forward("add_layer_norm", x, residual, normalized_shape, weight, bias, eps,
                            out, h_out, True)


def add_rms_norm(
    x,
    residual,
    normalized_shape: ShapeLike,
    weight=None,
    *,
    eps: Optional[float] = None,
    out: Optional[np.ndarray] = None,
    h_out: Optional[np.ndarray] = None,
) -> AddNormOutput:
    """Fused residual add and RMS normalization: ``h = x + residual``, ``y = rms_norm(h)``.

    Parameters and errors as :func:`add_layer_norm` (eps as :func:`rms_norm`).

    Returns
    -------
    AddNormOutput
        ``(y, h, None, rstd)``.
    """
    return _add_row_forward("add_rms_norm", x, residual, normalized_shape, weight, None, eps,
                            out, h_out, False)


def _add_row_backward(fn, dy, dh, h, mean, rstd, weight, center) -> NormGrads:
    g = (layer_norm_backward if center else rms_norm_backward)(
        *((dy, h, mean, rstd, weight) if center else (dy, h, rstd, weight)))
    if dh is None:
        return g
    if P.is_device(h):  # dx is a device array: add dh there
        P.same_kind(fn, h, dh=dh)
        if tuple(dh.shape) != tuple(g.dx.shape):
            raise ValueError(f"{fn}: dh has shape {tuple(dh.shape)} but h has shape {g.dx.shape}")
        dx = g.dx
        dx += dh.astype(dx.dtype, copy=False)  # in place: g holds dx
        return g
    dh = data_array(host_array(dh, fn, "dh"), fn, "dh")
    if dh.shape != g.dx.shape:
        raise ValueError(f"{fn}: dh has shape {dh.shape} but h has shape {g.dx.shape}")
    np.add(g.dx, dh, out=g.dx, casting="unsafe")
    return g


def add_layer_norm_backward(dy, dh, h, mean, rstd, weight=None) -> NormGrads:
    """Gradients of :func:`add_layer_norm`.

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to y.
    dh : array_like or None
        Gradient with respect to h from where else h is used (the residual branch of the next
        block); None means zero.
    h, mean, rstd : array_like
        The forward's h and statistics.
    weight : array_like, optional

    Returns
    -------
    NormGrads
        ``(dx, dweight, dbias)``: dx is the gradient with respect to x and to residual alike
        (``h = x + residual``), ``layer_norm_backward(dy, h, ...).dx + dh``.

    Raises
    ------
    TypeError, ValueError
        As :func:`layer_norm_backward`; dh of another shape than h.
    """
    return _add_row_backward("add_layer_norm_backward", dy, dh, h, mean, rstd, weight, True)


def add_rms_norm_backward(dy, dh, h, rstd, weight=None) -> NormGrads:
    """Gradients of :func:`add_rms_norm`: ``(dx, dweight, None)``, dx as in
    :func:`add_layer_norm_backward`."""
    return _add_row_backward("add_rms_norm_backward", dy, dh, h, None, rstd, weight, False)
