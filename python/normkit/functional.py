"""Stateless normalization kernels (SPEC sections 1-3).

Every function validates its arguments completely before any memory is written, reduces the
input to one of the two canonical views of the C++ core, and calls ``normkit._core``:

* row view ``(M, N)``: LayerNorm (and RMSNorm), one statistic per row;
* channel view ``(B, C, S)`` or channels-last ``(B, S, C)``: BatchNorm (one statistic per
  channel), GroupNorm (one per sample and group) and InstanceNorm (GroupNorm with G = C).

C-contiguous inputs, and channels-last memory with ``channel_axis=1``, are used without a copy;
any other strides are copied once to a dense array first.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core

# Arrays exposing this attribute (CuPy) are processed on the GPU (normkit/_cuda_dispatch.py).
_CAI = "__cuda_array_interface__"

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
]


class NormOutput(NamedTuple):
    """Result of a forward: ``y`` (x's shape and dtype) and the saved statistics."""

    y: np.ndarray
    mean: Optional[np.ndarray]
    rstd: np.ndarray


class NormGrads(NamedTuple):
    """Result of a backward: ``dx`` (x's shape and dtype), ``dweight`` and ``dbias``."""

    dx: np.ndarray
    dweight: np.ndarray
    dbias: Optional[np.ndarray]


ShapeLike = Union[int, Sequence[int]]

# The C++ fast paths build NormOutput themselves (they return None for anything unusual).
_core._set_result_types(NormOutput)
_row_fast = _core.row_norm_fast
_batch_fast = _core.batch_norm_fast

# --------------------------------------------------------------------------------------------
# validation helpers


def _is_float_dtype(dt: np.dtype) -> bool:
    return (dt.kind == "f" and dt.itemsize in (2, 4, 8)) or dt.name == "bfloat16"


def _host_array(a, fn: str, name: str) -> np.ndarray:
    """``np.asarray(a)``; TypeError for a CUDA array (x is a host array: SPEC section 3)."""
    if type(a) is np.ndarray:
        return a
    if hasattr(a, _CAI):
        raise TypeError(
            f"{fn}: {name} is a CUDA array but x is a host array; pass CUDA arrays for every "
            "array argument (or host arrays for all)"
        )
    return np.asarray(a)


def _native_dtype(dt: np.dtype) -> np.dtype:
    """``dt`` in this machine's byte order (data read from files written elsewhere, e.g. ``'>f4'``
    on a little-endian machine, has the same values in the other order)."""
    return dt if dt.isnative else dt.newbyteorder("=")


def _data_array(x, fn: str, name: str = "x") -> np.ndarray:
    """x (or dy) as an ndarray of a supported float dtype in native byte order: non-native data is
    converted once (the kernels read native floats only), so its values are used correctly."""
    if type(x) is not np.ndarray:
        x = _host_array(x, fn, name)
    if not _is_float_dtype(x.dtype):
        raise TypeError(
            f"{fn}: {name} has unsupported dtype {x.dtype} "
            "(expected float32, float64, float16 or bfloat16)"
        )
    if not x.dtype.isnative:
        x = x.astype(_native_dtype(x.dtype))
    return x


def _grad_array(dy, x: np.ndarray, fn: str) -> np.ndarray:
    dy = _data_array(dy, fn, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"{fn}: dy has shape {dy.shape} but x has shape {x.shape}")
    if dy.dtype != x.dtype:
        dy = dy.astype(x.dtype)
    return dy


def _stat_dtype(dt: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)


def _vector(v, fn: str, name: str, shape: Tuple[int, ...], sd: np.dtype, what: str) -> Optional[np.ndarray]:
    """An optional per-feature array (weight, bias, saved statistics), converted to ``sd``."""
    if v is None:
        return None
    if type(v) is not np.ndarray:
        v = _host_array(v, fn, name)
    if not _is_float_dtype(v.dtype):
        raise TypeError(f"{fn}: {name} has unsupported dtype {v.dtype} (expected a float dtype)")
    if v.shape != shape:
        raise ValueError(f"{fn}: {name} has shape {v.shape} but {what} is {shape}")
    if v.dtype != sd or not v.flags.c_contiguous:
        v = np.ascontiguousarray(v, dtype=sd)
    return v


def _running(rm, rv, fn: str, C: int, sd: np.dtype):
    """The running statistics, checked: ``(C,)`` arrays of the statistics dtype ``sd`` (either
    byte order: non-native arrays are updated in their own order, see :func:`_native_running`),
    writeable, not overlapping each other."""
    if (rm is None) != (rv is None):
        raise ValueError(f"{fn}: running_mean and running_var must be given together")
    if rm is None:
        return None, None
    for name, r in (("running_mean", rm), ("running_var", rv)):
        if not isinstance(r, np.ndarray):
            _host_array(r, fn, name)
            raise TypeError(f"{fn}: {name} must be a NumPy array (it is updated in place), got {type(r).__name__}")
        if _native_dtype(r.dtype) != sd:
            raise TypeError(
                f"{fn}: {name} has dtype {r.dtype} but must be {sd} for x of dtype "
                f"{'float64' if sd == np.float64 else 'float32, float16 or bfloat16'}"
            )
        if r.shape != (C,):
            raise ValueError(f"{fn}: {name} has shape {r.shape} but the input has {C} channels")
        if not r.flags.writeable:
            raise ValueError(f"{fn}: {name} is read-only but is updated in place")
    if np.may_share_memory(rm, rv):
        raise ValueError(f"{fn}: running_mean and running_var overlap in memory")
    return rm, rv


def _no_overlap_with_running(fn: str, rm, rv, **arrays) -> None:
    """ValueError when running statistics that are about to be updated share memory with an
    input the kernel reads (it would change while it is read). ``out`` may overlap them:
    NumPy's rule for outputs applies, and which write lands last is unspecified."""
    if rm is None:
        return
    for rname, r in (("running_mean", rm), ("running_var", rv)):
        for name, a in arrays.items():
            if a is not None and isinstance(a, np.ndarray) and np.may_share_memory(r, a):
                raise ValueError(f"{fn}: {rname} overlaps {name} in memory; pass separate arrays")


def _training(training, fn: str) -> bool:
    """``training`` must be a bool (Python's or NumPy's): a string such as ``'False'`` or None
    would otherwise be read by its truth value."""
    if training is True or training is False:
        return training
    if isinstance(training, np.bool_):
        return bool(training)
    raise TypeError(f"{fn}: training must be a bool, got {training!r}")


def _real(v, fn: str, name: str) -> float:
    """A real number (int, float or NumPy scalar; not bool, str or an array) as a float."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {v!r}")
    try:
        return float(v)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{fn}: {name} is out of range, got {v!r}") from None


def _eps(eps, fn: str) -> float:
    e = _real(eps, fn, "eps")
    if math.isnan(e) or e < 0:
        raise ValueError(f"{fn}: eps must be >= 0, got {eps!r}")
    return e


def _momentum(momentum, fn: str) -> float:
    m = _real(momentum, fn, "momentum")
    if not (0.0 <= m <= 1.0):
        raise ValueError(f"{fn}: momentum must be in [0, 1], got {momentum!r}")
    return m


def _channel_axis(ca, fn: str) -> int:
    if isinstance(ca, (bool, np.bool_)) or not isinstance(ca, (int, np.integer)):
        raise ValueError(f"{fn}: channel_axis must be 1 or -1, got {ca!r}")
    if ca not in (1, -1):
        raise ValueError(f"{fn}: channel_axis must be 1 or -1, got {ca!r}")
    return int(ca)


def _check_out(out, x: np.ndarray, fn: str) -> Optional[np.ndarray]:
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        _host_array(out, fn, "out")
        raise TypeError(f"{fn}: out must be a NumPy array, got {type(out).__name__}")
    if out.shape != x.shape or _native_dtype(out.dtype) != x.dtype:
        raise ValueError(
            f"{fn}: out has shape {out.shape} and dtype {out.dtype} but y has shape "
            f"{x.shape} and dtype {x.dtype}"
        )
    if not out.flags.writeable:
        raise ValueError(f"{fn}: out is read-only")
    return out


def _normalized_shape(ns, fn: str) -> Tuple[int, ...]:
    if isinstance(ns, (bool, np.bool_)) or (
        isinstance(ns, (tuple, list)) and any(isinstance(n, (bool, np.bool_)) for n in ns)
    ):
        raise TypeError(f"{fn}: normalized_shape must be an int or a sequence of ints, got {ns!r}")
    try:
        ns = (operator.index(ns),)
    except TypeError:
        try:
            ns = tuple(operator.index(n) for n in ns)
        except TypeError:
            raise TypeError(f"{fn}: normalized_shape must be an int or a sequence of ints, got {ns!r}") from None
    if len(ns) == 0:
        raise ValueError(f"{fn}: normalized_shape must have at least one axis")
    return ns


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


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
    S = _prod(x.shape[1:-1]) if channel_axis == -1 else _prod(x.shape[2:])
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
    """``a`` itself when C-contiguous, else a C-contiguous copy."""
    if a.flags.c_contiguous:
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
    if out.dtype.isnative and op.flags.c_contiguous and not any(
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


def _channel_input(x, fn: str, channel_axis):
    x = _data_array(x, fn)
    if x.ndim < 2:
        raise ValueError(f"{fn}: x must have at least 2 dimensions (N, C, ...), got shape {x.shape}")
    ca = _channel_axis(channel_axis, fn)
    return x, ca, x.shape[ca], _stat_dtype(x.dtype)


def _spatial_size(x: np.ndarray, ca: int) -> int:
    return _prod(x.shape[2:]) if ca == 1 else _prod(x.shape[1:-1])


def _native_running(r: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The array the kernel updates: ``r`` itself, or a native-order copy of a non-native ``r``
    (copied back into ``r``, in its own byte order, after the kernel)."""
    return r if r is None or r.dtype.isnative else r.astype(_native_dtype(r.dtype))


def _channel_forward(fn, x, ca, w, b, rm, rv, training, momentum, eps, out, groups, stat_shape):
    out = _check_out(out, x, fn)
    if training and rm is not None:  # running statistics are written while these are read
        _no_overlap_with_running(fn, rm, rv, x=x, weight=w, bias=b)
    if x.dtype != np.float64 and eps < _TINY_EPS:
        return _channel_forward_wide(fn, x, ca, w, b, rm, rv, training, momentum, eps, out,
                                     groups, stat_shape)
    xp, channels_last, perm = _channel_view(x, ca)
    yp, y, copy_back = _output(out, x, xp, perm, (w, b, rm, rv))
    sd = _stat_dtype(x.dtype)
    mean = np.empty(stat_shape, sd)
    rstd = np.empty(stat_shape, sd)
    if mean.size or x.size:  # else nothing to compute (e.g. InstanceNorm with zero channels)
        rm_k, rv_k = _native_running(rm), _native_running(rv)
        _core.channel_norm_forward(
            xp, channels_last, w, b, rm_k, rv_k, training, momentum, eps, yp,
            mean.reshape(-1), rstd.reshape(-1), groups,
        )
        for r, r_k in ((rm, rm_k), (rv, rv_k)):
            if r is not r_k:
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


def _channel_forward_wide(fn, x, ca, w, b, rm, rv, training, momentum, eps, out, groups,
                          stat_shape):
    f64 = np.dtype(np.float64)
    wide = lambda v: None if v is None else v.astype(f64)  # noqa: E731
    rm64, rv64 = wide(rm), wide(rv)
    r = _channel_forward(fn, x.astype(f64), ca, wide(w), wide(b), rm64, rv64, training, momentum,
                         eps, None, groups, stat_shape)
    for dst, src in ((rm, rm64), (rv, rv64)):
        if dst is not None:
            np.copyto(dst, src, casting="unsafe")
    return _narrow(r, x.dtype, out)


def _narrow(r: NormOutput, dtype: np.dtype, out: Optional[np.ndarray]) -> NormOutput:
    """A float64 result given back in ``dtype`` (y, into ``out`` when given) and its statistics
    dtype; a statistic beyond float32's range becomes inf, on purpose (see _TINY_EPS)."""
    sd = _stat_dtype(dtype)
    with np.errstate(over="ignore"):
        y = r.y.astype(dtype)
        mean = None if r.mean is None else r.mean.astype(sd)
        rstd = r.rstd.astype(sd)
    if out is not None:
        np.copyto(out, y, casting="unsafe")
        y = out
    return NormOutput(y, mean, rstd)


def _channel_backward(fn, dy, x, ca, mean, rstd, w, training, groups):
    xp, channels_last, perm = _channel_view(x, ca)
    dyp = _like_view(dy, perm, xp.shape)
    dxp, dx, _ = _output(None, x, xp, perm)
    C = x.shape[ca]
    sd = _stat_dtype(x.dtype)
    dweight = np.empty(C, sd)
    dbias = np.empty(C, sd)
    if mean.size == 0 and x.size == 0:  # no data (e.g. InstanceNorm with zero channels)
        return NormGrads(dx, np.zeros(C, sd), np.zeros(C, sd))
    _core.channel_norm_backward(
        dyp, xp, channels_last, mean.reshape(-1), rstd.reshape(-1), w, training, dxp, dweight,
        dbias, groups,
    )
    return NormGrads(dx, dweight, dbias)


def _saved_stats(mean, rstd, fn, shape, sd, what):
    if mean is None or rstd is None:
        raise ValueError(f"{fn}: mean and rstd from the forward are required")
    return _vector(mean, fn, "mean", shape, sd, what), _vector(rstd, fn, "rstd", shape, sd, what)


def _positional_running(fn: str, args: tuple) -> None:
    """TypeError for a 4th positional argument: running_mean/running_var are keyword-only, since
    a call in PyTorch's functional order (input, running_mean, running_var, weight, bias) would
    otherwise read the running statistics as weight and bias and update the caller's weight and
    bias in place."""
    raise TypeError(
        f"{fn}: running_mean and running_var are keyword-only; pass running_mean=..., "
        f"running_var=... (got {3 + len(args)} positional arguments; the order is x, weight, "
        "bias; PyTorch's functional order differs). Nothing was written."
    )


def _hide_varargs(f):
    """Show ``f``'s signature without the ``*args`` that only exists to catch a positional
    running_mean (help() and inspect then list running_mean/running_var as keyword-only)."""
    import inspect

    sig = inspect.signature(f)
    f.__signature__ = sig.replace(
        parameters=[q for q in sig.parameters.values() if q.kind is not q.VAR_POSITIONAL]
    )
    return f


@_hide_varargs
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
) -> NormOutput:
    """Batch normalization: statistics per channel over every other axis.

    x: ``(N, C, *spatial)`` (``channel_axis=1``) or ``(N, *spatial, C)`` (``channel_axis=-1``),
    float32/float64/float16/bfloat16. weight, bias: ``(C,)`` or None.
    training=True: batch statistics; ``running_mean``/``running_var`` (``(C,)``, the statistics
    dtype, writeable) are updated in place with ``momentum`` and the unbiased batch variance.
    training=False: the running statistics are used (and required).
    Returns ``NormOutput(y, mean, rstd)``: y has x's shape and dtype (it is ``out`` when given),
    mean and rstd ``(C,)`` in float64 for float64 x, else float32.
    """
    if args:
        _positional_running("batch_norm", args)
    if type(x) is not np.ndarray and hasattr(x, _CAI):  # CUDA array: run on the GPU
        return _cuda_dispatch.batch_norm(
            x, weight, bias, running_mean=running_mean, running_var=running_var,
            training=training, momentum=momentum,
            eps=eps, channel_axis=channel_axis, out=out
        )
    r = _batch_fast(x, weight, bias, running_mean, running_var, training, momentum, eps,
                    channel_axis, out)
    if r is not None:
        return r
    fn = "batch_norm"
    training = _training(training, fn)
    x, ca, C, sd = _channel_input(x, fn, channel_axis)
    w = _vector(weight, fn, "weight", (C,), sd, "the number of channels")
    b = _vector(bias, fn, "bias", (C,), sd, "the number of channels")
    rm, rv = _running(running_mean, running_var, fn, C, sd)
    m = _momentum(momentum, fn)
    e = _eps(eps, fn)
    count = x.size // C if C else 0
    if training:
        if C and count == 0:
            raise ValueError(f"{fn}: empty reduction: x has shape {x.shape}")
        if count == 1:
            raise ValueError(
                f"{fn}: expected more than 1 value per channel when training, got input of shape {x.shape}"
            )
    else:
        if rm is None:
            raise ValueError(f"{fn}: training=False requires running_mean and running_var")
        if np.any(rv < 0):
            raise ValueError(f"{fn}: running_var has negative entries")
    return _channel_forward(fn, x, ca, w, b, rm, rv, bool(training), m, e, out, 0, (C,))


