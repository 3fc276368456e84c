"""nk.group_norm / nk.group_norm_backward against SPEC sections 1-3 and 5.

Statistics are per sample and per group of ``C / G`` consecutive channels (and every spatial
position); ``mean``/``rstd`` have shape ``(N, G)``.  Every result is compared with the float64
reference (tests/reference.py) under the per-dtype tolerance table of conftest.py; backwards
are compared with the reference fed the statistics the library saved.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import naive
import reference as ref
from conftest import (
    assert_bitwise_equal,
    assert_close,
    assert_half_rounding,
    assert_unchanged,
    get_dtype,
    is_half,
    randn,
    snapshot,
    stats_dtype,
)
from helpers import (
    AFFINES,
    assert_raises_nothing_written,
    assert_same_across_thread_counts,
    cax,
    layout,
    make_params,
    many,
    nchan,
    readonly,
    setter,
    x_dtype,
)

nk = pytest.importorskip("normkit")

# Canonical (N, C, *spatial) shapes per rank; C = 6 so that G = 1, 2, 3, 6 all divide it.
SHAPES = {2: (5, 6), 3: (3, 6, 7), 4: (2, 6, 5, 3), 5: (2, 6, 3, 2, 3)}


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def channels(a, idx, channel_axis):
    """``a`` restricted to the channel indices ``idx`` (a list) along the channel axis."""
    a = np.asarray(a)
    return np.take(a, idx, axis=cax(a.ndim, channel_axis))


def run_forward(x, num_groups, weight=None, bias=None, **kw):
    """nk.group_norm plus every check against the reference; returns (out, reference)."""
    xa = np.asarray(x)
    sd = stats_dtype(xa.dtype)
    ca = kw.get("channel_axis", 1)
    eps = kw.get("eps", 1e-5)
    keep = snapshot(xa, weight, bias)

    out = nk.group_norm(x, num_groups, weight, bias, **kw)

    assert isinstance(out, nk.NormOutput)
    assert out.y.shape == xa.shape and out.y.dtype == xa.dtype
    n, g = xa.shape[0], int(num_groups)
    assert out.mean.shape == (n, g) and out.mean.dtype == sd
    assert out.rstd.shape == (n, g) and out.rstd.dtype == sd
    assert_unchanged(keep, "input")

    r = ref.group_norm(xa, num_groups, weight, bias, eps=eps, channel_axis=ca)
    nv = None
    if is_half(xa.dtype):
        nv = naive.group_norm(xa, num_groups, weight, bias, eps=eps, channel_axis=ca)
    assert_close(out.y, r.y, xa.dtype, naive=nv, what="y")
    if nv is not None:
        assert_half_rounding(out.y, r.y, xa.dtype, what="y")
    assert_close(out.mean, r.mean, sd, what="mean")
    assert_close(out.rstd, r.rstd, sd, what="rstd")
    return out, r


def run_backward(dy, x, mean, rstd, weight=None, **kw):
    """nk.group_norm_backward against the reference fed the same saved statistics."""
    xa = np.asarray(x)
    sd = stats_dtype(xa.dtype)
    ca = kw.get("channel_axis", 1)
    c = nchan(xa.shape, ca)
    keep = snapshot(dy, xa, mean, rstd, weight)

    g = nk.group_norm_backward(dy, x, mean, rstd, weight, **kw)

    assert isinstance(g, nk.NormGrads)
    assert g.dx.shape == xa.shape and g.dx.dtype == xa.dtype
    assert g.dweight.shape == (c,) and g.dweight.dtype == sd
    assert g.dbias.shape == (c,) and g.dbias.dtype == sd
    assert_unchanged(keep, "backward input")

    r = ref.group_norm_backward(dy, xa, np.asarray(mean, np.float64),
                                np.asarray(rstd, np.float64), weight, channel_axis=ca)
    nv = None
    if is_half(xa.dtype):
        nv = naive.group_norm_backward(dy, xa, mean, rstd, weight, channel_axis=ca)
    assert_close(g.dx, r.dx, xa.dtype, naive=nv, what="dx")
    if nv is not None:
        assert_half_rounding(g.dx, r.dx, xa.dtype, what="dx")
    assert_close(g.dweight, r.dweight, sd, what="dweight")
    assert_close(g.dbias, r.dbias, sd, what="dbias")
    return g, r


# ----------------------------------------------------------------------------
# the main grid
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("num_groups", [1, 3])
def test_matches_reference(dtype, rank, channel_axis, num_groups, rng):
    shape = layout(SHAPES[rank], channel_axis)
    sd = stats_dtype(dtype)
    x = randn(rng, shape, dtype, loc=0.3, scale=1.5)
    w, b = make_params(rng, 6, "weight+bias", sd)
    out, _ = run_forward(x, num_groups, w, b, channel_axis=channel_axis)
    dy = randn(rng, shape, dtype)
    run_backward(dy, x, out.mean, out.rstd, w, channel_axis=channel_axis)


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("affine", AFFINES)
def test_optional_weight_and_bias(dtype, channel_axis, affine, rng):
    """weight=None means 1 and bias=None means 0, independently."""
    shape = layout((3, 6, 4, 5), channel_axis)
    sd = stats_dtype(dtype)
    x = randn(rng, shape, dtype, loc=-0.5, scale=2.0)
    w, b = make_params(rng, 6, affine, sd)
    out, _ = run_forward(x, 2, w, b, channel_axis=channel_axis)
    dy = randn(rng, shape, dtype)
    run_backward(dy, x, out.mean, out.rstd, w, channel_axis=channel_axis)


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_one_channel_per_group_rank2(channel_axis, rng):
    """G = C on (N, C): every group is a single value, var = 0, y = bias, dx = 0."""
    x = randn(rng, (5, 6), np.float64)
    w, b = make_params(rng, 6, "weight+bias", np.float64)
    out, _ = run_forward(x, 6, w, b, channel_axis=channel_axis)
    np.testing.assert_array_equal(out.y, np.broadcast_to(b, x.shape))
    dy = randn(rng, x.shape, np.float64)
    g, _ = run_backward(dy, x, out.mean, out.rstd, w, channel_axis=channel_axis)
    assert_close(g.dx, np.zeros_like(x), what="dx")


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_group_is_consecutive_channels(channel_axis, rng):
    """Group g holds channels g*C/G .. (g+1)*C/G - 1 (PyTorch's grouping), checked directly."""
    shape = layout((3, 6, 4, 5), channel_axis)
    x = randn(rng, shape, np.float64, loc=1.0, scale=2.0)
    out = nk.group_norm(x, 3, channel_axis=channel_axis)
    for g in range(3):
        part = channels(x, [2 * g, 2 * g + 1], channel_axis)
        axes = tuple(range(1, x.ndim))
        m = part.mean(axis=axes)
        v = part.var(axis=axes)
        assert_close(out.mean[:, g], m, what=f"mean of group {g}")
        assert_close(out.rstd[:, g], 1 / np.sqrt(v + 1e-5), what=f"rstd of group {g}")


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_float64_backward_with_reference_stats(channel_axis, rng):
    shape = layout((4, 6, 5, 3), channel_axis)
    x = randn(rng, shape, np.float64)
    w = randn(rng, 6, np.float64, loc=1.0)
    dy = randn(rng, shape, np.float64)
    out = nk.group_norm(x, 2, w, None, channel_axis=channel_axis)
    g = nk.group_norm_backward(dy, x, out.mean, out.rstd, w, channel_axis=channel_axis)
    r = ref.group_norm(x, 2, w, None, channel_axis=channel_axis)
    rg = ref.group_norm_backward(dy, x, r.mean, r.rstd, w, channel_axis=channel_axis)
    assert_close(g.dx, rg.dx, what="dx")
    assert_close(g.dweight, rg.dweight, what="dweight")
    assert_close(g.dbias, rg.dbias, what="dbias")


def test_dweight_dbias_returned_without_weight(rng):
    x = randn(rng, (4, 6, 5))
    dy = randn(rng, (4, 6, 5))
    out = nk.group_norm(x, 3)
    g = nk.group_norm_backward(dy, x, out.mean, out.rstd)
    g1 = nk.group_norm_backward(dy, x, out.mean, out.rstd, np.ones(6, np.float32))
    assert g.dweight is not None and g.dbias is not None
    assert_close(g.dx, g1.dx, what="dx")
    assert_close(g.dweight, g1.dweight, what="dweight")
    assert_close(g.dbias, g1.dbias, what="dbias")


def test_default_arguments(rng):
    """Defaults: eps=1e-5, channel_axis=1."""
    x = randn(rng, (3, 4, 5), np.float64, scale=0.01)  # var ~ eps: eps matters
    out = nk.group_norm(x, 2)
    r = ref.group_norm(x, 2, eps=1e-5, channel_axis=1)
    assert_close(out.y, r.y)
    assert_close(out.rstd, r.rstd)


def test_extreme_groups_match_layer_and_instance_norm(rng):
    """G = 1 normalizes each sample over (C, *spatial); G = C is per-instance."""
    x = randn(rng, (3, 6, 4, 5), np.float64)
    g1 = nk.group_norm(x, 1)
    ln = ref.layer_norm(x, x.shape[1:])
    assert_close(g1.y, ln.y, what="G=1 vs layer norm")
    assert_close(g1.mean[:, 0], ln.mean, what="G=1 mean")
    gc = nk.group_norm(x, 6)
    inn = ref.instance_norm(x)
    assert_close(gc.y, inn.y, what="G=C vs instance norm")
    assert_close(gc.mean, inn.mean, what="G=C mean")


def test_num_groups_numpy_integer(rng):
    x = randn(rng, (2, 6, 5))
    a = nk.group_norm(x, np.int64(3))
    b = nk.group_norm(x, 3)
    assert a.mean.shape == (2, 3)
    assert_bitwise_equal(a.y, b.y)


@pytest.mark.parametrize("x_name", ["float32", "float64", "float16"])
@pytest.mark.parametrize("w_name", ["float32", "float64", "float16", "bfloat16"])
def test_weight_of_another_float_dtype(x_name, w_name, rng):
    xd, wd = get_dtype(x_name), get_dtype(w_name)
    x = randn(rng, (3, 6, 5), xd)
    w = randn(rng, 6, wd, loc=1.0, scale=0.5)
    b = randn(rng, 6, wd)
    out, _ = run_forward(x, 3, w, b)
    dy = randn(rng, x.shape, xd)
    g, _ = run_backward(dy, x, out.mean, out.rstd, w)
    assert g.dweight.dtype == stats_dtype(xd)


def test_array_like_input():
    x = [[1.0, 2.0, 4.0, 0.5], [3.0, 5.0, -1.0, 2.0]]
    out = nk.group_norm(x, 2)
    assert out.y.dtype == np.float64 and out.mean.dtype == np.float64
    r = ref.group_norm(np.array(x), 2)
    assert_close(out.y, r.y)
    g = nk.group_norm_backward(x, x, out.mean, out.rstd)
    rg = ref.group_norm_backward(np.array(x), np.array(x), r.mean, r.rstd)
    assert g.dx.dtype == np.float64
    assert_close(g.dx, rg.dx)


# ----------------------------------------------------------------------------
# hard inputs
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("loc,scale", [(1000.0, 0.01), (1e4, 1.0), (-3e4, 2.0)])
def test_float32_large_mean_small_spread(loc, scale, channel_axis, rng):
    """Far from zero with a small spread: a stable, float64-accumulating kernel is as accurate
    as on centred data; E[x^2] - E[x]^2 in any precision is not."""
    shape = layout((4, 6, 9, 7), channel_axis)
    x = randn(rng, shape, np.float32, loc=loc, scale=scale)
    w = randn(rng, 6, np.float32, loc=1.0, scale=0.2)
    b = randn(rng, 6, np.float32)
    out, _ = run_forward(x, 3, w, b, channel_axis=channel_axis)
    dy = randn(rng, shape, np.float32, scale=scale)  # keeps dx ~ dy * rstd of order one
    run_backward(dy, x, out.mean, out.rstd, w, channel_axis=channel_axis)


def test_float64_large_mean_is_stable(rng):
    x = randn(rng, (4, 6, 64), np.float64, loc=1e8, scale=1.0)
    out = nk.group_norm(x, 2)
    r = ref.group_norm(x, 2)
    # Loosened: the mean itself carries ~1e-16 * 1e8 of rounding whatever the summation order,
    # amplified by rstd ~ 1 into y; 1e-6 still fails the one-pass formula by orders of magnitude.
    assert_close(out.y, r.y, rtol=1e-6, atol=1e-6, what="y")
    assert_close(out.rstd, r.rstd, rtol=1e-6, atol=0, what="rstd")


@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.1, 2.0])
def test_eps_placement(dtype, eps, rng):
    """var of the order of eps: 1/sqrt(var + eps) differs from other placements of eps."""
    x = randn(rng, (4, 6, 10), dtype, scale=0.003)
    out, _ = run_forward(x, 3, eps=eps)
    dy = randn(rng, x.shape, dtype)
    run_backward(dy, x, out.mean, out.rstd)


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_constant_groups(dtype, channel_axis, rng):
    """var = 0: y == bias in that group, rstd = 1/sqrt(eps), nothing non-finite."""
    shape = layout((3, 6, 5, 2), channel_axis)
    sd = stats_dtype(dtype)
    x = randn(rng, shape, dtype)
    ax = cax(x.ndim, channel_axis)
    const = np.zeros(shape, bool)  # sample 1, group 0 (channels 0 and 1)
    idx = [slice(None)] * x.ndim
    idx[0], idx[ax] = 1, slice(0, 2)
    const[tuple(idx)] = True
    x[tuple(idx)] = 3.0  # exactly representable: the mean is exact
    idx[0], idx[ax] = 2, slice(4, 6)  # sample 2, group 2: a rounded value
    x[tuple(idx)] = 0.1
    w = randn(rng, 6, sd, loc=1.0)
    b = randn(rng, 6, sd)
    out, _ = run_forward(x, 3, w, b, channel_axis=channel_axis)
    assert np.all(np.isfinite(out.y.astype(np.float64)))
    assert out.mean[1, 0] == 3.0
    assert out.mean[2, 2] == pytest.approx(float(np.asarray(0.1, dtype)), rel=1e-6)
    assert_close(out.rstd[[1, 2], [0, 2]], np.full(2, 1 / math.sqrt(1e-5)), sd, what="rstd")
    bshape = [1] * x.ndim
    bshape[ax] = 6
    b_full = np.broadcast_to(b.astype(np.float64).reshape(bshape), shape)
    # y = 0 * rstd * w + b, rounded once to x's dtype
    np.testing.assert_array_equal(out.y[const].astype(np.float64),
                                  b_full[const].astype(dtype).astype(np.float64))
    dy = randn(rng, shape, dtype)
    g, _ = run_backward(dy, x, out.mean, out.rstd, w, channel_axis=channel_axis)
    assert np.all(np.isfinite(g.dx.astype(np.float64)))


