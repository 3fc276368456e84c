"""CUDA support tested without a GPU (SPEC section 5; issue 7).

* runtime: ``normkit.cuda`` answers on any machine; ``build_info()`` tells the truth.
* launch arithmetic of ``csrc/cuda/launch.h`` through ``normkit._cuda``'s test hooks: grids stay
  within CUDA's limits for any size (past 2**31 elements), grid-stride loops cover every item
  once, the channel index maps and partial layouts partition the data exactly.
* dispatch (``normkit/_cuda_dispatch.py``) with fake objects exposing
  ``__cuda_array_interface__``: mixing host and device arrays raises TypeError, invalid input
  raises the host path's exact error before any device work, and a valid call on a machine
  without a GPU raises a clear RuntimeError.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import normkit as nk
from normkit import _cuda_dispatch

try:
    from normkit import _cuda
except ImportError:  # pragma: no cover - depends on the build
    _cuda = None

needs_cuda_module = pytest.mark.skipif(
    _cuda is None, reason="normkit was built without CUDA (no nvcc at build time, or NORMKIT_CUDA=OFF)"
)


# --------------------------------------------------------------------------------------------
# runtime


def test_runtime_queries_never_fail():
    n = nk.cuda.device_count()
    assert isinstance(n, int) and n >= 0
    assert nk.cuda.is_available() == (n > 0)
    assert nk.cuda.is_compiled() == (_cuda is not None)
    reason = nk.cuda.unavailable_reason()
    assert (reason is None) == nk.cuda.is_available()


def test_build_info_reports_cuda_truthfully():
    info = nk.build_info()
    assert info["cuda_compiled"] == nk.cuda.is_compiled()
    assert info["cuda_available"] == nk.cuda.is_available()


@needs_cuda_module
def test_cuda_module_imports_without_a_driver():
    # the runtime is linked statically: import and queries work whatever the machine has
    assert _cuda.runtime_version() >= 12000
    if _cuda.device_count() == 0:
        assert _cuda.device_error() != ""
        assert "device" in nk.cuda.unavailable_reason()


# --------------------------------------------------------------------------------------------
# launch arithmetic

K = _cuda._constants if _cuda is not None else {}
GRID_X_LIMIT = 2**31 - 1


@needs_cuda_module
@pytest.mark.parametrize("items", [0, 1, 255, 256, 257, 2**31 - 1, 2**31, 2**40, 2**62])
@pytest.mark.parametrize("per_block", [1, 8, 256])
def test_grid_is_clamped_to_launch_limits(items, per_block):
    g = _cuda._grid_for(items, per_block)
    assert 1 <= g <= K["max_blocks"] <= GRID_X_LIMIT
    assert g == min(max(1, -(-items // per_block)), K["max_blocks"])


def grid_stride_cover(items, blocks, per_block):
    """Items visited by a grid-stride loop: start = block * per_block + lane, stride = blocks *
    per_block (the loops of csrc/cuda/*.cu)."""
    seen = np.zeros(items, np.int64)
    for start in range(blocks * per_block):
        seen[start:items:blocks * per_block] += 1
    return seen


@needs_cuda_module
@pytest.mark.parametrize("M, N", [(1, 1), (7, 32), (1000, 1024), (9, 1025), (3, 100000)])
def test_row_launch(M, N):
    l = _cuda._row_launch(M, N)
    assert l["warp_per_row"] == (N <= K["warp_row_max"])
    rows_per_block = K["block"] // K["warp"] if l["warp_per_row"] else 1
    assert l["threads"] == (K["block"] if l["warp_per_row"] else K["row_block"])
    assert l["threads"] % K["warp"] == 0
    assert (grid_stride_cover(M, l["blocks"], rows_per_block) == 1).all()
    assert l["chunks"] == -(-M // K["rows_per_chunk"])


@needs_cuda_module
@pytest.mark.parametrize("M, N", [(2**33, 64), (2**31 + 1, 2048), (3, 2**34), (2**40, 2**20)])
def test_row_launch_huge(M, N):
    l = _cuda._row_launch(M, N)
    for key in ("blocks", "partial_blocks", "combine_blocks"):
        assert 1 <= l[key] <= K["max_blocks"]
    assert l["chunks"] == -(-M // K["rows_per_chunk"])
    ws = _cuda.workspace("row_backward", "float32", M, N)
    assert ws == 2 * (-(-(l["chunks"] * N * 4) // 256) * 256)


def view_model(B, C, S, G, channels_last):
    """The channel view of csrc/cpu/channel_norm.cpp, written again from its header comment."""
    per_sample = G > 0
    g = G if per_sample else C
    if channels_last:
        O, I = (S if per_sample else B * S), 1
    else:
        O, I = (1 if per_sample else B), S
    return dict(samples=B if per_sample else 1, O=O, I=I, G=g, D=C // g if g else 0)


CHANNEL_CASES = [
    # (B, C, S, groups) ; groups = 0: BatchNorm
    (2, 3, 40, 0), (3, 4, 5, 0), (4, 6, 1, 0), (2, 6, 33, 3), (2, 6, 7, 2), (3, 4, 64, 4),
    (1, 8, 4097, 2), (5, 2, 300, 0), (2, 4, 0, 0), (0, 4, 9, 2),
]


@needs_cuda_module
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("B, C, S, groups", CHANNEL_CASES)
def test_channel_view_matches_cpu_view(B, C, S, groups, channels_last):
    v = _cuda._channel_view(B, C, S, groups, channels_last)
    for k, want in view_model(B, C, S, groups, channels_last).items():
        assert v[k] == want, k
    assert v["use_runs"] == (v["I"] >= K["min_run"])
    assert v["total"] == B * C * S
    assert v["group_size"] * v["groups"] == B * C * S


@needs_cuda_module
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("B, C, S, groups", [c for c in CHANNEL_CASES if c[0] * c[1] * c[2] <= 2000])
def test_locate_matches_numpy_indices(B, C, S, groups, channels_last):
    shape = (B, S, C) if channels_last else (B, C, S)
    b, *rest = np.indices(shape).reshape(3, -1)
    c = rest[1] if channels_last else rest[0]
    t = b * groups + c // (C // groups) if groups else c
    got = np.array([_cuda._locate(B, C, S, groups, channels_last, e) for e in range(B * C * S)])
    if got.size:
        assert (got[:, 0] == c).all() and (got[:, 1] == t).all()


@needs_cuda_module
@pytest.mark.parametrize("channels_last", [False, True])
def test_locate_past_2_to_the_31(channels_last):
    B, C, S, G = 3, 96, 2**31 // 7, 8
    D = C // G
    for e in (0, 2**31 - 1, 2**31, 2**32 + 12345, B * C * S - 1):
        if channels_last:
            c, b = e % C, e // (S * C)
        else:
            c, b = (e // S) % C, e // (S * C)
        assert _cuda._locate(B, C, S, G, channels_last, e) == (c, b * G + c // D)


def simulate_partials(B, C, S, groups, channels_last):
    """Which dense elements each partial of the partial kernels reduces (a Python model of the
    loops in csrc/cuda/channel_norm.cu), as a list of sets indexed like the workspace."""
    v = _cuda._channel_view(B, C, S, groups, channels_last)
    samples, O, I, K_ = v["samples"], v["O"], v["I"], v["chunks"]

    def off(s, o, c, i):
        return ((s * O + o) * C + c) * I + i

    parts = [set() for _ in range(v["partials"])]
    if v["use_runs"]:
        for s, c in itertools.product(range(samples), range(C)):
            for e in range(O * I):
                parts[(s * C + c) * K_ + e // K["chunk_elements"]].add(off(s, e // I, c, e % I))
    else:
        J = C * I
        for s, o, j in itertools.product(range(samples), range(O), range(J)):
            parts[(s * K_ + o // K["column_rows"]) * J + j].add(off(s, o, j // I, j % I))
    return v, parts


@needs_cuda_module
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("B, C, S, groups", [c for c in CHANNEL_CASES if c[0] * c[1] * c[2] <= 20000])
def test_partials_partition_each_group_and_unit(B, C, S, groups, channels_last):
    v, parts = simulate_partials(B, C, S, groups, channels_last)
    # the flat index each element's statistics come from, per the normalize kernel
    slot = {}
    for e in range(B * C * S):
        slot[e] = _cuda._locate(B, C, S, groups, channels_last, e)

    def merged(s, c0, width):
        base, A, stride, Bn = _cuda._partial_range(B, C, S, groups, channels_last, s, c0, width)
        idx = [base + a * stride + b for a in range(A) for b in range(Bn)]
        assert all(0 <= i < len(parts) for i in idx)
        return idx

    used = []
    for s in range(v["samples"]):
        for g in range(v["G"]):
            idx = merged(s, g * v["D"], v["D"])  # forward: a group's partials
            used += idx
            elems = set().union(*(parts[i] for i in idx)) if idx else set()
            assert len(elems) == v["group_size"]
            t = s * v["G"] + g
            assert all(slot[e][1] == t for e in elems)
        for c in range(C):
            elems = set().union(*(parts[i] for i in merged(s, c, 1)))  # backward: a unit's
            assert all(slot[e][0] == c for e in elems)
    assert sorted(used) == list(range(len(parts)))  # every partial merged exactly once


@needs_cuda_module
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("groups", [0, 32])
def test_channel_sizes_past_2_to_the_31(channels_last, groups):
    B, C, S = 64, 256, 2**20  # 2**34 elements
    v = _cuda._channel_view(B, C, S, groups, channels_last)
    assert v["total"] == 2**34
    for kind in ("channel_forward", "channel_backward"):
        ws = _cuda.workspace(kind, "float32", B, C, S, groups, channels_last)
        assert ws % 256 == 0 and 0 < ws < 2**34 * 4  # far smaller than x itself
    items = v["partials"] if v["use_runs"] else v["samples"] * v["chunks"] * -(-C // K["block"])
    assert 1 <= _cuda._grid_for(items, 1) <= K["max_blocks"]
    assert 1 <= _cuda._grid_for(v["total"], K["block"]) <= K["max_blocks"]


@needs_cuda_module
def test_module_rechecks_its_arguments():
    with pytest.raises(TypeError, match="unsupported dtype int8"):
        _cuda.workspace("row_backward", "int8", 4, 4)
    with pytest.raises(ValueError, match="not divisible by num_groups"):
        _cuda.workspace("channel_forward", "float32", 2, 6, 4, 4)
    with pytest.raises(ValueError, match="unknown kind"):
        _cuda.workspace("nope", "float32", 2, 6)
    with pytest.raises(ValueError, match="N >= 1"):
        _cuda.row_forward("float32", 0, 0, 0, 0, 0, 0, 4, 0, 1e-5, 0, 0, 0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        _cuda.channel_forward("float32", 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 2, 3, 4, 0, False, True,
                              0.1, -1.0, 0, 0, 0)
    # an empty batch (CuPy gives empty arrays a null pointer): accepted, nothing launched
    _cuda.channel_forward("float32", 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 4, 5, 2, False, True, 0.1,
                          1e-5, 1, 0, 0)
    with pytest.raises(ValueError, match="mean and rstd are required"):
        _cuda.channel_forward("float32", 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 2, 4, 5, 2, False, True,
                              0.1, 1e-5, 1, 0, 0)
    with pytest.raises(ValueError, match="training=False requires"):
        _cuda.channel_forward("float32", 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 2, 3, 4, 0, False, False,
                              0.1, 1e-5, 1, 0, 0)


# --------------------------------------------------------------------------------------------
# dispatch, with fake CUDA arrays


class FakeDevice:
    """Exposes ``__cuda_array_interface__`` (version 3) over a host buffer; never launched on."""

    def __init__(self, a: np.ndarray, readonly: bool = False):
        self._a = a
        self.shape, self.dtype, self.ndim, self.size = a.shape, a.dtype, a.ndim, a.size
        self._readonly = readonly

    @property
    def __cuda_array_interface__(self):
        a = self._a
        return {
            "shape": a.shape,
            "typestr": a.dtype.str,
            "data": (a.__array_interface__["data"][0], self._readonly),
            "strides": None if a.flags.c_contiguous else a.strides,
            "version": 3,
            "stream": 1,
        }


def dev(a):
    return None if a is None else FakeDevice(np.asarray(a), readonly=not np.asarray(a).flags.writeable)


@pytest.fixture
def no_device_work(monkeypatch):
    """Any attempt to reach the GPU fails the test."""
    def refuse(fn):
        raise AssertionError(f"{fn}: device work before validation finished")

    monkeypatch.setattr(_cuda_dispatch, "_runtime", refuse)


def rng_arrays():
    rng = np.random.default_rng(0)
    x4 = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
    c4 = np.ones(4, np.float32)
    return x4, c4


def _with_running(f):
    """``f`` taking the running statistics as its 4th and 5th positional arguments (they are
    keyword-only in normkit), so that the tables below can wrap every array by position."""

    def call(x, weight, bias, running_mean, running_var, **kw):
        return f(x, weight, bias, running_mean=running_mean, running_var=running_var, **kw)

    return call


def all_calls():
    """(name, call(arrays...)) for every SPEC function with plain valid arguments."""
    x, c = rng_arrays()
    rows = x.reshape(8, 15)
    m2, r2 = np.zeros((2, 4), np.float32), np.ones((2, 4), np.float32)
    return {
        "batch_norm": (_with_running(nk.batch_norm), (x, c, c, c.copy(), c.copy()), {}),
        "batch_norm_backward": (nk.batch_norm_backward, (x, x, c, c, c), {}),
        "group_norm": (nk.group_norm, (x, 2, c, c), {}),
        "group_norm_backward": (nk.group_norm_backward, (x, x, m2[:, :2], r2[:, :2], c), {}),
        "instance_norm": (_with_running(nk.instance_norm), (x, c, c, c.copy(), c.copy()), {}),
        "instance_norm_backward": (nk.instance_norm_backward, (x, x, m2, r2, c), {}),
        "layer_norm": (nk.layer_norm, (rows, 15, np.ones(15, np.float32)), {}),
        "layer_norm_backward": (nk.layer_norm_backward, (rows, rows, np.zeros(8, np.float32),
                                                         np.ones(8, np.float32)), {}),
        "rms_norm": (nk.rms_norm, (rows, 15, np.ones(15, np.float32)), {}),
        "rms_norm_backward": (nk.rms_norm_backward, (rows, rows, np.ones(8, np.float32)), {}),
    }


def wrap_args(args, which):
    """Wrap the array arguments at positions ``which`` (all arrays when None) as fake device arrays."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, np.ndarray) and (which is None or i in which):
            out.append(dev(a))
        else:
            out.append(a)
    return out


def data_positions(name):
    return (0, 1) if name.endswith("_backward") else (0,)


@pytest.mark.parametrize("name", sorted(all_calls()))
def test_host_calls_still_work(name):
    f, args, kw = all_calls()[name]
    f(*args, **kw)


@pytest.mark.parametrize("name", sorted(all_calls()))
def test_mixing_device_data_with_host_arrays_raises_type_error(name, no_device_work):
    f, args, kw = all_calls()[name]
    params = [i for i, a in enumerate(args) if isinstance(a, np.ndarray) and i not in data_positions(name)]
    for host in params:  # device data, one host parameter
        wrapped = wrap_args(args, None)
        wrapped[host] = args[host]
        with pytest.raises(TypeError, match=rf"^{name}: .* is a CUDA array but .* is a host ndarray"):
            f(*wrapped, **kw)
    for device in params:  # host data, one device parameter
        with pytest.raises(TypeError, match="CUDA array"):
            f(*wrap_args(args, {device}), **kw)


@pytest.mark.parametrize("name", [n for n in sorted(all_calls()) if n.endswith("_backward")])
def test_mixing_dy_and_x_raises_type_error(name, no_device_work):
    f, args, kw = all_calls()[name]
    with pytest.raises(TypeError, match="CUDA array"):
        f(*wrap_args(args, {0}), **kw)  # device dy, host x
    with pytest.raises(TypeError, match="dy is a host ndarray"):
        f(*wrap_args(args, set(range(2, len(args))) | {1}), **kw)  # device x, host dy


def test_mixing_out_raises_type_error(no_device_work):
    x, c = rng_arrays()
    with pytest.raises(TypeError, match="out is a host ndarray"):
        nk.batch_norm(dev(x), out=np.empty_like(x))
    with pytest.raises(TypeError, match="CUDA array"):
        nk.batch_norm(x, out=dev(np.empty_like(x)))


def bad_inputs():
    """(function, args, kwargs) cases that each raise in validation on the host."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    c = np.ones(4, np.float32)
    rows = x.reshape(12, 5)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    ro_c = np.zeros(4, np.float32)
    ro_c.flags.writeable = False
    return [
        (nk.batch_norm, (x.astype(np.int32),), {}),
        (nk.batch_norm, (x[0, 0],), {}),
        (nk.batch_norm, (x, np.ones(3, np.float32)), {}),
        (nk.batch_norm, (x,), {"running_mean": c.astype(np.float64), "running_var": c.astype(np.float64)}),
        (nk.batch_norm, (x,), {"running_mean": c.copy()}),
        (nk.batch_norm, (x,), {"running_mean": ro_c, "running_var": c.copy()}),
        (nk.batch_norm, (x,), {"momentum": 2.0}),
        (nk.batch_norm, (x,), {"eps": -1.0}),
        (nk.batch_norm, (x,), {"eps": float("nan")}),
        (nk.batch_norm, (x,), {"channel_axis": 2}),
        (nk.batch_norm, (x[:1, :, :1],), {}),
        (nk.batch_norm, (x,), {"training": False}),
        (nk.batch_norm, (x,), {"out": np.empty((3, 4), np.float32)}),
        (nk.batch_norm, (x,), {"out": np.empty_like(x, dtype=np.float64)}),
        (nk.batch_norm, (x,), {"out": ro}),
        (nk.batch_norm_backward, (x[:2], x, c, c), {}),
        (nk.batch_norm_backward, (x, x, c[:3], c), {}),
        (nk.batch_norm_backward, (x, x, None, c), {}),
        (nk.group_norm, (x, 3), {}),
        (nk.group_norm, (x, 0), {}),
        (nk.group_norm, (x, 2, np.ones(5, np.float32)), {}),
        (nk.group_norm, (x[:, :, :0], 2), {}),
        (nk.group_norm_backward, (x, x, np.zeros((3, 3), np.float32), np.ones((3, 3), np.float32)), {}),
        (nk.group_norm_backward, (x, x, np.zeros(3, np.float32), np.ones(3, np.float32)), {}),
        (nk.instance_norm, (x[:, :, :1],), {}),
        (nk.instance_norm, (x,), {"training": False}),
        (nk.instance_norm, (x[:0],), {"running_mean": c.copy(), "running_var": c.copy()}),
        (nk.instance_norm_backward, (x, x, c, c), {}),
        (nk.instance_norm_backward, (x, x, c, c), {"training": False, "channel_axis": -1}),
        (nk.layer_norm, (rows, 4), {}),
        (nk.layer_norm, (rows, (3, 5)), {}),
        (nk.layer_norm, (rows, 5, np.ones(4, np.float32)), {}),
        (nk.layer_norm, (rows, 5), {"eps": -1e-5}),
        (nk.layer_norm, (rows.astype(np.complex64), 5), {}),
        (nk.layer_norm, (rows[:, :0], 0), {}),
        (nk.layer_norm_backward, (rows, rows, np.zeros(11, np.float32), np.ones(11, np.float32)), {}),
        (nk.layer_norm_backward, (rows, rows, None, np.ones(12, np.float32)), {}),
        (nk.rms_norm, (rows, 5, None), {"eps": float("nan")}),
        (nk.rms_norm_backward, (rows, rows, np.ones((12, 5), np.float32)), {}),
        (nk.rms_norm_backward, (rows[:3], rows, np.ones(12, np.float32)), {}),
    ]


@pytest.mark.parametrize("case", range(len(bad_inputs())))
def test_device_validation_matches_host_and_precedes_device_work(case, no_device_work):
    f, args, kw = bad_inputs()[case]
    with pytest.raises((TypeError, ValueError)) as host:
        f(*args, **kw)
    dkw = {k: (dev(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    with pytest.raises(host.type) as device:
        f(*wrap_args(args, None), **dkw)
    assert str(device.value) == str(host.value)


def test_overlapping_running_stats_rejected_on_device(no_device_work):
    x, _ = rng_arrays()
    buf = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="running_mean and running_var overlap"):
        nk.batch_norm(dev(x), None, None, running_mean=dev(buf[:4]), running_var=dev(buf[1:]))


@pytest.mark.skipif(nk.cuda.is_available(), reason="a GPU is present; tests/test_cuda.py runs there")
@pytest.mark.parametrize("name", sorted(all_calls()))
def test_valid_device_call_without_gpu_raises_runtime_error(name):
    f, args, kw = all_calls()[name]
    with pytest.raises(RuntimeError, match=rf"^{name}: x is a CUDA array but normkit cannot run CUDA kernels here"):
        f(*wrap_args(args, None), **kw)


def test_plan_reads_shape_dtype_and_writeability_of_device_arrays():
    """The plan reads a device array's shape, dtype and read-only flag from its interface,
    without touching (or copying) its memory."""
    from normkit import _plan

    a = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    d = _plan.arg(dev(a))
    assert d.shape == (2, 3, 4) and d.dtype == np.float16 and d.device and d.writeable
    assert d.size == 24 and d.ndim == 3
    ro = np.zeros((2, 2), np.float32)
    ro.flags.writeable = False
    assert not _plan.arg(dev(ro)).writeable
    with pytest.raises(TypeError, match="native byte order"):
        nk.layer_norm(dev(np.zeros((2, 3), ">f4")), 3)


def test_byte_ranges_and_overlap():
    buf = np.zeros(10, np.float32)
    lo, hi = _cuda_dispatch._byte_range(dev(buf[2:5]))
    assert hi - lo == 12
    lo, hi = _cuda_dispatch._byte_range(dev(buf[::-3]))  # negative strides
    assert (lo, hi) == (buf.ctypes.data, buf.ctypes.data + 40)
    assert _cuda_dispatch._overlap(dev(buf[:5]), dev(buf[4:]))
    assert not _cuda_dispatch._overlap(dev(buf[:5]), dev(buf[5:]))
    assert not _cuda_dispatch._overlap(dev(buf[:0]), dev(buf))


# --------------------------------------------------------------------------------------------
# the whole dispatch path on the CPU: a NumPy-backed stand-in for CuPy, and a stand-in for
# normkit._cuda whose entry points run the CPU kernels on the memory behind the pointers they
# are given. Pointers, sizes, layouts, strides, workspace sizes, outputs, in-place and `out=`
# handling of _cuda_dispatch are then checked against the host path, bit for bit.

import contextlib  # noqa: E402
import ctypes  # noqa: E402
import types  # noqa: E402

from normkit import _core  # noqa: E402

STREAM = 0x5EED


class DevArray(np.ndarray):
    """A NumPy array posing as a CuPy array: CUDA array interface, ``.data.ptr``, ``.device``."""

    @property
    def __cuda_array_interface__(self):
        ai = self.__array_interface__
        return {"shape": self.shape, "typestr": self.dtype.str, "data": ai["data"],
                "strides": ai["strides"], "version": 3, "stream": 1}

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    @property
    def device(self):
        return contextlib.nullcontext()


def dev_array(a, copy=None):
    """``a`` as a DevArray: a view of the same memory (same strides, so the dispatch sees the
    host path's layout), or a copy for 1-D arrays (parameters, running statistics) or copy=True."""
    if a is None:
        return None
    if copy or (copy is None and a.ndim == 1):
        return np.array(a, copy=True).view(DevArray)
    return a.view(DevArray)


class FakeCupy:
    ndarray = DevArray
    cuda = types.SimpleNamespace(get_current_stream=lambda: types.SimpleNamespace(ptr=STREAM))

    @staticmethod
    def empty(shape, dtype):
        return np.empty(shape, dtype).view(DevArray)

    @staticmethod
    def ones(shape, dtype):
        return np.ones(shape, dtype).view(DevArray)

    @staticmethod
    def zeros(shape, dtype):
        return np.zeros(shape, dtype).view(DevArray)

    @staticmethod
    def asarray(a):
        return np.asarray(a).view(DevArray)

    @staticmethod
    def ascontiguousarray(a, dtype=None):
        return np.ascontiguousarray(a, dtype=dtype).view(DevArray)

    @staticmethod
    def copyto(dst, src):
        np.copyto(dst, src)


def at(ptr, shape, dtype, stride=1):
    """The array at device pointer ``ptr`` (here: host memory), or None for a null pointer."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    if ptr == 0:  # an absent optional argument (weight, bias, mean, running statistics)
        return None
    if n == 0:
        return np.empty(shape, dtype)
    span = ((n - 1) * stride + 1) * dtype.itemsize
    base = np.frombuffer((ctypes.c_char * span).from_address(ptr), dtype)
    if stride == 1:
        return base.reshape(shape)
    return np.lib.stride_tricks.as_strided(base, shape, (stride * dtype.itemsize,))


def storage_dtype(name):
    return get_bf16() if name == "bfloat16" else np.dtype(name)


def get_bf16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.dtype(ml_dtypes.bfloat16)


class EmulatedCuda:
    """normkit._cuda's entry points, run by the CPU kernels of normkit._core."""

    def __init__(self):
        self.streams = []

    def workspace(self, *args):
        return _cuda.workspace(*args)

    def row_forward(self, dtype, x, y, w, b, mean, rstd, M, N, eps, stream, residual, h):
        self.streams.append(stream)
        dt = storage_dtype(dtype)
        sd = F_stat(dt)
        _core.row_norm_forward(at(x, (M, N), dt), at(w, (N,), sd), at(b, (N,), sd), eps,
                               at(y, (M, N), dt), at(mean, (M,), sd), at(rstd, (M,), sd),
                               at(residual, (M, N), dt), at(h, (M, N), dt))

    def row_backward(self, dtype, dy, x, mean, rstd, w, dx, dw, db, M, N, ws, stream):
        self.streams.append(stream)
        assert ws != 0
        dt = storage_dtype(dtype)
        sd = F_stat(dt)
        _core.row_norm_backward(at(dy, (M, N), dt), at(x, (M, N), dt), at(mean, (M,), sd),
                                at(rstd, (M,), sd), at(w, (N,), sd), at(dx, (M, N), dt),
                                at(dw, (N,), sd), at(db, (N,), sd))

    @staticmethod
    def _shapes(B, C, S, groups, channels_last, training):
        shape = (B, S, C) if channels_last else (B, C, S)
        nstats = B * groups if groups else C
        return shape, nstats

    def channel_forward(self, dtype, x, y, w, b, rm, rv, rms, rvs, mean, rstd, B, C, S, groups,
                        channels_last, training, momentum, eps, ws, stream, activation):
        self.streams.append(stream)
        assert ws != 0
        dt = storage_dtype(dtype)
        sd = F_stat(dt)
        shape, ns = self._shapes(B, C, S, groups, channels_last, training)
        _core.channel_norm_forward(
            at(x, shape, dt), channels_last, at(w, (C,), sd), at(b, (C,), sd),
            at(rm, (C,), sd, rms), at(rv, (C,), sd, rvs), training, momentum, eps,
            at(y, shape, dt), at(mean, (ns,), sd), at(rstd, (ns,), sd), groups, activation)

    def channel_backward(self, dtype, dy, x, mean, rstd, w, dx, dw, db, B, C, S, groups,
                         channels_last, training, ws, stream, b, activation):
        self.streams.append(stream)
        dt = storage_dtype(dtype)
        sd = F_stat(dt)
        shape, ns = self._shapes(B, C, S, groups, channels_last, training)
        _core.channel_norm_backward(
            at(dy, shape, dt), at(x, shape, dt), channels_last, at(mean, (ns,), sd),
            at(rstd, (ns,), sd), at(w, (C,), sd), training, at(dx, shape, dt), at(dw, (C,), sd),
            at(db, (C,), sd), groups, at(b, (C,), sd), activation)


def F_stat(dt):
    return np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)


@pytest.fixture
def emulated(monkeypatch):
    emu = EmulatedCuda()
    monkeypatch.setattr(_cuda_dispatch, "_runtime", lambda fn: (emu, FakeCupy))
    return emu


def to_dev(args, kw):
    return ([dev_array(a) if isinstance(a, np.ndarray) else a for a in args],
            {k: dev_array(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()})


def assert_same(dev_result, host_result):
    for d, h in zip(dev_result, host_result):
        if h is None:
            assert d is None
            continue
        assert isinstance(d, DevArray)
        assert d.shape == h.shape and d.dtype == h.dtype
        # bit for bit: the same CPU kernels ran on the same dense layouts
        assert np.ascontiguousarray(d).tobytes() == np.ascontiguousarray(h).tobytes()


def emulation_cases(dtype):
    rng = np.random.default_rng(7)
    dt = storage_dtype(dtype)
    sd = F_stat(dt)

    def r(*shape, t=dt):
        return rng.standard_normal(shape).astype(t)

    x4, x3, x2 = r(3, 4, 5, 6), r(4, 6, 40), r(16, 6)
    nhwc = np.ascontiguousarray(x4.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # channels-last memory
    strided = r(3, 4, 10, 6)[:, :, ::2, :]
    c4, c6 = r(4, t=sd), r(6, t=sd)
    rows = r(5, 7, 33)
    cases = []
    for x, c in ((x4, c4), (x3, c6), (x2, c6), (nhwc, c4), (strided, c4)):
        C = x.shape[1]
        dy = r(*x.shape)
        for ca in (1, -1):
            xx = x if ca == 1 else np.moveaxis(x, 1, -1)
            dyy = dy if ca == 1 else np.moveaxis(dy, 1, -1)
            kw = {"channel_axis": ca}
            cases.append(("batch_norm", (xx, c, c, np.zeros(C, sd), np.ones(C, sd)), kw, dyy))
            cases.append(("batch_norm", (xx, c, None, np.zeros(C, sd), np.ones(C, sd)),
                          {**kw, "training": False}, dyy))
            cases.append(("group_norm", (xx, 2, c, c), kw, dyy))
            # fused activations: the bias travels to the backward (absent: zeros)
            cases.append(("batch_norm", (xx, c, c, np.zeros(C, sd), np.ones(C, sd)),
                          {**kw, "activation": "relu"}, dyy))
            cases.append(("group_norm", (xx, 2, c, None), {**kw, "activation": "silu"}, dyy))
            if xx.ndim > 2:
                cases.append(("instance_norm", (xx, c, c, np.zeros(C, sd), np.ones(C, sd)), kw, dyy))
                cases.append(("instance_norm", (xx, None, None, np.zeros(C, sd), np.ones(C, sd)),
                              {**kw, "training": False}, dyy))
    dyr = r(*rows.shape)
    cases.append(("layer_norm", (rows, 33, r(33, t=sd), r(33, t=sd)), {}, dyr))
    cases.append(("layer_norm", (rows, (7, 33)), {}, dyr))
    cases.append(("rms_norm", (rows, 33, r(33, t=sd)), {}, dyr))
    cases.append(("rms_norm", (rows[..., ::2], 17), {"eps": 1e-3}, dyr[..., ::2]))
    return cases


def backward_args(name, args, kw, res, dy):
    x = args[0]
    if name == "layer_norm":
        return (dy, x, res.mean, res.rstd, args[2] if len(args) > 2 else None), {}
    if name == "rms_norm":
        return (dy, x, res.rstd, args[2] if len(args) > 2 else None), {}
    w = args[2] if name == "group_norm" else args[1]
    bkw = {k: v for k, v in kw.items() if k in ("channel_axis", "training", "activation")}
    if "activation" in kw:
        bkw["bias"] = args[3] if name == "group_norm" else args[2]
    return (dy, x, res.mean, res.rstd, w), bkw


@needs_cuda_module
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_dispatch_end_to_end_on_emulated_device(dtype, emulated):
    for name, args, kw, dy in emulation_cases(dtype):
        fwd, bwd = getattr(nk, name), getattr(nk, name + "_backward")
        if name in ("batch_norm", "instance_norm"):  # running statistics are keyword-only
            fwd = _with_running(fwd)
        dargs, dkw = to_dev(args, kw)  # copies, running statistics included
        host = fwd(*args, **kw)
        device = fwd(*dargs, **dkw)
        assert_same(device, host)
        if name in ("batch_norm", "instance_norm"):
            assert_same(dargs[3:5], args[3:5])  # running statistics updated alike
        hb_args, hb_kw = backward_args(name, args, kw, host, dy)
        db_args, db_kw = backward_args(name, dargs, dkw, device, dev_array(dy))
        assert_same(bwd(*db_args, **db_kw), bwd(*hb_args, **hb_kw))
    assert emulated.streams and set(emulated.streams) == {STREAM}


@needs_cuda_module
@pytest.mark.parametrize("name", ["batch_norm", "layer_norm", "group_norm"])
def test_dispatch_out_in_place_and_overlapping(name, emulated):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6, 9)).astype(np.float32)
    extra = {"batch_norm": (), "layer_norm": (9,), "group_norm": (3,)}[name]
    f = getattr(nk, name)
    want = f(x, *extra).y
    dx = dev_array(x, copy=True)
    r = f(dx, *extra, out=dx)  # in place
    assert r.y is dx and np.array_equal(dx, want)
    out = FakeCupy.empty((4, 9, 6), np.float32).transpose(0, 2, 1)  # channels-last memory
    assert f(dev_array(x, copy=True), *extra, out=out).y is out and np.array_equal(out, want)
    buf = dev_array(np.concatenate([x.ravel(), np.zeros(3, np.float32)]))
    xin, xout = buf[:x.size].reshape(x.shape), buf[3:].reshape(x.shape)  # overlapping
    assert f(xin, *extra, out=xout).y is xout and np.array_equal(np.asarray(xout), want)


@needs_cuda_module
def test_dispatch_negative_running_var_raises_before_writing(emulated):
    x = dev_array(np.ones((4, 3), np.float32), copy=True)
    out = dev_array(np.full((4, 3), 7.0, np.float32), copy=True)
    with pytest.raises(ValueError, match="running_var has negative entries"):
        nk.batch_norm(x, None, None, running_mean=dev_array(np.zeros(3, np.float32)),
                      running_var=dev_array(-np.ones(3, np.float32)), training=False, out=out)
    assert (out == 7).all() and not emulated.streams


@needs_cuda_module
def test_dispatch_empty_inputs(emulated):
    x = dev_array(np.zeros((0, 8), np.float32))
    y, mean, rstd = nk.layer_norm(x, 8)
    assert y.shape == (0, 8) and mean.shape == (0,) and rstd.shape == (0,)
    g = nk.layer_norm_backward(x, x, mean, rstd)
    assert g.dx.shape == (0, 8) and (np.asarray(g.dweight) == 0).all()


# tests/test_cuda.py itself, run on the emulated device: its calls, shapes and tolerances are
# checked here against the CPU kernels, so the file is known to be sound before a GPU runs it.
# (Its mixing test is left out: a NumPy-backed stand-in is a host array to the C++ fast paths.)
EMULATED_GPU_RUN = r"""
import sys, types
import numpy as np
sys.path.insert(0, sys.argv[1])
import test_cuda_host as H
fake = types.ModuleType("cupy")
fake.ndarray = H.DevArray
fake.asarray = lambda a, dtype=None: a if isinstance(a, H.DevArray) else np.array(a, dtype=dtype).view(H.DevArray)
fake.asnumpy = lambda a: np.array(a)
for name in ("empty", "full", "zeros", "ones"):
    setattr(fake, name, (lambda f: lambda *a, **k: f(*a, **k).view(H.DevArray))(getattr(np, name)))
fake.ascontiguousarray = H.FakeCupy.ascontiguousarray
fake.copyto = np.copyto
for name in ("float16", "float32", "float64", "uint8", "uint16"):
    setattr(fake, name, getattr(np, name))
class Stream:
    def __init__(self, non_blocking=False):
        self.ptr = H.STREAM
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return False
    def synchronize(self):
        pass
fake.cuda = types.SimpleNamespace(Stream=Stream, get_current_stream=lambda: Stream())
sys.modules["cupy"] = fake
import normkit as nk
from normkit import _cuda, _cuda_dispatch
emu = H.EmulatedCuda()
nk.cuda.device_count = lambda: 1
_cuda_dispatch._runtime = lambda fn: (emu, fake)
for name in ("row_forward", "row_backward", "channel_forward", "channel_backward"):
    setattr(_cuda, name, getattr(emu, name))
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", sys.argv[1] + "/test_cuda.py",
                      "-k", "not mixing"]))
"""


@needs_cuda_module
def test_gpu_test_file_passes_on_the_emulated_device():
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    r = subprocess.run([sys.executable, "-c", EMULATED_GPU_RUN, str(here)], capture_output=True,
                       text=True, timeout=600, cwd=here.parent)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1]


@needs_cuda_module
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("name", ["add_layer_norm", "add_rms_norm"])
def test_fused_add_on_emulated_device(dtype, name, emulated):
    """The fused residual add through the CUDA dispatch (h, y, statistics, out=/h_out= and the
    backward with dh) gives the host call's bits."""
    rng = np.random.default_rng(11)
    dt = storage_dtype(dtype)
    sd = F_stat(dt)
    x = rng.standard_normal((5, 7, 33)).astype(dt)
    r = rng.standard_normal((5, 7, 33)).astype(dt)
    w, b = rng.standard_normal(33).astype(sd), rng.standard_normal(33).astype(sd)
    params = (w, b) if name == "add_layer_norm" else (w,)
    fwd, bwd = getattr(nk, name), getattr(nk, name + "_backward")
    host = fwd(x, r, 33, *params)
    device = fwd(dev_array(x, copy=True), dev_array(r, copy=True), 33,
                 *[dev_array(p) for p in params])
    assert_same(device, host)
    # out= / h_out= on the device, h_out aliasing x (in place)
    dx_, dr = dev_array(x, copy=True), dev_array(r, copy=True)
    dout = dev_array(np.empty_like(x), copy=True)
    got = fwd(dx_, dr, 33, *[dev_array(p) for p in params], out=dout, h_out=dx_)
    assert got.y is dout and got.h is dx_
    assert_same((got.y, got.h), (host.y, host.h))
    dy, dh = rng.standard_normal(x.shape).astype(dt), rng.standard_normal(x.shape).astype(dt)
    stats = (host.mean, host.rstd) if name == "add_layer_norm" else (host.rstd,)
    hg = bwd(dy, dh, host.h, *stats, w)
    dg = bwd(dev_array(dy, copy=True), dev_array(dh, copy=True), dev_array(host.h, copy=True),
             *[dev_array(s_) for s_ in stats], dev_array(w))
    assert_same(dg, hg)