def batch_norm_backward(
    dy, x, mean, rstd, weight=None, *, training: bool = True, channel_axis: int = 1
) -> NormGrads:
    """Gradients of :func:`batch_norm` given the upstream gradient ``dy`` (x's shape).

    ``mean``/``rstd`` are the forward's saved statistics ``(C,)``. training=False treats them as
    constants (``dx = dy * weight * rstd``). Returns ``NormGrads(dx, dweight, dbias)``: dx in x's
    dtype; dweight = sum(dy * xhat), dbias = sum(dy), ``(C,)``, in the statistics dtype.
    """
    if type(x) is not np.ndarray and hasattr(x, _CAI):  # CUDA array: run on the GPU
        return _cuda_dispatch.batch_norm_backward(
            dy, x, mean, rstd, weight, training=training, channel_axis=channel_axis
        )
    fn = "batch_norm_backward"
    training = _training(training, fn)
    x, ca, C, sd = _channel_input(x, fn, channel_axis)
    dy = _grad_array(dy, x, fn)
    mean, rstd = _saved_stats(mean, rstd, fn, (C,), sd, "the number of channels")
    w = _vector(weight, fn, "weight", (C,), sd, "the number of channels")
    if training and C and x.size == 0:
        raise ValueError(f"{fn}: empty reduction: x has shape {x.shape}")
    return _channel_backward(fn, dy, x, ca, mean, rstd, w, bool(training), 0)


