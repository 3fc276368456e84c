"""One plan per operation: every argument rule of the public API, written once.

A plan is computed from the arguments' shapes, dtypes, writeability and the options alone, so
the same function validates host (NumPy) arrays and CUDA arrays (``__cuda_array_interface__``,
read here without touching their memory). It raises every documented ``TypeError`` and
``ValueError`` before anything is written, and returns what a call needs: the canonical view
(``(N, C, S)`` / channels-last, or rows ``(M, N)``), the statistics' shape and dtype, the
kernel's group count, eps, momentum, and whether running statistics are written. The host path
(``functional``), the CUDA path (``_cuda_dispatch``), ``distributed``, ``dask`` and the layers
call these functions; none of them restates a rule.

Rules that need the data itself (a negative running variance; running statistics sharing
memory with an input) are stated here too, as functions the paths call with what they observed.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import NamedTuple, Optional, Tuple

import numpy as np

_CAI = "__cuda_array_interface__"


class NormOutput(NamedTuple):
    """Result of a forward: ``y`` (x's shape and dtype) and the saved statistics."""

    y: np.ndarray
    mean: Optional[np.ndarray]
    rstd: np.ndarray


class AddNormOutput(NamedTuple):
    """Result of a fused residual add + norm: ``y``, the sum ``h = x + residual`` (the next
    block's input), and the statistics of h."""

    y: np.ndarray
    h: np.ndarray
    mean: Optional[np.ndarray]
    rstd: np.ndarray


class NormGrads(NamedTuple):
    """Result of a backward: ``dx`` (x's shape and dtype), ``dweight`` and ``dbias``."""

    dx: np.ndarray
    dweight: np.ndarray
    dbias: Optional[np.ndarray]


# --------------------------------------------------------------------------------------------
# what an array argument looks like, host or device


class Arg(NamedTuple):
    """The facts a plan uses about one array argument."""

    shape: Tuple[int, ...]
    dtype: np.dtype
    writeable: bool
    device: bool

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return prod(self.shape)


def is_device(a) -> bool:
    """Whether ``a`` is a CUDA array (exposes ``__cuda_array_interface__``)."""
    return hasattr(a, _CAI)


def device_dtype(a) -> np.dtype:
    dt = getattr(a, "dtype", None)
    if dt is not None:
        try:
            return np.dtype(dt)
        except TypeError:
            pass
    return np.dtype(a.__cuda_array_interface__["typestr"])


def arg(a):
    """What the plan reads of an array argument: an ndarray as it is (its shape, dtype, ndim and
    size are read directly, which costs nothing), an ``Arg`` for a CUDA or lazy array (None
    stays None)."""
    if a is None or type(a) is np.ndarray or isinstance(a, (Arg, np.ndarray)):
        return a
    iface = getattr(a, _CAI, None)
    if iface is None:  # a lazy array (dask): its shape and dtype; results are new arrays
        return Arg(tuple(int(n) for n in a.shape), np.dtype(a.dtype), True, False)
    return Arg(tuple(int(n) for n in iface["shape"]), device_dtype(a), not bool(iface["data"][1]),
               True)


def writeable(a) -> bool:
    return bool(a.flags.writeable) if isinstance(a, np.ndarray) else a.writeable


def on_device(a) -> bool:
    return isinstance(a, Arg) and a.device


def prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def same_kind(fn: str, x, /, **arrays) -> None:
    """TypeError when array arguments mix CUDA and host arrays (x decides which is expected)."""
    dev = is_device(x)
    for name, a in arrays.items():
        if a is None or is_device(a) == dev:
            continue
        if dev:
            raise TypeError(
                f"{fn}: x is a CUDA array but {name} is a host {type(a).__name__}; pass CUDA "
                "arrays for every array argument (or host arrays for all)"
            )
        raise TypeError(
            f"{fn}: {name} is a CUDA array but x is a host array; pass CUDA arrays for every "
            "array argument (or host arrays for all)"
        )


# --------------------------------------------------------------------------------------------
# dtypes


def is_float_dtype(dt: np.dtype) -> bool:
    if dt.kind == "f":
        return dt.itemsize in (2, 4, 8)
    return dt.kind == "V" and dt.name == "bfloat16"  # ml_dtypes' bfloat16


def native_dtype(dt: np.dtype) -> np.dtype:
    """``dt`` in this machine's byte order (data read from files written elsewhere, e.g. ``'>f4'``
    on a little-endian machine, has the same values in the other order)."""
    return dt if dt.isnative else dt.newbyteorder("=")


def stat_dtype(dt: np.dtype) -> np.dtype:
    """float64 statistics for float64 data, else float32."""
    return np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)