def test_constant_input_with_eps_zero_confines_nan(rng):
    """eps=0 is allowed; a constant group gets rstd = inf and non-finite y, that group only."""
    x = randn(rng, (3, 6, 5), np.float64)
    x[1, 2:4] = 2.0
    out = nk.group_norm(x, 3, eps=0.0)
    assert np.isinf(out.rstd[1, 1])
    mask = np.ones(x.shape, bool)
    mask[1, 2:4] = False
    assert np.all(np.isfinite(out.y[mask]))
    r = ref.group_norm(x, 3, eps=0.0)
    assert_close(out.y[mask], r.y[mask])


@pytest.mark.parametrize(
    "shape,num_groups",
    [
        ((1, 6, 7), 3),  # batch of one
        ((2, 4), 2),  # two values per group
        ((7, 6, 11, 13), 3),  # primes
        ((5, 7, 11, 13), 7),  # prime C, one channel per group
        ((13, 10, 3), 5),  # N prime
        ((2, 4, 4099), 2),  # long spatial axis: several chunks per group
        ((3, 12, 1, 1), 4),  # spatial ones: a group is C/G values
        ((101, 2, 3), 1),  # many samples, one group
        ((2, 6, 40000), 2),  # channels-last: several row chunks per sample, Chan merges
    ],
)
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_sizes(shape, num_groups, channel_axis, rng):
    shape = layout(shape, channel_axis)
    c = nchan(shape, channel_axis)
    x = randn(rng, shape, np.float32, loc=0.5)
    w, b = make_params(rng, c, "weight+bias")
    out, _ = run_forward(x, num_groups, w, b, channel_axis=channel_axis)
    dy = randn(rng, shape, np.float32)
    run_backward(dy, x, out.mean, out.rstd, w, channel_axis=channel_axis)