def _num_groups(num_groups, C: int, fn: str) -> int:
    if isinstance(num_groups, (bool, np.bool_)):
        raise TypeError(f"{fn}: num_groups must be an int, got {num_groups!r}")
    try:
        G = operator.index(num_groups)
    except TypeError:
        raise TypeError(f"{fn}: num_groups must be an int, got {num_groups!r}") from None
    if G < 1:
        raise ValueError(f"{fn}: num_groups must be >= 1, got {G}")
    if G > max(C, 1):
        raise ValueError(f"{fn}: num_groups {G} is larger than the number of channels {C}")
    if C % G:
        raise ValueError(f"{fn}: num_groups {G} does not divide the number of channels {C}")
    return G


def group_norm(
    x,
    num_groups: int,
    weight=None,
    bias=None,
    *,
    eps: float = 1e-5,
    channel_axis: int = 1,
    out: Optional[np.ndarray] = None,
) -> NormOutput:
    """Group normalization: per sample, statistics over each group of ``C / num_groups``
    channels and all spatial positions.

    x: ``(N, C, *spatial)`` or channels-last with ``channel_axis=-1``. weight, bias: ``(C,)``.
    Returns ``NormOutput(y, mean, rstd)`` with mean and rstd of shape ``(N, num_groups)``.
    """
    if type(x) is not np.ndarray and hasattr(x, _CAI):  # CUDA array: run on the GPU
        return _cuda_dispatch.group_norm(
            x, num_groups, weight, bias, eps=eps, channel_axis=channel_axis, out=out
        )
    fn = "group_norm"
    x, ca, C, sd = _channel_input(x, fn, channel_axis)
    G = _num_groups(num_groups, C, fn)
    w = _vector(weight, fn, "weight", (C,), sd, "the number of channels")
    b = _vector(bias, fn, "bias", (C,), sd, "the number of channels")
    e = _eps(eps, fn)
    N = x.shape[0]
    if N and (C // G) * _spatial_size(x, ca) == 0:
        raise ValueError(f"{fn}: empty reduction: x has shape {x.shape}")
    return _channel_forward(fn, x, ca, w, b, None, None, True, 0.0, e, out, G, (N, G))


def group_norm_backward(dy, x, mean, rstd, weight=None, *, channel_axis: int = 1) -> NormGrads:
    """Gradients of :func:`group_norm`; the number of groups is ``mean.shape[1]``."""
    if type(x) is not np.ndarray and hasattr(x, _CAI):  # CUDA array: run on the GPU
        return _cuda_dispatch.group_norm_backward(
            dy, x, mean, rstd, weight, channel_axis=channel_axis
        )
    fn = "group_norm_backward"
    x, ca, C, sd = _channel_input(x, fn, channel_axis)
    dy = _grad_array(dy, x, fn)
    if mean is None or rstd is None:
        raise ValueError(f"{fn}: mean and rstd from the forward are required")
    mean_a = _host_array(mean, fn, "mean")
    if mean_a.ndim != 2 or mean_a.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: mean has shape {mean_a.shape} but (N, num_groups) with N = {x.shape[0]} is required")
    G = _num_groups(mean_a.shape[1], C, fn)
    mean, rstd = _saved_stats(mean_a, rstd, fn, (x.shape[0], G), sd, "(N, num_groups)")
    w = _vector(weight, fn, "weight", (C,), sd, "the number of channels")
    return _channel_backward(fn, dy, x, ca, mean, rstd, w, True, G)


@_hide_varargs
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
) -> NormOutput:
    """Instance normalization: per sample and channel, statistics over the spatial axes
    (GroupNorm with one group per channel).

    training=True: returns mean/rstd of shape ``(N, C)``; running statistics ``(C,)``, when
    given, are updated with the batch averages of the per-instance means and unbiased variances.
    training=False: the running statistics are used (and required); mean/rstd are ``(C,)``.
    """
    if args:
        _positional_running("instance_norm", args)
    if type(x) is not np.ndarray and hasattr(x, _CAI):  # CUDA array: run on the GPU
        return _cuda_dispatch.instance_norm(
            x, weight, bias, running_mean=running_mean, running_var=running_var,
            training=training, momentum=momentum,
            eps=eps, channel_axis=channel_axis, out=out
        )
    fn = "instance_norm"
    training = _training(training, fn)
    x, ca, C, sd = _channel_input(x, fn, channel_axis)
    w = _vector(weight, fn, "weight", (C,), sd, "the number of channels")
    b = _vector(bias, fn, "bias", (C,), sd, "the number of channels")
    rm, rv = _running(running_mean, running_var, fn, C, sd)
    m = _momentum(momentum, fn)
    e = _eps(eps, fn)
    S = _spatial_size(x, ca)
    N = x.shape[0]
    if training:
        if N and C and S == 0:
            raise ValueError(f"{fn}: empty reduction: x has shape {x.shape}")
        if S == 1 and N and C:
            raise ValueError(
                f"{fn}: expected more than 1 spatial element when training, got input of shape {x.shape}"
            )
        if rm is not None and N == 0:
            raise ValueError(f"{fn}: cannot update running statistics from an empty batch")
        return _channel_forward(fn, x, ca, w, b, rm, rv, True, m, e, out, C if C else 1, (N, C))
    if rm is None:
        raise ValueError(f"{fn}: training=False requires running_mean and running_var")
    if np.any(rv < 0):
        raise ValueError(f"{fn}: running_var has negative entries")
    return _channel_forward(fn, x, ca, w, b, rm, rv, False, m, e, out, 0, (C,))


