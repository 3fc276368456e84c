"""The bounded cache of large output buffers (normkit.set_buffer_cache_limit).

Outputs of 256 KiB or more that no ``out=`` receives come from a cache of freed buffers. These
tests check the promises users rely on: a reused buffer never changes a result (it is fully
overwritten, whatever it held), two live arrays never share memory, the limit bounds what is kept,
0 turns caching off, and bad limits raise.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import normkit as nk
from normkit import _core
import reference as ref

MiB = 1 << 20


@pytest.fixture
def cache_limit():
    old = nk.set_buffer_cache_limit(256 * MiB)
    yield
    nk.set_buffer_cache_limit(old)


def _x(seed, shape=(2048, 1024)):  # 8 MiB of float32: goes through the cache
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 3 + 1


def test_freed_output_is_reused_and_overwritten(cache_limit):
    x1, x2 = _x(0), _x(1)
    y1 = nk.layer_norm(x1, 1024).y
    addr = y1.__array_interface__["data"][0]
    y1.fill(np.nan)  # whatever the buffer held must not leak into the next result
    del y1
    before = nk.buffer_cache_info()["hits"]
    y2 = nk.layer_norm(x2, 1024).y
    assert nk.buffer_cache_info()["hits"] == before + 1
    assert y2.__array_interface__["data"][0] == addr  # the same memory, reused
    want = ref.layer_norm(x2, 1024)[0]
    np.testing.assert_allclose(y2, want, rtol=1e-5, atol=1e-5)


def test_backward_reuses_and_is_exact(cache_limit):
    x, dy = _x(2), _x(3)
    out = nk.layer_norm(x, 1024)
    g1 = nk.layer_norm_backward(dy, x, out.mean, out.rstd)
    first = g1.dx.copy()
    g1.dx.fill(np.inf)
    del g1
    g2 = nk.layer_norm_backward(dy, x, out.mean, out.rstd)
    np.testing.assert_array_equal(g2.dx, first)  # same bits from a reused, dirtied buffer
    want = ref.layer_norm_backward(dy, x, out.mean, out.rstd)[0]
    np.testing.assert_allclose(g2.dx, want, rtol=1e-4, atol=1e-4)


def test_live_outputs_never_share_memory(cache_limit):
    x = _x(4)
    ys = [nk.layer_norm(x, 1024).y for _ in range(4)]
    for i in range(len(ys)):
        for j in range(i):
            assert not np.shares_memory(ys[i], ys[j])
    np.testing.assert_array_equal(ys[0], ys[3])


def test_limit_bounds_the_cache():
    old = nk.set_buffer_cache_limit(10 * MiB)  # room for one 8 MiB buffer, not two
    try:
        x = _x(5)
        a, b = nk.layer_norm(x, 1024).y, nk.layer_norm(x, 1024).y
        del a, b
        info = nk.buffer_cache_info()
        assert info["cached_bytes"] <= 10 * MiB
        assert info["cached_buffers"] == 1
        assert nk.set_buffer_cache_limit(0) == 10 * MiB
        assert nk.buffer_cache_info()["cached_bytes"] == 0
        y = nk.layer_norm(x, 1024).y
        del y
        assert nk.buffer_cache_info()["cached_bytes"] == 0  # 0: nothing is kept
    finally:
        nk.set_buffer_cache_limit(old)


def test_small_outputs_bypass_the_cache(cache_limit):
    info = nk.buffer_cache_info()
    y = nk.layer_norm(_x(6, (64, 64)), 64).y
    del y
    after = nk.buffer_cache_info()
    assert (after["hits"], after["misses"]) == (info["hits"], info["misses"])


def test_outputs_larger_than_the_limit_come_from_numpy():
    """A buffer the cache would not keep is not taken from it: the output is an ordinary NumPy
    array (NumPy's allocator maps large arrays faster), correct, and the cache is not touched."""
    old = nk.set_buffer_cache_limit(4 * MiB)  # below the 8 MiB output
    try:
        assert _core.empty((2048, 1024), np.dtype(np.float32)) is None
        info = nk.buffer_cache_info()
        x = _x(7)
        for _ in range(2):
            y = nk.layer_norm(x, 1024).y
            assert isinstance(y.base, (np.ndarray, type(None)))  # not a cache capsule
            np.testing.assert_allclose(y, ref.layer_norm(x, (1024,)).y, rtol=1e-5, atol=1e-5)
            del y
        after = nk.buffer_cache_info()
        assert (after["hits"], after["misses"], after["cached_bytes"]) == (
            info["hits"], info["misses"], 0)
    finally:
        nk.set_buffer_cache_limit(old)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_empty_shapes_and_dtypes(dtype, cache_limit):
    for shape in [(0,), (3, 0, 5), (1 << 20,), (1024, 3, 700)]:
        a = _core.empty(shape, np.dtype(dtype))
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
        assert a.flags.writeable and a.flags.aligned
        a[...] = 1
        assert np.all(a == 1)


@pytest.mark.parametrize("bad", [-1, -(2**40)])
def test_bad_limit_raises(bad):
    with pytest.raises(ValueError, match="set_buffer_cache_limit"):
        nk.set_buffer_cache_limit(bad)


@pytest.mark.parametrize("bad", [1.5, "8", None, True])
def test_limit_type_raises(bad):
    with pytest.raises(TypeError, match="set_buffer_cache_limit"):
        nk.set_buffer_cache_limit(bad)


def _limit_in_subprocess(value):
    env = dict(os.environ, NORMKIT_BUFFER_CACHE_MB=value)
    code = "import normkit as nk; print(nk.buffer_cache_info()['limit'])"
    r = subprocess.run([sys.executable, "-W", "default", "-c", code], env=env,
                       capture_output=True, text=True, check=True)
    return int(r.stdout.strip()), r.stderr


def test_environment_sets_the_limit():
    assert _limit_in_subprocess("64")[0] == 64 * MiB
    assert _limit_in_subprocess("0")[0] == 0
    limit, err = _limit_in_subprocess("lots")
    assert limit == 256 * MiB and "NORMKIT_BUFFER_CACHE_MB" in err


def test_impossible_sizes_give_none_and_numpy_raises():
    # _core.empty never throws for memory: None sends the caller to NumPy, which raises
    assert _core.empty((2**62,), np.dtype(np.float32)) is None  # bytes overflow size_t
    assert _core.empty((2**40,), np.dtype(np.float32)) is None  # 4 TiB
    x = np.broadcast_to(np.ones(2**20, np.float32), (2**20, 2**20))
    with pytest.raises(MemoryError):
        nk.layer_norm(x, 2**20)
