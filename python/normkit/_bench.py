"""``python -m normkit bench``: normkit against plain NumPy and PyTorch's CPU kernels.

Imported lazily by ``normkit.__main__``; nothing here is part of the public API.
The method is the one BENCH.md prescribes:

* Fixed seed. Every contender is first checked against a float64 evaluation of
  the NumPy reference below (|got - ref| <= rtol*|ref| + atol*max|ref|, loose
  per-dtype tolerances). A contender that disagrees is reported as WRONG, one
  that raises as ERROR; neither is timed.
* Warm-up, then the contenders are interleaved (A B C A B C ...) and the median
  of the repeats is reported. A short sleep separates samples: normkit and
  torch each own an OpenMP pool whose idle workers spin for a while, and on a
  two-core machine they would steal cycles from the next contender.
* normkit's forward writes into a preallocated ``out=`` array; its time with a
  fresh output is reported separately ("fresh"). PyTorch's forward calls its
  native kernels directly: ``aten::native_batch_norm.out`` into preallocated
  outputs (a real out= kernel); ``aten::native_layer_norm`` and
  ``native_group_norm`` with fresh outputs, because their ``.out`` overloads
  are generated wrappers that run the functional kernel and then copy (measured
  slower: PyTorch has no faster way to run them). Backwards allocate their
  results in both libraries: normkit's ``*_backward`` against
  ``aten::native_*_backward`` called directly (kernel only, no autograd).
  Exceptions, printed in the header:
  InstanceNorm is timed as PyTorch runs it (BatchNorm on a (1, N*C, ...)
  view, weight repeated N times); RMSNorm's forward uses
  ``aten::_fused_rms_norm`` (fresh output) and its backward goes through
  autograd on a graph built once (``torch.autograd.grad(..., retain_graph=True)``),
  as PyTorch has no CPU kernel for ``_fused_rms_norm_backward``.
* Bandwidth: the byte model of BENCH.md (forward 2*n*itemsize, backward
  3*n*itemsize; channels-last BatchNorm training forward 3*n*itemsize) over
  normkit's time, and its ratio to a copy (``np.copyto``, i.e. libc memcpy, of
  256 MiB, best of 5, read + write counted) measured in the same run with the
  same number of threads, before and after the workloads (the larger is used).

Timings are never asserted on: this prints, it does not judge. torch is
optional; without it the torch columns show '-'.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

SEED = 1234
MOMENTUM = 0.1
EPS = 1e-5
_SLEEP_BETWEEN_SAMPLES = 0.002  # s; lets the other library's OpenMP workers go idle
_SAMPLE_TARGET = 2e-3  # s; calls faster than this are repeated inside one sample
_COPY_BYTES = 256 << 20

# Loose check tolerances per dtype: (rtol, atol relative to max|ref|).
_TOL = {
    "float64": (1e-7, 1e-7),
    "float32": (1e-3, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}


# --------------------------------------------------------------------------------------
# Workloads (BENCH.md's table, as data)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str
    op: str  # batch_norm | layer_norm | group_norm | instance_norm | rms_norm
    shape: Tuple[int, ...]
    dtype: str = "float32"
    dirs: Tuple[str, ...] = ("fwd", "bwd")
    training: bool = True  # batch_norm only
    channel_axis: int = 1  # channel norms
    norm_ndim: int = 1  # row norms: number of normalized trailing axes
    num_groups: int = 0  # group_norm
    quick: bool = False  # part of --quick
    in_cache: bool = False  # small enough to be cache-resident: % of copy not meaningful
    fwd_bytes: int = 2  # byte model, multiples of n*itemsize
    bwd_bytes: int = 3


WORKLOADS: Tuple[Workload, ...] = (
    Workload("bn_train_56", "batch_norm", (32, 64, 56, 56), quick=True),
    Workload("bn_train_56_cl", "batch_norm", (32, 56, 56, 64), channel_axis=-1, fwd_bytes=3),
    Workload("bn_train_14", "batch_norm", (256, 256, 14, 14)),
    Workload("bn_train_7", "batch_norm", (64, 512, 7, 7)),
    Workload("bn1d", "batch_norm", (4096, 1024)),
    Workload("bn_eval", "batch_norm", (32, 64, 56, 56), dirs=("fwd",), training=False),
    Workload("ln_1k", "layer_norm", (8192, 1024), quick=True),
    Workload("ln_4k", "layer_norm", (4096, 4096)),
    Workload("ln_small", "layer_norm", (512, 768), in_cache=True),
    Workload("gn_28", "group_norm", (32, 256, 28, 28), num_groups=32, quick=True),
    Workload("gn_64", "group_norm", (8, 512, 64, 64), num_groups=32),
    Workload("in_56", "instance_norm", (32, 64, 56, 56), quick=True),
    Workload("rms_1k", "rms_norm", (8192, 1024), quick=True),
    Workload("tiny_ln", "layer_norm", (8, 64), dirs=("fwd",), in_cache=True),
    Workload("tiny_bn1d", "batch_norm", (8, 64), dirs=("fwd",), in_cache=True),
    Workload("bn_train_56_f64", "batch_norm", (32, 64, 56, 56), dtype="float64"),
    Workload("ln_1k_f64", "layer_norm", (8192, 1024), dtype="float64"),
)


def _prod(shape: Sequence[int]) -> int:
    p = 1
    for s in shape:
        p *= int(s)
    return p


# --------------------------------------------------------------------------------------
# One workload: data, the plain NumPy reference, the float64 oracle, the contenders
# --------------------------------------------------------------------------------------
class Problem:
    """Inputs and calls for one workload.

    The NumPy reference works on a view of x in which the statistic groups are
    explicit axes: ``red_axes`` are reduced for the statistics, ``affine_axes``
    for dweight/dbias, and weight/bias broadcast as ``param_b``.
    """

    def __init__(self, wl: Workload):
        self.wl = wl
        op, shape, nd = wl.op, tuple(wl.shape), len(wl.shape)
        self.shape = shape
        self.n = _prod(shape)
        self.dtype = _np_dtype(wl.dtype)
        self.sdt = np.dtype(np.float64) if self.dtype == np.float64 else np.dtype(np.float32)
        self.center = op != "rms_norm"
        self.has_bias = op != "rms_norm"
        self.training = wl.training if op == "batch_norm" else True
        self.eps = float(np.finfo(self.sdt).eps) if op == "rms_norm" else EPS
        self.ca = wl.channel_axis % nd
        self.perm_cl = None  # NCHW <-> channels-last permutation for torch, if any
        if op in ("batch_norm", "group_norm", "instance_norm"):
            C = shape[self.ca]
            self.C = C
            self.param_shape: Tuple[int, ...] = (C,)
            if op != "batch_norm" and self.ca != 1:
                raise NotImplementedError(f"{wl.name}: only channel_axis=1 for {op} here")
            if self.ca != 1:
                self.perm_cl = (0, nd - 1) + tuple(range(1, nd - 1))
        if op == "batch_norm":
            red = tuple(a for a in range(nd) if a != self.ca)
            bshape = [1] * nd
            bshape[self.ca] = self.C
            self.view_shape = shape
            self.red_axes, self.affine_axes = red, red
            self.param_b = tuple(bshape)
            self.stat_shape, self.stat_b = (self.C,), tuple(bshape)
        elif op in ("layer_norm", "rms_norm"):
            k = wl.norm_ndim
            self.nshape = shape[nd - k:]
            self.param_shape = self.nshape
            self.view_shape = shape
            self.red_axes = tuple(range(nd - k, nd))
            self.affine_axes = tuple(range(nd - k))
            self.param_b = self.nshape
            self.stat_shape = shape[: nd - k]
            self.stat_b = shape[: nd - k] + (1,) * k
        elif op == "group_norm":
            N, G = shape[0], wl.num_groups
            D, S = self.C // G, _prod(shape[2:])
            self.view_shape = (N, G, D, S)
            self.red_axes, self.affine_axes = (2, 3), (0, 3)
            self.param_b = (1, G, D, 1)
            self.stat_shape, self.stat_b = (N, G), (N, G, 1, 1)
        elif op == "instance_norm":
            N, S = shape[0], _prod(shape[2:])
            self.view_shape = (N, self.C, S)
            self.red_axes, self.affine_axes = (2,), (0, 2)
            self.param_b = (1, self.C, 1)
            self.stat_shape, self.stat_b = (N, self.C), (N, self.C, 1)
        else:
            raise ValueError(f"unknown op {op!r}")
        self._make_data()
        self.ref: Dict[str, Optional[np.ndarray]] = {}

    # -- data ---------------------------------------------------------------------
    def _make_data(self):
        rng = np.random.default_rng(SEED)
        gen_dt = np.float64 if self.dtype == np.float64 else np.float32

        def randn(shape, dt):
            a = rng.standard_normal(shape, dtype=gen_dt)
            return a.astype(dt, copy=False)

        x = randn(self.shape, gen_dt)
        x *= 2.0
        x += 0.5  # mean 0.5, std 2: centring matters
        self.x = x.astype(self.dtype, copy=False)
        self.dy = randn(self.shape, self.dtype)
        ps = self.param_shape
        self.w = (1.0 + 0.1 * rng.standard_normal(ps)).astype(self.sdt)
        self.b = (0.1 * rng.standard_normal(ps)).astype(self.sdt) if self.has_bias else None
        if self.wl.op == "batch_norm":
            # Initial running statistics, near the data's for eval mode.
            self.rm0 = (0.5 + 0.1 * rng.standard_normal(ps)).astype(self.sdt)
            self.rv0 = (4.0 * (1.0 + 0.1 * np.abs(rng.standard_normal(ps)))).astype(self.sdt)
        else:
            self.rm0 = self.rv0 = None

    def running(self):
        """Fresh, private copies of the initial running statistics (or Nones)."""
        if self.rm0 is None:
            return None, None
        return self.rm0.copy(), self.rv0.copy()

    # -- the plain NumPy reference (what a user writes by hand, in x's dtype) ------
    def numpy_forward(self, x, w, b, rm, rv):
        v = x.reshape(self.view_shape)
        ra, eps = self.red_axes, self.eps
        if self.wl.op == "batch_norm" and not self.training:
            mean = rm.reshape(self.stat_b)
            rstd = 1 / np.sqrt(rv.reshape(self.stat_b) + eps)
        elif self.center:
            mean = v.mean(axis=ra, keepdims=True)
            var = v.var(axis=ra, keepdims=True)
            rstd = 1 / np.sqrt(var + eps)
            if self.wl.op == "batch_norm" and rm is not None:
                m = v.size // self.C
                rm *= 1 - MOMENTUM
                rm += MOMENTUM * mean.reshape(-1)
                rv *= 1 - MOMENTUM
                rv += (MOMENTUM * m / (m - 1)) * var.reshape(-1)
        else:
            mean = None
            rstd = 1 / np.sqrt(np.mean(v * v, axis=ra, keepdims=True) + eps)
        y = (v - mean) * rstd if self.center else v * rstd
        if w is not None:
            y = y * w.reshape(self.param_b)
        if b is not None:
            y = y + b.reshape(self.param_b)
        y = y.reshape(x.shape).astype(x.dtype, copy=False)
        return y, mean, rstd

    def numpy_backward(self, dy, x, mean, rstd, w):
        v = x.reshape(self.view_shape)
        dyv = dy.reshape(self.view_shape)
        ra = self.red_axes
        rstd = rstd.reshape(self.stat_b)
        xhat = (v - mean.reshape(self.stat_b)) * rstd if self.center else v * rstd
        g = dyv * w.reshape(self.param_b) if w is not None else dyv
        if self.training:
            c1 = (g * xhat).mean(axis=ra, keepdims=True)
            if self.center:
                c2 = g.mean(axis=ra, keepdims=True)
                dx = rstd * (g - c2 - xhat * c1)
            else:
                dx = rstd * (g - xhat * c1)
        else:
            dx = g * rstd
        dw = (dyv * xhat).sum(axis=self.affine_axes).reshape(self.param_shape)
        db = dyv.sum(axis=self.affine_axes).reshape(self.param_shape) if self.has_bias else None
        return dx.reshape(x.shape).astype(x.dtype, copy=False), dw, db

    # -- float64 oracle ------------------------------------------------------------
    def compute_oracle(self, dirs):
        """Reference results in float64 and the saved statistics the backwards take."""
        f64 = np.float64
        x64 = self.x.astype(f64)
        w64 = self.w.astype(f64)
        b64 = self.b.astype(f64) if self.b is not None else None
        rm, rv = self.running()
        rm64 = rm.astype(f64) if rm is not None else None
        rv64 = rv.astype(f64) if rv is not None else None
        y, mean, rstd = self.numpy_forward(x64, w64, b64, rm64, rv64)
        self.ref.update(
            y=y,
            mean=mean.reshape(self.stat_shape) if mean is not None else None,
            rstd=rstd.reshape(self.stat_shape),
            running_mean=rm64 if self.training else None,
            running_var=rv64 if self.training else None,
        )
        # Saved statistics in the statistics dtype: the same inputs for every backward.
        self.mean_s = self.ref["mean"].astype(self.sdt) if self.center else None
        self.rstd_s = self.ref["rstd"].astype(self.sdt)
        del y, x64
        if "bwd" in dirs:
            x64 = self.x.astype(f64)
            dx, dw, db = self.numpy_backward(
                self.dy.astype(f64),
                x64,
                self.mean_s.astype(f64) if self.center else None,
                self.rstd_s.astype(f64),
                w64,
            )
            self.ref.update(dx=dx, dweight=dw, dbias=db)

    # -- normkit calls ----------------------------------------------------------------
    def nk_forward(self, nk, out, rm, rv):
        wl, x = self.wl, self.x
        if wl.op == "batch_norm":
            return nk.batch_norm(
                x, self.w, self.b, running_mean=rm, running_var=rv, training=self.training, momentum=MOMENTUM,
                eps=self.eps, channel_axis=wl.channel_axis, out=out,
            )
        if wl.op == "layer_norm":
            return nk.layer_norm(x, self.nshape, self.w, self.b, eps=self.eps, out=out)
        if wl.op == "group_norm":
            return nk.group_norm(
                x, wl.num_groups, self.w, self.b, eps=self.eps, channel_axis=wl.channel_axis,
                out=out,
            )
        if wl.op == "instance_norm":
            return nk.instance_norm(
                x, self.w, self.b, training=True, eps=self.eps, channel_axis=wl.channel_axis,
                out=out,
            )
        return nk.rms_norm(x, self.nshape, self.w, eps=None, out=out)

    def nk_backward(self, nk):
        wl = self.wl
        dy, x, mean, rstd, w = self.dy, self.x, self.mean_s, self.rstd_s, self.w
        if wl.op == "batch_norm":
            return nk.batch_norm_backward(
                dy, x, mean, rstd, w, training=self.training, channel_axis=wl.channel_axis
            )
        if wl.op == "layer_norm":
            return nk.layer_norm_backward(dy, x, mean, rstd, w)
        if wl.op == "group_norm":
            return nk.group_norm_backward(dy, x, mean, rstd, w, channel_axis=wl.channel_axis)
        if wl.op == "instance_norm":
            return nk.instance_norm_backward(
                dy, x, mean, rstd, w, training=True, channel_axis=wl.channel_axis
            )
        return nk.rms_norm_backward(dy, x, rstd, w)


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# --------------------------------------------------------------------------------------
# PyTorch side
# --------------------------------------------------------------------------------------
TORCH_METHOD = {
    "batch_norm": ("aten.native_batch_norm.out", "aten.native_batch_norm_backward"),
    "layer_norm": ("aten.native_layer_norm (fresh output)", "aten.native_layer_norm_backward"),
    "group_norm": ("aten.native_group_norm (fresh output)", "aten.native_group_norm_backward"),
    "instance_norm": (
        "aten.native_batch_norm.out on a (1, N*C, ...) view",
        "aten.native_batch_norm_backward on that view",
    ),
    "rms_norm": ("aten._fused_rms_norm (fresh output)", "autograd of F.rms_norm"),
}


class TorchSide:
    """PyTorch calls on the same memory as the NumPy inputs (torch.from_numpy)."""

    def __init__(self, torch, p: Problem):
        self.torch, self.p = torch, p
        aten = torch.ops.aten
        nd = len(p.shape)
        if p.perm_cl is not None:  # numpy (N, *S, C) -> torch NCHW-logical channels-last view
            fwd_perm = p.perm_cl
            back_perm = (0,) + tuple(range(2, nd)) + (1,)
            self.to_t = lambda a: torch.from_numpy(a).permute(*fwd_perm)
            self.from_t = lambda t: t.permute(*back_perm).numpy()
        else:
            self.to_t = torch.from_numpy
            self.from_t = lambda t: t.numpy()
        self.xt, self.dyt = self.to_t(p.x), self.to_t(p.dy)
        self.wt = torch.from_numpy(p.w)
        self.bt = torch.from_numpy(p.b) if p.b is not None else None
        self.aten = aten

    def _running_t(self):
        rm, rv = self.p.running()
        if rm is None:
            return None, None
        return self.torch.from_numpy(rm), self.torch.from_numpy(rv)

    def forward(self) -> Callable[[], object]:
        """A zero-argument callable returning y (as a numpy array via from_t on check)."""
        torch, p, aten = self.torch, self.p, self.aten
        op, xt, wt, bt = p.wl.op, self.xt, self.wt, self.bt
        yt = torch.empty_like(xt)  # keeps the channels-last strides
        if op == "batch_norm":
            rmt, rvt = self._running_t()
            sm, si = torch.empty(p.C, dtype=wt.dtype), torch.empty(p.C, dtype=wt.dtype)
            training, eps = p.training, p.eps

            def fwd():
                aten.native_batch_norm.out(
                    xt, wt, bt, rmt, rvt, training, MOMENTUM, eps, out=yt, save_mean=sm,
                    save_invstd=si,
                )
                return yt

            return fwd
        # LayerNorm, GroupNorm: the .out overloads are generated wrappers that run the
        # functional kernel and copy its result (measured slower), so call the kernel.
        if op == "layer_norm":
            nshape, eps = list(p.nshape), p.eps

            def fwd():
                return aten.native_layer_norm(xt, nshape, wt, bt, eps)[0]

            return fwd
        if op == "group_norm":
            N, C, G = p.shape[0], p.C, p.wl.num_groups
            S = _prod(p.shape[2:])
            eps = p.eps

            def fwd():
                return aten.native_group_norm(xt, wt, bt, N, C, S, G, eps)[0]

            return fwd
        if op == "instance_norm":
            N, C = p.shape[0], p.C
            vshape = (1, N * C) + tuple(p.shape[2:])
            xv, yv = xt.view(vshape), yt.view(vshape)
            sm = torch.empty(N * C, dtype=wt.dtype)
            si = torch.empty(N * C, dtype=wt.dtype)
            eps = p.eps

            def fwd():
                aten.native_batch_norm.out(
                    xv, wt.repeat(N), bt.repeat(N), None, None, True, MOMENTUM, eps, out=yv,
                    save_mean=sm, save_invstd=si,
                )
                return yt

            return fwd
        # rms_norm
        nshape = list(p.nshape)

        def fwd():
            return aten._fused_rms_norm(xt, nshape, wt, None)[0]

        return fwd

    def backward(self) -> Callable[[], tuple]:
        torch, p, aten = self.torch, self.p, self.aten
        op, xt, dyt, wt, bt = p.wl.op, self.xt, self.dyt, self.wt, self.bt
        mask = [True, True, True]
        meant = torch.from_numpy(p.mean_s) if p.mean_s is not None else None
        rstdt = torch.from_numpy(p.rstd_s)
        if op == "batch_norm":
            rmt, rvt = self._running_t()
            if p.training:
                rmt = rvt = None
            training, eps = p.training, p.eps

            def bwd():
                return aten.native_batch_norm_backward(
                    dyt, xt, wt, rmt, rvt, meant, rstdt, training, eps, mask
                )

            return bwd
        if op == "layer_norm":
            nshape = list(p.nshape)
            mb, rb = meant.view(p.stat_b), rstdt.view(p.stat_b)

            def bwd():
                return aten.native_layer_norm_backward(dyt, xt, nshape, mb, rb, wt, bt, mask)

            return bwd
        if op == "group_norm":
            N, C, G = p.shape[0], p.C, p.wl.num_groups
            S = _prod(p.shape[2:])

            def bwd():
                return aten.native_group_norm_backward(
                    dyt, xt, meant, rstdt, wt, N, C, S, G, mask
                )

            return bwd
        if op == "instance_norm":
            N, C = p.shape[0], p.C
            vshape = (1, N * C) + tuple(p.shape[2:])
            xv, dyv = xt.view(vshape), dyt.view(vshape)
            mv, rv = meant.reshape(N * C), rstdt.reshape(N * C)
            eps = p.eps

            def bwd():
                dx, dw, db = aten.native_batch_norm_backward(
                    dyv, xv, wt.repeat(N), None, None, mv, rv, True, eps, mask
                )
                return dx.view(xt.shape), dw.view(N, C).sum(0), db.view(N, C).sum(0)

            return bwd
        # rms_norm: autograd on a graph built once
        F = torch.nn.functional
        xg = xt.detach().requires_grad_(True)
        wg = wt.detach().requires_grad_(True)
        y = F.rms_norm(xg, list(p.nshape), wg, eps=None)

        def bwd():
            dx, dw = torch.autograd.grad(y, (xg, wg), dyt, retain_graph=True)
            return dx, dw, None

        return bwd


# --------------------------------------------------------------------------------------
# Checking and timing
# --------------------------------------------------------------------------------------
def _compare(name: str, got, ref, dtype_name: str, want_dtype=None) -> Optional[str]:
    """None if ``got`` matches ``ref`` within the loose tolerance, else a one-line reason."""
    if ref is None:
        return None if got is None else f"{name}: expected None, got {type(got).__name__}"
    if got is None:
        return f"{name}: got None"
    got = np.asarray(got)
    if got.shape != ref.shape:
        return f"{name}: shape {got.shape}, expected {ref.shape}"
    if want_dtype is not None and got.dtype != want_dtype:
        return f"{name}: dtype {got.dtype}, expected {np.dtype(want_dtype)}"
    rtol, atol = _TOL.get(dtype_name, (1e-3, 1e-3))
    g = got.astype(np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 1.0
    scale = scale if scale > 0 else 1.0
    err = np.abs(g - ref)
    bad = ~(err <= atol * scale + rtol * np.abs(ref))  # NaN counts as bad
    nbad = int(np.count_nonzero(bad))
    if nbad == 0:
        return None
    idx = np.unravel_index(int(np.argmax(bad)), bad.shape)
    maxerr = float(np.nanmax(err)) if np.isfinite(err).any() else float("nan")
    return (
        f"{name}: {nbad} of {ref.size} elements off; first at {tuple(int(i) for i in idx)}: "
        f"got {float(g[idx]):.9g}, expected {float(ref[idx]):.9g}; "
        f"max abs err {maxerr:.3g} (max|ref| {scale:.3g})"
    )


def _check(fields: Callable[[], Dict[str, object]], p: Problem,
           expect_dtypes: bool) -> Tuple[str, str, Optional[Dict[str, object]]]:
    """Call once and compare every field with the oracle's.

    Returns (status, detail, fields), status one of ok, WRONG, ERROR.
    """
    try:
        res = fields()
    except Exception as e:  # the benchmark reports, it does not crash
        return "ERROR", f"{type(e).__name__}: {e}", None
    problems = []
    for key, got in res.items():
        want = None
        if expect_dtypes:
            want = p.dtype if key in ("y", "dx") else p.sdt
        msg = _compare(key, got, p.ref.get(key), p.wl.dtype, want)
        if msg:
            problems.append(msg)
    if problems:
        return "WRONG", "; ".join(problems), res
    return "ok", "", res


def _time_interleaved(fns: Dict[str, Callable[[], object]], max_reps: int, budget_s: float,
                      min_reps: int = 3) -> Dict[str, dict]:
    """Median seconds per call of each function, sampled round-robin (A B C A B C ...)."""
    plan = {}
    for name, fn in fns.items():  # warm-up, and an estimate of the time per call
        t0 = time.perf_counter()
        fn()
        est = time.perf_counter() - t0
        if est < 0.05:
            for _ in range(2):
                t0 = time.perf_counter()
                fn()
                est = min(est, time.perf_counter() - t0)
        est = max(est, 1e-7)
        inner = 1 if est >= _SAMPLE_TARGET else min(2000, int(math.ceil(_SAMPLE_TARGET / est)))
        reps = int(budget_s / (est * inner))
        reps = max(min(min_reps, max_reps), min(max_reps, reps))
        plan[name] = (fn, inner, reps)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    rounds = max((r for _, _, r in plan.values()), default=0)
    for r in range(rounds):
        for name, (fn, inner, reps) in plan.items():
            if r >= reps:
                continue
            time.sleep(_SLEEP_BETWEEN_SAMPLES)
            if inner > 1:
                fn()  # after the sleep the first call runs cold (~0.1 ms here); keep it out
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {
        name: {
            "median_s": statistics.median(s),
            "min_s": min(s),
            "reps": len(s),
            "calls_per_sample": plan[name][1],
        }
        for name, s in samples.items()
    }


def measure_copy_bandwidth(threads: Sequence[int], nbytes: int = _COPY_BYTES,
                           repeats: int = 5) -> Dict[int, float]:
    """GB/s of np.copyto (read + write counted), split over t Python threads.

    np.copyto releases the GIL, so the threads copy in parallel.
    """
    n = nbytes // 8
    src = np.empty(n)
    src.fill(1.0)
    dst = np.empty(n)
    dst.fill(0.0)
    result = {}
    for t in threads:
        if t == 1:
            def copy():
                np.copyto(dst, src)
            pool = None
        else:
            step = -(-n // t)
            step = -(-step // 512) * 512  # 4 KiB-aligned pieces
            pieces = [(i, min(i + step, n)) for i in range(0, n, step)]
            pool = ThreadPoolExecutor(max_workers=t)

            def part(ab):
                np.copyto(dst[ab[0]:ab[1]], src[ab[0]:ab[1]])

            def copy(pool=pool, pieces=pieces, part=part):
                list(pool.map(part, pieces))
        copy()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            copy()
            best = min(best, time.perf_counter() - t0)
        if pool is not None:
            pool.shutdown()
        result[t] = 2 * n * 8 / best / 1e9
    return result


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------
_CPUINFO_IDS = {"cpu family": "cpu_family", "model": "cpu_model_number", "stepping": "cpu_stepping"}


def cpu_info() -> Dict[str, str]:
    """CPU model and vendor: /proc/cpuinfo on Linux, the platform module elsewhere."""
    info = {"cpu": "", "cpu_vendor": ""}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and not info["cpu"]:
                    info["cpu"] = value
                elif key == "vendor_id" and not info["cpu_vendor"]:
                    info["cpu_vendor"] = value
                elif key in _CPUINFO_IDS and _CPUINFO_IDS[key] not in info:
                    info[_CPUINFO_IDS[key]] = value
                elif key == "flags" and "cpu_simd" not in info:
                    flags = set(value.split())
                    info["cpu_simd"] = ",".join(
                        f for f in ("sse2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw",
                                    "avx512vl", "avx512dq") if f in flags)
                elif not line.strip() and info["cpu"]:
                    break  # the first processor is enough
    except OSError:
        pass
    if not info["cpu"]:
        info["cpu"] = platform.processor() or platform.machine() or "unknown"
    if not info["cpu_vendor"]:
        info["cpu_vendor"] = "unknown"
    info["cpu_count"] = str(os.cpu_count())
    return info


def _import_torch(disabled: bool):
    if disabled:
        return None, "disabled (--no-torch)"
    try:
        import torch
    except Exception as e:  # not installed, or broken: run without it
        return None, f"not available ({type(e).__name__}: {e})"
    return torch, torch.__version__


class _ForeignLoad:
    """CPU used by everything but this process while a row is measured, in cores.

    From /proc/stat (busy time of all CPUs, hypervisor steal included) minus
    this process's own CPU time; None where /proc/stat is unavailable. On a
    two-core machine another process using a core ruins 2-thread timings (a
    spinning OpenMP barrier then waits for the scheduler), so rows measured
    under foreign load are marked "busy".
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        return busy, t.user + t.system, time.perf_counter()

    def cores(self) -> Optional[float]:
        end = self._sample()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        foreign = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, foreign / (end[2] - self.start[2]))