def instance_norm_backward(
    dy, x, mean, rstd, weight=None, *, training: bool = True, channel_axis: int = 1
) -> NormGrads:
    """Gradients of :func:`instance_norm`. training=True: mean/rstd ``(N, C)``; training=False:
    the running statistics used, ``(C,)``, held constant."""
    if type(x) is not np.ndarray and hasattr(x, _CAI):  # CUDA array: run on the GPU
        return _cuda_dispatch.instance_norm_backward(
            dy, x, mean, rstd, weight, training=training, channel_axis=channel_axis
        )
    fn = "instance_norm_backward"
    training = _training(training, fn)
    x, ca, C, sd = _channel_input(x, fn, channel_axis)
    dy = _grad_array(dy, x, fn)
    w = _vector(weight, fn, "weight", (C,), sd, "the number of channels")
    if training:
        mean, rstd = _saved_stats(mean, rstd, fn, (x.shape[0], C), sd, "(N, C)")
        return _channel_backward(fn, dy, x, ca, mean, rstd, w, True, C if C else 1)
    mean, rstd = _saved_stats(mean, rstd, fn, (C,), sd, "(C,)")
    return _channel_backward(fn, dy, x, ca, mean, rstd, w, False, 0)


# --------------------------------------------------------------------------------------------
# row norms: LayerNorm, RMSNorm