def data_dtype(a, fn: str, name: str = "x") -> None:
    if not is_float_dtype(a.dtype):
        raise TypeError(
            f"{fn}: {name} has unsupported dtype {a.dtype} "
            "(expected float32, float64, float16 or bfloat16)"
        )
    if on_device(a) and not a.dtype.isnative:  # the kernels read native floats; no device conversion
        raise TypeError(f"{fn}: CUDA arrays must be in native byte order, got dtype {a.dtype.str!r}")


# --------------------------------------------------------------------------------------------
# options


def positional_running(fn: str, args: tuple) -> None:
    """TypeError for a 4th positional argument: running_mean/running_var are keyword-only, since
    a call in PyTorch's functional order (input, running_mean, running_var, weight, bias) would
    otherwise read the running statistics as weight and bias and update the caller's weight and
    bias in place."""
    raise TypeError(
        f"{fn}: running_mean and running_var are keyword-only; pass running_mean=..., "
        f"running_var=... (got {3 + len(args)} positional arguments; the order is x, weight, "
        "bias; PyTorch's functional order differs). Nothing was written."
    )


def training_flag(training, fn: str) -> bool:
    """``training`` must be a bool (Python's or NumPy's): a string such as ``'False'`` or None
    would otherwise be read by its truth value."""
    if training is True or training is False:
        return training
    if isinstance(training, np.bool_):
        return bool(training)
    raise TypeError(f"{fn}: training must be a bool, got {training!r}")


def real(v, fn: str, name: str) -> float:
    """A real number (int, float or NumPy scalar; not bool, str or an array) as a float."""
    if type(v) is float:  # the common case, without the ABC check below
        return v
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {v!r}")
    try:
        return float(v)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{fn}: {name} is out of range, got {v!r}") from None


def eps_value(eps, fn: str) -> float:
    e = real(eps, fn, "eps")
    if math.isnan(e) or e < 0:
        raise ValueError(f"{fn}: eps must be >= 0, got {eps!r}")
    return e


def rms_eps(eps, dtype: np.dtype, fn: str) -> float:
    """RMSNorm's eps; None means the machine epsilon of the compute type (float64's for float64
    data, float32's otherwise), as PyTorch does."""
    if eps is None:
        eps = np.finfo(np.float64 if dtype == np.float64 else np.float32).eps
    return eps_value(eps, fn)


def momentum_value(momentum, fn: str) -> float:
    m = real(momentum, fn, "momentum")
    if not (0.0 <= m <= 1.0):
        raise ValueError(f"{fn}: momentum must be in [0, 1], got {momentum!r}")
    return m


def channel_axis(ca, fn: str) -> int:
    if type(ca) is int and (ca == 1 or ca == -1):
        return ca
    if isinstance(ca, (bool, np.bool_)) or not isinstance(ca, (int, np.integer)):
        raise ValueError(f"{fn}: channel_axis must be 1 or -1, got {ca!r}")
    if ca not in (1, -1):
        raise ValueError(f"{fn}: channel_axis must be 1 or -1, got {ca!r}")
    return int(ca)


def normalized_shape(ns, fn: str) -> Tuple[int, ...]:
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


def num_groups(g, C: int, fn: str) -> int:
    if type(g) is int and 1 <= g <= C and C % g == 0:
        return g
    if isinstance(g, (bool, np.bool_)):
        raise TypeError(f"{fn}: num_groups must be an int, got {g!r}")
    try:
        G = operator.index(g)
    except TypeError:
        raise TypeError(f"{fn}: num_groups must be an int, got {g!r}") from None
    if G < 1:
        raise ValueError(f"{fn}: num_groups must be >= 1, got {G}")
    if G > max(C, 1):
        raise ValueError(f"{fn}: num_groups {G} is larger than the number of channels {C}")
    if C % G:
        raise ValueError(f"{fn}: num_groups {G} does not divide the number of channels {C}")
    return G


# --------------------------------------------------------------------------------------------
# array arguments