_BUSY_CORES = 0.25


def _loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):  # not on every platform
        return "?"


def _fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    ms = v * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    if ms >= 0.01:
        return f"{ms:.3f}"
    return f"{ms:.5f}"


def _fmt_x(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}x" if v >= 10 else f"{v:.2f}x"


def _geomean(vals: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def _cell(row: dict, key: str) -> str:
    st = row["status"].get(key)
    if st in ("WRONG", "ERROR"):
        return st
    return _fmt_ms(row["time_s"].get(key))


def _missing_ops(nk, wl: Workload) -> List[str]:
    need = [wl.op] + ([wl.op + "_backward"] if "bwd" in wl.dirs else [])
    return [f"normkit.{name}" for name in need if not hasattr(nk, name)]


def _contenders(p: Problem, nk, tside: Optional[TorchSide], d: str) -> Dict[str, tuple]:
    """name -> (timed call, checked call returning named fields, check dtypes too)."""
    contenders: Dict[str, tuple] = {}
    if d == "fwd":
        out = np.empty_like(p.x)
        nk_rm, nk_rv = p.running()
        fr_rm, fr_rv = p.running()
        np_rm, np_rv = p.running()

        def nk_fields(r):
            return {"y": r[0], "mean": r[1], "rstd": r[2]}

        def nk_check_call():
            rm, rv = p.running()
            r = p.nk_forward(nk, np.empty_like(p.x), rm, rv)
            f = nk_fields(r)
            if p.wl.op == "batch_norm" and p.training:
                f.update(running_mean=rm, running_var=rv)
            return f

        contenders["normkit"] = (
            lambda: p.nk_forward(nk, out, nk_rm, nk_rv), nk_check_call, True
        )
        contenders["fresh"] = (
            lambda: p.nk_forward(nk, None, fr_rm, fr_rv),
            lambda: nk_fields(p.nk_forward(nk, None, *p.running())), True,
        )
        contenders["numpy"] = (
            lambda: p.numpy_forward(p.x, p.w, p.b, np_rm, np_rv),
            lambda: {"y": p.numpy_forward(p.x, p.w, p.b, *p.running())[0]}, False,
        )
        if tside is not None:
            tf = tside.forward()
            contenders["torch"] = (tf, lambda tf=tf: {"y": tside.from_t(tf())}, False)
    else:
        def nk_b():
            return p.nk_backward(nk)

        def grads(r):
            return {"dx": r[0], "dweight": r[1], "dbias": r[2]}

        contenders["normkit"] = (nk_b, lambda: grads(nk_b()), True)
        contenders["numpy"] = (
            lambda: p.numpy_backward(p.dy, p.x, p.mean_s, p.rstd_s, p.w),
            lambda: grads(p.numpy_backward(p.dy, p.x, p.mean_s, p.rstd_s, p.w)), False,
        )
        if tside is not None:
            tb = tside.backward()

            def torch_grads(tb=tb):
                dx, dw, db = tb()
                return {
                    "dx": tside.from_t(dx),
                    "dweight": dw.numpy(),
                    "dbias": db.numpy() if db is not None else None,
                }

            contenders["torch"] = (tb, torch_grads, False)
    return contenders


def _bench_workload(nk, torch, wl: Workload, threads: Sequence[int], max_reps: int,
                    budget_s: float, log) -> List[dict]:
    p = Problem(wl)
    p.compute_oracle(wl.dirs)
    tside = TorchSide(torch, p) if torch is not None else None
    rows = []
    numpy_status: Dict[str, Tuple[str, str]] = {}
    first_nk: Dict[str, Dict[str, np.ndarray]] = {}
    for t in threads:
        nk.set_num_threads(t)
        if torch is not None:
            torch.set_num_threads(t)
        for d in wl.dirs:
            row = {
                "workload": wl.name, "op": wl.op, "shape": list(wl.shape), "dtype": wl.dtype,
                "channel_axis": wl.channel_axis, "dir": d, "threads": t, "n": p.n,
                "bytes": (wl.fwd_bytes if d == "fwd" else wl.bwd_bytes) * p.n * p.dtype.itemsize,
                "in_cache": wl.in_cache, "status": {}, "detail": {}, "time_s": {}, "timing": {},
                "notes": [],
            }
            foreign = _ForeignLoad()
            contenders = _contenders(p, nk, tside, d)

            timed = {}
            for name, (fn, check_fn, expect_dtypes) in contenders.items():
                if name == "numpy" and d in numpy_status:  # numpy ignores the thread count
                    status, detail = numpy_status[d]
                else:
                    status, detail, res = _check(check_fn, p, expect_dtypes)
                    if name == "numpy":
                        numpy_status[d] = (status, detail)
                    if name == "normkit" and res is not None:
                        key = "y" if d == "fwd" else "dx"
                        main = np.asarray(res[key])
                        if d not in first_nk:
                            first_nk[d] = {"threads": t, key: main.copy()}
                        elif not np.array_equal(first_nk[d][key], main, equal_nan=True):
                            row["notes"].append(
                                f"{key} differs bitwise between {first_nk[d]['threads']} and "
                                f"{t} threads"
                            )
                row["status"][name] = status
                if detail:
                    row["detail"][name] = detail
                if status == "ok":
                    timed[name] = fn
            if timed:
                res_t = _time_interleaved(timed, max_reps, budget_s)
                for name, r in res_t.items():
                    row["time_s"][name] = r["median_s"]
                    row["timing"][name] = r
            t_nk = row["time_s"].get("normkit")
            t_np = row["time_s"].get("numpy")
            t_th = row["time_s"].get("torch")
            row["speedup_torch"] = t_th / t_nk if (t_nk and t_th) else None
            row["speedup_numpy"] = t_np / t_nk if (t_nk and t_np) else None
            row["gbps"] = row["bytes"] / t_nk / 1e9 if t_nk else None
            row["foreign_cores"] = foreign.cores()
            rows.append(row)
            log(
                f"  {wl.name:<16} {d} t={t}: normkit {_cell(row, 'normkit')} ms, "
                f"numpy {_cell(row, 'numpy')} ms, torch {_cell(row, 'torch')} ms"
            )
    return rows


def _print_table(rows: List[dict], out) -> None:
    header = ("workload", "dir", "thr", "normkit ms", "fresh ms", "numpy ms", "torch ms",
              "vs torch", "vs numpy", "GB/s", "% copy", "note")
    lines = []
    for r in rows:
        notes = []
        if r["workload"].endswith("_cl") and r["dir"] == "fwd":
            notes.append("3n bytes")
        if r["in_cache"]:
            notes.append("cache")
        if any(s != "ok" for s in r["status"].values()):
            notes.append("see below")
        if r["notes"]:
            notes.append("NONDET")
        if (r.get("foreign_cores") or 0.0) > _BUSY_CORES:
            notes.append(f"busy({r['foreign_cores']:.1f})")
        pct = r.get("pct_copy")
        lines.append((
            r["workload"], r["dir"], str(r["threads"]), _cell(r, "normkit"),
            _cell(r, "fresh") if r["dir"] == "fwd" else "-", _cell(r, "numpy"),
            _cell(r, "torch"), _fmt_x(r["speedup_torch"]), _fmt_x(r["speedup_numpy"]),
            f"{r['gbps']:.1f}" if r["gbps"] else "-",
            f"{pct:.0f}%" if pct is not None else "-", ",".join(notes),
        ))
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    left = {0, 1, 11}

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(fmt(header), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for ln in lines:
        print(fmt(ln), file=out)


def _summary(rows: List[dict], have_torch: bool, out) -> dict:
    summ = {}

    def minmean(key, label, only=None):
        vals = [(r[key], r) for r in rows if r.get(key) and (only is None or only(r))]
        if not vals:
            return None
        v_min, r_min = min(vals, key=lambda vr: vr[0])
        g = _geomean([v for v, _ in vals])
        where = f"{r_min['workload']} {r_min['dir']} t={r_min['threads']}"
        print(f"{label}: min {_fmt_x(v_min)} ({where}), geomean {_fmt_x(g)} over {len(vals)} rows",
              file=out)
        return {"min": v_min, "min_at": where, "geomean": g, "rows": len(vals)}

    if have_torch:
        summ["speedup_torch"] = minmean("speedup_torch", "speed-up vs torch")
    else:
        print("speed-up vs torch: - (torch not available)", file=out)
    summ["speedup_numpy"] = minmean("speedup_numpy", "speed-up vs numpy")
    big = [r for r in rows if r.get("pct_copy") is not None and not r["in_cache"]]
    if big:
        r_min = min(big, key=lambda r: r["pct_copy"])
        print(f"normkit % of copy bandwidth (rows larger than the cache): min "
              f"{r_min['pct_copy']:.0f}% ({r_min['workload']} {r_min['dir']} t={r_min['threads']})",
              file=out)
        summ["min_pct_copy"] = r_min["pct_copy"]
    # Thread scaling of normkit: time at the fewest threads / time at the most.
    thr = sorted({r["threads"] for r in rows})
    if len(thr) > 1:
        lo, hi = thr[0], thr[-1]
        by = {(r["workload"], r["dir"], r["threads"]): r for r in rows}
        sc = []
        for (w, d, t), r in by.items():
            if t != lo or r["in_cache"]:
                continue
            r2 = by.get((w, d, hi))
            a, b = r["time_s"].get("normkit"), (r2 or {}).get("time_s", {}).get("normkit")
            if a and b:
                sc.append((a / b, f"{w} {d}"))
        if sc:
            m = min(sc)
            g = _geomean([v for v, _ in sc])
            print(f"normkit scaling {lo} -> {hi} threads (rows larger than the cache): min "
                  f"{m[0]:.2f}x ({m[1]}), geomean {g:.2f}x", file=out)
            summ["scaling"] = {"min": m[0], "min_at": m[1], "geomean": g}
    busy = [r for r in rows if (r.get("foreign_cores") or 0.0) > _BUSY_CORES]
    if busy:
        print(f"busy: {len(busy)} rows were measured while other processes used more than "
              f"{_BUSY_CORES} cores (note 'busy(cores)'); their timings are not trustworthy, "
              f"rerun them with --only", file=out)
    summ["busy_rows"] = len(busy)
    bad = [(r, k) for r in rows for k, s in r["status"].items() if s != "ok"]
    nondet = [r for r in rows if r["notes"]]
    if bad or nondet:
        print("problems:", file=out)
        for r, k in bad:
            print(f"  {r['status'][k]} {r['workload']} {r['dir']} t={r['threads']} {k}: "
                  f"{r['detail'].get(k, '')}", file=out)
        for r in nondet:
            for note in r["notes"]:
                print(f"  NONDET {r['workload']} {r['dir']} t={r['threads']}: {note}", file=out)
    else:
        print("problems: none (every contender matched the float64 reference)", file=out)
    summ["problems"] = len(bad) + len(nondet)
    return summ


def run(*, quick: bool = False, threads: Sequence[int] = (1, 2), json_path: Optional[str] = None,
        repeats: Optional[int] = None, only: Optional[Sequence[str]] = None,
        no_torch: bool = False, list_only: bool = False, out=None) -> int:
    out = out if out is not None else sys.stdout
    if list_only:
        for wl in WORKLOADS:
            tag = " (quick)" if wl.quick else ""
            print(f"{wl.name:<16} {wl.op:<14} {str(wl.shape):<20} {wl.dtype:<8} "
                  f"{'/'.join(wl.dirs)}{tag}", file=out)
        from normkit._bench_extra import EXTRA_NAMES

        print(f"{'  '.join(EXTRA_NAMES)}: after the table, in full runs (fused residual add and "
              "fused norm + activation vs PyTorch's eager pairs; masked vs unmasked BatchNorm; "
              "Standardizer vs StandardScaler)", file=out)
        return 0

    import normkit as nk

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    from normkit._bench_extra import EXTRA_NAMES, run_extra

    extras: Sequence[str] = ()
    if only:
        names = {w.name for w in WORKLOADS}
        unknown = [n for n in only if n not in names and n not in EXTRA_NAMES]
        if unknown:
            print(f"unknown workload(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
            return 2
        workloads = [w for w in WORKLOADS if w.name in set(only)]
        extras = [n for n in EXTRA_NAMES if n in set(only)]
    elif quick:
        workloads = [w for w in WORKLOADS if w.quick]
    else:
        workloads = list(WORKLOADS)
        extras = EXTRA_NAMES
    max_reps = repeats if repeats is not None else (15 if quick else 20)
    budget_s = 0.6 if quick else 0.8

    torch, torch_info = _import_torch(no_torch)
    info = dict(nk.build_info()) if hasattr(nk, "build_info") else {}
    nk_threads0 = nk.get_num_threads()
    torch_threads0 = torch.get_num_threads() if torch is not None else None

    print(f"normkit bench{' --quick' if quick else ''}: normkit {info.get('version', '?')}, "
          f"numpy {np.__version__}, torch {torch_info}", file=out)
    build = ", ".join(f"{k}={v}" for k, v in info.items() if k != "version")
    cpu = cpu_info()
    print(f"machine: {platform.machine()}, {cpu['cpu']} ({cpu['cpu_vendor']}), "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}; normkit build: {build}",
          file=out)
    if torch is not None:
        ops = sorted({w.op for w in workloads})
        print("torch calls: " + "; ".join(f"{o}: {TORCH_METHOD[o][0]} / {TORCH_METHOD[o][1]}"
                                          for o in ops), file=out)
    print(f"method: median of up to {max_reps} interleaved repeats after warm-up; normkit fwd "
          f"into out= ('fresh': without); numpy single-threaded, checked once", file=out)

    out.flush()
    load0 = _loadavg()
    log("measuring copy bandwidth ...")
    copy_before = measure_copy_bandwidth(threads)
    rows: List[dict] = []
    skipped = []
    t_start = time.perf_counter()
    try:
        for wl in workloads:
            missing = _missing_ops(nk, wl)
            if missing:
                msg = f"skipped {wl.name}: {', '.join(missing)} not available yet"
                skipped.append(msg)
                log(msg)
                continue
            rows.extend(_bench_workload(nk, torch, wl, threads, max_reps, budget_s, log))
            gc.collect()  # the previous workload's arrays
    finally:
        nk.set_num_threads(nk_threads0)
        if torch is not None:
            torch.set_num_threads(torch_threads0)
    elapsed = time.perf_counter() - t_start
    copy_after = measure_copy_bandwidth(threads)
    copy_bw = {t: max(copy_before[t], copy_after[t]) for t in threads}
    for r in rows:
        if r["gbps"]:
            r["pct_copy"] = 100.0 * r["gbps"] / copy_bw[r["threads"]]
        else:
            r["pct_copy"] = None

    print(f"load average (1 min) before/after: {load0}/{_loadavg()} "
          f"(above ~0.3 other processes share the cores: 2-thread numbers suffer)", file=out)
    print("copy bandwidth (np.copyto 256 MiB, best of 5, before/after): " + ", ".join(
        f"{t} thr {copy_before[t]:.1f}/{copy_after[t]:.1f} GB/s" for t in threads), file=out)
    for msg in skipped:
        print(msg, file=out)
    print(file=out)
    _print_table(rows, out)
    print(file=out)
    summ = _summary(rows, torch is not None, out)
    print(f"(workloads took {elapsed:.0f} s)", file=out)
    extra_rows = run_extra(nk, torch, extras, threads, copy_bw, out) if extras else []

    if json_path:
        doc = {
            "normkit": info, "numpy": np.__version__, "torch": torch_info, "cpu": cpu,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "quick": quick, "threads": list(threads), "max_repeats": max_reps,
            "copy_bandwidth_gbps": {"before": copy_before, "after": copy_after, "used": copy_bw},
            "workloads": [asdict(w) for w in workloads], "skipped": skipped,
            "rows": rows, "summary": summ, "extra_rows": extra_rows,
        }
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"wrote {json_path}", file=out)
    return 0


# --------------------------------------------------------------------------------------
# Every instruction-set level side by side (--isa)
# --------------------------------------------------------------------------------------
ISA_LEVELS = ("baseline", "avx2", "avx512")


def supported_isas() -> List[str]:
    """The kernel versions this build has and this CPU can run, lowest first."""
    import normkit as nk

    info = dict(nk.build_info())
    compiled = str(info.get("simd_compiled", "baseline")).split(",")
    best = str(info.get("simd_best", "baseline"))
    top = ISA_LEVELS.index(best) if best in ISA_LEVELS else 0
    return [i for i in ISA_LEVELS[: top + 1] if i in compiled]


def parse_isas(text: str) -> List[str]:
    """'all' or a comma-separated list of levels; ValueError names what is wrong."""
    if text.strip() == "all":
        return supported_isas()
    isas = []
    for part in text.split(","):
        part = part.strip()
        if part not in ISA_LEVELS:
            raise ValueError(f"unknown instruction set {part!r}; expected 'all' or some of "
                             f"{', '.join(ISA_LEVELS)}")
        if part not in isas:
            isas.append(part)
    have = supported_isas()
    missing = [i for i in isas if i not in have]
    if missing:
        raise ValueError(f"{', '.join(missing)} not available here (this CPU and build: "
                         f"{', '.join(have)})")
    return sorted(isas, key=ISA_LEVELS.index)


def run_isas(isas: Sequence[str], child_args: Sequence[str], json_path: Optional[str] = None,
             out=None) -> int:
    """Run the benchmark once per instruction set, each in its own process with NORMKIT_ISA set
    (the kernels' version is chosen once per process), then print the results side by side.
    Within each process normkit, NumPy and PyTorch are interleaved as usual, so the ratios are
    same-run ratios; raw times of different levels come from consecutive runs."""
    import subprocess
    import tempfile

    out = out if out is not None else sys.stdout
    docs: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for isa in isas:
            path = os.path.join(tmp, f"{isa}.json")
            env = dict(os.environ, NORMKIT_ISA=isa)
            print(f"===== NORMKIT_ISA={isa} =====", file=out, flush=True)
            cmd = [sys.executable, "-m", "normkit", "bench", *child_args, "--json", path]
            rc = subprocess.call(cmd, env=env)  # its table goes straight to our stdout
            if rc != 0 or not os.path.exists(path):
                print(f"bench with NORMKIT_ISA={isa} failed (exit status {rc})", file=out)
                return rc or 1
            with open(path) as f:
                docs[isa] = json.load(f)
            active = docs[isa]["normkit"].get("simd")
            if active != isa:
                print(f"warning: NORMKIT_ISA={isa} ran the {active} kernels", file=out)
            print(file=out, flush=True)
    _print_isa_table(isas, docs, out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"isas": list(isas), "runs": docs}, f, indent=1, default=str)
        print(f"wrote {json_path}", file=out)
    return 0


