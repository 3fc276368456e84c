"""SPEC section 6: Moments, BatchNorm.recompute_statistics, BatchNorm.as_affine and
fold_batch_norm, each against a direct float64 NumPy computation (np.mean / np.var of the
concatenated data, explicit batch loops, explicit dense and convolution layers)."""

from __future__ import annotations

import itertools
import os
import pickle

import numpy as np
import pytest

nk = pytest.importorskip("normkit")

# Two-pass float64 statistics of O(1) data agree with NumPy's to round-off; merges add a few
# roundings per level.
RTOL = 1e-12
ATOL = 1e-13


def rng_for(*key):
    return np.random.default_rng([7, *key])


def close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# Moments


def test_defaults_and_empty():
    m = nk.Moments()
    assert m.feature_shape == () and m.dtype == np.float64 and m.count == 0
    assert np.isnan(m.mean) and np.isnan(m.var()) and np.isnan(m.std(ddof=1))
    m = nk.Moments(5)
    assert m.feature_shape == (5,)
    assert m.mean.shape == (5,) and np.isnan(m.mean).all()


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize(
    "shape,axis",
    [((50,), 0), ((40, 3), 0), ((6, 4, 5), (0, 2)), ((6, 5, 4), (0, 1)), ((3, 4, 5, 2), (0, 2, 3)),
     ((7, 3), -2), ((2, 3, 4), (2, 0)), ((30,), None), ((2, 3, 4), None)],
)
def test_update_matches_numpy(dtype, shape, axis):
    x = (rng_for(1, len(shape)).standard_normal(shape) * 3 + 1).astype(dtype)
    ax = tuple(range(len(shape))) if axis is None else axis
    ax = tuple(a % len(shape) for a in np.atleast_1d(ax))
    kept = tuple(s for i, s in enumerate(shape) if i not in ax)
    m = nk.Moments(kept).update(x, axis=axis)
    x64 = x.astype(np.float64)
    assert m.count == x.size // max(1, int(np.prod(kept)))
    close(m.mean, x64.mean(axis=ax))
    for ddof in (0, 1, 2.5):
        close(m.var(ddof=ddof), x64.var(axis=ax, ddof=ddof))
        close(m.std(ddof=ddof), x64.std(axis=ax, ddof=ddof))


def test_update_bfloat16_accumulates_in_float64():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = (rng_for(1, 9).standard_normal((300, 2)) + 50).astype(ml_dtypes.bfloat16)
    m = nk.Moments((2,)).update(x)
    x64 = x.astype(np.float64)  # the rounded values, exactly
    close(m.mean, x64.mean(0))
    close(m.var(), x64.var(0), rtol=1e-11)


def test_update_returns_self_and_streams_like_concatenation():
    rng = rng_for(2)
    parts = [rng.standard_normal((n, 4, 3)) for n in (1, 7, 30, 2, 0, 11)]
    m = nk.Moments((4,))
    for p in parts:
        assert m.update(p, axis=(0, 2)) is m
    allx = np.concatenate(parts)
    assert m.count == allx.shape[0] * 3
    close(m.mean, allx.mean(axis=(0, 2)))
    close(m.var(1), allx.var(axis=(0, 2), ddof=1))


def test_empty_update_changes_nothing():
    m = nk.Moments((3,)).update(np.arange(12.0).reshape(4, 3))
    before = m.state_dict()
    m.update(np.empty((0, 3)))
    m.update(np.empty((2, 0, 3)), axis=(0, 1))
    after = m.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_empty_features():
    m = nk.Moments((0,)).update(np.empty((5, 0)))
    assert m.count == 5 and m.mean.shape == (0,) and m.var().shape == (0,)


def test_blocked_update_matches_numpy(monkeypatch):
    # Force many blocks per update: the two passes are then done block by block.
    import normkit.stats as st

    monkeypatch.setattr(st, "_BLOCK_ELEMENTS", 16)
    x = rng_for(3).standard_normal((101, 5)) * 2 - 7
    m = nk.Moments((5,)).update(x)
    close(m.mean, x.mean(0))
    close(m.var(), x.var(0))


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_merge_orders(order):
    rng = rng_for(4)
    parts = [rng.standard_normal((n, 3)) * (i + 1) + 10 * i for i, n in enumerate((5, 1, 40, 9))]
    ms = [nk.Moments((3,)).update(p) for p in parts]
    acc = nk.Moments((3,))
    for i in order:
        acc.merge(ms[i])
    allx = np.concatenate(parts)
    assert acc.count == len(allx)
    close(acc.mean, allx.mean(0))
    close(acc.var(1), allx.var(0, ddof=1))


