"""The shared host+device math of csrc/core, exercised on the CPU through _core's test hooks:
16-bit conversions against NumPy / ml_dtypes, and Welford/Chan merges against exact values."""

import numpy as np
import pytest

from normkit import _core


def _interesting_floats():
    rng = np.random.default_rng(0)
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    halves = halves[np.isfinite(halves)]
    # every half, its float neighbours, and the midpoints between consecutive halves (ties)
    up = np.nextafter(halves, np.float32(np.inf))
    down = np.nextafter(halves, np.float32(-np.inf))
    sorted_h = np.unique(halves.astype(np.float64))
    mids = ((sorted_h[1:] + sorted_h[:-1]) / 2).astype(np.float32)
    wide = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-12, 7, 200_000)).astype(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, 1e-8, 6e-8, 3e38, -3e38], np.float32)
    return np.concatenate([halves, up, down, mids, wide.astype(np.float32), special])


def test_float_to_half_matches_numpy_everywhere():
    v = _interesting_floats()
    got = _core._float_to_half(v)
    with np.errstate(over="ignore"):
        want = v.astype(np.float16).view(np.uint16)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"first mismatches at {v[bad[:5]]}: {got[bad[:5]]} vs {want[bad[:5]]}"


def test_half_to_float_is_exact_for_every_half():
    bits = np.arange(1 << 16, dtype=np.uint16)
    got = _core._half_to_float(bits)
    want = bits.view(np.float16).astype(np.float32)
    finite = np.isfinite(want)
    assert np.array_equal(got[finite], want[finite])
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(np.isinf(got) & (got > 0), np.isinf(want) & (want > 0))


def test_float_to_half_nan_stays_nan():
    v = np.array([np.nan, -np.nan], np.float32)
    assert np.isnan(_core._float_to_half(v).view(np.float16)).all()


def test_float_to_bfloat16_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    v = _interesting_floats()
    got = _core._float_to_bfloat16(v)
    with np.errstate(over="ignore"):
        want = v.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("cuts", [[], [1], [3, 4, 900], list(range(1, 1000, 7))])
def test_chan_merge_equals_direct_moments(cuts):
    rng = np.random.default_rng(1)
    v = 1e6 + rng.standard_normal(1000)
    count, mean, var = _core._moments_by_pieces(v, cuts)
    assert count == v.size
    ref_mean = v.mean()
    ref_var = ((v - ref_mean) ** 2).mean()
    assert abs(mean - ref_mean) <= 1e-9 * abs(ref_mean)
    assert abs(var - ref_var) <= 1e-7 * ref_var


def test_chan_merge_exact_on_representable_data():
    # Pieces of (1, 2, 3, 4): Welford's pushes are exact within a piece (means 1, 1.5, 2, 2.5),
    # and merging pieces with equal moments must add nothing but exact terms.
    v = np.tile(np.array([1.0, 2.0, 3.0, 4.0]), 256)
    count, mean, var = _core._moments_by_pieces(v, list(range(4, 1024, 4)))
    assert (count, mean, var) == (1024, 2.5, 1.25)
    # pieces of different lengths: merges with unequal weights, within a few ulps
    count, mean, var = _core._moments_by_pieces(v, [4, 12, 400])
    assert count == 1024 and abs(mean - 2.5) <= 1e-14 and abs(var - 1.25) <= 1e-14
