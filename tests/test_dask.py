"""normkit.dask (SPEC section 7): moments, batch_norm and layer_norm of dask arrays.

Results are compared with the in-memory functions (``normkit.Moments``, ``normkit.batch_norm``,
``normkit.layer_norm``, each tested against the float64 reference elsewhere) and with plain
float64 NumPy, on dask's threaded scheduler and on a local cluster of two worker processes.
Chunkings split the batch, the channels and the normalized axes.

Skipped without dask, unless ``NORMKIT_REQUIRE_DASK=1`` (set by ``.ci/run``).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import normkit as nk
from conftest import AVAILABLE_DTYPES, randn

if os.environ.get("NORMKIT_REQUIRE_DASK") == "1":
    import dask  # noqa: F401  (an ImportError here fails the run, as it should in CI)
dask = pytest.importorskip("dask", reason="dask is not installed (pip install 'normkit[dask]')")
da = pytest.importorskip("dask.array")
nkd = pytest.importorskip("normkit.dask")

F64_TOL = 1e-12


def close(actual, expected, tol):
    a = np.asarray(actual).astype(np.float64)
    e = np.asarray(expected).astype(np.float64)
    assert a.shape == e.shape
    np.testing.assert_allclose(a, e, rtol=tol, atol=tol)


def half_tol(dt):
    """Two units in the last place of a 16-bit dtype, or the float32 table's 1e-5."""
    dt = np.dtype(dt)
    if dt.itemsize == 2:
        import ml_dtypes

        return 2 * float(ml_dtypes.finfo(dt).eps)
    return 1e-5 if dt == np.float32 else F64_TOL


@pytest.fixture(scope="module")
def cluster_client():
    """A local cluster of two single-threaded worker processes (started once for the module)."""
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    client = distributed.Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


# -- moments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, (0, 2), -1, (1, 3), None])
def test_moments_match_numpy_and_in_memory(rng, axis):
    x = randn(rng, (9, 5, 6, 4), np.float64, loc=1000.0, scale=0.01)  # large mean, small spread
    d = da.from_array(x, chunks=(2, 3, 4, 3))
    with dask.config.set(scheduler="threads"):
        m = nkd.moments(d, axis)
    assert isinstance(m, nk.Moments)
    expect = nk.Moments(m.feature_shape).update(x, axis=axis)
    assert m.count == expect.count == x.size // max(1, int(np.prod(m.feature_shape)))
    close(m.mean, expect.mean, F64_TOL)
    close(m.var(), expect.var(), 1e-9)  # var ~ 1e-4 holds ~1e-16 * 1000**2 of round-off
    close(m.mean, np.mean(x, axis=axis), F64_TOL)
    close(m.var(ddof=1), np.var(x, axis=axis, ddof=1), 1e-9)


def test_moments_accumulate_in_float64(rng):
    x = randn(rng, (64, 3), np.float32, loc=3.0)
    m = nkd.moments(da.from_array(x, chunks=(10, 2)), 0)
    x64 = x.astype(np.float64)
    close(m.mean, x64.mean(axis=0), F64_TOL)
    close(m.var(), x64.var(axis=0), F64_TOL)
    assert m.mean.dtype == np.float64


def test_moments_merge_with_more_data(rng):
    """The result is an ordinary Moments: it merges with in-memory statistics."""
    a, b = randn(rng, (20, 4), np.float64), randn(rng, (7, 4), np.float64, loc=2.0)
    m = nkd.moments(da.from_array(a, chunks=(6, 4)), 0) + nk.Moments((4,)).update(b, axis=0)
    close(m.var(), np.concatenate([a, b]).var(axis=0), F64_TOL)


def test_moments_errors():
    with pytest.raises(TypeError, match="moments: x has unsupported dtype int64"):
        nkd.moments(da.zeros((4, 3), dtype=np.int64, chunks=2), 0)
    with pytest.raises(ValueError, match="moments: axis 2 is out of range"):
        nkd.moments(da.zeros((4, 3), chunks=2), 2)


# -- batch_norm -------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", AVAILABLE_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_batch_norm_matches_in_memory(rng, dt, channel_axis):
    shape = (7, 5, 4, 3) if channel_axis == 1 else (7, 4, 3, 5)
    x = randn(rng, shape, dt, loc=0.5, scale=2.0)
    sd = np.float64 if dt == np.float64 else np.float32
    w, b = randn(rng, (5,), sd, loc=1.0), randn(rng, (5,), sd)
    d = da.from_array(x, chunks=(3, 2, 3, 2))  # splits the batch, the channels, the rest
    y = nkd.batch_norm(d, w, b, channel_axis=channel_axis)
    assert isinstance(y, da.Array) and y.dtype == x.dtype and y.chunks == d.chunks
    got = y.compute(scheduler="threads")
    close(got, nk.batch_norm(x, w, b, channel_axis=channel_axis).y, half_tol(dt))


