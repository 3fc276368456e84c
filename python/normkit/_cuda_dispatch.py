"""CUDA arrays: outputs and launches for ``normkit._cuda``.

``functional`` hands a call here when ``x`` exposes ``__cuda_array_interface__``. Each function:

1. computes the operation's plan (``normkit._plan``) from the device arrays' shapes, dtypes and
   writeability (their memory is not touched), which raises every documented error, including
   ``TypeError`` for a host array mixed in;
2. applies the rules that need the data (overlapping or negative running statistics);
3. checks that the kernels can run here (``normkit.cuda.is_available()``, CuPy importable);
4. allocates outputs and workspace with CuPy, on the current device and stream, and launches
   ``normkit._cuda`` on that stream (``cupy.cuda.get_current_stream()``).

Nothing is written before every check has passed. Results are CuPy arrays (a CUDA array of
another library is viewed through ``cupy.asarray``, without a copy).
"""

from __future__ import annotations

import numpy as np

from . import _plan as P
from . import cuda as _cuda_info
from ._plan import AddNormOutput, NormGrads, NormOutput


def _inverse(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


# --------------------------------------------------------------------------------------------
# device memory


def _byte_range(a):
    """[lo, hi) bytes spanned by device array ``a`` (empty for an empty array)."""
    iface = a.__cuda_array_interface__
    ptr, shape = int(iface["data"][0]), tuple(iface["shape"])
    itemsize = P.device_dtype(a).itemsize
    if any(n == 0 for n in shape):
        return ptr, ptr
    strides = iface.get("strides")
    if strides is None:
        return ptr, ptr + P.prod(shape) * itemsize
    lo = ptr + sum(min(0, (n - 1) * s) for n, s in zip(shape, strides))
    hi = ptr + sum(max(0, (n - 1) * s) for n, s in zip(shape, strides)) + itemsize
    return lo, hi


def _overlap(a, b) -> bool:
    (alo, ahi), (blo, bhi) = _byte_range(a), _byte_range(b)
    return alo < bhi and blo < ahi and alo < ahi and blo < bhi


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
    S = P.prod(x.shape[2:]) if ca == 1 else P.prod(x.shape[1:-1])
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
        return yd, yd.reshape(pshape).transpose(_inverse(perm)), None
    op = out.transpose(perm)
    if op.flags.c_contiguous and not any(o is not None and _overlap(out, o) for o in others):
        yd = op.reshape(xd.shape)
        if not _overlap(yd, xd) or (yd.data.ptr == xd.data.ptr and yd.strides == xd.strides):
            return yd, out, None
    tmp = L.empty(xd.shape, x.dtype)
    return tmp, out, tmp.reshape(pshape).transpose(_inverse(perm))


# --------------------------------------------------------------------------------------------
# channel norms


def _channel_forward(plan: P.ChannelPlan, x, weight, bias, rm, rv, out) -> NormOutput:
    fn = plan.fn
    if rm is not None:
        if _overlap(rm, rv):
            P.running_overlap(fn, "running_mean", "running_var")
        if plan.updates_running:
            for rname, r in (("running_mean", rm), ("running_var", rv)):
                for name, a in (("x", x), ("weight", weight), ("bias", bias)):
                    if a is not None and _overlap(r, a):
                        P.running_overlap(fn, rname, name)
    L = _Launch(fn, x)
    with L.device:
        x = L.x
        sd = plan.sd
        w, b = _affine_for(L, plan, L.param(weight, sd), L.param(bias, sd))
        rm, rv, out = L.arr_or_none(rm), L.arr_or_none(rv), L.arr_or_none(out)
        if plan.uses_running and bool((rv < 0).any()):
            P.negative_running_var(fn)
        xd, channels_last, perm = _channel_view(L.xp, x, plan.ca)
        yd, y, copy_back = _output(L, out, x, xd, perm, (w, b, rm, rv))
        mean, rstd = L.empty(plan.stat_shape, sd), L.empty(plan.stat_shape, sd)
        B, C, S = plan.N, plan.C, plan.S
        ws = L.workspace("channel_forward", x.dtype, B, C, S, plan.groups, channels_last)
        L.mod.channel_forward(
            x.dtype.name, _ptr(xd), _ptr(yd), _ptr(w), _ptr(b), _ptr(rm), _ptr(rv), _stride(rm),
            _stride(rv), _ptr(mean), _ptr(rstd), B, C, S, plan.groups, channels_last,
            plan.training, plan.momentum, plan.eps, _ptr(ws), L.stream, plan.activation,
        )
        if copy_back is not None:
            L.xp.copyto(out, copy_back)
        return NormOutput(y, mean, rstd)


def _affine_for(L: _Launch, plan: P.ChannelPlan, w, b):
    """As functional._affine_for: ones / zeros for absent parameters with an activation."""
    if plan.activation:
        w = L.xp.ones(plan.C, plan.sd) if w is None else w
        b = L.xp.zeros(plan.C, plan.sd) if b is None else b
    return w, b


def _stateful(fn, planner, x, weight, bias, running_mean, running_var, training, momentum, eps,
              channel_axis, out, activation=None) -> NormOutput:
    P.training_flag(training, fn)
    P.same_kind(fn, x, weight=weight, bias=bias, running_mean=running_mean,
                running_var=running_var, out=out)
    extra = {} if activation is None else {"activation": activation}
    plan = planner(fn, x, weight, bias, running_mean, running_var, training, momentum, eps,
                   channel_axis, out, **extra)
    return _channel_forward(plan, x, weight, bias, running_mean, running_var, out)


def batch_norm(*args) -> NormOutput:
    """(x, weight, bias, running_mean, running_var, training, momentum, eps, channel_axis, out,
    activation)"""
    return _stateful("batch_norm", P.batch_norm, *args)


def instance_norm(*args) -> NormOutput:
    """(x, weight, bias, running_mean, running_var, training, momentum, eps, channel_axis, out)"""
    return _stateful("instance_norm", P.instance_norm, *args)


def group_norm(x, num_groups, weight, bias, eps, channel_axis, out, activation=None) -> NormOutput:
    fn = "group_norm"
    P.same_kind(fn, x, weight=weight, bias=bias, out=out)
    plan = P.group_norm(fn, x, num_groups, weight, bias, eps, channel_axis, out, activation)
    return _channel_forward(plan, x, weight, bias, None, None, out)


def channel_backward(fn, kind, dy, x, mean, rstd, weight, training, channel_axis, bias=None,
                     activation=None) -> NormGrads:
    if kind != "group":
        P.training_flag(training, fn)
    P.same_kind(fn, x, dy=dy, mean=mean, rstd=rstd, weight=weight, bias=bias)
    plan = P.channel_backward(fn, kind, dy, x, mean, rstd, weight, training, channel_axis, bias,
                              activation)
    L = _Launch(fn, x)
    with L.device:
        x = L.x
        sd = plan.sd
        dy = L.arr_or_none(dy)
        if dy.dtype != x.dtype:
            dy = dy.astype(x.dtype)
        mean, rstd = L.param(mean, sd), L.param(rstd, sd)
        w, b = _affine_for(L, plan, L.param(weight, sd), L.param(bias, sd))
        xd, channels_last, perm = _channel_view(L.xp, x, plan.ca)
        dyd = L.xp.ascontiguousarray(dy.transpose(perm)).reshape(xd.shape)
        dxd, dx, _ = _output(L, None, x, xd, perm)
        B, C, S = plan.N, plan.C, plan.S
        dweight, dbias = L.empty(C, sd), L.empty(C, sd)
        ws = L.workspace("channel_backward", x.dtype, B, C, S, plan.groups, channels_last)
        L.mod.channel_backward(
            x.dtype.name, _ptr(dyd), _ptr(xd), _ptr(mean), _ptr(rstd), _ptr(w), _ptr(dxd),
            _ptr(dweight), _ptr(dbias), B, C, S, plan.groups, channels_last, plan.training,
            _ptr(ws), L.stream, _ptr(b), plan.activation,
        )
        return NormGrads(dx, dweight, dbias)


# --------------------------------------------------------------------------------------------
# row norms


def row_forward(fn, x, normalized_shape, weight, bias, eps, out, center) -> NormOutput:
    P.same_kind(fn, x, weight=weight, bias=bias, out=out)
    plan = P.row_forward(fn, x, normalized_shape, weight, bias, eps, out, center)
    L = _Launch(fn, x)
    with L.device:
        x = L.x
        sd, M, N = plan.sd, plan.M, plan.N
        w, b = L.param(weight, sd), L.param(bias, sd)
        xd = L.xp.ascontiguousarray(x).reshape(M, N)
        out = L.arr_or_none(out)
        yd, y, copy_back = _output(L, out, x, xd, tuple(range(x.ndim)), (w, b))
        mean = L.empty(plan.lead, sd) if center else None
        rstd = L.empty(plan.lead, sd)
        L.mod.row_forward(x.dtype.name, _ptr(xd), _ptr(yd), _ptr(w), _ptr(b), _ptr(mean),
                          _ptr(rstd), M, N, plan.eps, L.stream, 0, 0)
        if copy_back is not None:
            L.xp.copyto(out, copy_back)
        return NormOutput(y, mean, rstd)


def add_row_forward(fn, x, residual, normalized_shape, weight, bias, eps, out, h_out,
                    center) -> AddNormOutput:
    """functional.add_layer_norm / add_rms_norm on the device: one kernel sums each row
    (h = x + residual, rounded to x's dtype), writes h and normalizes it. h and y are written
    into fresh device buffers and copied into ``h_out``/``out`` when given, so any aliasing of
    those with the inputs gives the fresh-array result."""
    P.same_kind(fn, x, residual=residual, weight=weight, bias=bias, out=out, h_out=h_out)
    plan = P.add_row_forward(fn, x, residual, normalized_shape, weight, bias, eps, out, h_out,
                             center)
    L = _Launch(fn, x)
    with L.device:
        x, xp = L.x, L.xp
        sd, M, N = plan.sd, plan.M, plan.N
        w, b = L.param(weight, sd), L.param(bias, sd)
        xd = xp.ascontiguousarray(x).reshape(M, N)
        rd = xp.ascontiguousarray(L.arr_or_none(residual), dtype=x.dtype).reshape(M, N)
        hd, yd = L.empty((M, N), x.dtype), L.empty((M, N), x.dtype)
        mean = L.empty(plan.lead, sd) if center else None
        rstd = L.empty(plan.lead, sd)
        L.mod.row_forward(x.dtype.name, _ptr(xd), _ptr(yd), _ptr(w), _ptr(b), _ptr(mean),
                          _ptr(rstd), M, N, plan.eps, L.stream, _ptr(rd), _ptr(hd))
        h, y = hd.reshape(x.shape), yd.reshape(x.shape)
        for dst, src in ((L.arr_or_none(h_out), h), (L.arr_or_none(out), y)):
            if dst is not None:
                xp.copyto(dst, src)
        return AddNormOutput(y if out is None else L.arr_or_none(out),
                             h if h_out is None else L.arr_or_none(h_out), mean, rstd)


def row_backward(fn, dy, x, mean, rstd, weight, center) -> NormGrads:
    P.same_kind(fn, x, dy=dy, mean=mean, rstd=rstd, weight=weight)
    plan = P.row_backward(fn, dy, x, mean, rstd, weight, center)
    L = _Launch(fn, x)
    with L.device:
        x, xp = L.x, L.xp
        sd, M, N, ns = plan.sd, plan.M, plan.N, plan.ns
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
