"""CUDA arrays (SPEC section 5): validation, outputs and launches for ``normkit._cuda``.

``functional.py`` hands a call here when ``x`` exposes ``__cuda_array_interface__``. Each
function then, in order:

1. raises ``TypeError`` if any other array argument is a host array (SPEC section 3);
2. validates every argument with ``functional.py``'s own helpers, applied to *shadows*: NumPy
   arrays of the device arrays' shapes and dtypes with zero strides (nothing is copied, and the
   messages are the host path's);
3. checks that the kernels can run here (``normkit.cuda.is_available()``, CuPy importable);
4. allocates outputs and workspace with CuPy, on the current device and stream, and launches
   ``normkit._cuda`` on that stream (``cupy.cuda.get_current_stream()``).

Nothing is written before every check has passed. Results are CuPy arrays (a CUDA array of
another library is viewed through ``cupy.asarray``, without a copy).
"""

from __future__ import annotations

import numpy as np

from . import cuda as _cuda_info
from . import functional as F
from .functional import NormGrads, NormOutput

# --------------------------------------------------------------------------------------------
# checks that need no GPU


def is_device(a) -> bool:
    """Whether ``a`` is a CUDA array (exposes ``__cuda_array_interface__``)."""
    return hasattr(a, "__cuda_array_interface__")


def _no_host(fn: str, dev: str, **arrays) -> None:
    """TypeError when an array argument is a host array while ``dev`` is a CUDA array."""
    for name, a in arrays.items():
        if a is not None and not is_device(a):
            raise TypeError(
                f"{fn}: {dev} is a CUDA array but {name} is a host {type(a).__name__}; pass CUDA "
                "arrays for every array argument (or host arrays for all)"
            )


def _dtype(a) -> np.dtype:
    dt = getattr(a, "dtype", None)
    if dt is not None:
        try:
            return np.dtype(dt)
        except TypeError:
            pass
    return np.dtype(a.__cuda_array_interface__["typestr"])


def _shadow(a):
    """A NumPy stand-in for device array ``a``: its shape, dtype and writeability, zero strides
    (so it owns one element whatever its shape). Validation helpers inspect it; no kernel does."""
    if a is None:
        return None
    iface = a.__cuda_array_interface__
    shape = tuple(int(n) for n in iface["shape"])
    readonly = bool(iface["data"][1])
    dt = _dtype(a)
    if not dt.isnative:  # the kernels read native floats; CUDA arrays are not converted here
        raise TypeError(f"CUDA arrays must be in native byte order, got dtype {dt.str!r}")
    return np.lib.stride_tricks.as_strided(
        np.zeros(1, dt), shape, (0,) * len(shape), writeable=not readonly
    )


def _byte_range(a):
    """[lo, hi) bytes spanned by device array ``a`` (empty for an empty array)."""
    iface = a.__cuda_array_interface__
    ptr, shape = int(iface["data"][0]), tuple(iface["shape"])
    itemsize = _dtype(a).itemsize
    if any(n == 0 for n in shape):
        return ptr, ptr
    strides = iface.get("strides")
    if strides is None:
        return ptr, ptr + F._prod(shape) * itemsize
    lo = ptr + sum(min(0, (n - 1) * s) for n, s in zip(shape, strides))
    hi = ptr + sum(max(0, (n - 1) * s) for n, s in zip(shape, strides)) + itemsize
    return lo, hi


def _overlap(a, b) -> bool:
    (alo, ahi), (blo, bhi) = _byte_range(a), _byte_range(b)
    return alo < bhi and blo < ahi and alo < ahi and blo < bhi


def _running(fn, rm, rv, C, sd):
    F._running(_shadow(rm), _shadow(rv), fn, C, sd)
    if rm is not None and _overlap(rm, rv):
        raise ValueError(f"{fn}: running_mean and running_var overlap in memory")


def _grad_shadow(dy, sx, fn):
    sdy = F._data_array(_shadow(dy), fn, "dy")
    if sdy.shape != sx.shape:
        raise ValueError(f"{fn}: dy has shape {sdy.shape} but x has shape {sx.shape}")


def _runtime(fn: str):
    """(normkit._cuda, cupy), or RuntimeError when CUDA arrays cannot be processed here."""
    if not _cuda_info.is_available():
        raise RuntimeError(
            f"{fn}: x is a CUDA array but normkit cannot run CUDA kernels here: "
            f"{_cuda_info.unavailable_reason()}"
        )
    try:
        import cupy
    except ImportError:
        raise RuntimeError(
            f"{fn}: CUDA arrays need CuPy to allocate the results (pip install 'normkit[cuda]')"
        ) from None
    return _cuda_info._module(), cupy