def vector(v, fn: str, name: str, shape: Tuple[int, ...], what: str) -> None:
    """An optional per-feature array (weight, bias, saved statistics): any float dtype (it is
    converted to the statistics dtype), the given shape."""
    if v is None:
        return
    if not is_float_dtype(v.dtype):
        raise TypeError(f"{fn}: {name} has unsupported dtype {v.dtype} (expected a float dtype)")
    if on_device(v) and not v.dtype.isnative:
        raise TypeError(f"{fn}: CUDA arrays must be in native byte order, got dtype {v.dtype.str!r}")
    if v.shape != shape:
        raise ValueError(f"{fn}: {name} has shape {v.shape} but {what} is {shape}")


def running(rm, rv, fn: str, C: int, sd: np.dtype) -> bool:
    """Checks the running statistics: both or neither, ``(C,)`` arrays of the statistics dtype
    ``sd`` (either byte order on the host: non-native arrays are updated in their own order),
    writeable. Returns whether they are given. ``rm``/``rv``: the arrays themselves."""
    if (rm is None) != (rv is None):
        raise ValueError(f"{fn}: running_mean and running_var must be given together")
    if rm is None:
        return False
    for name, r in (("running_mean", rm), ("running_var", rv)):
        if not isinstance(r, np.ndarray) and not is_device(r):
            raise TypeError(f"{fn}: {name} must be a NumPy array (it is updated in place), got {type(r).__name__}")
        a = arg(r)
        if native_dtype(a.dtype) != sd or (on_device(a) and not a.dtype.isnative):
            raise TypeError(
                f"{fn}: {name} has dtype {a.dtype} but must be {sd} for x of dtype "
                f"{'float64' if sd == np.float64 else 'float32, float16 or bfloat16'}"
            )
        if a.shape != (C,):
            raise ValueError(f"{fn}: {name} has shape {a.shape} but the input has {C} channels")
        if not writeable(a):
            raise ValueError(f"{fn}: {name} is read-only but is updated in place")
    return True


def running_overlap(fn: str, name: str, other: str) -> None:
    """The error for running statistics that share memory with another argument (the paths
    detect the overlap their own way: host memory or device byte ranges)."""
    if other == "running_var":
        raise ValueError(f"{fn}: running_mean and running_var overlap in memory")
    raise ValueError(f"{fn}: {name} overlaps {other} in memory; pass separate arrays")


def negative_running_var(fn: str) -> None:
    raise ValueError(f"{fn}: running_var has negative entries")


def out_array(out, x, fn: str, name: str = "out", what: str = "y") -> None:
    """``out`` (forward only): y's shape and dtype (either byte order on the host), writeable."""
    if out is None:
        return
    if out.shape != x.shape or native_dtype(out.dtype) != native_dtype(x.dtype) or (
        on_device(out) and not out.dtype.isnative
    ):
        raise ValueError(
            f"{fn}: {name} has shape {out.shape} and dtype {out.dtype} but {what} has shape "
            f"{x.shape} and dtype {native_dtype(x.dtype)}"
        )
    if not writeable(out):
        raise ValueError(f"{fn}: {name} is read-only")


def grad_array(dy, x, fn: str) -> None:
    data_dtype(dy, fn, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"{fn}: dy has shape {dy.shape} but x has shape {x.shape}")


def saved_stats(mean, rstd, fn: str, shape, what: str) -> None:
    if mean is None or rstd is None:
        raise ValueError(f"{fn}: mean and rstd from the forward are required")
    vector(mean, fn, "mean", shape, what)
    vector(rstd, fn, "rstd", shape, what)


# --------------------------------------------------------------------------------------------
# channel norms: BatchNorm, GroupNorm, InstanceNorm


class ChannelPlan(NamedTuple):
    """A channel-norm call. ``groups``: the kernel's group count (0 = one statistic per channel
    over the whole batch, BatchNorm and InstanceNorm's eval mode; G = per sample and group)."""

    fn: str
    ca: int
    N: int
    C: int
    S: int
    sd: np.dtype
    groups: int
    stat_shape: Tuple[int, ...]
    training: bool
    eps: float
    momentum: float
    updates_running: bool  # running statistics are written
    uses_running: bool  # running statistics are read as the statistics (eval mode)
    activation: int = 0  # fused activation: ACTIVATIONS[name] (0: none)


# Fused activations of batch_norm / group_norm, by name: the kernels' codes (core/activation.h).
ACTIVATIONS = {"relu": 1, "silu": 2}