@pytest.mark.parametrize("name", ["float64", "float16", "bfloat16"])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_medium_size(name, channel_axis, rng):
    """Several chunks per group, half dtypes included."""
    dt = get_dtype(name)
    shape = layout((4, 16, 33, 35), channel_axis)
    x = randn(rng, shape, dt, loc=-1.0, scale=2.0)
    w, b = make_params(rng, 16, "weight+bias", stats_dtype(dt))
    out, _ = run_forward(x, 4, w, b, channel_axis=channel_axis)
    dy = randn(rng, shape, dt)
    run_backward(dy, x, out.mean, out.rstd, w, channel_axis=channel_axis)


# ----------------------------------------------------------------------------
# empty non-reduced axes
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("shape", [(0, 6, 4), (0, 6), (0, 6, 2, 3)])
def test_empty_batch(shape, channel_axis, dtype, rng):
    shape = layout(shape, channel_axis)
    sd = stats_dtype(dtype)
    x = np.zeros(shape, dtype)
    w, b = make_params(rng, 6, "weight+bias", sd)
    out = nk.group_norm(x, 3, w, b, channel_axis=channel_axis)
    assert out.y.shape == shape and out.y.dtype == dtype
    assert out.mean.shape == (0, 3) and out.mean.dtype == sd
    assert out.rstd.shape == (0, 3) and out.rstd.dtype == sd
    o = np.empty(shape, dtype)
    assert nk.group_norm(x, 3, w, b, channel_axis=channel_axis, out=o).y is o
    g = nk.group_norm_backward(x, x, out.mean, out.rstd, w, channel_axis=channel_axis)
    assert g.dx.shape == shape and g.dx.dtype == dtype
    assert g.dweight.dtype == sd and g.dbias.dtype == sd
    np.testing.assert_array_equal(g.dweight, np.zeros(6))
    np.testing.assert_array_equal(g.dbias, np.zeros(6))