def test_batch_norm_float64_reference_and_options(rng):
    x = randn(rng, (10, 3), np.float64, loc=1000.0, scale=0.01)
    d = da.from_array(x, chunks=(4, 2))
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=0), x64.var(axis=0)
    for w, b, eps in ((None, None, 1e-5), (np.full(3, 2.0), None, 0.1), (None, np.ones(3), 0.0)):
        y = nkd.batch_norm(d, w, b, eps=eps).compute(scheduler="threads")
        expect = (x64 - mean) / np.sqrt(var + eps) * (1 if w is None else w) + (0 if b is None else b)
        close(y, expect, 1e-9)  # float64 round-off in mean, times |mean| / spread = 1e5


def test_batch_norm_is_lazy():
    def boom():
        raise AssertionError("computed too early")

    lazy = da.from_delayed(dask.delayed(boom)(), shape=(6, 2), dtype=np.float64)
    y = nkd.batch_norm(lazy)  # builds the graph only
    with pytest.raises(AssertionError, match="computed too early"):
        y.compute(scheduler="threads")


def test_batch_norm_errors():
    d = da.zeros((4, 3, 2), chunks=2)
    with pytest.raises(ValueError, match="batch_norm: weight has shape \\(4,\\) but the number of channels is \\(3,\\)"):
        nkd.batch_norm(d, np.ones(4))
    with pytest.raises(ValueError, match="expected more than 1 value per channel when training"):
        nkd.batch_norm(da.zeros((1, 3), chunks=1))
    with pytest.raises(ValueError, match="batch_norm: empty reduction"):
        nkd.batch_norm(da.zeros((0, 3, 2), chunks=1))
    with pytest.raises(ValueError, match="channel_axis must be 1 or -1, got 2"):
        nkd.batch_norm(d, channel_axis=2)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        nkd.batch_norm(da.zeros(4, chunks=2))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        nkd.batch_norm(d, eps=-1.0)
    with pytest.raises(TypeError, match="batch_norm: x has unsupported dtype int32"):
        nkd.batch_norm(da.zeros((4, 3), dtype=np.int32, chunks=2))


# -- layer_norm -------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", AVAILABLE_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("chunks, rechunked", [((3, 2, 6), False), ((3, 2, 4), True)])
def test_layer_norm_matches_in_memory(rng, dt, chunks, rechunked):
    x = randn(rng, (7, 4, 6), dt, loc=0.3)
    sd = np.float64 if dt == np.float64 else np.float32
    w, b = randn(rng, (6,), sd, loc=1.0), randn(rng, (6,), sd)
    d = da.from_array(x, chunks=chunks)
    y = nkd.layer_norm(d, 6, w, b)
    assert isinstance(y, da.Array) and y.dtype == x.dtype
    assert (y.chunks != d.chunks) == rechunked  # rechunked only when the row was split
    close(y.compute(scheduler="threads"), nk.layer_norm(x, 6, w, b).y, half_tol(dt))


def test_layer_norm_several_axes_and_float64_reference(rng):
    x = randn(rng, (5, 4, 3, 2), np.float64, loc=2.0)
    d = da.from_array(x, chunks=(2, 3, 2, 1))
    y = nkd.layer_norm(d, (3, 2), eps=1e-3).compute(scheduler="threads")
    mean = x.mean(axis=(2, 3), keepdims=True)
    var = x.var(axis=(2, 3), keepdims=True)
    close(y, (x - mean) / np.sqrt(var + 1e-3), F64_TOL)


def test_layer_norm_errors():
    d = da.zeros((4, 6), chunks=2)
    with pytest.raises(ValueError, match="layer_norm: normalized_shape \\(5,\\) does not match"):
        nkd.layer_norm(d, 5)
    with pytest.raises(ValueError, match="layer_norm: weight has shape \\(5,\\) but normalized_shape is \\(6,\\)"):
        nkd.layer_norm(d, 6, np.ones(5))
    with pytest.raises(TypeError, match="normalized_shape must be an int or a sequence of ints"):
        nkd.layer_norm(d, "6")


# -- schedulers -------------------------------------------------------------------------------


def test_local_cluster_of_processes(rng, cluster_client):
    """The same graph on two worker processes gives the threaded scheduler's bits."""
    x = randn(rng, (12, 4, 5), np.float32, loc=0.5)
    d = da.from_array(x, chunks=(5, 3, 5))
    w = randn(rng, (4,), np.float32, loc=1.0)
    bn, ln = nkd.batch_norm(d, w), nkd.layer_norm(d, 5)
    bn_p, ln_p = cluster_client.compute([bn, ln], sync=True)
    bn_t, ln_t = dask.compute(bn, ln, scheduler="threads")
    np.testing.assert_array_equal(bn_p, bn_t)
    np.testing.assert_array_equal(ln_p, ln_t)
    close(bn_p, nk.batch_norm(x, w).y, 1e-5)
    close(ln_p, nk.layer_norm(x, 5).y, 1e-5)
    with dask.config.set(scheduler=cluster_client.get):
        m = nkd.moments(d, (0, 2))
    close(m.var(), x.astype(np.float64).var(axis=(0, 2)), F64_TOL)