def test_merge_tree_plus_and_sum():
    rng = rng_for(5)
    parts = [rng.standard_normal((n, 2)) for n in (3, 4, 5, 6)]
    ms = [nk.Moments((2,)).update(p) for p in parts]
    tree = (ms[0] + ms[1]) + (ms[2] + ms[3])
    total = sum(ms)
    allx = np.concatenate(parts)
    for m in (tree, total):
        assert isinstance(m, nk.Moments) and m.count == len(allx)
        close(m.mean, allx.mean(0))
        close(m.var(), allx.var(0))
    # + makes a new object and leaves its operands alone
    assert ms[0].count == 3 and tree is not ms[0]
    close(ms[0].mean, parts[0].mean(0))


def test_merge_with_empty_either_side():
    x = rng_for(6).standard_normal((9, 2))
    a = nk.Moments((2,)).update(x)
    e = nk.Moments((2,))
    assert a.merge(e) is a and a.count == 9
    e.merge(a)
    close(e.mean, x.mean(0))
    close(e.var(), x.var(0))
    # the merged-into copy is independent of its source
    a.update(x)
    assert e.count == 9


def test_large_mean_small_spread():
    # float32 data 1000 + 0.01 * randn: E[x^2] - E[x]^2 in float64 would lose ~6 of the ~16 digits
    # of the variance; in float32 it would give garbage. Compare with float64 two-pass NumPy.
    rng = rng_for(7)
    parts = [(1000 + 0.01 * rng.standard_normal((n, 4))).astype(np.float32) for n in (500, 1, 2000)]
    m = nk.Moments((4,), dtype=np.float32)
    for p in parts:
        m.update(p)
    allx = np.concatenate(parts).astype(np.float64)
    assert m.mean.dtype == np.float32 and m.var().dtype == np.float32
    ref_var = allx.var(0)
    state = m.state_dict()  # the float64 state, not rounded to float32
    close(state["mean"], allx.mean(0), rtol=1e-14)
    close(state["m2"] / m.count, ref_var, rtol=1e-9)
    close(m.var(), ref_var, rtol=1e-6)


def test_large_offset_merge():
    # two shards with very different means and tiny spreads
    a = 1e8 + rng_for(8).standard_normal((100, 2)) * 1e-3
    b = -1e8 + rng_for(9).standard_normal((50, 2)) * 1e-3
    m = nk.Moments((2,)).update(a) + nk.Moments((2,)).update(b)
    allx = np.concatenate([a, b])
    close(m.mean, allx.mean(0), rtol=1e-9, atol=1e-6)
    close(m.var(), allx.var(0), rtol=1e-12)


def test_nan_confined_to_its_feature():
    x = rng_for(10).standard_normal((20, 3))
    x[4, 1] = np.nan
    m = nk.Moments((3,)).update(x)
    assert np.isnan(m.mean[1]) and np.isnan(m.var()[1])
    close(m.mean[[0, 2]], x[:, [0, 2]].mean(0))
    close(m.var()[[0, 2]], x[:, [0, 2]].var(0))


def test_ddof_at_or_above_count_is_nan():
    m = nk.Moments().update(np.array([2.0, 4.0]))
    assert m.var(ddof=1) == 2.0
    assert np.isnan(m.var(ddof=2)) and np.isnan(m.std(ddof=3))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_state_dict_round_trip(dtype):
    x = rng_for(11).standard_normal((13, 2, 3))
    m = nk.Moments((2, 3), dtype=dtype).update(x)
    d = m.state_dict()
    assert set(d) == {"count", "mean", "m2", "dtype"}
    assert all(isinstance(v, np.ndarray) for v in d.values())
    assert d["count"].dtype == np.int64 and d["mean"].dtype == np.float64
    m2 = nk.Moments.from_state_dict(d)
    assert m2.feature_shape == (2, 3) and m2.dtype == np.dtype(dtype) and m2.count == 13
    np.testing.assert_array_equal(m2.mean, m.mean)
    np.testing.assert_array_equal(m2.var(1), m.var(1))
    # copies, both ways
    d["mean"][...] = 0
    np.testing.assert_array_equal(m2.mean, m.mean)
    # pickles, continues streaming
    m3 = pickle.loads(pickle.dumps(m2))
    m3.update(x)
    allx = np.concatenate([x, x])
    s3 = m3.state_dict()  # float64 state (mean/var are rounded to float32 for that dtype)
    close(s3["mean"], allx.mean(0))
    close(s3["m2"] / m3.count, allx.var(0))