def _print_isa_table(isas: Sequence[str], docs: Dict[str, dict], out) -> None:
    first = docs[isas[0]]
    cpu = first.get("cpu", {})
    print(f"===== side by side: {cpu.get('cpu', '?')} ({cpu.get('cpu_vendor', '?')}), "
          f"{first.get('date_utc', '')} UTC =====", file=out)
    print("per level: normkit ms, speed-up vs torch and vs numpy (same process), % of that "
          "process's copy bandwidth; 'order' lists levels slower than the level below "
          "(ratio of their same-run speed-ups vs torch, or vs numpy without torch)", file=out)
    keyed = {isa: {(r["workload"], r["dir"], r["threads"]): r for r in docs[isa]["rows"]}
             for isa in isas}
    header = ["workload", "dir", "thr"]
    for isa in isas:
        header += [f"{isa} ms", "vs torch", "vs numpy", "% copy"]
    header.append("order")
    lines = []
    for key in [(r["workload"], r["dir"], r["threads"]) for r in first["rows"]]:
        cells = [key[0], key[1], str(key[2])]
        order = []
        prev = None
        for isa in isas:
            r = keyed[isa].get(key)
            if r is None:
                cells += ["-"] * 4
                prev = None
                continue
            t = r["time_s"].get("normkit")
            pct = r.get("pct_copy")
            cells += [_fmt_ms(t), _fmt_x(r.get("speedup_torch")), _fmt_x(r.get("speedup_numpy")),
                      f"{pct:.0f}%" if pct is not None and not r["in_cache"] else "-"]
            anchor = "speedup_torch" if r.get("speedup_torch") else "speedup_numpy"
            if prev is not None and r.get(anchor) and prev[1].get(anchor):
                ratio = r[anchor] / prev[1][anchor]
                if ratio < 1.0:
                    order.append(f"{isa}<{prev[0]} {ratio:.2f}")
            prev = (isa, r)
        cells.append(", ".join(order))
        lines.append(cells)
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    left = {0, 1, len(header) - 1}

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(fmt(header), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for ln in lines:
        print(fmt(ln), file=out)
    print(file=out)
    for isa in isas:
        s = docs[isa].get("summary", {})
        parts = []
        for k, label in (("speedup_torch", "vs torch"), ("speedup_numpy", "vs numpy")):
            v = s.get(k)
            if v:
                parts.append(f"{label} min {_fmt_x(v['min'])} ({v['min_at']}), "
                             f"geomean {_fmt_x(v['geomean'])}")
        if s.get("min_pct_copy") is not None:
            parts.append(f"min % copy {s['min_pct_copy']:.0f}%")
        print(f"{isa}: " + "; ".join(parts), file=out)