# ----------------------------------------------------------------------------
# layouts and strides
# ----------------------------------------------------------------------------


def _strided_cases(rng, dt):
    base = randn(rng, (8, 6, 10, 12), dt, loc=0.2)
    nhwc = randn(rng, (3, 5, 7, 6), dt)
    nchw = randn(rng, (3, 6, 5, 7), dt)
    return {
        # (x, channel_axis, num_groups)
        "steps": (base[::2, ::2, 1::3, ::5], 1, 3),  # (4, 3, 3, 3)
        "negative": (base[::-1, :, ::-2, ::-1], 1, 2),
        "negative_channels": (base[:, ::-1], 1, 3),  # reversed channel order
        "transposed": (base.transpose(0, 2, 1, 3), 1, 5),  # logical (8, 10, 6, 12)
        "fortran": (np.asfortranarray(base[:3]), 1, 3),
        "channels_innermost_axis1": (nhwc.transpose(0, 3, 1, 2), 1, 3),
        "channels_innermost_steps": (nhwc[:, ::2, ::3].transpose(0, 3, 1, 2), 1, 2),
        "nchw_memory_axis-1": (nchw.transpose(0, 2, 3, 1), -1, 2),
        "steps_axis-1": (base[1::3, ::-1, ::4, ::3], -1, 2),  # (3, 6, 3, 4): C = 4
        "broadcast_batch": (np.broadcast_to(base[:1, :, :3, :3], (5, 6, 3, 3)), 1, 3),
        "column_slice_rank2": (base[0, 0][:, ::3], 1, 2),  # (10, 4)
    }


