"""GPU tests: every SPEC operation on CuPy arrays against the CPU result (SPEC section 5).

They skip, with the reason, where CuPy or a usable GPU is absent, and run as they are on a
machine with both (``pip install 'normkit[cuda]'``, then ``python -m pytest tests/test_cuda.py``).

The GPU accumulates statistics in float32 for float32 and 16-bit inputs (float64 on the CPU), so
results are compared with tolerances: float64 1e-10, float32 2e-5 (relative to the output
scale), float16/bfloat16 two units in the last place of the output's largest magnitude (the CPU
and GPU may each round once, differently).
"""

from __future__ import annotations

import numpy as np
import pytest

import normkit as nk

try:
    import cupy as cp
except Exception:  # ImportError, or CuPy failing to find its CUDA libraries
    cp = None

if cp is None:
    _skip = "CuPy is not installed (pip install 'normkit[cuda]')"
elif not nk.cuda.is_available():
    _skip = f"no usable GPU: {nk.cuda.unavailable_reason()}"
else:
    _skip = None

pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

try:
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

# CuPy has no bfloat16 dtype, so bfloat16 runs through normkit._cuda directly (test_bfloat16_*).
DTYPES = ["float32", "float64", "float16"]


def tol(dtype, ref):
    scale = max(1.0, float(np.max(np.abs(np.asarray(ref, np.float64)), initial=0.0)))
    if dtype == np.float64:
        return 1e-10 * scale
    if dtype == np.float32:
        return 2e-5 * scale
    return 2 * float(np.finfo(np.float16).eps if dtype == np.float16 else 2.0**-7) * scale


def assert_close(gpu, cpu, dtype=None):
    if cpu is None:
        assert gpu is None
        return
    got = cp.asnumpy(gpu) if isinstance(gpu, cp.ndarray) else np.asarray(gpu)
    assert got.shape == cpu.shape and got.dtype == cpu.dtype
    dt = np.dtype(dtype) if dtype is not None else cpu.dtype
    err = np.max(np.abs(got.astype(np.float64) - cpu.astype(np.float64)), initial=0.0)
    assert err <= tol(dt, cpu), f"max error {err} > {tol(dt, cpu)}"


def assert_all_close(gpu_tuple, cpu_tuple, dtype):
    for g, c in zip(gpu_tuple, cpu_tuple):
        assert_close(g, c, dtype)