# --------------------------------------------------------------------------------------------
# device arrays and launches


class _Launch:
    """The array library, device and stream of one call (x's), and conversions to them."""

    def __init__(self, fn: str, x):
        self.mod, self.xp = _runtime(fn)
        xp = self.xp
        if isinstance(x, xp.ndarray):
            self.stream = xp.cuda.get_current_stream().ptr
        else:
            s = x.__cuda_array_interface__.get("stream")
            self.stream = xp.cuda.get_current_stream().ptr if s is None else int(s)
        self.x = self.arr_or_none(x)
        self.device = self.x.device

    def arr_or_none(self, a):
        return None if a is None else (a if isinstance(a, self.xp.ndarray) else self.xp.asarray(a))

    def param(self, a, dtype):
        """weight, bias, saved statistics: dense, in the statistics dtype."""
        a = self.arr_or_none(a)
        return None if a is None else self.xp.ascontiguousarray(a, dtype=dtype)

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype)

    def workspace(self, kind, dtype, *sizes):
        return self.empty(max(1, self.mod.workspace(kind, dtype.name, *sizes)), np.uint8)


def _ptr(a) -> int:
    return 0 if a is None else int(a.data.ptr)


def _stride(a) -> int:
    return 1 if a is None else a.strides[0] // a.itemsize


def _channel_view(xp, x, ca):
    """(dense 3-D array, channels_last, perm), as functional._channel_view, on the device."""
    nd = x.ndim
    first = tuple(range(nd)) if ca == 1 else (0, nd - 1, *range(1, nd - 1))
    last = (0, *range(2, nd), 1) if ca == 1 else tuple(range(nd))
    B, C = x.shape[0], x.shape[ca]
    S = F._prod(x.shape[2:]) if ca == 1 else F._prod(x.shape[1:-1])
    xf, xl = x.transpose(first), x.transpose(last)
    if xf.flags.c_contiguous:
        return xf.reshape(B, C, S), False, first
    if xl.flags.c_contiguous:
        return xl.reshape(B, S, C), True, last
    if ca == 1:
        return xp.ascontiguousarray(xf).reshape(B, C, S), False, first
    return xp.ascontiguousarray(xl).reshape(B, S, C), True, last


def _output(L: _Launch, out, x, xd, perm, others=()):
    """(yd, y, copy_back) as functional._output: the kernel writes ``out`` directly when its
    memory has the kernel's layout and it is x itself or overlaps nothing the kernel reads."""
    pshape = tuple(x.shape[p] for p in perm)
    if out is None:
        yd = L.empty(xd.shape, x.dtype)
        return yd, yd.reshape(pshape).transpose(F._inverse(perm)), None
    op = out.transpose(perm)
    if op.flags.c_contiguous and not any(o is not None and _overlap(out, o) for o in others):
        yd = op.reshape(xd.shape)
        if not _overlap(yd, xd) or (yd.data.ptr == xd.data.ptr and yd.strides == xd.strides):
            return yd, out, None
    tmp = L.empty(xd.shape, x.dtype)
    return tmp, out, tmp.reshape(pshape).transpose(F._inverse(perm))


# --------------------------------------------------------------------------------------------
# channel norms


def _channel_forward(fn, L: _Launch, ca, weight, bias, rm, rv, training, momentum, eps, out,
                     groups, stat_shape):
    x = L.x
    sd = F._stat_dtype(x.dtype)
    w, b = L.param(weight, sd), L.param(bias, sd)
    rm, rv, out = L.arr_or_none(rm), L.arr_or_none(rv), L.arr_or_none(out)
    if not training and bool((rv < 0).any()):
        raise ValueError(f"{fn}: running_var has negative entries")
    xd, channels_last, perm = _channel_view(L.xp, x, ca)
    yd, y, copy_back = _output(L, out, x, xd, perm, (w, b, rm, rv))
    mean, rstd = L.empty(stat_shape, sd), L.empty(stat_shape, sd)
    B, C = x.shape[0], x.shape[ca]
    S = xd.shape[1] if channels_last else xd.shape[2]
    ws = L.workspace("channel_forward", x.dtype, B, C, S, groups, channels_last)
    L.mod.channel_forward(
        x.dtype.name, _ptr(xd), _ptr(yd), _ptr(w), _ptr(b), _ptr(rm), _ptr(rv), _stride(rm),
        _stride(rv), _ptr(mean), _ptr(rstd), B, C, S, groups, channels_last, bool(training),
        momentum, eps, _ptr(ws), L.stream,
    )
    if copy_back is not None:
        L.xp.copyto(out, copy_back)
    return NormOutput(y, mean, rstd)