CASE_NAMES = ["steps", "negative", "negative_channels", "transposed", "fortran",
              "channels_innermost_axis1", "channels_innermost_steps", "nchw_memory_axis-1",
              "steps_axis-1", "broadcast_batch", "column_slice_rank2"]


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("name", ["float32", "float64", "float16"])
def test_arbitrary_strides(case, name, rng):
    dt = get_dtype(name)
    x, channel_axis, num_groups = _strided_cases(rng, dt)[case]
    c = nchan(x.shape, channel_axis)
    sd = stats_dtype(dt)
    w = randn(rng, 3 * c, sd, loc=1.0)[::-3]  # strided weight too
    b = randn(rng, c, sd)
    out, _ = run_forward(x, num_groups, w, b, channel_axis=channel_axis)
    # layout independence: the same values as on a C-contiguous copy
    out_c = nk.group_norm(np.ascontiguousarray(x), num_groups, w, b, channel_axis=channel_axis)
    assert_close(out.y, out_c.y.astype(np.float64), dt if is_half(dt) else sd,
                 what="strided vs contiguous")
    dy = randn(rng, tuple(reversed(x.shape)), dt).T  # Fortran-ordered dy
    run_backward(dy, x, out.mean, out.rstd, w, channel_axis=channel_axis)


# ----------------------------------------------------------------------------
# out=
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_out_fresh(dtype, channel_axis, rng):
    shape = layout((4, 6, 5, 2), channel_axis)
    sd = stats_dtype(dtype)
    x = randn(rng, shape, dtype)
    w, b = make_params(rng, 6, "weight+bias", sd)
    want = nk.group_norm(x, 3, w, b, channel_axis=channel_axis)
    out = np.full(shape, np.nan, dtype)
    got = nk.group_norm(x, 3, w, b, channel_axis=channel_axis, out=out)
    assert got.y is out
    assert_bitwise_equal(out, want.y, "out")
    assert_bitwise_equal(got.mean, want.mean, "mean")
    assert_bitwise_equal(got.rstd, want.rstd, "rstd")


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_out_strided(channel_axis, rng):
    shape = layout((4, 6, 5, 2), channel_axis)
    x = randn(rng, shape)
    want = nk.group_norm(x, 2, channel_axis=channel_axis)
    big = np.zeros(shape[:-1] + (2 * shape[-1],), np.float32)
    out = big[..., ::-2]
    got = nk.group_norm(x, 2, out=out, channel_axis=channel_axis)
    assert got.y is out
    assert_close(out, want.y.astype(np.float64), np.float32, what="strided out")
    assert np.all(big[..., ::2] == 0)  # the slots in between are untouched


@pytest.mark.parametrize("layout_kind", ["contiguous", "channels_last", "channels_innermost",
                                         "strided"])
def test_out_is_x(dtype, layout_kind, rng):
    """In place: the result is as if computed into a fresh array."""
    channel_axis = 1
    if layout_kind == "contiguous":
        x = randn(rng, (5, 6, 4, 3), dtype)
    elif layout_kind == "channels_last":
        x = randn(rng, (5, 4, 3, 6), dtype)
        channel_axis = -1
    elif layout_kind == "channels_innermost":
        x = randn(rng, (5, 4, 3, 6), dtype).transpose(0, 3, 1, 2)
    else:
        x = randn(rng, (10, 6, 4, 12), dtype)[::2, :, :, ::2]
    sd = stats_dtype(dtype)
    x0 = np.copy(x, order="K")  # same memory layout, hence the same summation order
    w, b = make_params(rng, 6, "weight+bias", sd)
    r = ref.group_norm(x0, 3, w, b, channel_axis=channel_axis)
    want = nk.group_norm(x0, 3, w, b, channel_axis=channel_axis)
    got = nk.group_norm(x, 3, w, b, channel_axis=channel_axis, out=x)
    assert got.y is x
    nv = naive.group_norm(x0, 3, w, b, channel_axis=channel_axis) if is_half(dtype) else None
    assert_close(x, r.y, dtype, naive=nv, what="in-place y")
    assert_close(got.mean, r.mean, sd, what="mean")
    if layout_kind != "strided":
        assert_bitwise_equal(x, want.y, "in-place y vs fresh")
        assert_bitwise_equal(got.rstd, want.rstd, "rstd")