def data(shape, dtype, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    return (offset + rng.standard_normal(shape)).astype(dtype)


def to_gpu(*arrays):
    return [None if a is None else cp.asarray(a) for a in arrays]


def _stat(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


# --------------------------------------------------------------------------------------------
# row norms

ROW_SHAPES = [((7, 33), 33), ((5, 1024), 1024), ((3, 1025), 1025), ((2, 3, 4097), 4097),
              ((2, 6, 8), (6, 8)), ((0, 8), 8), ((1, 1), 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, ns", ROW_SHAPES)
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_matches_cpu(dtype, shape, ns, affine):
    x = data(shape, dtype, offset=3.0)
    dy = data(shape, dtype, seed=1)
    nshape = (ns,) if isinstance(ns, int) else ns
    w = data(nshape, _stat(dtype), seed=2) if affine else None
    b = data(nshape, _stat(dtype), seed=3) if affine else None
    cpu = nk.layer_norm(x, ns, w, b)
    gx, gdy, gw, gb = to_gpu(x, dy, w, b)
    gpu = nk.layer_norm(gx, ns, gw, gb)
    assert isinstance(gpu.y, cp.ndarray)
    assert_all_close(gpu, cpu, dtype)
    cpu_g = nk.layer_norm_backward(dy, x, cpu.mean, cpu.rstd, w)
    gpu_g = nk.layer_norm_backward(gdy, gx, gpu.mean, gpu.rstd, gw)
    assert_all_close(gpu_g, cpu_g, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, ns", ROW_SHAPES)
def test_rms_norm_matches_cpu(dtype, shape, ns):
    x = data(shape, dtype)
    dy = data(shape, dtype, seed=1)
    nshape = (ns,) if isinstance(ns, int) else ns
    w = data(nshape, _stat(dtype), seed=2)
    cpu = nk.rms_norm(x, ns, w)
    gx, gdy, gw = to_gpu(x, dy, w)
    gpu = nk.rms_norm(gx, ns, gw)
    assert gpu.mean is None
    assert_all_close(gpu, cpu, dtype)
    assert_all_close(nk.rms_norm_backward(gdy, gx, gpu.rstd, gw),
                     nk.rms_norm_backward(dy, x, cpu.rstd, w), dtype)


def test_layer_norm_in_place_and_out():
    x = data((9, 300), np.float32)
    cpu = nk.layer_norm(x, 300)
    gx = cp.asarray(x)
    r = nk.layer_norm(gx, 300, out=gx)
    assert r.y is gx
    assert_close(gx, cpu.y)
    out = cp.empty((9, 300), cp.float32)
    assert nk.layer_norm(cp.asarray(x), 300, out=out).y is out
    assert_close(out, cpu.y)


def test_large_mean_small_spread():
    x = (1000 + 0.01 * data((4, 2048), np.float64)).astype(np.float32)
    assert_all_close(nk.layer_norm(cp.asarray(x), 2048), nk.layer_norm(x, 2048), np.float32)


# --------------------------------------------------------------------------------------------
# channel norms

CHANNEL_SHAPES = [(4, 6, 5, 7), (8, 6, 3), (16, 6), (2, 4, 40), (3, 8, 4097), (64, 4, 2, 2)]


def channel_layouts(x, channel_axis):
    """x as given, and (channel_axis=1) the same values with channels-last memory."""
    yield x
    if channel_axis == 1 and x.ndim > 2:
        perm = (0, *range(2, x.ndim), 1)
        yield np.ascontiguousarray(x.transpose(perm)).transpose(np.argsort(perm))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CHANNEL_SHAPES)
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_batch_norm_matches_cpu(dtype, shape, channel_axis):
    C = shape[channel_axis]
    sd = _stat(dtype)
    w, b = data(C, sd, seed=2), data(C, sd, seed=3)
    for x in channel_layouts(data(shape, dtype, offset=2.0), channel_axis):
        dy = data(x.shape, dtype, seed=1)
        rm, rv = np.zeros(C, sd), np.ones(C, sd)
        grm, grv = cp.asarray(rm), cp.asarray(rv)
        cpu = nk.batch_norm(x, w, b, running_mean=rm, running_var=rv, channel_axis=channel_axis)
        gx, gdy, gw, gb = to_gpu(x, dy, w, b)
        gpu = nk.batch_norm(gx, gw, gb, running_mean=grm, running_var=grv, channel_axis=channel_axis)
        assert_all_close(gpu, cpu, dtype)
        assert_close(grm, rm, dtype)
        assert_close(grv, rv, dtype)
        assert_all_close(nk.batch_norm_backward(gdy, gx, gpu.mean, gpu.rstd, gw, channel_axis=channel_axis),
                         nk.batch_norm_backward(dy, x, cpu.mean, cpu.rstd, w, channel_axis=channel_axis),
                         dtype)
        # evaluation with the running statistics
        cpu_e = nk.batch_norm(x, w, b, running_mean=rm, running_var=rv, training=False, channel_axis=channel_axis)
        gpu_e = nk.batch_norm(gx, gw, gb, running_mean=grm, running_var=grv, training=False, channel_axis=channel_axis)
        assert_all_close(gpu_e, cpu_e, dtype)
        assert_all_close(
            nk.batch_norm_backward(gdy, gx, gpu_e.mean, gpu_e.rstd, gw, training=False, channel_axis=channel_axis),
            nk.batch_norm_backward(dy, x, cpu_e.mean, cpu_e.rstd, w, training=False, channel_axis=channel_axis),
            dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, groups", [((4, 6, 5, 7), 3), ((2, 8, 40), 2), ((3, 6, 3), 6),
                                           ((2, 4, 4097), 1), ((5, 6), 2)])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_group_norm_matches_cpu(dtype, shape, groups, channel_axis):
    if channel_axis == -1:  # the same (N, C, *spatial) problem, channels last
        shape = (shape[0], *shape[2:], shape[1])
    C = shape[channel_axis]
    sd = _stat(dtype)
    w, b = data(C, sd, seed=2), data(C, sd, seed=3)
    for x in channel_layouts(data(shape, dtype, offset=-1.0), channel_axis):
        dy = data(x.shape, dtype, seed=1)
        cpu = nk.group_norm(x, groups, w, b, channel_axis=channel_axis)
        gx, gdy, gw, gb = to_gpu(x, dy, w, b)
        gpu = nk.group_norm(gx, groups, gw, gb, channel_axis=channel_axis)
        assert_all_close(gpu, cpu, dtype)
        assert_all_close(nk.group_norm_backward(gdy, gx, gpu.mean, gpu.rstd, gw, channel_axis=channel_axis),
                         nk.group_norm_backward(dy, x, cpu.mean, cpu.rstd, w, channel_axis=channel_axis),
                         dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (3, 8, 40), (2, 3, 4100)])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_instance_norm_matches_cpu(dtype, shape, channel_axis):
    C = shape[channel_axis]
    sd = _stat(dtype)
    w, b = data(C, sd, seed=2), data(C, sd, seed=3)
    x = data(shape, dtype, offset=1.0)
    dy = data(shape, dtype, seed=1)
    rm, rv = np.zeros(C, sd), np.ones(C, sd)
    grm, grv = cp.asarray(rm), cp.asarray(rv)
    gx, gdy, gw, gb = to_gpu(x, dy, w, b)
    cpu = nk.instance_norm(x, w, b, running_mean=rm, running_var=rv, channel_axis=channel_axis)
    gpu = nk.instance_norm(gx, gw, gb, running_mean=grm, running_var=grv, channel_axis=channel_axis)
    assert_all_close(gpu, cpu, dtype)
    assert_close(grm, rm, dtype)
    assert_close(grv, rv, dtype)
    assert_all_close(nk.instance_norm_backward(gdy, gx, gpu.mean, gpu.rstd, gw, channel_axis=channel_axis),
                     nk.instance_norm_backward(dy, x, cpu.mean, cpu.rstd, w, channel_axis=channel_axis),
                     dtype)
    cpu_e = nk.instance_norm(x, w, b, running_mean=rm, running_var=rv, training=False, channel_axis=channel_axis)
    gpu_e = nk.instance_norm(gx, gw, gb, running_mean=grm, running_var=grv, training=False, channel_axis=channel_axis)
    assert_all_close(gpu_e, cpu_e, dtype)


def test_channel_norm_in_place_and_strided_out():
    x = data((4, 6, 50), np.float32)
    cpu = nk.batch_norm(x)
    gx = cp.asarray(x)
    assert nk.batch_norm(gx, out=gx).y is gx
    assert_close(gx, cpu.y)
    out = cp.empty((4, 50, 6), cp.float32).transpose(0, 2, 1)  # channels-last memory
    assert nk.batch_norm(cp.asarray(x), out=out).y is out
    assert_close(out, cpu.y)


# --------------------------------------------------------------------------------------------
# runtime properties


def test_results_are_deterministic():
    x = data((64, 32, 17), np.float32)
    gx = cp.asarray(x)
    a = nk.batch_norm(gx)
    b = nk.batch_norm(gx)
    assert bool((a.y == b.y).all()) and bool((a.mean == b.mean).all()) and bool((a.rstd == b.rstd).all())
    dy = cp.asarray(data(x.shape, np.float32, seed=5))
    g1 = nk.batch_norm_backward(dy, gx, a.mean, a.rstd)
    g2 = nk.batch_norm_backward(dy, gx, a.mean, a.rstd)
    assert all(bool((p == q).all()) for p, q in zip(g1, g2))


def test_runs_on_the_current_stream():
    x = data((33, 257), np.float32)
    cpu = nk.layer_norm(x, 257)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        gx = cp.asarray(x)
        gpu = nk.layer_norm(gx, 257)
        stream.synchronize()
    assert_all_close(gpu, cpu, np.float32)


def test_mixing_raises_type_error():
    x = cp.asarray(data((4, 6), np.float32))
    with pytest.raises(TypeError, match="host ndarray"):
        nk.batch_norm(x, np.ones(6, np.float32))
    with pytest.raises(TypeError, match="CUDA array"):
        nk.batch_norm(cp.asnumpy(x), cp.ones(6, cp.float32))


def test_errors_write_nothing():
    x = cp.asarray(data((4, 6), np.float32))
    rm, rv = cp.zeros(6, cp.float32), cp.ones(6, cp.float32)
    out = cp.full((4, 6), 7.0, cp.float32)
    with pytest.raises(ValueError, match="momentum"):
        nk.batch_norm(x, None, None, running_mean=rm, running_var=rv, momentum=2.0, out=out)
    assert bool((rm == 0).all()) and bool((rv == 1).all()) and bool((out == 7).all())
    with pytest.raises(ValueError, match="negative"):
        nk.batch_norm(x, None, None, running_mean=rm, running_var=-rv, training=False, out=out)
    assert bool((out == 7).all())


# --------------------------------------------------------------------------------------------
# bfloat16: CuPy has no such dtype, so the kernels are called directly on uint16 buffers.


@pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed")
@pytest.mark.parametrize("N", [40, 2000])
def test_bfloat16_row_kernels_match_cpu(N):
    from normkit import _cuda

    bf16 = np.dtype(ml_dtypes.bfloat16)
    M = 6
    x = data((M, N), bf16, offset=1.0)
    dy = data((M, N), bf16, seed=1)
    cpu = nk.layer_norm(x, N)
    gx, gdy = cp.asarray(x.view(np.uint16)), cp.asarray(dy.view(np.uint16))
    y = cp.empty((M, N), cp.uint16)
    mean, rstd = cp.empty(M, cp.float32), cp.empty(M, cp.float32)
    s = cp.cuda.get_current_stream().ptr
    _cuda.row_forward("bfloat16", gx.data.ptr, y.data.ptr, 0, 0, mean.data.ptr, rstd.data.ptr, M, N, 1e-5, s, 0, 0)
    assert_close(cp.asnumpy(y).view(bf16), cpu.y)
    assert_close(mean, cpu.mean)
    assert_close(rstd, cpu.rstd)
    cg = nk.layer_norm_backward(dy, x, cpu.mean, cpu.rstd)
    dx = cp.empty((M, N), cp.uint16)
    dw, db = cp.empty(N, cp.float32), cp.empty(N, cp.float32)
    ws = cp.empty(_cuda.workspace("row_backward", "bfloat16", M, N), cp.uint8)
    _cuda.row_backward("bfloat16", gdy.data.ptr, gx.data.ptr, mean.data.ptr, rstd.data.ptr, 0,
                       dx.data.ptr, dw.data.ptr, db.data.ptr, M, N, ws.data.ptr, s)
    assert_close(cp.asnumpy(dx).view(bf16), cg.dx)
    assert_close(dw, cg.dweight)
    assert_close(db, cg.dbias)


@pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed")
@pytest.mark.parametrize("channels_last", [False, True])
def test_bfloat16_channel_kernels_match_cpu(channels_last):
    from normkit import _cuda

    bf16 = np.dtype(ml_dtypes.bfloat16)
    B, C, S = 4, 6, 45
    shape = (B, S, C) if channels_last else (B, C, S)
    ca = -1 if channels_last else 1
    x = data(shape, bf16, offset=1.0)
    cpu = nk.batch_norm(x, channel_axis=ca)
    gx = cp.asarray(x.view(np.uint16))
    y = cp.empty(shape, cp.uint16)
    mean, rstd = cp.empty(C, cp.float32), cp.empty(C, cp.float32)
    ws = cp.empty(_cuda.workspace("channel_forward", "bfloat16", B, C, S, 0, channels_last), cp.uint8)
    s = cp.cuda.get_current_stream().ptr
    _cuda.channel_forward("bfloat16", gx.data.ptr, y.data.ptr, 0, 0, 0, 0, 1, 1, mean.data.ptr,
                          rstd.data.ptr, B, C, S, 0, channels_last, True, 0.1, 1e-5, ws.data.ptr, s, 0)
    assert_close(cp.asnumpy(y).view(bf16), cpu.y)
    assert_close(mean, cpu.mean)
    assert_close(rstd, cpu.rstd)


@pytest.mark.slow
def test_layer_norm_past_2_to_the_31_elements():
    M, N = 2**21 + 3, 1024  # 2**31 + 3072 elements of float16 (4 GiB)
    x = cp.random.standard_normal((M, N), dtype=cp.float32).astype(cp.float16)
    r = nk.layer_norm(x, N)
    for rows in (slice(0, 2), slice(M - 2, M)):
        xs = cp.asnumpy(x[rows])
        assert_all_close(tuple(a[rows] for a in r), nk.layer_norm(xs, N), np.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_fused_activations_match_cpu(dtype, activation, channel_axis):
    shape = (4, 6, 5, 7) if channel_axis == 1 else (4, 5, 7, 6)
    sd = _stat(dtype)
    w, b = data(6, sd, seed=2), data(6, sd, seed=3)
    x, dy = data(shape, dtype, offset=-1.0), data(shape, dtype, seed=1)
    gx, gdy, gw, gb = to_gpu(x, dy, w, b)
    for fwd, bwd, args in ((nk.batch_norm, nk.batch_norm_backward, ()),
                           (nk.group_norm, nk.group_norm_backward, (3,))):
        cpu = fwd(x, *args, w, b, channel_axis=channel_axis, activation=activation)
        gpu = fwd(gx, *args, gw, gb, channel_axis=channel_axis, activation=activation)
        assert_all_close(gpu, cpu, dtype)
        kw = {"channel_axis": channel_axis, "activation": activation}
        assert_all_close(bwd(gdy, gx, gpu.mean, gpu.rstd, gw, bias=gb, **kw),
                         bwd(dy, x, cpu.mean, cpu.rstd, w, bias=b, **kw), dtype)



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["add_layer_norm", "add_rms_norm"])
def test_fused_add_matches_cpu(dtype, name):
    sd = _stat(dtype)
    x, r, dy, dh = (data((6, 5, 257), dtype, seed=s) for s in (1, 2, 3, 4))
    w, b = data(257, sd, seed=5), data(257, sd, seed=6)
    params = (w, b) if name == "add_layer_norm" else (w,)
    fwd, bwd = getattr(nk, name), getattr(nk, name + "_backward")
    cpu = fwd(x, r, 257, *params)
    gx, gr, gdy, gdh, *gp = to_gpu(x, r, dy, dh, *params)
    gpu = fwd(gx, gr, 257, *gp)
    assert_all_close(gpu, cpu, dtype)
    stats = (1, 2) if name == "add_layer_norm" else (2,)
    assert_all_close(bwd(gdy, gdh, gpu.h, *(gpu[i + 1] for i in stats), gp[0]),
                     bwd(dy, dh, cpu.h, *(cpu[i + 1] for i in stats), w), dtype)
