"""Exact statistics: inputs whose mean and variance are exactly representable and whose every
partial sum is exact in any order (a +- d in a checkerboard of signs, power-of-two sizes, a and
d powers of two). Whatever pieces, chunks, lanes or threads the kernels use, they must return
mean == a, rstd == 1/d and y == +-1 exactly (eps = 0)."""

from __future__ import annotations

import numpy as np
import pytest

nk = pytest.importorskip("normkit")

DTYPES = [np.float32, np.float64, np.float16]


def _checkerboard(shape, a, d, dtype):
    idx = np.indices(shape).sum(axis=0)
    s = np.where(idx % 2 == 0, 1.0, -1.0)
    return (a + d * s).astype(dtype), s


def _params(dtype):
    # half: spacing at 16 is 2**-6, so 16 +- 0.25 is exact; wider types use a larger mean
    return (16.0, 0.25) if dtype == np.float16 else (1024.0, 0.25)


def _check(out, s, a, d, stat_shape):
    assert out.mean is None or np.all(out.mean == a), out.mean
    assert out.rstd.shape == stat_shape and np.all(out.rstd == 1.0 / d), out.rstd
    assert np.array_equal(out.y.astype(np.float64), s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_layer_norm_exact(dtype, threads, restore_threads):
    nk.set_num_threads(threads)
    a, d = _params(dtype)
    for shape in [(16, 128), (4, 8, 64), (1024, 64)]:
        x, s = _checkerboard(shape, a, d, dtype)
        _check(nk.layer_norm(x, shape[-1], eps=0.0), s, a, d, shape[:-1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_exact(dtype, restore_threads):
    c = 4.0
    x, s = _checkerboard((32, 256), 0.0, c, dtype)
    out = nk.rms_norm(x, 256, eps=0.0)
    assert np.all(out.rstd == 1.0 / c)
    assert np.array_equal(out.y.astype(np.float64), s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shape,ca",
    [
        ((8, 16, 8, 8), 1),        # planes of 64: channel-major planes
        ((16, 8, 4, 4), 1),        # planes of 16: per-column row chunks
        ((8, 8, 8, 16), -1),       # channels-last
        ((256, 32), 1),            # BatchNorm1d
        ((64, 4, 32, 32), 1),      # planes of 1024
        ((64, 8, 8, 16), 1),       # short planes, many samples
    ],
)
def test_batch_norm_exact(dtype, threads, shape, ca, restore_threads):
    nk.set_num_threads(threads)
    a, d = _params(dtype)
    x, s = _checkerboard(shape, a, d, dtype)
    _check(nk.batch_norm(x, eps=0.0, channel_axis=ca), s, a, d, (shape[ca],))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,ca", [((4, 16, 8, 8), 1), ((4, 8, 8, 16), -1), ((8, 32, 4), 1)])
def test_group_and_instance_norm_exact(dtype, shape, ca, restore_threads):
    a, d = _params(dtype)
    x, s = _checkerboard(shape, a, d, dtype)
    C = shape[ca]
    _check(nk.group_norm(x, 4, eps=0.0, channel_axis=ca), s, a, d, (shape[0], 4))
    _check(nk.instance_norm(x, eps=0.0, channel_axis=ca), s, a, d, (shape[0], C))


@pytest.fixture
def restore_threads():
    n = nk.get_num_threads()
    yield
    nk.set_num_threads(n)