def test_from_state_dict_without_dtype_is_float64():
    d = nk.Moments((2,)).update(np.ones((3, 2))).state_dict()
    del d["dtype"]
    assert nk.Moments.from_state_dict(d).dtype == np.float64


def test_repr():
    assert repr(nk.Moments((2,))) == "Moments(feature_shape=(2,), dtype=float64, count=0)"


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: nk.Moments((2,)).update(np.ones((3, 3))), ValueError, r"keeps shape \(3,\).*feature_shape is \(2,\)"),
        (lambda: nk.Moments((2,)).update(np.ones((3, 2)), axis=2), ValueError, r"axis 2 is out of range.*\(3, 2\)"),
        (lambda: nk.Moments((2,)).update(np.ones((3, 2, 2)), axis=(0, -3)), ValueError, "repeats axis 0"),
        (lambda: nk.Moments((2,)).update(np.ones((3, 2)), axis=0.5), TypeError, "axis must be"),
        (lambda: nk.Moments((2,)).update(np.ones((3, 2), np.int64)), TypeError, "unsupported dtype int64"),
        (lambda: nk.Moments((2,)).update(np.ones((3, 2), bool)), TypeError, "unsupported dtype bool"),
        (lambda: nk.Moments((2,)).update(np.ones((3, 2), complex)), TypeError, "unsupported dtype complex128"),
        (lambda: nk.Moments((2,)).merge(nk.Moments((3,))), ValueError, r"feature_shape \(3,\).*\(2,\)"),
        (lambda: nk.Moments((2,)).merge(np.ones(2)), TypeError, "must be a Moments"),
        (lambda: nk.Moments((2,)) + 1, TypeError, "unsupported operand"),
        (lambda: nk.Moments((2,)).var(ddof=-1), ValueError, "ddof must be >= 0"),
        (lambda: nk.Moments((2,)).std(ddof="1"), TypeError, "ddof must be a real number"),
        (lambda: nk.Moments((2,), dtype=np.int32), TypeError, "dtype must be a float dtype"),
        (lambda: nk.Moments((-1,)), ValueError, "negative"),
        (lambda: nk.Moments("ab"), TypeError, "feature_shape must be"),
        (lambda: nk.Moments.from_state_dict({"count": np.array(1)}), KeyError, "missing keys"),
        (lambda: nk.Moments.from_state_dict({"count": np.array(1.0), "mean": np.zeros(2), "m2": np.zeros(2)}),
         TypeError, "count must be an integer scalar"),
        (lambda: nk.Moments.from_state_dict({"count": np.array(-1), "mean": np.zeros(2), "m2": np.zeros(2)}),
         ValueError, "count must be >= 0"),
        (lambda: nk.Moments.from_state_dict({"count": np.array(1), "mean": np.zeros(2), "m2": np.zeros(3)}),
         ValueError, r"mean has shape \(2,\) but m2 has shape \(3,\)"),
    ],
)
def test_moments_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_failed_update_changes_nothing():
    m = nk.Moments((2,)).update(np.ones((3, 2)))
    with pytest.raises(ValueError):
        m.update(np.ones((3, 5)))
    assert m.count == 3


# ----------------------------------------------------------------------------------------------
# BatchNorm.recompute_statistics


def channel_last(x):
    """(N, C, *spatial) -> (N, *spatial, C)."""
    return np.moveaxis(x, 1, -1)


def bn_batches(sizes, C=3, spatial=(2, 3), seed=12, offset=5.0):
    rng = rng_for(seed)
    spread = np.arange(1, C + 1).reshape((C,) + (1,) * len(spatial))
    return [rng.standard_normal((n, C, *spatial)) * spread + offset for n in sizes]


