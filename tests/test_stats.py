"""SPEC section 6: Moments, BatchNorm.recompute_statistics, BatchNorm.as_affine and
fold_batch_norm, each against a direct float64 NumPy computation (np.mean / np.var of the
concatenated data, explicit batch loops, explicit dense and convolution layers)."""

from __future__ import annotations

import itertools
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
