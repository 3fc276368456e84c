"""nk.instance_norm / nk.instance_norm_backward against SPEC sections 1-3 and 5.

training=True: statistics per (sample, channel) over the spatial axes, ``mean``/``rstd`` of
shape ``(N, C)``; running statistics ``(C,)``, when given, move towards the batch average of
the per-instance means and of the per-instance *unbiased* variances.  training=False: the
running statistics are used, returned as ``(C,)``, and the backward holds them constant.
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
    channel_strided_cases,
    layout,
    make_params,
    make_running,
    many,
    nchan,
    per_channel,
    readonly,
    setter,
    x_dtype,
)

nk = pytest.importorskip("normkit")

# Canonical (N, C, *spatial) shapes per rank (rank 2 has no spatial axis: eval only).
SHAPES = {2: (5, 3), 3: (3, 4, 7), 4: (2, 3, 5, 4), 5: (2, 3, 3, 2, 4)}


def run_forward(x, weight=None, bias=None, running_mean=None, running_var=None, **kw):
    """nk.instance_norm plus every check against the reference; returns (out, reference)."""
    xa = np.asarray(x)
    sd = stats_dtype(xa.dtype)
    training = kw.get("training", True)
    ca = kw.get("channel_axis", 1)
    eps = kw.get("eps", 1e-5)
    n, c = xa.shape[0], nchan(xa.shape, ca)
    r = ref.instance_norm(xa, weight, bias, running_mean, running_var, **kw)
    keep = snapshot(xa, weight, bias)
    keep_running = snapshot(running_mean, running_var)

    out = nk.instance_norm(x, weight, bias, running_mean=running_mean, running_var=running_var, **kw)

    assert isinstance(out, nk.NormOutput)
    assert out.y.shape == xa.shape and out.y.dtype == xa.dtype
    stat_shape = (n, c) if training else (c,)
    assert out.mean.shape == stat_shape and out.mean.dtype == sd
    assert out.rstd.shape == stat_shape and out.rstd.dtype == sd
    assert_unchanged(keep, "input")
    if not training or running_mean is None:
        assert_unchanged(keep_running, "running statistics")

    nv = None
    if is_half(xa.dtype):
        nv = naive.instance_norm(xa, weight, bias, running_mean, running_var,
                                 training=training, eps=eps, channel_axis=ca)
    assert_close(out.y, r.y, xa.dtype, naive=nv, what="y")
    if nv is not None:
        assert_half_rounding(out.y, r.y, xa.dtype, what="y")
    assert_close(out.mean, r.mean, sd, what="mean")
    assert_close(out.rstd, r.rstd, sd, what="rstd")
    if running_mean is not None and training:
        assert_close(running_mean, r.running_mean, sd, what="running_mean")
        assert_close(running_var, r.running_var, sd, what="running_var")
    return out, r


def run_backward(dy, x, mean, rstd, weight=None, **kw):
    """nk.instance_norm_backward against the reference fed the same saved statistics."""
    xa = np.asarray(x)
    sd = stats_dtype(xa.dtype)
    c = nchan(xa.shape, kw.get("channel_axis", 1))
    keep = snapshot(dy, xa, mean, rstd, weight)

    g = nk.instance_norm_backward(dy, x, mean, rstd, weight, **kw)

    assert isinstance(g, nk.NormGrads)
    assert g.dx.shape == xa.shape and g.dx.dtype == xa.dtype
    assert g.dweight.shape == (c,) and g.dweight.dtype == sd
    assert g.dbias.shape == (c,) and g.dbias.dtype == sd
    assert_unchanged(keep, "backward input")

    r = ref.instance_norm_backward(dy, xa, np.asarray(mean, np.float64),
                                   np.asarray(rstd, np.float64), weight, **kw)
    nv = None
    if is_half(xa.dtype):
        nv = naive.instance_norm_backward(dy, xa, mean, rstd, weight, **kw)
    assert_close(g.dx, r.dx, xa.dtype, naive=nv, what="dx")
    if nv is not None:
        assert_half_rounding(g.dx, r.dx, xa.dtype, what="dx")
    assert_close(g.dweight, r.dweight, sd, what="dweight")
    assert_close(g.dbias, r.dbias, sd, what="dbias")
    return g, r


# ----------------------------------------------------------------------------
# the main grid
# ----------------------------------------------------------------------------


MODES = ["train", "train+running", "eval"]


# rank 2 has one value per instance: training on it is an error (see the error table)
RANK_MODES = [(r, m) for r in (2, 3, 4, 5) for m in MODES if r > 2 or m == "eval"]


@pytest.mark.parametrize("rank,mode", RANK_MODES)
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_matches_reference(dtype, rank, channel_axis, mode, rng):
    shape = layout(SHAPES[rank], channel_axis)
    c = nchan(shape, channel_axis)
    sd = stats_dtype(dtype)
    x = randn(rng, shape, dtype, loc=0.3, scale=1.5)
    w, b = make_params(rng, c, "weight+bias", sd)
    rm = rv = None
    if mode != "train":
        rm, rv = make_running(rng, c, sd)
    training = mode != "eval"
    out, _ = run_forward(x, w, b, rm, rv, training=training, momentum=0.1,
                         channel_axis=channel_axis)
    if not training:
        # SPEC: with training=False the returned statistics are the ones used (a copy)
        assert_bitwise_equal(out.mean, rm, "mean (eval)")
        assert not np.shares_memory(out.mean, rm)
        assert_close(out.rstd, 1.0 / np.sqrt(rv.astype(np.float64) + 1e-5), sd, what="rstd")
    dy = randn(rng, shape, dtype)
    run_backward(dy, x, out.mean, out.rstd, w, training=training, channel_axis=channel_axis)


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("training", [True, False])
def test_optional_weight_and_bias(dtype, channel_axis, affine, training, rng):
    shape = layout((3, 4, 5, 2), channel_axis)
    sd = stats_dtype(dtype)
    x = randn(rng, shape, dtype, loc=-0.5, scale=2.0)
    w, b = make_params(rng, 4, affine, sd)
    rm, rv = make_running(rng, 4, sd)
    out, _ = run_forward(x, w, b, rm, rv, training=training, channel_axis=channel_axis)
    dy = randn(rng, shape, dtype)
    run_backward(dy, x, out.mean, out.rstd, w, training=training, channel_axis=channel_axis)


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_statistics_are_per_instance(channel_axis, rng):
    """Checked directly, without the reference: one mean/var per (sample, channel)."""
    shape = layout((3, 4, 5, 6), channel_axis)
    x = randn(rng, shape, np.float64, loc=1.0, scale=2.0)
    x = x + per_channel(np.arange(4.0), x.ndim, channel_axis)  # channels differ
    out = nk.instance_norm(x, channel_axis=channel_axis)
    xs = np.moveaxis(x, cax(x.ndim, channel_axis), 1).reshape(3, 4, -1)
    assert_close(out.mean, xs.mean(axis=2), what="mean")
    assert_close(out.rstd, 1 / np.sqrt(xs.var(axis=2) + 1e-5), what="rstd")


def test_matches_group_norm_with_one_channel_per_group(rng):
    x = randn(rng, (3, 5, 4, 6), np.float64)
    w, b = make_params(rng, 5, "weight+bias", np.float64)
    a = nk.instance_norm(x, w, b)
    g = nk.group_norm(x, 5, w, b)
    assert_close(a.y, g.y, what="y")
    assert_close(a.mean, g.mean, what="mean")
    assert_close(a.rstd, g.rstd, what="rstd")


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("training", [True, False])
def test_float64_backward_with_reference_stats(channel_axis, training, rng):
    shape = layout((4, 3, 5, 3), channel_axis)
    x = randn(rng, shape, np.float64)
    w = randn(rng, 3, np.float64, loc=1.0)
    rm, rv = make_running(rng, 3, np.float64)
    dy = randn(rng, shape, np.float64)
    out = nk.instance_norm(x, w, None, running_mean=rm.copy(), running_var=rv.copy(), training=training,
                           channel_axis=channel_axis)
    g = nk.instance_norm_backward(dy, x, out.mean, out.rstd, w, training=training,
                                  channel_axis=channel_axis)
    r = ref.instance_norm(x, w, None, rm, rv, training=training, channel_axis=channel_axis)
    rg = ref.instance_norm_backward(dy, x, r.mean, r.rstd, w, training=training,
                                    channel_axis=channel_axis)
    assert_close(g.dx, rg.dx, what="dx")
    assert_close(g.dweight, rg.dweight, what="dweight")
    assert_close(g.dbias, rg.dbias, what="dbias")


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_eval_backward_treats_stats_as_constants(channel_axis, rng):
    """training=False: dx = dy * weight * rstd exactly as SPEC states."""
    shape = layout((3, 4, 6), channel_axis)
    x = randn(rng, shape, np.float64)
    dy = randn(rng, shape, np.float64)
    w = randn(rng, 4, np.float64, loc=1.0)
    rm, rv = make_running(rng, 4, np.float64)
    out = nk.instance_norm(x, w, None, running_mean=rm, running_var=rv, training=False, channel_axis=channel_axis)
    g = nk.instance_norm_backward(dy, x, out.mean, out.rstd, w, training=False,
                                  channel_axis=channel_axis)
    assert_close(g.dx, dy * per_channel(w * out.rstd, x.ndim, channel_axis), what="dx")
    xhat = (x - per_channel(rm, x.ndim, channel_axis)) * per_channel(out.rstd, x.ndim,
                                                                       channel_axis)
    axes = tuple(a for a in range(x.ndim) if a != cax(x.ndim, channel_axis))
    assert_close(g.dweight, (dy * xhat).sum(axis=axes), what="dweight")
    assert_close(g.dbias, dy.sum(axis=axes), what="dbias")
    g0 = nk.instance_norm_backward(dy, x, out.mean, out.rstd, None, training=False,
                                   channel_axis=channel_axis)
    assert_close(g0.dx, dy * per_channel(out.rstd, x.ndim, channel_axis), what="dx (no w)")
    assert_close(g0.dweight, g.dweight, what="dweight independent of weight")


def test_dweight_dbias_returned_without_weight(rng):
    x = randn(rng, (4, 3, 5))
    dy = randn(rng, (4, 3, 5))
    out = nk.instance_norm(x)
    g = nk.instance_norm_backward(dy, x, out.mean, out.rstd)
    g1 = nk.instance_norm_backward(dy, x, out.mean, out.rstd, np.ones(3, np.float32))
    assert g.dweight is not None and g.dbias is not None
    assert_close(g.dx, g1.dx, what="dx")
    assert_close(g.dweight, g1.dweight, what="dweight")
    assert_close(g.dbias, g1.dbias, what="dbias")


def test_default_arguments(rng):
    """Defaults: training=True, momentum=0.1, eps=1e-5, channel_axis=1."""
    x = randn(rng, (4, 3, 5), np.float64, loc=1.0, scale=0.01)
    rm, rv = np.zeros(3), np.ones(3)
    out = nk.instance_norm(x, None, None, running_mean=rm, running_var=rv)
    r = ref.instance_norm(x, None, None, np.zeros(3), np.ones(3), training=True, momentum=0.1,
                          eps=1e-5, channel_axis=1)
    assert out.mean.shape == (4, 3)
    assert_close(out.y, r.y)
    assert_close(rm, r.running_mean)
    assert_close(rv, r.running_var)


# ----------------------------------------------------------------------------
# running statistics
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.37, 1.0])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_running_stats_momentum_rule(dtype, momentum, channel_axis, rng):
    """Batch average of per-instance means and of per-instance unbiased variances."""
    shape = layout((5, 3, 4, 2), channel_axis)
    sd = stats_dtype(dtype)
    x = randn(rng, shape, dtype, loc=2.0, scale=3.0)
    rm, rv = make_running(rng, 3, sd)
    rm0, rv0 = rm.copy(), rv.copy()
    run_forward(x, None, None, rm, rv, momentum=momentum, channel_axis=channel_axis)
    xs = np.moveaxis(x.astype(np.float64), cax(x.ndim, channel_axis), 1).reshape(5, 3, 8)
    want_m = (1 - momentum) * rm0.astype(np.float64) + momentum * xs.mean(axis=2).mean(axis=0)
    want_v = ((1 - momentum) * rv0.astype(np.float64)
              + momentum * xs.var(axis=2, ddof=1).mean(axis=0))
    assert_close(rm, want_m, sd, what="running_mean")
    assert_close(rv, want_v, sd, what="running_var")
    if momentum == 0.0:
        assert_bitwise_equal(rm, rm0, "running_mean (momentum=0)")
        assert_bitwise_equal(rv, rv0, "running_var (momentum=0)")


def test_running_var_is_not_the_batch_variance(rng):
    """Instances with different means: the average of per-instance variances is much smaller
    than the variance over the whole batch (which BatchNorm would use)."""
    x = randn(rng, (4, 2, 10), np.float64, scale=0.1)
    x += np.array([0.0, 10.0, -10.0, 20.0])[:, None, None]
    rm, rv = np.zeros(2), np.zeros(2)
    nk.instance_norm(x, None, None, running_mean=rm, running_var=rv, momentum=1.0)
    assert_close(rm, x.mean(axis=2).mean(axis=0), what="running_mean")
    assert np.all(rv < 0.1)
    assert_close(rv, x.var(axis=2, ddof=1).mean(axis=0), what="running_var")


def test_running_stats_repeated_updates(rng):
    rm = np.zeros(4)
    rv = np.ones(4)
    rm_r, rv_r = rm.copy(), rv.copy()
    for i in range(5):
        x = randn(rng, (3 + i, 4, 6), np.float64, loc=1.0, scale=2.0)
        nk.instance_norm(x, None, None, running_mean=rm, running_var=rv, momentum=0.2)
        r = ref.instance_norm(x, None, None, rm_r, rv_r, momentum=0.2)
        rm_r, rv_r = r.running_mean, r.running_var
    assert_close(rm, rm_r)
    assert_close(rv, rv_r)


def test_running_stats_strided_view_updated_in_place(rng):
    """Running statistics need only the right dtype and to be writeable."""
    x = randn(rng, (4, 3, 5))
    buf = np.full((2, 7), 5.0, np.float32)
    rm, rv = buf[0, ::3], buf[1, ::3]  # stride 3, elements 0, 3, 6
    rm0, rv0 = rm.copy(), rv.copy()
    run_forward(x, None, None, rm, rv, momentum=0.5)
    r = ref.instance_norm(x, None, None, rm0, rv0, momentum=0.5)
    assert_close(buf[0, [0, 3, 6]], r.running_mean, what="running_mean")
    assert_close(buf[1, [0, 3, 6]], r.running_var, what="running_var")
    np.testing.assert_array_equal(np.delete(buf, [0, 3, 6], axis=1), 5.0)


def test_running_stats_with_different_strides(rng):
    """SPEC section 2 asks only for the statistics dtype and writeability: running_mean and
    running_var are independent arrays and may have different strides."""
    x = randn(rng, (4, 3, 5))
    buf = np.full(9, 5.0, np.float32)
    rm = buf[::3]  # stride 3 elements
    rv = np.ones(3, np.float32)  # contiguous
    rm0, rv0 = rm.copy(), rv.copy()
    run_forward(x, None, None, rm, rv, momentum=0.5)
    r = ref.instance_norm(x, None, None, rm0, rv0, momentum=0.5)
    assert_close(buf[::3], r.running_mean, what="running_mean")
    np.testing.assert_array_equal(np.delete(buf, [0, 3, 6]), 5.0)
    rv_neg = np.full(3, 2.0, np.float32)[::-1]  # negative stride
    ev, _ = run_forward(x, None, None, rm, rv_neg, training=False)
    assert_close(ev.rstd, np.full(3, 1 / np.sqrt(2.0 + 1e-5)), np.float32, what="rstd")


def test_eval_uses_running_stats(rng):
    x = randn(rng, (4, 3, 5), np.float64)
    rm = np.array([10.0, -1.0, 0.5])
    rv = np.array([4.0, 0.25, 1.0])
    w = np.array([1.0, 2.0, -1.0])
    b = np.array([0.0, 1.0, 3.0])
    out = nk.instance_norm(x, w, b, running_mean=rm, running_var=rv, training=False, eps=0.0)
    want = (x - rm[:, None]) / np.sqrt(rv)[:, None] * w[:, None] + b[:, None]
    assert_close(out.y, want)
    assert_bitwise_equal(out.mean, rm)
    assert_close(out.rstd, 1 / np.sqrt(rv))
    np.testing.assert_array_equal(rm, [10.0, -1.0, 0.5])
    np.testing.assert_array_equal(rv, [4.0, 0.25, 1.0])


def test_eval_allows_one_value_per_instance(rng):
    """The spatial-size rule is for training only: (N, C) works in eval."""
    x = randn(rng, (4, 3))
    rm, rv = make_running(rng, 3, np.float32)
    run_forward(x, None, None, rm, rv, training=False)


# ----------------------------------------------------------------------------
# parameter dtypes, array-likes
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("x_name", ["float32", "float64", "float16"])
@pytest.mark.parametrize("w_name", ["float32", "float64", "float16", "bfloat16"])
def test_weight_of_another_float_dtype(x_name, w_name, rng):
    xd, wd = get_dtype(x_name), get_dtype(w_name)
    x = randn(rng, (3, 4, 5), xd)
    w = randn(rng, 4, wd, loc=1.0, scale=0.5)
    b = randn(rng, 4, wd)
    out, _ = run_forward(x, w, b)
    dy = randn(rng, x.shape, xd)
    g, _ = run_backward(dy, x, out.mean, out.rstd, w)
    assert g.dweight.dtype == stats_dtype(xd)


def test_array_like_input():
    x = [[[1.0, 2.0, 4.0], [3.0, 5.0, -1.0]], [[0.0, 1.0, 0.5], [2.0, 2.5, 9.0]]]
    out = nk.instance_norm(x)
    assert out.y.dtype == np.float64 and out.mean.shape == (2, 2)
    r = ref.instance_norm(np.array(x))
    assert_close(out.y, r.y)
    g = nk.instance_norm_backward(x, x, out.mean, out.rstd)
    assert_close(g.dx, ref.instance_norm_backward(np.array(x), np.array(x), r.mean,
                                                  r.rstd).dx)


# ----------------------------------------------------------------------------
# hard inputs
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("loc,scale", [(1000.0, 0.01), (-3e4, 2.0)])
def test_float32_large_mean_small_spread(loc, scale, channel_axis, rng):
    shape = layout((4, 3, 9, 7), channel_axis)
    x = randn(rng, shape, np.float32, loc=loc, scale=scale)
    w, b = make_params(rng, 3, "weight+bias")
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out, _ = run_forward(x, w, b, rm, rv, channel_axis=channel_axis)
    dy = randn(rng, shape, np.float32, scale=scale)  # keeps dx of order one
    run_backward(dy, x, out.mean, out.rstd, w, channel_axis=channel_axis)


@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.1, 2.0])
def test_eps_placement(dtype, eps, rng):
    x = randn(rng, (4, 3, 10), dtype, scale=0.003)
    sd = stats_dtype(dtype)
    out, _ = run_forward(x, eps=eps)
    run_backward(randn(rng, x.shape, dtype), x, out.mean, out.rstd)
    rm, rv = np.zeros(3, sd), np.full(3, 1e-5, sd)
    run_forward(x, None, None, rm, rv, training=False, eps=eps)


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_constant_instances(dtype, channel_axis, rng):
    """var = 0: y == bias for that instance; unbiased var 0 enters the running var."""
    shape = layout((3, 4, 5, 2), channel_axis)
    sd = stats_dtype(dtype)
    x = randn(rng, shape, dtype)
    ax = cax(x.ndim, channel_axis)
    idx = [slice(None)] * x.ndim
    idx[0], idx[ax] = 1, 2
    x[tuple(idx)] = 3.0
    w, b = make_params(rng, 4, "weight+bias", sd)
    rm, rv = make_running(rng, 4, sd)
    out, _ = run_forward(x, w, b, rm, rv, channel_axis=channel_axis)
    assert np.all(np.isfinite(out.y.astype(np.float64)))
    assert out.mean[1, 2] == 3.0
    assert_close(out.rstd[1, 2], 1 / math.sqrt(1e-5), sd, what="rstd")
    np.testing.assert_array_equal(out.y[tuple(idx)].astype(np.float64),
                                  np.float64(b[2].astype(dtype)))
    g, _ = run_backward(randn(rng, shape, dtype), x, out.mean, out.rstd, w,
                        channel_axis=channel_axis)
    assert np.all(np.isfinite(g.dx.astype(np.float64)))


@pytest.mark.parametrize(
    "shape",
    [
        (1, 3, 7),  # batch of one
        (2, 3, 2),  # two values per instance
        (7, 5, 11, 13),  # primes
        (3, 2, 4099),  # long spatial axis
        (2, 3, 1, 5),  # a spatial one
        (67, 1, 3),  # one channel, many samples
        (2, 3, 90000),  # channels-last: several row chunks per sample, Chan merges
    ],
)
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_sizes(shape, channel_axis, rng):
    shape = layout(shape, channel_axis)
    c = nchan(shape, channel_axis)
    x = randn(rng, shape, np.float32, loc=0.5)
    w, b = make_params(rng, c, "weight+bias")
    rm, rv = make_running(rng, c, np.float32)
    out, _ = run_forward(x, w, b, rm, rv, channel_axis=channel_axis)
    run_backward(randn(rng, shape, np.float32), x, out.mean, out.rstd, w,
                 channel_axis=channel_axis)


@pytest.mark.parametrize("name", ["float64", "float16", "bfloat16"])
def test_medium_size_channels_last(name, rng):
    dt = get_dtype(name)
    sd = stats_dtype(dt)
    x = randn(rng, (4, 33, 35, 16), dt, loc=-1.0, scale=2.0)
    w, b = make_params(rng, 16, "weight+bias", sd)
    rm, rv = make_running(rng, 16, sd)
    out, _ = run_forward(x, w, b, rm, rv, channel_axis=-1)
    run_backward(randn(rng, x.shape, dt), x, out.mean, out.rstd, w, channel_axis=-1)


# ----------------------------------------------------------------------------
# empty non-reduced axes
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("shape", [(0, 3, 4), (0, 3, 2, 5)])
def test_empty_batch_training(shape, channel_axis, dtype, rng):
    shape = layout(shape, channel_axis)
    sd = stats_dtype(dtype)
    x = np.zeros(shape, dtype)
    w, b = make_params(rng, 3, "weight+bias", sd)
    out = nk.instance_norm(x, w, b, channel_axis=channel_axis)
    assert out.y.shape == shape and out.y.dtype == dtype
    assert out.mean.shape == (0, 3) and out.mean.dtype == sd
    assert out.rstd.shape == (0, 3) and out.rstd.dtype == sd
    g = nk.instance_norm_backward(x, x, out.mean, out.rstd, w, channel_axis=channel_axis)
    assert g.dx.shape == shape and g.dx.dtype == dtype
    np.testing.assert_array_equal(g.dweight, np.zeros(3, sd))
    np.testing.assert_array_equal(g.dbias, np.zeros(3, sd))


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("shape", [(0, 3, 4), (0, 3)])
def test_empty_batch_eval(shape, channel_axis, dtype, rng):
    shape = layout(shape, channel_axis)
    sd = stats_dtype(dtype)
    x = np.zeros(shape, dtype)
    rm, rv = make_running(rng, 3, sd)
    out = nk.instance_norm(x, None, None, running_mean=rm, running_var=rv, training=False, channel_axis=channel_axis)
    assert out.y.shape == shape and out.y.dtype == dtype
    assert_bitwise_equal(out.mean, rm)
    assert out.rstd.shape == (3,) and out.rstd.dtype == sd
    g = nk.instance_norm_backward(x, x, out.mean, out.rstd, training=False,
                                  channel_axis=channel_axis)
    assert g.dx.shape == shape
    np.testing.assert_array_equal(g.dweight, np.zeros(3, sd))


def test_empty_batch_cannot_update_running_stats(rng):
    """The batch average over zero instances is an empty reduction: ValueError, no write."""
    x = np.zeros((0, 3, 4), np.float32)
    rm, rv = make_running(rng, 3, np.float32)
    keep = snapshot(rm, rv)
    with pytest.raises(ValueError, match="instance_norm"):
        nk.instance_norm(x, None, None, running_mean=rm, running_var=rv)
    assert_unchanged(keep, "running statistics")


# ----------------------------------------------------------------------------
# layouts and strides
# ----------------------------------------------------------------------------


CASE_NAMES = ["steps", "negative", "transposed", "fortran", "channels_innermost_axis1",
              "nchw_memory_axis-1", "steps_axis-1", "broadcast_batch"]


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("name", ["float32", "float64", "float16"])
def test_arbitrary_strides(case, name, rng):
    dt = get_dtype(name)
    x, channel_axis = channel_strided_cases(rng, dt)[case]
    c = nchan(x.shape, channel_axis)
    sd = stats_dtype(dt)
    w = randn(rng, 3 * c, sd, loc=1.0)[::3]
    b = randn(rng, c, sd)
    rm, rv = make_running(rng, c, sd)
    out, _ = run_forward(x, w, b, rm, rv, channel_axis=channel_axis)
    out_c = nk.instance_norm(np.ascontiguousarray(x), w, b, channel_axis=channel_axis)
    assert_close(out.y, out_c.y.astype(np.float64), dt if is_half(dt) else sd,
                 what="strided vs contiguous")
    dy = randn(rng, tuple(reversed(x.shape)), dt).T
    run_backward(dy, x, out.mean, out.rstd, w, channel_axis=channel_axis)
    ev, _ = run_forward(x, w, b, rm, rv, training=False, channel_axis=channel_axis)
    run_backward(dy, x, ev.mean, ev.rstd, w, training=False, channel_axis=channel_axis)


# ----------------------------------------------------------------------------
# out=
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("training", [True, False])
def test_out_fresh(dtype, channel_axis, training, rng):
    shape = layout((4, 3, 5, 2), channel_axis)
    sd = stats_dtype(dtype)
    x = randn(rng, shape, dtype)
    w, b = make_params(rng, 3, "weight+bias", sd)
    rm, rv = make_running(rng, 3, sd)
    kw = dict(training=training, channel_axis=channel_axis)
    rm1, rv1 = rm.copy(), rv.copy()
    want = nk.instance_norm(x, w, b, running_mean=rm1, running_var=rv1, **kw)
    out = np.full(shape, np.nan, dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    got = nk.instance_norm(x, w, b, running_mean=rm2, running_var=rv2, out=out, **kw)
    assert got.y is out
    assert_bitwise_equal(out, want.y, "out")
    assert_bitwise_equal(got.mean, want.mean, "mean")
    assert_bitwise_equal(rm2, rm1, "running_mean")
    assert_bitwise_equal(rv2, rv1, "running_var")


@pytest.mark.parametrize("layout_kind", ["contiguous", "channels_last", "channels_innermost"])
@pytest.mark.parametrize("training", [True, False])
def test_out_is_x(dtype, layout_kind, training, rng):
    channel_axis = 1
    if layout_kind == "contiguous":
        x = randn(rng, (5, 3, 4, 6), dtype)
    elif layout_kind == "channels_last":
        x = randn(rng, (5, 4, 6, 3), dtype)
        channel_axis = -1
    else:
        x = randn(rng, (5, 4, 6, 3), dtype).transpose(0, 3, 1, 2)
    sd = stats_dtype(dtype)
    x0 = np.copy(x, order="K")
    w, b = make_params(rng, 3, "weight+bias", sd)
    rm, rv = make_running(rng, 3, sd)
    kw = dict(training=training, channel_axis=channel_axis)
    rm1, rv1 = rm.copy(), rv.copy()
    want = nk.instance_norm(x0, w, b, running_mean=rm1, running_var=rv1, **kw)
    got = nk.instance_norm(x, w, b, running_mean=rm, running_var=rv, out=x, **kw)
    assert got.y is x
    assert_bitwise_equal(x, want.y, "in-place y vs fresh")
    assert_bitwise_equal(got.mean, want.mean, "mean")
    assert_bitwise_equal(rm, rm1, "running_mean")
    assert_bitwise_equal(rv, rv1, "running_var")
    r = ref.instance_norm(x0, w, b, **kw) if training else ref.instance_norm(
        x0, w, b, rm1, rv1, **kw)
    nv = None
    if is_half(dtype):
        nv = naive.instance_norm(x0, w, b, rm1, rv1, **kw)
    assert_close(x, r.y, dtype, naive=nv, what="in-place y")


@pytest.mark.parametrize("shift", [1, -1, 4, -9])
@pytest.mark.parametrize("training", [True, False])
def test_out_overlaps_x(shift, training, rng):
    shape = (4, 3, 5, 6)
    n = int(np.prod(shape))
    buf = randn(rng, n + abs(shift), np.float32, loc=1.0)
    if shift > 0:
        x, out = buf[:n].reshape(shape), buf[shift:].reshape(shape)
    else:
        x, out = buf[-shift:].reshape(shape), buf[:n].reshape(shape)
    x0 = x.copy()
    w, b = make_params(rng, 3, "weight+bias")
    rm, rv = make_running(rng, 3, np.float32)
    want = ref.instance_norm(x0, w, b, rm, rv, training=training)
    got = nk.instance_norm(x, w, b, running_mean=rm, running_var=rv, training=training, out=out)
    assert got.y is out
    assert_close(out, want.y, what="overlapping out")
    assert_close(got.mean, want.mean, what="mean")
    if training:
        assert_close(rm, want.running_mean, what="running_mean")
        assert_close(rv, want.running_var, what="running_var")


@pytest.mark.parametrize("param", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("training", [True, False])
def test_out_overlaps_parameters(param, training, rng):
    """out= follows NumPy's ufunc rule for every input, running statistics included (when
    training they are also written: with the statistics of x, not of a half-written y)."""
    shape = (4, 3, 5)
    out = np.empty(shape)
    view = out[1, 1, 1:4]
    args = dict(weight=randn(rng, 3, np.float64, loc=1.0), bias=randn(rng, 3, np.float64),
                running_mean=randn(rng, 3, np.float64, scale=0.3),
                running_var=rng.uniform(0.5, 2.0, 3))
    view[...] = args[param]
    args[param] = view
    copies = {k: v.copy() for k, v in args.items()}
    x = randn(rng, shape, np.float64, loc=0.5)
    want = ref.instance_norm(x, copies["weight"], copies["bias"], copies["running_mean"],
                             copies["running_var"], training=training, momentum=0.5)
    got = nk.instance_norm(x, args["weight"], args["bias"], running_mean=args["running_mean"],
                           running_var=args["running_var"], training=training, momentum=0.5, out=out)
    assert got.y is out
    if param.startswith("running") and training:
        # the running statistic shares memory with y; which write lands last is not
        # specified, so only the other elements of y are checked
        mask = np.ones(shape, bool)
        mask[1, 1, 1:4] = False
        assert_close(out[mask], want.y[mask], what=f"y with out overlapping {param}")
    else:
        assert_close(out, want.y, what=f"y with out overlapping {param}")
    assert_close(got.mean, want.mean, what="mean")


def test_out_reversed_view_of_x(rng):
    x = randn(rng, (6, 3, 8))
    x0 = x.copy()
    out = x[::-1, ::-1, ::-1]
    got = nk.instance_norm(x, out=out)
    assert got.y is out
    assert_close(out, ref.instance_norm(x0).y, what="reversed overlapping out")


# ----------------------------------------------------------------------------
# NaN / Inf: confined to the affected instance (and its channel's running stats)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_nonfinite_confined_to_its_instance(dtype, bad, channel_axis, rng):
    shape = layout((4, 3, 6), channel_axis)
    sd = stats_dtype(dtype)
    ax = cax(len(shape), channel_axis)
    x = randn(rng, shape, dtype)
    idx = [2, 0, 0]
    idx[ax] = 1
    idx[3 - ax] = 4
    x[tuple(idx)] = bad
    hit = np.zeros(shape, bool)
    sl = [2, slice(None), slice(None)]
    sl[ax] = 1
    hit[tuple(sl)] = True
    smask = np.ones((4, 3), bool)
    smask[2, 1] = False
    w, b = make_params(rng, 3, "weight+bias", sd)
    rm, rv = make_running(rng, 3, sd)
    r = ref.instance_norm(x, w, b, rm, rv, channel_axis=channel_axis)
    out = nk.instance_norm(x, w, b, running_mean=rm, running_var=rv, channel_axis=channel_axis)
    assert not np.any(np.isfinite(out.y[hit].astype(np.float64)))
    nv = naive.instance_norm(x, w, b, channel_axis=channel_axis) if is_half(dtype) else None
    assert_close(out.y[~hit], r.y[~hit], dtype, naive=None if nv is None else nv[~hit],
                 what="y (other instances)")
    assert_close(out.mean[smask], r.mean[smask], sd, what="mean (other instances)")
    assert_close(out.rstd[smask], r.rstd[smask], sd, what="rstd (other instances)")
    # the channel's running statistics average over the batch: only channel 1 is hit
    assert not np.isfinite(rv[1])
    assert_close(rm[[0, 2]], r.running_mean[[0, 2]], sd, what="running_mean (others)")
    assert_close(rv[[0, 2]], r.running_var[[0, 2]], sd, what="running_var (others)")

    dy = randn(rng, shape, dtype)
    g = nk.instance_norm_backward(dy, x, out.mean, out.rstd, w, channel_axis=channel_axis)
    rg = ref.instance_norm_backward(dy, x, out.mean.astype(np.float64),
                                    out.rstd.astype(np.float64), w, channel_axis=channel_axis)
    nvg = None
    if is_half(dtype):
        nvg = naive.instance_norm_backward(dy, x, out.mean, out.rstd, w,
                                           channel_axis=channel_axis)[~hit]
    assert_close(g.dx[~hit], rg.dx[~hit], dtype, naive=nvg, what="dx (other instances)")
    assert_close(g.dweight[[0, 2]], rg.dweight[[0, 2]], sd, what="dweight (other channels)")
    assert_close(g.dbias, rg.dbias, sd, what="dbias")


# ----------------------------------------------------------------------------
# errors: right exception, message naming function and argument, nothing written
# ----------------------------------------------------------------------------


def _valid_call(rng):
    x = randn(rng, (4, 3, 5))
    return dict(
        x=x,
        weight=randn(rng, 3, loc=1.0),
        bias=randn(rng, 3),
        running_mean=np.zeros(3, np.float32),
        running_var=np.ones(3, np.float32),
        kw=dict(training=True, momentum=0.1, eps=1e-5, channel_axis=1,
                out=np.full(x.shape, 7.0, np.float32)),
    )


_set = setter(kw_keys=("training", "momentum", "eps", "channel_axis", "out"))


IN = r"instance_norm"
EVAL = _set("training", False)
FORWARD_ERRORS = [
    ("x_int32", x_dtype(np.int32), TypeError, IN + r".*\bx\b.*dtype"),
    ("x_uint8", x_dtype(np.uint8), TypeError, IN + r".*\bx\b.*dtype"),
    ("x_bool", x_dtype(np.bool_), TypeError, IN + r".*\bx\b.*dtype"),
    ("x_complex", x_dtype(np.complex128), TypeError, IN + r".*\bx\b.*dtype"),
    ("x_object", x_dtype(object), TypeError, IN + r".*\bx\b.*dtype"),
    ("x_1d", many(_set("x", lambda a: a["x"][0, 0]), _set("out", None)), ValueError,
     IN + r".*\bx\b"),
    ("one_value_per_instance", many(_set("x", lambda a: a["x"][:, :, 0]), _set("out", None)),
     ValueError, IN),
    ("one_value_per_instance_4d",
     many(_set("x", lambda a: a["x"][:, :, :1, None]), _set("out", None)), ValueError, IN),
    ("empty_spatial", many(_set("x", lambda a: a["x"][:, :, :0]), _set("out", None)),
     ValueError, IN),
    ("weight_shape", _set("weight", lambda a: np.ones(4, np.float32)), ValueError,
     IN + r".*weight"),
    ("weight_int", _set("weight", lambda a: np.ones(3, np.int64)), TypeError, IN + r".*weight"),
    ("bias_shape", _set("bias", lambda a: np.ones((3, 1), np.float32)), ValueError,
     IN + r".*bias"),
    ("running_mean_shape", _set("running_mean", lambda a: np.zeros(4, np.float32)), ValueError,
     IN + r".*running_mean"),
    ("running_mean_per_instance", _set("running_mean", lambda a: np.zeros((4, 3), np.float32)),
     ValueError, IN + r".*running_mean"),
    ("running_var_shape", _set("running_var", lambda a: np.ones(2, np.float32)), ValueError,
     IN + r".*running_var"),
    ("running_mean_only", _set("running_var", None), ValueError, IN + r".*running"),
    ("running_var_only", _set("running_mean", None), ValueError, IN + r".*running"),
    ("running_mean_float64", _set("running_mean", lambda a: np.zeros(3, np.float64)),
     TypeError, IN + r".*running_mean"),
    ("running_var_float16", _set("running_var", lambda a: np.ones(3, np.float16)), TypeError,
     IN + r".*running_var"),
    ("running_var_list", _set("running_var", [1.0, 1.0, 1.0]), TypeError,
     IN + r".*running_var"),
    ("running_mean_readonly", _set("running_mean", lambda a: readonly(a["running_mean"])),
     ValueError, IN + r".*running_mean"),
    ("running_var_readonly", _set("running_var", lambda a: readonly(a["running_var"])),
     ValueError, IN + r".*running_var"),
    ("eps_negative", _set("eps", -1.0), ValueError, IN + r".*eps"),
    ("eps_nan", _set("eps", float("nan")), ValueError, IN + r".*eps"),
    ("momentum_negative", _set("momentum", -0.01), ValueError, IN + r".*momentum"),
    ("momentum_above_one", _set("momentum", 1.01), ValueError, IN + r".*momentum"),
    ("momentum_nan", _set("momentum", float("nan")), ValueError, IN + r".*momentum"),
    ("channel_axis_0", _set("channel_axis", 0), ValueError, IN + r".*channel_axis"),
    ("channel_axis_2", _set("channel_axis", 2), ValueError, IN + r".*channel_axis"),
    ("channel_axis_-2", _set("channel_axis", -2), ValueError, IN + r".*channel_axis"),
    ("out_shape", _set("out", lambda a: np.full((4, 3, 6), 7.0, np.float32)), ValueError,
     IN + r".*\bout\b"),
    ("out_dtype", _set("out", lambda a: np.full((4, 3, 5), 7.0, np.float16)), ValueError,
     IN + r".*\bout\b"),
    ("out_readonly", _set("out", lambda a: readonly(a["kw"]["out"])), ValueError,
     IN + r".*\bout\b"),
    ("eval_without_running",
     many(EVAL, _set("running_mean", None), _set("running_var", None)), ValueError,
     IN + r".*running"),
    ("eval_negative_running_var",
     many(EVAL, _set("running_var", lambda a: np.array([1.0, -0.5, 1.0], np.float32))),
     ValueError, IN + r".*running_var"),
    ("eval_running_mean_readonly",
     many(EVAL, _set("running_mean", lambda a: readonly(a["running_mean"]))), ValueError,
     IN + r".*running_mean"),
    ("eval_out_readonly", many(EVAL, _set("out", lambda a: readonly(a["kw"]["out"]))),
     ValueError, IN + r".*\bout\b"),
]


@pytest.mark.parametrize("name,mutate,exc,match", FORWARD_ERRORS,
                         ids=[e[0] for e in FORWARD_ERRORS])
def test_forward_errors(name, mutate, exc, match, rng):
    a = _valid_call(rng)
    mutate(a)
    assert_raises_nothing_written(exc, match, nk.instance_norm, a["x"], a["weight"], a["bias"],
                                  running_mean=a["running_mean"], running_var=a["running_var"], **a["kw"])


@pytest.mark.parametrize("training", [True, False])
def test_valid_call_of_error_table_works(training, rng):
    a = _valid_call(rng)
    a["kw"]["training"] = training
    out = nk.instance_norm(a["x"], a["weight"], a["bias"], running_mean=a["running_mean"],
                           running_var=a["running_var"], **a["kw"])
    assert out.y is a["kw"]["out"]


def _valid_backward(rng, training=True):
    x = randn(rng, (4, 3, 5))
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = nk.instance_norm(x, None, None, running_mean=rm, running_var=rv, training=training)
    return dict(dy=randn(rng, (4, 3, 5)), x=x, mean=out.mean, rstd=out.rstd,
                weight=randn(rng, 3, loc=1.0), kw=dict(training=training, channel_axis=1))


_bset = setter(kw_keys=("training", "channel_axis"))


INB = r"instance_norm_backward"
BACKWARD_ERRORS = [
    ("x_int", True, _bset("x", lambda a: a["x"].astype(np.int16)), TypeError, INB + r".*dtype"),
    ("dy_bool", True, _bset("dy", lambda a: a["dy"] > 0), TypeError, INB + r".*dtype"),
    ("dy_shape", True, _bset("dy", lambda a: a["dy"][:3]), ValueError, INB + r".*\bdy\b"),
    ("mean_shape", True, _bset("mean", lambda a: a["mean"][:, :2]), ValueError,
     INB + r".*\bmean\b"),
    ("rstd_shape", True, _bset("rstd", lambda a: a["rstd"][0]), ValueError,
     INB + r".*\brstd\b"),
    ("eval_stats_per_instance", False,
     many(_bset("mean", lambda a: np.zeros((4, 3), np.float32)),
           _bset("rstd", lambda a: np.ones((4, 3), np.float32))), ValueError,
     INB + r".*\bmean\b"),
    ("training_stats_per_channel", False, _bset("training", True), ValueError,
     INB + r".*\bmean\b"),
    ("weight_shape", True, _bset("weight", lambda a: np.ones(5, np.float32)), ValueError,
     INB + r".*weight"),
    ("channel_axis", True, _bset("channel_axis", 3), ValueError, INB + r".*channel_axis"),
]


@pytest.mark.parametrize("name,training,mutate,exc,match", BACKWARD_ERRORS,
                         ids=[e[0] for e in BACKWARD_ERRORS])
def test_backward_errors(name, training, mutate, exc, match, rng):
    a = _valid_backward(rng, training)
    mutate(a)
    assert_raises_nothing_written(exc, match, nk.instance_norm_backward, a["dy"], a["x"],
                                  a["mean"], a["rstd"], a["weight"], **a["kw"])


# ----------------------------------------------------------------------------
# threads: bitwise identical results whatever the thread count
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,channel_axis", [("float32", 1), ("float32", -1),
                                               ("float64", -1)])
def test_bitwise_identical_across_thread_counts(name, channel_axis, restore_num_threads):
    rng = np.random.default_rng(77)
    dt = get_dtype(name)
    sd = stats_dtype(dt)
    shape = layout((16, 32, 40, 40), channel_axis)
    x = randn(rng, shape, dt, loc=1.0, scale=2.0)
    dy = randn(rng, shape, dt)
    w, b = make_params(rng, 32, "weight+bias", sd)

    def compute():
        rm, rv = np.zeros(32, sd), np.ones(32, sd)
        out = nk.instance_norm(x, w, b, running_mean=rm, running_var=rv, channel_axis=channel_axis)
        g = nk.instance_norm_backward(dy, x, out.mean, out.rstd, w, channel_axis=channel_axis)
        ev = nk.instance_norm(x, w, b, running_mean=rm, running_var=rv, training=False, channel_axis=channel_axis)
        return out.y, out.mean, out.rstd, rm, rv, g.dx, g.dweight, g.dbias, ev.y

    first = assert_same_across_thread_counts(
        compute, ["y", "mean", "rstd", "running_mean", "running_var", "dx", "dweight", "dbias",
                  "y (eval)"])
    r = ref.instance_norm(x, w, b, np.zeros(32), np.ones(32), channel_axis=channel_axis)
    assert_close(first[0], r.y, what="y")
    assert_close(first[4], r.running_var, sd, what="running_var")