def reduce_axes(x):
    return (0, *range(2, x.ndim))


def stats_state(bn):
    return bn.running_mean.copy(), bn.running_var.copy(), bn.num_batches_tracked


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_recompute_population(channel_axis, dtype):
    batches = bn_batches((4, 1, 7, 3))
    bn = nk.BatchNorm(3, dtype=dtype, channel_axis=channel_axis)
    bn.num_batches_tracked = 17
    feed = [b.astype(np.float32) if dtype == np.float32 else b for b in batches]
    if channel_axis == -1:
        feed = [channel_last(b) for b in feed]
    bn.recompute_statistics(feed, method="population")
    ref = np.concatenate(feed).astype(np.float64)
    ax = tuple(a for a in range(ref.ndim) if a != channel_axis % ref.ndim)
    rtol = RTOL if dtype == np.float64 else 1e-6
    close(bn.running_mean, ref.mean(axis=ax), rtol=rtol)
    close(bn.running_var, ref.var(axis=ax, ddof=1), rtol=rtol)
    assert bn.running_mean.dtype == dtype and bn.running_var.dtype == dtype
    assert bn.num_batches_tracked == 17 and bn.training
    # population is the default method
    bn2 = nk.BatchNorm(3, dtype=dtype, channel_axis=channel_axis)
    bn2.recompute_statistics(iter(feed))
    np.testing.assert_array_equal(bn2.running_var, bn.running_var)


def test_recompute_paper_equal_batches():
    m_batches = bn_batches((5, 5, 5, 5), seed=13)
    bn = nk.BatchNorm(3, dtype=np.float64)
    bn.recompute_statistics(m_batches, method="paper")
    m = 5 * 2 * 3  # values per channel per batch
    means = [b.mean(axis=(0, 2, 3)) for b in m_batches]
    biased = [b.var(axis=(0, 2, 3)) for b in m_batches]
    close(bn.running_mean, np.mean(means, axis=0))
    close(bn.running_var, m / (m - 1) * np.mean(biased, axis=0))
    # Algorithm 2 is not the population variance (it leaves out the spread of the batch means)
    allx = np.concatenate(m_batches)
    assert not np.allclose(bn.running_var, allx.var(axis=(0, 2, 3), ddof=1), rtol=1e-6)


def test_recompute_paper_unequal_batches_and_empty_skipped():
    batches = bn_batches((2, 6, 0, 3), spatial=(4,), seed=14)
    bn = nk.BatchNorm(3, dtype=np.float64)
    bn.recompute_statistics((b for b in batches), method="paper")
    used = [b for b in batches if b.shape[0]]
    close(bn.running_mean, np.mean([b.mean(axis=(0, 2)) for b in used], axis=0))
    close(bn.running_var, np.mean([b.var(axis=(0, 2), ddof=1) for b in used], axis=0))