@pytest.mark.parametrize("x_memory,out_memory", [("nchw", "nhwc"), ("nhwc", "nchw"),
                                                  ("nhwc", "strided")])
def test_out_layout_differs_from_x(x_memory, out_memory, rng):
    """channel_axis=1 throughout; x and out have different memory layouts."""
    def make(memory, fill):
        if memory == "nchw":
            return np.full((3, 6, 4, 5), fill, np.float32)
        if memory == "nhwc":
            return np.full((3, 4, 5, 6), fill, np.float32).transpose(0, 3, 1, 2)
        return np.full((3, 6, 8, 5), fill, np.float32)[:, :, ::2]

    x = make(x_memory, 0.0)
    x[...] = randn(rng, x.shape, loc=0.5)
    out = make(out_memory, np.nan)
    want = ref.group_norm(x, 3)
    got = nk.group_norm(x, 3, out=out)
    assert got.y is out
    assert_close(out, want.y, what="y in out")
    assert_close(got.mean, want.mean, what="mean")


@pytest.mark.parametrize("shift", [1, -1, 5, -11])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_out_overlaps_x(shift, channel_axis, rng):
    shape = layout((4, 6, 5, 3), channel_axis)
    n = int(np.prod(shape))
    buf = randn(rng, n + abs(shift), np.float32, loc=1.0)
    if shift > 0:
        x, out = buf[:n].reshape(shape), buf[shift:].reshape(shape)
    else:
        x, out = buf[-shift:].reshape(shape), buf[:n].reshape(shape)
    x0 = x.copy()
    w, b = make_params(rng, 6, "weight+bias")
    want = ref.group_norm(x0, 2, w, b, channel_axis=channel_axis)
    got = nk.group_norm(x, 2, w, b, channel_axis=channel_axis, out=out)
    assert got.y is out
    assert_close(out, want.y, what="overlapping out")
    assert_close(got.mean, want.mean, what="mean")
    assert_close(got.rstd, want.rstd, what="rstd")


@pytest.mark.parametrize("param", ["weight", "bias"])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_out_overlaps_weight_or_bias(param, channel_axis, rng):
    """out= follows NumPy's ufunc rule for every input: here part of out is the weight/bias."""
    shape = layout((5, 6, 4), channel_axis)
    out = np.empty(shape)
    p = out.reshape(-1)[7:13]  # six values in the middle of out
    p[...] = randn(rng, 6, np.float64, loc=1.0)
    other = randn(rng, 6, np.float64, loc=1.0)
    weight, bias = (p, other) if param == "weight" else (other, p)
    x = randn(rng, shape, np.float64)
    want = ref.group_norm(x, 2, weight.copy(), bias.copy(), channel_axis=channel_axis)
    got = nk.group_norm(x, 2, weight, bias, channel_axis=channel_axis, out=out)
    assert got.y is out
    assert_close(out, want.y, what=f"y with out overlapping {param}")


def test_out_reversed_view_of_x(rng):
    x = randn(rng, (6, 4, 8))
    x0 = x.copy()
    want = ref.group_norm(x0, 2)
    out = x[::-1, :, ::-1]
    got = nk.group_norm(x, 2, out=out)
    assert got.y is out
    assert_close(out, want.y, what="reversed overlapping out")


def test_out_interleaved_with_x(rng):
    """x and out share one buffer, interleaved element by element."""
    buf = randn(rng, (4, 6, 10))
    x, out = buf[..., ::2], buf[..., 1::2]
    x0 = x.copy()
    got = nk.group_norm(x, 3, out=out)
    assert got.y is out
    np.testing.assert_array_equal(x, x0)
    assert_close(out, ref.group_norm(x0, 3).y, what="interleaved out")


# ----------------------------------------------------------------------------
# NaN / Inf: confined to the affected (sample, group)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_nonfinite_confined_to_its_group(dtype, bad, channel_axis, rng):
    shape = layout((4, 6, 5), channel_axis)
    sd = stats_dtype(dtype)
    ax = cax(len(shape), channel_axis)
    x = randn(rng, shape, dtype)
    idx = [2, 0, 0]
    idx[ax] = 3  # channel 3: group 1 of 3
    idx[3 - ax] = 1
    x[tuple(idx)] = bad
    hit = np.zeros(shape, bool)
    sl = [2, slice(None), slice(None)]
    sl[ax] = slice(2, 4)
    hit[tuple(sl)] = True
    w, b = make_params(rng, 6, "weight+bias", sd)
    r = ref.group_norm(x, 3, w, b, channel_axis=channel_axis)
    out = nk.group_norm(x, 3, w, b, channel_axis=channel_axis)
    assert not np.any(np.isfinite(out.y[hit].astype(np.float64)))
    smask = np.ones((4, 3), bool)
    smask[2, 1] = False
    if np.isnan(bad):
        assert np.isnan(out.mean[2, 1]) and np.isnan(out.rstd[2, 1])
    nv = naive.group_norm(x, 3, w, b, channel_axis=channel_axis) if is_half(dtype) else None
    assert_close(out.y[~hit], r.y[~hit], dtype, naive=None if nv is None else nv[~hit],
                 what="y (other groups)")
    assert_close(out.mean[smask], r.mean[smask], sd, what="mean (other groups)")
    assert_close(out.rstd[smask], r.rstd[smask], sd, what="rstd (other groups)")

    dy = randn(rng, shape, dtype)
    g = nk.group_norm_backward(dy, x, out.mean, out.rstd, w, channel_axis=channel_axis)
    rg = ref.group_norm_backward(dy, x, out.mean.astype(np.float64),
                                 out.rstd.astype(np.float64), w, channel_axis=channel_axis)
    nvg = None
    if is_half(dtype):
        nvg = naive.group_norm_backward(dy, x, out.mean, out.rstd, w,
                                        channel_axis=channel_axis)[~hit]
    assert_close(g.dx[~hit], rg.dx[~hit], dtype, naive=nvg, what="dx (other groups)")
    others = [0, 1, 4, 5]
    assert_close(g.dweight[others], rg.dweight[others], sd, what="dweight (other channels)")
    assert_close(g.dbias, rg.dbias, sd, what="dbias (sum of dy, finite everywhere)")