def _channel_backward(L: _Launch, dy, ca, mean, rstd, weight, training, groups):
    x = L.x
    sd = F._stat_dtype(x.dtype)
    dy = L.arr_or_none(dy)
    if dy.dtype != x.dtype:
        dy = dy.astype(x.dtype)
    mean, rstd, w = L.param(mean, sd), L.param(rstd, sd), L.param(weight, sd)
    xd, channels_last, perm = _channel_view(L.xp, x, ca)
    dyd = L.xp.ascontiguousarray(dy.transpose(perm)).reshape(xd.shape)
    dxd, dx, _ = _output(L, None, x, xd, perm)
    B, C = x.shape[0], x.shape[ca]
    S = xd.shape[1] if channels_last else xd.shape[2]
    dweight, dbias = L.empty(C, sd), L.empty(C, sd)
    ws = L.workspace("channel_backward", x.dtype, B, C, S, groups, channels_last)
    L.mod.channel_backward(
        x.dtype.name, _ptr(dyd), _ptr(xd), _ptr(mean), _ptr(rstd), _ptr(w), _ptr(dxd),
        _ptr(dweight), _ptr(dbias), B, C, S, groups, channels_last, bool(training), _ptr(ws),
        L.stream,
    )
    return NormGrads(dx, dweight, dbias)


def _channel_args(fn, x, channel_axis, weight, bias):
    sx, ca, C, sd = F._channel_input(_shadow(x), fn, channel_axis)
    F._vector(_shadow(weight), fn, "weight", (C,), sd, "the number of channels")
    F._vector(_shadow(bias), fn, "bias", (C,), sd, "the number of channels")
    return sx, ca, C, sd


def _stateful_args(fn, x, channel_axis, weight, bias, running_mean, running_var, momentum, eps,
                   out):
    """The checks batch_norm and instance_norm share, in functional.py's order."""
    _no_host(fn, "x", weight=weight, bias=bias, running_mean=running_mean,
             running_var=running_var, out=out)
    sx, ca, C, sd = _channel_args(fn, x, channel_axis, weight, bias)
    _running(fn, running_mean, running_var, C, sd)
    return sx, ca, C, F._momentum(momentum, fn), F._eps(eps, fn)


def batch_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *, training=True,
               momentum=0.1, eps=1e-5, channel_axis=1, out=None) -> NormOutput:
    fn = "batch_norm"
    training = F._training(training, fn)
    sx, ca, C, m, e = _stateful_args(fn, x, channel_axis, weight, bias, running_mean, running_var,
                                     momentum, eps, out)
    count = sx.size // C if C else 0
    if training:
        if C and count == 0:
            raise ValueError(f"{fn}: empty reduction: x has shape {sx.shape}")
        if count == 1:
            raise ValueError(
                f"{fn}: expected more than 1 value per channel when training, got input of shape {sx.shape}"
            )
    elif running_mean is None:
        raise ValueError(f"{fn}: training=False requires running_mean and running_var")
    F._check_out(_shadow(out), sx, fn)
    L = _Launch(fn, x)
    with L.device:
        return _channel_forward(fn, L, ca, weight, bias, running_mean, running_var, training, m, e,
                                out, 0, (C,))


def batch_norm_backward(dy, x, mean, rstd, weight=None, *, training=True, channel_axis=1) -> NormGrads:
    fn = "batch_norm_backward"
    training = F._training(training, fn)
    _no_host(fn, "x", dy=dy, mean=mean, rstd=rstd, weight=weight)
    sx, ca, C, sd = F._channel_input(_shadow(x), fn, channel_axis)
    _grad_shadow(dy, sx, fn)
    F._saved_stats(_shadow(mean), _shadow(rstd), fn, (C,), sd, "the number of channels")
    F._vector(_shadow(weight), fn, "weight", (C,), sd, "the number of channels")
    if training and C and sx.size == 0:
        raise ValueError(f"{fn}: empty reduction: x has shape {sx.shape}")
    L = _Launch(fn, x)
    with L.device:
        return _channel_backward(L, dy, ca, mean, rstd, weight, training, 0)