def test_recompute_population_2d_and_large_mean():
    rng = rng_for(15)
    batches = [(1000 + 0.01 * rng.standard_normal((n, 4))).astype(np.float32) for n in (60, 60, 17)]
    bn = nk.BatchNorm(4, dtype=np.float64)
    bn.recompute_statistics(batches)
    ref = np.concatenate(batches).astype(np.float64)
    close(bn.running_mean, ref.mean(0), rtol=1e-14)
    close(bn.running_var, ref.var(0, ddof=1), rtol=1e-9)


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_eval_after_recompute_uses_the_new_statistics(channel_axis):
    batches = bn_batches((3, 4), seed=16)
    if channel_axis == -1:
        batches = [channel_last(b) for b in batches]
    bn = nk.BatchNorm(3, dtype=np.float64, channel_axis=channel_axis)
    bn.weight[:] = [1.5, -0.5, 2.0]
    bn.bias[:] = [0.1, 0.2, -0.3]
    bn.recompute_statistics(batches)
    bn.eval()
    x = batches[0]
    shape = [1] * x.ndim
    shape[channel_axis] = 3
    allx = np.concatenate(batches)
    ax = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
    mean, var = allx.mean(axis=ax), allx.var(axis=ax, ddof=1)
    expect = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + bn.eps) * bn.weight.reshape(shape) \
        + bn.bias.reshape(shape)
    close(bn(x), expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kw,batches,exc,match",
    [
        ({"method": "median"}, [np.ones((2, 3))], ValueError, "method must be 'population' or 'paper'"),
        ({}, np.ones((4, 3)), TypeError, r"iterable of arrays.*\(4, 3\).*\[x\]"),
        ({}, 3, TypeError, "iterable of arrays, got int"),
        ({}, [np.ones((4, 3)), np.ones((4, 3), np.int32)], TypeError, "batch 1 has unsupported dtype int32"),
        ({}, [np.ones((4, 3)), np.ones((4, 5))], ValueError, r"batch 1 has shape \(4, 5\) with 5 channels.*has 3"),
        ({}, [np.ones(3)], ValueError, r"batch 0 must have at least 2 dimensions, got shape \(3,\)"),
        ({}, [], ValueError, "held no values"),
        ({}, [np.ones((0, 3))], ValueError, "held no values"),
        ({}, [np.ones((1, 3))], ValueError, "1 value per channel"),
        ({"method": "paper"}, [np.ones((4, 3)), np.ones((1, 3))], ValueError,
         r"batch 1 of shape \(1, 3\) has 1 value per channel"),
    ],
)
def test_recompute_errors_leave_statistics_untouched(kw, batches, exc, match):
    bn = nk.BatchNorm(3, dtype=np.float64)
    bn.running_mean[:] = [1, 2, 3]
    bn.running_var[:] = [4, 5, 6]
    before = stats_state(bn)
    with pytest.raises(exc, match=match):
        bn.recompute_statistics(batches, **kw)
    after = stats_state(bn)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


def test_recompute_needs_running_statistics():
    bn = nk.BatchNorm(3, track_running_stats=False)
    with pytest.raises(ValueError, match="recompute_statistics: this BatchNorm has track_running_stats=False"):
        bn.recompute_statistics([np.ones((2, 3))])


def test_recompute_does_not_modify_batches():
    batches = bn_batches((3, 2), seed=17)
    copies = [b.copy() for b in batches]
    nk.BatchNorm(3, dtype=np.float64).recompute_statistics(batches, method="paper")
    for b, c in zip(batches, copies):
        np.testing.assert_array_equal(b, c)


# ----------------------------------------------------------------------------------------------
# BatchNorm.as_affine


def random_bn(C, dtype=np.float64, channel_axis=1, affine=True, seed=18):
    rng = rng_for(seed)
    bn = nk.BatchNorm(C, dtype=dtype, channel_axis=channel_axis, affine=affine)
    bn.running_mean[:] = rng.standard_normal(C) * 2
    bn.running_var[:] = rng.uniform(0.1, 3.0, C)
    if affine:
        bn.weight[:] = rng.standard_normal(C)
        bn.bias[:] = rng.standard_normal(C)
    return bn.eval()


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("affine", [True, False])
def test_as_affine_reproduces_eval_forward(channel_axis, affine):
    bn = random_bn(4, channel_axis=channel_axis, affine=affine)
    scale, shift = bn.as_affine()
    w = bn.weight if affine else 1.0
    b = bn.bias if affine else 0.0
    exp_scale = w / np.sqrt(bn.running_var + bn.eps)
    close(scale, exp_scale * np.ones(4))
    close(shift, b - bn.running_mean * exp_scale)
    x = rng_for(19).standard_normal((5, 4, 3) if channel_axis == 1 else (5, 3, 4))
    shape = [1] * 3
    shape[channel_axis] = 4
    close(scale.reshape(shape) * x + shift.reshape(shape), bn(x), rtol=1e-12, atol=1e-12)


def test_as_affine_float32_and_mode_independent():
    bn = random_bn(3, dtype=np.float32)
    scale, shift = bn.as_affine()
    assert scale.dtype == np.float32 and shift.dtype == np.float32
    bn.train()
    s2, h2 = bn.as_affine()
    np.testing.assert_array_equal(scale, s2)
    np.testing.assert_array_equal(shift, h2)
    bn.eval()
    x = rng_for(20).standard_normal((6, 3)).astype(np.float32)
    close(scale * x + shift, bn(x), rtol=1e-5, atol=1e-5)