# ----------------------------------------------------------------------------
# errors: right exception, message naming function and argument, nothing written
# ----------------------------------------------------------------------------


def _valid_call(rng):
    x = randn(rng, (4, 6, 5))
    return dict(
        x=x,
        num_groups=3,
        weight=randn(rng, 6, loc=1.0),
        bias=randn(rng, 6),
        kw=dict(eps=1e-5, channel_axis=1, out=np.full(x.shape, 7.0, np.float32)),
    )


_set = setter(kw_keys=("eps", "channel_axis", "out"))


GN = r"group_norm"
FORWARD_ERRORS = [
    ("x_int32", x_dtype(np.int32), TypeError, GN + r".*\bx\b.*dtype"),
    ("x_int64", x_dtype(np.int64), TypeError, GN + r".*\bx\b.*dtype"),
    ("x_bool", x_dtype(np.bool_), TypeError, GN + r".*\bx\b.*dtype"),
    ("x_complex", x_dtype(np.complex64), TypeError, GN + r".*\bx\b.*dtype"),
    ("x_object", x_dtype(object), TypeError, GN + r".*\bx\b.*dtype"),
    ("x_str", x_dtype(str), TypeError, GN + r".*\bx\b.*dtype"),
    ("x_1d", many(_set("x", lambda a: a["x"][0, 0]), _set("out", None)), ValueError,
     GN + r".*\bx\b"),
    ("num_groups_0", _set("num_groups", 0), ValueError, GN + r".*num_groups"),
    ("num_groups_negative", _set("num_groups", -3), ValueError, GN + r".*num_groups"),
    ("num_groups_not_dividing", _set("num_groups", 4), ValueError, GN + r".*num_groups"),
    ("num_groups_above_C", _set("num_groups", 12), ValueError, GN + r".*num_groups"),
    ("num_groups_float", _set("num_groups", 1.5), TypeError, GN + r".*num_groups"),
    ("weight_shape", _set("weight", lambda a: np.ones(5, np.float32)), ValueError,
     GN + r".*weight"),
    ("weight_2d", _set("weight", lambda a: np.ones((6, 1), np.float32)), ValueError,
     GN + r".*weight"),
    ("weight_per_group", _set("weight", lambda a: np.ones(3, np.float32)), ValueError,
     GN + r".*weight"),
    ("weight_int", _set("weight", lambda a: np.ones(6, np.int32)), TypeError,
     GN + r".*weight"),
    ("bias_shape", _set("bias", lambda a: np.ones(7, np.float32)), ValueError, GN + r".*bias"),
    ("empty_reduction", many(_set("x", lambda a: a["x"][:, :, :0]), _set("out", None)),
     ValueError, GN),
    ("eps_negative", _set("eps", -1e-5), ValueError, GN + r".*eps"),
    ("eps_nan", _set("eps", float("nan")), ValueError, GN + r".*eps"),
    ("channel_axis_0", _set("channel_axis", 0), ValueError, GN + r".*channel_axis"),
    ("channel_axis_2", _set("channel_axis", 2), ValueError, GN + r".*channel_axis"),
    ("channel_axis_-2", _set("channel_axis", -2), ValueError, GN + r".*channel_axis"),
    ("out_shape", _set("out", lambda a: np.full((4, 6, 6), 7.0, np.float32)), ValueError,
     GN + r".*\bout\b"),
    ("out_transposed_shape", _set("out", lambda a: np.full((4, 5, 6), 7.0, np.float32)),
     ValueError, GN + r".*\bout\b"),
    ("out_dtype", _set("out", lambda a: np.full((4, 6, 5), 7.0, np.float64)), ValueError,
     GN + r".*\bout\b"),
    ("out_readonly", _set("out", lambda a: readonly(a["kw"]["out"])), ValueError,
     GN + r".*\bout\b"),
]