def activation_code(act, fn: str) -> int:
    """None -> 0, or the code of a named activation ("relu", "silu")."""
    if act is None:
        return 0
    if not isinstance(act, str):
        raise TypeError(f"{fn}: activation must be None, 'relu' or 'silu', got {act!r}")
    if act not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be None, 'relu' or 'silu', got {act!r}")
    return ACTIVATIONS[act]


def spatial_shape(x, ca: int) -> Tuple[int, ...]:
    """x's shape without the batch and channel axes."""
    return tuple(x.shape[2:]) if ca == 1 else tuple(x.shape[1:-1])


def position_weights(fn: str, xa, ca: int, mask, sample_weight) -> None:
    """Static rules of ``mask=`` (boolean, broadcastable to x's shape without the channel axis,
    ``(N, *spatial)``) and ``sample_weight=`` (real, ``(N,)``); values are checked later."""
    if mask is None and sample_weight is None:
        return
    if is_device(mask) or is_device(sample_weight) or on_device(xa):
        raise TypeError(f"{fn}: mask and sample_weight take host (NumPy) arrays only")
    target = (xa.shape[0], *spatial_shape(xa, ca))
    if mask is not None:
        m = arg(mask)
        if m.dtype != np.bool_:
            raise TypeError(f"{fn}: mask must be a boolean array, got dtype {m.dtype}")
        try:
            np.broadcast_shapes(m.shape, target)
            ok = len(m.shape) <= len(target)
        except ValueError:
            ok = False
        if not ok or np.broadcast_shapes(m.shape, target) != target:
            raise ValueError(f"{fn}: mask has shape {m.shape}, which does not broadcast to x's "
                             f"shape without the channel axis, {target}")
    if sample_weight is not None:
        w = arg(sample_weight)
        weight_dtype(fn, w.dtype)
        if w.shape != (xa.shape[0],):
            raise ValueError(f"{fn}: sample_weight has shape {w.shape} but (N,) = "
                             f"{(xa.shape[0],)} is required")


def weight_dtype(fn: str, dt: np.dtype) -> None:
    """``sample_weight``'s dtype rule: real numbers (floats or integers; not bool)."""
    if dt.kind not in "fiu":
        raise TypeError(f"{fn}: sample_weight must be real numbers, got dtype {dt}")