def test_as_affine_errors():
    with pytest.raises(ValueError, match="as_affine: this BatchNorm has track_running_stats=False"):
        nk.BatchNorm(3, track_running_stats=False).as_affine()
    bn = random_bn(3)
    bn.running_var[1] = -1
    with pytest.raises(ValueError, match="as_affine: running_var has negative entries"):
        bn.as_affine()


# ----------------------------------------------------------------------------------------------
# fold_batch_norm


def dense(x, weight, bias, out_axis):
    w = weight if out_axis == 0 else weight.T  # (out, in)
    z = x @ w.T
    return z if bias is None else z + bias


def conv(x, weight, bias):
    """Direct 'valid' cross-correlation, x (N, Cin, *spatial), weight (Cout, Cin, *k)."""
    k = weight.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, k, axis=tuple(range(2, x.ndim)))
    # win: (N, Cin, *out_spatial, *k)
    nd = len(k)
    letters = "defgh"[:nd]
    kl = "uvw"[:nd]
    z = np.einsum(f"nc{letters}{kl},oc{kl}->no{letters}", win, weight)
    if bias is not None:
        z = z + bias.reshape((1, -1) + (1,) * nd)
    return z


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("out_axis", [0, 1, -1])
def test_fold_dense(with_bias, out_axis):
    rng = rng_for(21)
    W = rng.standard_normal((5, 7))  # (out, in)
    if out_axis != 0:
        W = np.ascontiguousarray(W.T)  # (in, out)
    b = rng.standard_normal(5) if with_bias else None
    bn = random_bn(5)
    W0, b0 = W.copy(), None if b is None else b.copy()
    W2, b2 = nk.fold_batch_norm(W, b, bn, out_axis=out_axis)
    assert W2.shape == W.shape and b2.shape == (5,)
    x = rng.standard_normal((9, 7))
    close(dense(x, W2, b2, out_axis % 2), bn(dense(x, W, b, out_axis % 2)), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(W, W0)
    if b is not None:
        np.testing.assert_array_equal(b, b0)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("kernel", [(3,), (2, 3)])
def test_fold_conv(with_bias, channel_axis, kernel):
    rng = rng_for(22, len(kernel))
    W = rng.standard_normal((4, 3, *kernel))
    b = rng.standard_normal(4) if with_bias else None
    x = rng.standard_normal((2, 3) + (6,) * len(kernel))
    bn = random_bn(4, channel_axis=channel_axis)
    W2, b2 = nk.fold_batch_norm(W, b, bn)
    z = conv(x, W, b)
    expect = bn(z if channel_axis == 1 else channel_last(z))
    got = conv(x, W2, b2)
    close(got if channel_axis == 1 else channel_last(got), expect, rtol=1e-12, atol=1e-12)


def test_fold_transposed_conv_layout():
    # (in, out, *k) with out_axis=1: every output channel's slice is scaled by its own factor
    rng = rng_for(23)
    W = rng.standard_normal((3, 4, 2, 2))
    bn = random_bn(4)
    W2, b2 = nk.fold_batch_norm(W, None, bn, out_axis=1)
    scale = bn.weight / np.sqrt(bn.running_var + bn.eps)
    close(W2, W * scale[None, :, None, None])
    close(b2, bn.bias - bn.running_mean * scale)


def test_fold_float32_affine_free_bn():
    rng = rng_for(24)
    W = rng.standard_normal((3, 4)).astype(np.float32)
    bn = random_bn(3, dtype=np.float32, affine=False)
    W2, b2 = nk.fold_batch_norm(W, None, bn)
    assert W2.dtype == np.float32 and b2.dtype == np.float32
    x = rng.standard_normal((5, 4)).astype(np.float32)
    close(dense(x, W2, b2, 0), bn(dense(x, W, None, 0)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "args,kw,exc,match",
    [
        ((np.ones((3, 4)), None, "bn"), {}, TypeError, "bn must be a normkit.BatchNorm, got str"),
        ((np.ones(3), None, None), {}, ValueError, r"dense \(out, in\) or convolution.*got shape \(3,\)"),
        ((np.ones((4, 4)), None, None), {}, ValueError, r"weight has shape \(4, 4\) with 4 outputs on out_axis=0.*num_features=3"),
        ((np.ones((3, 4)), None, None), {"out_axis": 2}, ValueError, r"out_axis 2 is out of range.*\(3, 4\)"),
        ((np.ones((3, 4)), None, None), {"out_axis": 1.0}, TypeError, "out_axis must be an int"),
        ((np.ones((3, 4)), np.ones(4), None), {}, ValueError, r"bias has shape \(4,\).*\(3,\) is required"),
        ((np.ones((3, 4), np.int64), None, None), {}, TypeError, "weight has unsupported dtype int64"),
        ((np.ones((3, 4)), np.ones(3, bool), None), {}, TypeError, "bias has unsupported dtype bool"),
    ],
)
def test_fold_errors(args, kw, exc, match):
    weight, bias, bn = args
    if bn is None:
        bn = random_bn(3)
    with pytest.raises(exc, match=match):
        nk.fold_batch_norm(weight, bias, bn, **kw)


def test_fold_needs_eval_mode_and_running_statistics():
    bn = random_bn(3).train()
    with pytest.raises(ValueError, match=r"fold_batch_norm: bn is in training mode.*bn.eval\(\)"):
        nk.fold_batch_norm(np.ones((3, 2)), None, bn)
    bn = nk.BatchNorm(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="fold_batch_norm: this BatchNorm has track_running_stats=False"):
        nk.fold_batch_norm(np.ones((3, 2)), None, bn)


# ----------------------------------------------------------------------------------------------
# _core.column_moments: the BatchNorm statistics kernel run for its float64 moments only (what
# normkit.sklearn's fit uses), against exact sums (math.fsum) of the float64 values


def _exact_moments(x64):
    import math

    n = x64.shape[0]
    mean = np.array([math.fsum(col) / n for col in x64.T])
    m2 = np.array([math.fsum((col - m) ** 2) for col, m in zip(x64.T, mean)])
    return mean, m2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 4), (5, 3), (20, 3), (300, 70), (5000, 2), (40, 3000)])
