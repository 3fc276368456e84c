"""Stateless normalization kernels (SPEC sections 1-3).

Every function validates its arguments completely before any memory is written, reduces the
input to one of the two canonical views of the C++ core, and calls ``normkit._core``:

* row view ``(M, N)``: LayerNorm (and RMSNorm), one statistic per row;
* channel view ``(B, C, S)`` or channels-last ``(B, S, C)``: BatchNorm, one statistic per channel.

C-contiguous inputs, and channels-last memory with ``channel_axis=1``, are used without a copy;
any other strides are copied once to a dense array first.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core

__all__ = [
    "NormOutput",
    "NormGrads",
    "batch_norm",
    "batch_norm_backward",
    "layer_norm",
    "layer_norm_backward",
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

# --------------------------------------------------------------------------------------------
# validation helpers


def _is_float_dtype(dt: np.dtype) -> bool:
    return (dt.kind == "f" and dt.itemsize in (2, 4, 8)) or dt.name == "bfloat16"


def _data_array(x, fn: str, name: str = "x") -> np.ndarray:
    if type(x) is not np.ndarray:
        if hasattr(x, "__cuda_array_interface__"):
            raise TypeError(
                f"{fn}: {name} is a CUDA array, but this build of normkit has no CUDA kernels; "
                "copy it to the host first"
            )
        x = np.asarray(x)
    if not _is_float_dtype(x.dtype):
        raise TypeError(
            f"{fn}: {name} has unsupported dtype {x.dtype} "
            "(expected float32, float64, float16 or bfloat16)"
        )
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
        v = np.asarray(v)
    if not _is_float_dtype(v.dtype):
        raise TypeError(f"{fn}: {name} has unsupported dtype {v.dtype} (expected a float dtype)")
    if v.shape != shape:
        raise ValueError(f"{fn}: {name} has shape {v.shape} but {what} is {shape}")
    if v.dtype != sd or not v.flags.c_contiguous:
        v = np.ascontiguousarray(v, dtype=sd)
    return v


def _running(rm, rv, fn: str, C: int, sd: np.dtype):
    if (rm is None) != (rv is None):
        raise ValueError(f"{fn}: running_mean and running_var must be given together")
    if rm is None:
        return None, None
    for name, r in (("running_mean", rm), ("running_var", rv)):
        if not isinstance(r, np.ndarray):
            raise TypeError(f"{fn}: {name} must be a NumPy array (it is updated in place), got {type(r).__name__}")
        if r.dtype != sd:
            raise TypeError(f"{fn}: {name} has dtype {r.dtype} but must be {sd} for this input")
        if r.shape != (C,):
            raise ValueError(f"{fn}: {name} has shape {r.shape} but the input has {C} channels")
        if not r.flags.writeable:
            raise ValueError(f"{fn}: {name} is read-only but is updated in place")
    if rm.strides != rv.strides:  # the kernel walks both with one stride
        raise ValueError(f"{fn}: running_mean and running_var must have the same strides")
    if np.may_share_memory(rm, rv):
        raise ValueError(f"{fn}: running_mean and running_var overlap in memory")
    return rm, rv


def _eps(eps, fn: str) -> float:
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: eps must be a real number, got {eps!r}") from None
    if math.isnan(e) or e < 0:
        raise ValueError(f"{fn}: eps must be >= 0, got {eps!r}")
    return e


def _momentum(momentum, fn: str) -> float:
    try:
        m = float(momentum)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: momentum must be a real number in [0, 1], got {momentum!r}") from None
    if not (0.0 <= m <= 1.0):
        raise ValueError(f"{fn}: momentum must be in [0, 1], got {momentum!r}")
    return m


def _channel_axis(ca, fn: str) -> int:
    if type(ca) is not int and not isinstance(ca, (int, np.integer)):
        raise ValueError(f"{fn}: channel_axis must be 1 or -1, got {ca!r}")
    if ca not in (1, -1):
        raise ValueError(f"{fn}: channel_axis must be 1 or -1, got {ca!r}")
    return int(ca)


def _check_out(out, x: np.ndarray, fn: str) -> Optional[np.ndarray]:
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{fn}: out must be a NumPy array, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(
            f"{fn}: out has shape {out.shape} and dtype {out.dtype} but y has shape "
            f"{x.shape} and dtype {x.dtype}"
        )
    if not out.flags.writeable:
        raise ValueError(f"{fn}: out is read-only")
    return out


def _normalized_shape(ns, fn: str) -> Tuple[int, ...]:
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
        return np.ascontiguousarray(xf).reshape(B, C, S), False, first
    return np.ascontiguousarray(xl).reshape(B, S, C), True, last


def _like_view(a: np.ndarray, perm, shape3) -> np.ndarray:
    ap = a.transpose(perm)
    if not ap.flags.c_contiguous:
        ap = np.ascontiguousarray(ap)
    return ap.reshape(shape3)


def _output(out: Optional[np.ndarray], x: np.ndarray, xp: np.ndarray, perm):
    """(yp, y, copy_back): yp is the dense buffer the kernel writes (xp's shape), y the array
    returned to the caller; copy_back is None or a dense temporary to copy into ``out``.

    ``out`` is written directly when its memory has the kernel's layout and it either does not
    overlap ``xp`` or is exactly ``xp`` (in place, safe because every group is reduced before
    any of its outputs is written); otherwise the kernel writes a temporary first.
    """
    pshape = tuple(x.shape[p] for p in perm)
    if out is None:
        yp = np.empty(xp.shape, x.dtype)
        return yp, yp.reshape(pshape).transpose(_inverse(perm)), None
    op = out.transpose(perm)
    if op.flags.c_contiguous:
        yp = op.reshape(xp.shape)
        if not np.may_share_memory(yp, xp) or (
            yp.__array_interface__["data"][0] == xp.__array_interface__["data"][0]
        ):
            return yp, out, None
    tmp = np.empty(xp.shape, x.dtype)
    return tmp, out, tmp.reshape(pshape).transpose(_inverse(perm))


# --------------------------------------------------------------------------------------------
# BatchNorm


def batch_norm(
    x,
    weight=None,
    bias=None,
    running_mean=None,
    running_var=None,
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    channel_axis: int = 1,
    out: Optional[np.ndarray] = None,
) -> NormOutput:
    """Batch normalization over every axis but the channel axis.

    x: ``(N, C, *spatial)`` (``channel_axis=1``) or ``(N, *spatial, C)`` (``channel_axis=-1``),
    float32/float64/float16/bfloat16. weight, bias: ``(C,)`` or None.
    training=True: batch statistics; ``running_mean``/``running_var`` (``(C,)``, the statistics
    dtype, writeable) are updated in place with ``momentum`` and the unbiased batch variance.
    training=False: the running statistics are used (and required).
    Returns ``NormOutput(y, mean, rstd)``: y has x's shape and dtype (it is ``out`` when given),
    mean and rstd ``(C,)`` in float64 for float64 x, else float32.
    """
    fn = "batch_norm"
    x = _data_array(x, fn)
    if x.ndim < 2:
        raise ValueError(f"{fn}: x must have at least 2 dimensions (N, C, ...), got shape {x.shape}")
    ca = _channel_axis(channel_axis, fn)
    C = x.shape[ca]
    sd = _stat_dtype(x.dtype)
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
    out = _check_out(out, x, fn)
    xp, channels_last, perm = _channel_view(x, ca)
    yp, y, copy_back = _output(out, x, xp, perm)
    mean = np.empty(C, sd)
    rstd = np.empty(C, sd)
    _core.channel_norm_forward(xp, channels_last, w, b, rm, rv, bool(training), m, e, yp, mean, rstd)
    if copy_back is not None:
        np.copyto(out, copy_back)
    return NormOutput(y, mean, rstd)


def batch_norm_backward(
    dy, x, mean, rstd, weight=None, *, training: bool = True, channel_axis: int = 1
) -> NormGrads:
    """Gradients of :func:`batch_norm` given the upstream gradient ``dy`` (x's shape).

    ``mean``/``rstd`` are the forward's saved statistics ``(C,)``. training=False treats them as
    constants (``dx = dy * weight * rstd``). Returns ``NormGrads(dx, dweight, dbias)``: dx in x's
    dtype; dweight = sum(dy * xhat), dbias = sum(dy), ``(C,)``, in the statistics dtype.
    """
    fn = "batch_norm_backward"
    x = _data_array(x, fn)
    dy = _grad_array(dy, x, fn)
    if x.ndim < 2:
        raise ValueError(f"{fn}: x must have at least 2 dimensions (N, C, ...), got shape {x.shape}")
    ca = _channel_axis(channel_axis, fn)
    C = x.shape[ca]
    sd = _stat_dtype(x.dtype)
    if mean is None or rstd is None:
        raise ValueError(f"{fn}: mean and rstd from the forward are required")
    mean = _vector(mean, fn, "mean", (C,), sd, "the number of channels")
    rstd = _vector(rstd, fn, "rstd", (C,), sd, "the number of channels")
    w = _vector(weight, fn, "weight", (C,), sd, "the number of channels")
    if training and C and x.size == 0:
        raise ValueError(f"{fn}: empty reduction: x has shape {x.shape}")
    xp, channels_last, perm = _channel_view(x, ca)
    dyp = _like_view(dy, perm, xp.shape)
    dxp, dx, _ = _output(None, x, xp, perm)
    dweight = np.empty(C, sd)
    dbias = np.empty(C, sd)
    _core.channel_norm_backward(dyp, xp, channels_last, mean, rstd, w, bool(training), dxp, dweight, dbias)
    return NormGrads(dx, dweight, dbias)


# --------------------------------------------------------------------------------------------
# LayerNorm


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
    return (a if a.flags.c_contiguous else np.ascontiguousarray(a)).reshape(M, N)


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
    fn = "layer_norm"
    x = _data_array(x, fn)
    ns = _normalized_shape(normalized_shape, fn)
    lead, M, N = _row_setup(x, ns, fn)
    sd = _stat_dtype(x.dtype)
    w = _vector(weight, fn, "weight", ns, sd, "normalized_shape")
    b = _vector(bias, fn, "bias", ns, sd, "normalized_shape")
    e = _eps(eps, fn)
    out = _check_out(out, x, fn)
    xp = _rows(x, M, N)
    yp, y, copy_back = _output(out, x, xp, tuple(range(x.ndim)))
    mean = np.empty(lead, sd)
    rstd = np.empty(lead, sd)
    _core.row_norm_forward(
        xp,
        None if w is None else w.reshape(N),
        None if b is None else b.reshape(N),
        e,
        yp,
        mean.reshape(M),
        rstd.reshape(M),
    )
    if copy_back is not None:
        np.copyto(out, copy_back)
    return NormOutput(y, mean, rstd)


def layer_norm_backward(dy, x, mean, rstd, weight=None) -> NormGrads:
    """Gradients of :func:`layer_norm`. The normalized axes are the trailing
    ``k = x.ndim - mean.ndim`` axes. Returns ``NormGrads(dx, dweight, dbias)`` with dweight and
    dbias of shape ``x.shape[-k:]`` in the statistics dtype.
    """
    fn = "layer_norm_backward"
    x = _data_array(x, fn)
    dy = _grad_array(dy, x, fn)
    if mean is None or rstd is None:
        raise ValueError(f"{fn}: mean and rstd from the forward are required")
    mean_a = np.asarray(mean)
    k = x.ndim - mean_a.ndim
    if k < 1:
        raise ValueError(
            f"{fn}: mean has shape {mean_a.shape} but x has shape {x.shape}; mean must have fewer axes than x"
        )
    ns = x.shape[x.ndim - k:]
    lead, M, N = _row_setup(x, ns, fn)
    sd = _stat_dtype(x.dtype)
    mean = _vector(mean_a, fn, "mean", lead, sd, "x.shape[:-k]")
    rstd = _vector(rstd, fn, "rstd", lead, sd, "x.shape[:-k]")
    w = _vector(weight, fn, "weight", ns, sd, "the normalized shape")
    xp = _rows(x, M, N)
    dyp = _rows(dy, M, N)
    dx = np.empty(x.shape, x.dtype)
    dweight = np.empty(ns, sd)
    dbias = np.empty(ns, sd)
    _core.row_norm_backward(
        dyp,
        xp,
        mean.reshape(M),
        rstd.reshape(M),
        None if w is None else w.reshape(N),
        dx.reshape(M, N),
        dweight.reshape(N),
        dbias.reshape(N),
    )
    return NormGrads(dx, dweight, dbias)