@pytest.mark.parametrize("name,mutate,exc,match", FORWARD_ERRORS,
                         ids=[e[0] for e in FORWARD_ERRORS])
def test_forward_errors(name, mutate, exc, match, rng):
    a = _valid_call(rng)
    mutate(a)
    assert_raises_nothing_written(exc, match, nk.group_norm, a["x"], a["num_groups"],
                                  a["weight"], a["bias"], **a["kw"])


def test_valid_call_of_error_table_works(rng):
    """The unmodified call is valid, so each error above is due to its one change."""
    a = _valid_call(rng)
    out = nk.group_norm(a["x"], a["num_groups"], a["weight"], a["bias"], **a["kw"])
    assert out.y is a["kw"]["out"]


def _valid_backward(rng):
    x = randn(rng, (4, 6, 5))
    out = nk.group_norm(x, 3)
    return dict(dy=randn(rng, (4, 6, 5)), x=x, mean=out.mean, rstd=out.rstd,
                weight=randn(rng, 6, loc=1.0), kw=dict(channel_axis=1))


_bset = setter(kw_keys=("channel_axis",))


GNB = r"group_norm_backward"
BACKWARD_ERRORS = [
    ("x_int", _bset("x", lambda a: a["x"].astype(np.int32)), TypeError, GNB + r".*dtype"),
    ("dy_int", _bset("dy", lambda a: a["dy"].astype(np.int64)), TypeError, GNB + r".*dtype"),
    ("dy_complex", _bset("dy", lambda a: a["dy"].astype(np.complex64)), TypeError,
     GNB + r".*dtype"),
    ("dy_shape", _bset("dy", lambda a: a["dy"][:, :, :4]), ValueError, GNB + r".*\bdy\b"),
    ("mean_wrong_N", _bset("mean", lambda a: a["mean"][:3]), ValueError, GNB + r".*\bmean\b"),
    ("mean_1d", _bset("mean", lambda a: a["mean"][0]), ValueError, GNB + r".*\bmean\b"),
    ("mean_groups_not_dividing",
     many(_bset("mean", lambda a: np.zeros((4, 4), np.float32)),
           _bset("rstd", lambda a: np.ones((4, 4), np.float32))), ValueError,
     GNB + r".*num_groups"),
    ("rstd_shape", _bset("rstd", lambda a: a["rstd"][:, :2]), ValueError, GNB + r".*\brstd\b"),
    ("mean_none", _bset("mean", None), ValueError, GNB + r".*mean"),
    ("weight_shape", _bset("weight", lambda a: np.ones(3, np.float32)), ValueError,
     GNB + r".*weight"),
    ("x_1d", many(_bset("x", lambda a: a["x"][0, 0]), _bset("dy", lambda a: a["dy"][0, 0])),
     ValueError, GNB + r".*\bx\b"),
    ("channel_axis", _bset("channel_axis", 0), ValueError, GNB + r".*channel_axis"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BACKWARD_ERRORS,
                         ids=[e[0] for e in BACKWARD_ERRORS])
def test_backward_errors(name, mutate, exc, match, rng):
    a = _valid_backward(rng)
    mutate(a)
    assert_raises_nothing_written(exc, match, nk.group_norm_backward, a["dy"], a["x"], a["mean"],
                                  a["rstd"], a["weight"], **a["kw"])


# ----------------------------------------------------------------------------
# threads: bitwise identical results whatever the thread count
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,memory",
    [("float32", "nchw"), ("float32", "nhwc_axis-1"), ("float32", "nhwc_axis1"),
     ("float64", "nchw"), ("float16", "nhwc_axis-1")],
)
def test_bitwise_identical_across_thread_counts(name, memory, restore_num_threads):
    rng = np.random.default_rng(2024)
    dt = get_dtype(name)
    sd = stats_dtype(dt)
    if memory == "nchw":
        x, ca = randn(rng, (16, 64, 40, 40), dt, loc=2.0, scale=3.0), 1
    else:
        x = randn(rng, (16, 40, 40, 64), dt, loc=2.0, scale=3.0)
        ca = -1
        if memory == "nhwc_axis1":  # channels-last memory seen as (N, C, H, W)
            x, ca = x.transpose(0, 3, 1, 2), 1
    dy = randn(rng, x.shape, dt)
    w, b = make_params(rng, 64, "weight+bias", sd)

    def compute():
        out = nk.group_norm(x, 8, w, b, channel_axis=ca)
        g = nk.group_norm_backward(dy, x, out.mean, out.rstd, w, channel_axis=ca)
        return out.y, out.mean, out.rstd, g.dx, g.dweight, g.dbias

    first = assert_same_across_thread_counts(compute, ["y", "mean", "rstd", "dx", "dweight",
                                                       "dbias"])
    if name == "float32":  # and the big case is right
        r = ref.group_norm(x, 8, w, b, channel_axis=ca)
        assert_close(first[0], r.y, what="y")
        assert_close(first[1], r.mean, sd, what="mean")