def _row_setup(x: np.ndarray, ns: Tuple[int, ...], fn: str):
    k = len(ns)
    if x.ndim < k:
        raise ValueError(f"{fn}: x has shape {x.shape}, fewer axes than normalized_shape {ns}")
    if x.shape[x.ndim - k:] != ns:
        raise ValueError(
            f"{fn}: normalized_shape {ns} does not match the trailing axes of x with shape {x.shape}"
        )
    N = _prod(ns)
    if N == 0:
        raise ValueError(f"{fn}: empty reduction: normalized_shape {ns} has no elements")
    lead = x.shape[: x.ndim - k]
    return lead, _prod(lead), N


def _rows(a: np.ndarray, M: int, N: int) -> np.ndarray:
    return _dense(a).reshape(M, N)


def _flat(v: Optional[np.ndarray], n: int) -> Optional[np.ndarray]:
    return None if v is None else v.reshape(n)


def _row_forward(fn, x, normalized_shape, weight, bias, eps, out, center: bool) -> NormOutput:
    x = _data_array(x, fn)
    ns = _normalized_shape(normalized_shape, fn)
    lead, M, N = _row_setup(x, ns, fn)
    sd = _stat_dtype(x.dtype)
    w = _vector(weight, fn, "weight", ns, sd, "normalized_shape")
    b = _vector(bias, fn, "bias", ns, sd, "normalized_shape")
    if eps is None and not center:  # RMSNorm's default: machine epsilon of the compute type
        eps = np.finfo(np.float64 if x.dtype == np.float64 else np.float32).eps
    e = _eps(eps, fn)
    out = _check_out(out, x, fn)
    if x.dtype != np.float64 and e < _TINY_EPS:  # rstd may exceed float32: see _TINY_EPS
        f64 = np.dtype(np.float64)
        r = _row_forward(fn, x.astype(f64), ns, None if w is None else w.astype(f64),
                         None if b is None else b.astype(f64), e, None, center)
        return _narrow(r, x.dtype, out)
    xp = _rows(x, M, N)
    yp, y, copy_back = _output(out, x, xp, tuple(range(x.ndim)), (w, b))
    mean = np.empty(lead, sd) if center else None
    rstd = np.empty(lead, sd)
    _core.row_norm_forward(
        xp, _flat(w, N), _flat(b, N), e, yp, _flat(mean, M), rstd.reshape(M)
    )
    if copy_back is not None:
        np.copyto(out, copy_back)
    return NormOutput(y, mean, rstd)