def weight_values(fn: str, sample_weight) -> np.ndarray:
    """``sample_weight`` as float64 after its dtype and value rules: real, finite and >= 0
    (its shape is checked where the shape it needs is known)."""
    w = np.asarray(sample_weight)
    weight_dtype(fn, w.dtype)
    w = w.astype(np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{fn}: sample_weight must be finite and >= 0")
    return w


def _channel_input(x, fn: str, ca) -> Tuple[int, int, int, int, np.dtype]:
    data_dtype(x, fn)
    if x.ndim < 2:
        raise ValueError(f"{fn}: x must have at least 2 dimensions (N, C, ...), got shape {x.shape}")
    ca = channel_axis(ca, fn)
    S = prod(x.shape[2:]) if ca == 1 else prod(x.shape[1:-1])
    return ca, x.shape[0], x.shape[ca], S, stat_dtype(native_dtype(x.dtype))


def per_channel_count(fn: str, count: int, C: int, shape, over_ranks: bool = False) -> None:
    """BatchNorm in training mode: statistics need values, and more than one per channel
    (``over_ranks``: the count is that of the batch concatenated over MPI ranks)."""
    if C and count == 0:
        raise ValueError(f"{fn}: empty reduction: " + (
            "x is empty on every rank" if over_ranks else f"x has shape {shape}"))
    if count == 1:
        raise ValueError(
            f"{fn}: expected more than 1 value per channel when training, got " + (
                "1 value per channel over all ranks" if over_ranks else f"input of shape {shape}")
        )


def _stateful(fn, x, weight, bias, rm, rv, training, momentum, eps, ca):
    """The rules BatchNorm and InstanceNorm share, in order."""
    training = training_flag(training, fn)
    xa = arg(x)
    ca, N, C, S, sd = _channel_input(xa, fn, ca)
    vector(arg(weight), fn, "weight", (C,), "the number of channels")
    vector(arg(bias), fn, "bias", (C,), "the number of channels")
    has_running = running(rm, rv, fn, C, sd)
    return (training, xa, ca, N, C, S, sd, has_running, momentum_value(momentum, fn),
            eps_value(eps, fn))


def batch_norm(fn, x, weight, bias, rm, rv, training, momentum, eps, ca, out,
               local_count: bool = True, activation=None) -> ChannelPlan:
    """``local_count=False``: the batch is split over ranks, so its count is checked later
    (:func:`per_channel_count` with ``over_ranks=True``)."""
    training, xa, ca, N, C, S, sd, has_running, m, e = _stateful(
        fn, x, weight, bias, rm, rv, training, momentum, eps, ca)
    if training:
        if local_count:
            per_channel_count(fn, N * S if C else 0, C, xa.shape)
    elif not has_running:
        raise ValueError(f"{fn}: training=False requires running_mean and running_var")
    act = activation_code(activation, fn)
    out_array(arg(out), xa, fn)
    return ChannelPlan(fn, ca, N, C, S, sd, 0, (C,), training, e, m, training and has_running,
                       not training, act)


def instance_norm(fn, x, weight, bias, rm, rv, training, momentum, eps, ca, out) -> ChannelPlan:
    training, xa, ca, N, C, S, sd, has_running, m, e = _stateful(
        fn, x, weight, bias, rm, rv, training, momentum, eps, ca)
    if training:
        if N and C and S == 0:
            raise ValueError(f"{fn}: empty reduction: x has shape {xa.shape}")
        if S == 1 and N and C:
            raise ValueError(
                f"{fn}: expected more than 1 spatial element when training, got input of shape {xa.shape}"
            )
        if has_running and N == 0:
            raise ValueError(f"{fn}: cannot update running statistics from an empty batch")
        groups, stat_shape = (C if C else 1), (N, C)
    elif not has_running:
        raise ValueError(f"{fn}: training=False requires running_mean and running_var")
    else:
        groups, stat_shape = 0, (C,)
    out_array(arg(out), xa, fn)
    return ChannelPlan(fn, ca, N, C, S, sd, groups, stat_shape, training, e, m,
                       training and has_running, not training)


def group_norm(fn, x, G, weight, bias, eps, ca, out, activation=None) -> ChannelPlan:
    xa = arg(x)
    ca, N, C, S, sd = _channel_input(xa, fn, ca)
    G = num_groups(G, C, fn)
    vector(arg(weight), fn, "weight", (C,), "the number of channels")
    vector(arg(bias), fn, "bias", (C,), "the number of channels")
    e = eps_value(eps, fn)
    if N and (C // G) * S == 0:
        raise ValueError(f"{fn}: empty reduction: x has shape {xa.shape}")
    act = activation_code(activation, fn)
    out_array(arg(out), xa, fn)
    return ChannelPlan(fn, ca, N, C, S, sd, G, (N, G), True, e, 0.0, False, False, act)


def channel_backward(fn, kind, dy, x, mean, rstd, weight, training, ca, bias=None,
                     activation=None) -> ChannelPlan:
    """kind: "batch", "instance" or "group" (the number of groups is ``mean.shape[1]``).
    ``bias`` and ``activation``: the forward's, for a fused activation (batch and group)."""
    training = True if kind == "group" else training_flag(training, fn)
    xa = arg(x)
    ca, N, C, S, sd = _channel_input(xa, fn, ca)
    grad_array(arg(dy), xa, fn)
    groups, shape, what = 0, (C,), "the number of channels"
    if kind == "group":
        if mean is None or rstd is None:
            raise ValueError(f"{fn}: mean and rstd from the forward are required")
        ma = arg(mean)
        if ma.ndim != 2 or ma.shape[0] != N:
            raise ValueError(f"{fn}: mean has shape {ma.shape} but (N, num_groups) with N = {N} is required")
        groups = num_groups(ma.shape[1], C, fn)
        shape, what = (N, groups), "(N, num_groups)"
    elif kind == "instance":
        vector(arg(weight), fn, "weight", (C,), "the number of channels")
        if training:
            groups, shape, what = (C if C else 1), (N, C), "(N, C)"
        else:
            what = "(C,)"
    saved_stats(arg(mean), arg(rstd), fn, shape, what)
    vector(arg(weight), fn, "weight", (C,), "the number of channels")
    vector(arg(bias), fn, "bias", (C,), "the number of channels")
    act = activation_code(activation, fn)
    if kind == "batch" and training and C and xa.size == 0:
        raise ValueError(f"{fn}: empty reduction: x has shape {xa.shape}")
    return ChannelPlan(fn, ca, N, C, S, sd, groups, shape, training, 0.0, 0.0, False, False, act)


# --------------------------------------------------------------------------------------------
# row norms: LayerNorm, RMSNorm


class RowPlan(NamedTuple):
    """A row-norm call on the view ``(M, N)``; ``lead`` is the statistics' shape."""

    fn: str
    ns: Tuple[int, ...]
    lead: Tuple[int, ...]
    M: int
    N: int
    sd: np.dtype
    eps: float
    center: bool


def _rows(x, ns: Tuple[int, ...], fn: str):
    k = len(ns)
    if x.ndim < k:
        raise ValueError(f"{fn}: x has shape {x.shape}, fewer axes than normalized_shape {ns}")
    if tuple(x.shape[x.ndim - k:]) != ns:
        raise ValueError(
            f"{fn}: normalized_shape {ns} does not match the trailing axes of x with shape {x.shape}"
        )
    N = prod(ns)
    if N == 0:
        raise ValueError(f"{fn}: empty reduction: normalized_shape {ns} has no elements")
    lead = tuple(x.shape[: x.ndim - k])
    return lead, prod(lead), N


def row_forward(fn, x, ns, weight, bias, eps, out, center: bool) -> RowPlan:
    xa = arg(x)
    data_dtype(xa, fn)
    ns = normalized_shape(ns, fn)
    lead, M, N = _rows(xa, ns, fn)
    sd = stat_dtype(native_dtype(xa.dtype))
    vector(arg(weight), fn, "weight", ns, "normalized_shape")
    vector(arg(bias), fn, "bias", ns, "normalized_shape")
    e = eps_value(eps, fn) if center else rms_eps(eps, native_dtype(xa.dtype), fn)
    out_array(arg(out), xa, fn)
    return RowPlan(fn, ns, lead, M, N, sd, e, center)


def add_row_forward(fn, x, residual, ns, weight, bias, eps, out, h_out, center: bool) -> RowPlan:
    """add_layer_norm / add_rms_norm: the row plan of ``h = x + residual``; residual has x's
    shape (any float dtype, converted to x's); ``h_out`` follows ``out``'s rules."""
    plan = row_forward(fn, x, ns, weight, bias, eps, out, center)
    xa, ra = arg(x), arg(residual)
    data_dtype(ra, fn, "residual")
    if ra.shape != xa.shape:
        raise ValueError(f"{fn}: residual has shape {ra.shape} but x has shape {xa.shape}")
    out_array(arg(h_out), xa, fn, "h_out", "h")
    return plan


def row_backward(fn, dy, x, mean, rstd, weight, center: bool) -> RowPlan:
    xa = arg(x)
    data_dtype(xa, fn)
    grad_array(arg(dy), xa, fn)
    if rstd is None or (center and mean is None):
        raise ValueError(f"{fn}: the statistics saved by the forward are required")
    ra = arg(rstd)
    k = xa.ndim - ra.ndim
    if k < 1:
        raise ValueError(
            f"{fn}: rstd has shape {ra.shape} but x has shape {xa.shape}; the statistics must have fewer axes than x"
        )
    ns = tuple(xa.shape[xa.ndim - k:])
    lead, M, N = _rows(xa, ns, fn)
    vector(ra, fn, "rstd", lead, "x.shape[:-k]")
    if center:
        vector(arg(mean), fn, "mean", lead, "x.shape[:-k]")
    vector(arg(weight), fn, "weight", ns, "the normalized shape")
    return RowPlan(fn, ns, lead, M, N, stat_dtype(native_dtype(xa.dtype)), 0.0, center)


# --------------------------------------------------------------------------------------------
# statistics math shared by the Python paths (the kernels have their own, in csrc/core)


def update_running(running_mean: np.ndarray, running_var: np.ndarray, mean, var_unbiased,
                   momentum: float) -> None:
    """``running = (1 - momentum) * running + momentum * batch_stat``, in float64, written into
    the running arrays in place (their dtype and byte order)."""
    for r, s in ((running_mean, mean), (running_var, var_unbiased)):
        new = (1.0 - momentum) * r.astype(np.float64) + momentum * np.asarray(s, np.float64)
        np.copyto(r, new, casting="unsafe")


def unbiased(var, count):
    """The unbiased variance ``var * n / (n - 1)`` (inf/NaN for n <= 1, as the kernels)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(var, np.float64) * (count / (count - 1.0))


def rstd_of(var, eps: float):
    """``1 / sqrt(var + eps)`` in float64 (the kernels' formula)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