def group_norm(x, num_groups, weight=None, bias=None, *, eps=1e-5, channel_axis=1, out=None) -> NormOutput:
    fn = "group_norm"
    _no_host(fn, "x", weight=weight, bias=bias, out=out)
    sx, ca, C, sd = F._channel_input(_shadow(x), fn, channel_axis)
    G = F._num_groups(num_groups, C, fn)
    _channel_args(fn, x, channel_axis, weight, bias)
    e = F._eps(eps, fn)
    N = sx.shape[0]
    if N and (C // G) * F._spatial_size(sx, ca) == 0:
        raise ValueError(f"{fn}: empty reduction: x has shape {sx.shape}")
    F._check_out(_shadow(out), sx, fn)
    L = _Launch(fn, x)
    with L.device:
        return _channel_forward(fn, L, ca, weight, bias, None, None, True, 0.0, e, out, G, (N, G))


def group_norm_backward(dy, x, mean, rstd, weight=None, *, channel_axis=1) -> NormGrads:
    fn = "group_norm_backward"
    _no_host(fn, "x", dy=dy, mean=mean, rstd=rstd, weight=weight)
    sx, ca, C, sd = F._channel_input(_shadow(x), fn, channel_axis)
    _grad_shadow(dy, sx, fn)
    if mean is None or rstd is None:
        raise ValueError(f"{fn}: mean and rstd from the forward are required")
    smean = _shadow(mean)
    if smean.ndim != 2 or smean.shape[0] != sx.shape[0]:
        raise ValueError(
            f"{fn}: mean has shape {smean.shape} but (N, num_groups) with N = {sx.shape[0]} is required"
        )
    G = F._num_groups(smean.shape[1], C, fn)
    F._saved_stats(smean, _shadow(rstd), fn, (sx.shape[0], G), sd, "(N, num_groups)")
    F._vector(_shadow(weight), fn, "weight", (C,), sd, "the number of channels")
    L = _Launch(fn, x)
    with L.device:
        return _channel_backward(L, dy, ca, mean, rstd, weight, True, G)


def instance_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                  training=True, momentum=0.1, eps=1e-5, channel_axis=1, out=None) -> NormOutput:
    fn = "instance_norm"
    training = F._training(training, fn)
    sx, ca, C, m, e = _stateful_args(fn, x, channel_axis, weight, bias, running_mean, running_var,
                                     momentum, eps, out)
    S, N = F._spatial_size(sx, ca), sx.shape[0]
    if training:
        if N and C and S == 0:
            raise ValueError(f"{fn}: empty reduction: x has shape {sx.shape}")
        if S == 1 and N and C:
            raise ValueError(
                f"{fn}: expected more than 1 spatial element when training, got input of shape {sx.shape}"
            )
        if running_mean is not None and N == 0:
            raise ValueError(f"{fn}: cannot update running statistics from an empty batch")
        groups, stat_shape = (C if C else 1), (N, C)
    elif running_mean is None:
        raise ValueError(f"{fn}: training=False requires running_mean and running_var")
    else:
        groups, stat_shape = 0, (C,)
    F._check_out(_shadow(out), sx, fn)
    L = _Launch(fn, x)
    with L.device:
        return _channel_forward(fn, L, ca, weight, bias, running_mean, running_var, training, m, e,
                                out, groups, stat_shape)


def instance_norm_backward(dy, x, mean, rstd, weight=None, *, training=True, channel_axis=1) -> NormGrads:
    fn = "instance_norm_backward"
    training = F._training(training, fn)
    _no_host(fn, "x", dy=dy, mean=mean, rstd=rstd, weight=weight)
    sx, ca, C, sd = F._channel_input(_shadow(x), fn, channel_axis)
    _grad_shadow(dy, sx, fn)
    F._vector(_shadow(weight), fn, "weight", (C,), sd, "the number of channels")
    shape, what = ((sx.shape[0], C), "(N, C)") if training else ((C,), "(C,)")
    F._saved_stats(_shadow(mean), _shadow(rstd), fn, shape, sd, what)
    L = _Launch(fn, x)
    with L.device:
        return _channel_backward(L, dy, ca, mean, rstd, weight, training,
                                 (C if C else 1) if training else 0)


# --------------------------------------------------------------------------------------------
# row norms