def _row_backward(fn, dy, x, mean, rstd, weight, center: bool) -> NormGrads:
    x = _data_array(x, fn)
    dy = _grad_array(dy, x, fn)
    if rstd is None or (center and mean is None):
        raise ValueError(f"{fn}: the statistics saved by the forward are required")
    rstd_a = _host_array(rstd, fn, "rstd")
    k = x.ndim - rstd_a.ndim
    if k < 1:
        raise ValueError(
            f"{fn}: rstd has shape {rstd_a.shape} but x has shape {x.shape}; the statistics must have fewer axes than x"
        )
    ns = x.shape[x.ndim - k:]
    lead, M, N = _row_setup(x, ns, fn)
    sd = _stat_dtype(x.dtype)
    rstd = _vector(rstd_a, fn, "rstd", lead, sd, "x.shape[:-k]")
    mean = _vector(mean, fn, "mean", lead, sd, "x.shape[:-k]") if center else None
    w = _vector(weight, fn, "weight", ns, sd, "the normalized shape")
    dx = _empty(x.shape, x.dtype)
    dweight = np.empty(ns, sd)
    dbias = np.empty(ns, sd) if center else None
    _core.row_norm_backward(
        _rows(dy, M, N), _rows(x, M, N), _flat(mean, M), rstd.reshape(M), _flat(w, N),
        dx.reshape(M, N), dweight.reshape(N), _flat(dbias, N),
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

    weight, bias: ``normalized_shape`` or None. Returns ``NormOutput(y, mean, rstd)``: y has x's
    shape and dtype (it is ``out`` when given); mean and rstd have shape
    ``x.shape[:-len(normalized_shape)]``, float64 for float64 x, else float32.
    """
    if type(x) is not np.ndarray and hasattr(x, _CAI):  # CUDA array: run on the GPU
        return _cuda_dispatch.layer_norm(
            x, normalized_shape, weight, bias, eps=eps, out=out
        )
    r = _row_fast(x, normalized_shape, weight, bias, eps, out, True)
    if r is not None:
        return r
    return _row_forward("layer_norm", x, normalized_shape, weight, bias, eps, out, True)


def layer_norm_backward(dy, x, mean, rstd, weight=None) -> NormGrads:
    """Gradients of :func:`layer_norm`. The normalized axes are the trailing
    ``k = x.ndim - mean.ndim`` axes. Returns ``NormGrads(dx, dweight, dbias)`` with dweight and
    dbias of shape ``x.shape[-k:]`` in the statistics dtype.
    """
    if type(x) is not np.ndarray and hasattr(x, _CAI):  # CUDA array: run on the GPU
        return _cuda_dispatch.layer_norm_backward(
            dy, x, mean, rstd, weight
        )
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
    ``rstd = 1 / sqrt(mean(x**2) + eps)``. ``eps=None``: float32's machine epsilon for float32 and
    half inputs, float64's for float64. Returns ``NormOutput(y, None, rstd)``.
    """
    if type(x) is not np.ndarray and hasattr(x, _CAI):  # CUDA array: run on the GPU
        return _cuda_dispatch.rms_norm(
            x, normalized_shape, weight, eps=eps, out=out
        )
    r = _row_fast(x, normalized_shape, weight, None, eps, out, False)
    if r is not None:
        return r
    return _row_forward("rms_norm", x, normalized_shape, weight, None, eps, out, False)


def rms_norm_backward(dy, x, rstd, weight=None) -> NormGrads:
    """Gradients of :func:`rms_norm`; ``NormGrads(dx, dweight, None)``."""
    if type(x) is not np.ndarray and hasattr(x, _CAI):  # CUDA array: run on the GPU
        return _cuda_dispatch.rms_norm_backward(
            dy, x, rstd, weight
        )
    return _row_backward("rms_norm_backward", dy, x, None, rstd, weight, False)


from . import _cuda_dispatch  # noqa: E402  (imports this module's helpers)