@pytest.mark.parametrize("order", ["C", "F"])
def test_column_moments_match_exact_sums(dtype, shape, order):
    from normkit import _core

    rng = rng_for(91, shape[0], shape[1])
    scale = np.logspace(-3, 3, shape[1])
    x = (1e4 + rng.standard_normal(shape) * scale).astype(dtype)
    x = np.asarray(x, order=order)
    before = x.copy()
    mean, m2 = (_core.column_moments(x, True) if order == "C"
                else _core.column_moments(x.T, False))
    np.testing.assert_array_equal(x, before)  # statistics only: nothing written
    assert mean.dtype == m2.dtype == np.float64 and mean.shape == m2.shape == (shape[1],)
    ref_mean, ref_m2 = _exact_moments(x.astype(np.float64))
    # the error bounds of recursive summation in float64 (gamma_n ~ n eps, Higham ch. 4) for the
    # mean, and for m2 that bound plus the cancellation of merging pieces whose means carry
    # round-off of |mean| (eps |mean| sqrt(n m2)); the float32 values are exact in float64
    n, eps = shape[0], np.finfo(np.float64).eps
    x64 = x.astype(np.float64)
    assert (np.abs(mean - ref_mean) <= 2 * n * eps * np.abs(x64).mean(axis=0)).all()
    bound = 8 * n * eps * ref_m2 + 4 * eps * np.abs(ref_mean) * np.sqrt(n * ref_m2)
    assert (np.abs(m2 - ref_m2) <= bound).all()


@pytest.mark.skipif(os.environ.get("NORMKIT_SANITIZER_RUN") == "1",
                    reason="a C++ exception aborts under the sanitizer tier's preloaded libasan "
                           "(tools/sanitize.sh); this test runs in the main tier")
def test_column_moments_rejects_what_it_cannot_read():
    from normkit import _core

    with pytest.raises(TypeError):
        _core.column_moments(np.ones((3, 2), np.int64), True)
    with pytest.raises(ValueError, match="2-D"):
        _core.column_moments(np.ones(3), True)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.column_moments(np.ones((4, 3))[::2], True)
    with pytest.raises(ValueError, match="no samples"):
        _core.column_moments(np.ones((0, 3)), True)
