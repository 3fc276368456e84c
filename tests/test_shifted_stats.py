"""Statistics of float32/float16/bfloat16 data come from sums shifted by one of the data's own
values (cpu/lanes.h). Their weak spot is a shift far from the mean: the first element of a group
(which the kernels use as the shift) an extreme outlier, in long groups. Here that case is built
on purpose, for every traversal (rows, planes, short planes, channels-last columns, long rows
split into pieces), and mean and rstd must still match the float64 reference to the rounding of
their float32 results.
"""

import numpy as np
import pytest

import normkit as nk
import reference as ref

OUTLIER = 3.0e4


def _with_outliers(rng, shape, positions):
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(0.01) + np.float32(1.0)
    for p in positions:
        x[p] = np.float32(OUTLIER)
    return x


def _close(got, want, what):
    # float32 results of float64 statistics: a few ulp
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=4e-7, atol=0, err_msg=what)


@pytest.mark.parametrize("N", [1000, 4096, 4097, 3 * 4096 + 5, 50_000])
def test_layer_norm_rows(N, rng):
    x = _with_outliers(rng, (3, N), [(0, 0), (1, 0), (1, N // 2)])
    out = nk.layer_norm(x, N)
    r = ref.layer_norm(x, N)
    _close(out.mean, r.mean, "mean")
    _close(out.rstd, r.rstd, "rstd")


@pytest.mark.parametrize(
    "shape, channel_axis",
    [
        ((16, 3, 3136), 1),   # planes
        ((64, 3, 49), 1),     # short planes (sample-major)
        ((300, 3, 7), 1),     # planes of 7: rows traversal
        ((9000, 3), 1),       # BatchNorm1d: one column per channel, chunks of rows
        ((16, 900, 3), -1),   # channels-last
        ((2, 3, 600, 600), 1),  # a channel larger than one two-pass group: pieces
    ],
)
def test_batch_norm(shape, channel_axis, rng):
    first = (0,) * len(shape)
    x = _with_outliers(rng, shape, [first])
    out = nk.batch_norm(x, channel_axis=channel_axis)
    r = ref.batch_norm(x, channel_axis=channel_axis)
    _close(out.mean, r.mean, "mean")
    _close(out.rstd, r.rstd, "rstd")


def test_group_norm(rng):
    x = _with_outliers(rng, (2, 8, 64, 64), [(0, 0, 0, 0), (1, 2, 0, 0)])
    out = nk.group_norm(x, 4)
    r = ref.group_norm(x, 4)
    _close(out.mean, r.mean, "mean")
    _close(out.rstd, r.rstd, "rstd")


def test_constant_groups_stay_exact():
    # shifted by one of their own values, constant groups give d = 0: y = bias exactly
    x = np.full((4, 5000), 12345.678, np.float32)
    b = np.linspace(-1, 1, 5000).astype(np.float32)
    w = np.full(5000, 3.0, np.float32)
    y = nk.layer_norm(x, 5000, w, b).y
    np.testing.assert_array_equal(y, np.broadcast_to(b, y.shape))
    xb = np.full((8, 3, 40, 40), -7.25, np.float32)
    yb = nk.batch_norm(xb, np.ones(3, np.float32), np.arange(3, dtype=np.float32)).y
    np.testing.assert_array_equal(yb, np.broadcast_to(np.arange(3, dtype=np.float32)[:, None, None], yb.shape))