def _row_forward(fn, x, normalized_shape, weight, bias, eps, out, center) -> NormOutput:
    _no_host(fn, "x", weight=weight, bias=bias, out=out)
    sx = F._data_array(_shadow(x), fn)
    ns = F._normalized_shape(normalized_shape, fn)
    lead, M, N = F._row_setup(sx, ns, fn)
    sd = F._stat_dtype(sx.dtype)
    F._vector(_shadow(weight), fn, "weight", ns, sd, "normalized_shape")
    F._vector(_shadow(bias), fn, "bias", ns, sd, "normalized_shape")
    if eps is None and not center:  # RMSNorm's default, as functional._row_forward
        eps = np.finfo(np.float64 if sx.dtype == np.float64 else np.float32).eps
    e = F._eps(eps, fn)
    F._check_out(_shadow(out), sx, fn)
    L = _Launch(fn, x)
    with L.device:
        x = L.x
        w, b = L.param(weight, sd), L.param(bias, sd)
        xd = L.xp.ascontiguousarray(x).reshape(M, N)
        out = L.arr_or_none(out)
        yd, y, copy_back = _output(L, out, x, xd, tuple(range(x.ndim)), (w, b))
        mean = L.empty(lead, sd) if center else None
        rstd = L.empty(lead, sd)
        L.mod.row_forward(x.dtype.name, _ptr(xd), _ptr(yd), _ptr(w), _ptr(b), _ptr(mean),
                          _ptr(rstd), M, N, e, L.stream)
        if copy_back is not None:
            L.xp.copyto(out, copy_back)
        return NormOutput(y, mean, rstd)


def _row_backward(fn, dy, x, mean, rstd, weight, center) -> NormGrads:
    _no_host(fn, "x", dy=dy, mean=mean, rstd=rstd, weight=weight)
    sx = F._data_array(_shadow(x), fn)
    _grad_shadow(dy, sx, fn)
    if rstd is None or (center and mean is None):
        raise ValueError(f"{fn}: the statistics saved by the forward are required")
    srstd = _shadow(rstd)
    k = sx.ndim - srstd.ndim
    if k < 1:
        raise ValueError(
            f"{fn}: rstd has shape {srstd.shape} but x has shape {sx.shape}; the statistics must have fewer axes than x"
        )
    ns = sx.shape[sx.ndim - k:]
    lead, M, N = F._row_setup(sx, ns, fn)
    sd = F._stat_dtype(sx.dtype)
    F._vector(srstd, fn, "rstd", lead, sd, "x.shape[:-k]")
    if center:
        F._vector(_shadow(mean), fn, "mean", lead, sd, "x.shape[:-k]")
    F._vector(_shadow(weight), fn, "weight", ns, sd, "the normalized shape")
    L = _Launch(fn, x)
    with L.device:
        x, xp = L.x, L.xp
        dy = L.arr_or_none(dy)
        dyd = xp.ascontiguousarray(dy, dtype=x.dtype).reshape(M, N)
        xd = xp.ascontiguousarray(x).reshape(M, N)
        mean = L.param(mean, sd) if center else None
        rstd, w = L.param(rstd, sd), L.param(weight, sd)
        dx = L.empty(x.shape, x.dtype)
        dweight = L.empty(ns, sd)
        dbias = L.empty(ns, sd) if center else None
        ws = L.workspace("row_backward", x.dtype, M, N)
        L.mod.row_backward(x.dtype.name, _ptr(dyd), _ptr(xd), _ptr(mean), _ptr(rstd), _ptr(w),
                           _ptr(dx), _ptr(dweight), _ptr(dbias), M, N, _ptr(ws), L.stream)
        return NormGrads(dx, dweight, dbias)


def layer_norm(x, normalized_shape, weight=None, bias=None, *, eps=1e-5, out=None) -> NormOutput:
    return _row_forward("layer_norm", x, normalized_shape, weight, bias, eps, out, True)


def layer_norm_backward(dy, x, mean, rstd, weight=None) -> NormGrads:
    return _row_backward("layer_norm_backward", dy, x, mean, rstd, weight, True)


def rms_norm(x, normalized_shape, weight=None, *, eps=None, out=None) -> NormOutput:
    return _row_forward("rms_norm", x, normalized_shape, weight, None, eps, out, False)


def rms_norm_backward(dy, x, rstd, weight=None) -> NormGrads:
    return _row_backward("rms_norm_backward", dy, x, None, rstd, weight, False)
