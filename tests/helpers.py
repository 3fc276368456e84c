"""Helpers shared by the per-op test files (test_batch_norm.py, test_layer_norm.py, ...).

Fixtures, the tolerance table and the comparison functions live in conftest.py; this module
holds plain functions: channel-axis layout, parameter builders, the error-table mutators and
the thread-count / concurrency checks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import assert_bitwise_equal, assert_unchanged, num_threads, randn, snapshot

AFFINES = ["weight+bias", "weight", "bias", "none"]


# ----------------------------------------------------------------------------
# channel axis: channel_axis=1 is (N, C, *spatial), channel_axis=-1 is (N, *spatial, C)
# ----------------------------------------------------------------------------


def layout(ncs_shape, channel_axis):
    """(N, C, *spatial) -> the logical shape for ``channel_axis``."""
    if channel_axis == 1:
        return tuple(ncs_shape)
    return (ncs_shape[0],) + tuple(ncs_shape[2:]) + (ncs_shape[1],)


def cax(ndim, channel_axis):
    """The non-negative index of the channel axis of an ndim array."""
    return 1 if channel_axis == 1 else ndim - 1


def nchan(shape, channel_axis):
    return shape[cax(len(shape), channel_axis)]


def per_channel(a, ndim, channel_axis):
    """Reshape a (C,) vector to broadcast along ``channel_axis`` of an ndim array."""
    shp = [1] * ndim
    shp[cax(ndim, channel_axis)] = -1
    return np.asarray(a).reshape(shp)


def channel_strided_cases(rng, dt, nhwc_shape=(3, 5, 7, 4), nchw_shape=(3, 4, 5, 7)):
    """Strided / transposed / broadcast views, name -> (x, channel_axis)."""
    base = randn(rng, (8, 6, 10, 12), dt, loc=0.2)
    nhwc = randn(rng, nhwc_shape, dt)
    nchw = randn(rng, nchw_shape, dt)
    return {
        "steps": (base[::2, ::2, 1::3, ::5], 1),
        "negative": (base[::-1, :, ::-2, ::-1], 1),
        "transposed": (base.transpose(0, 2, 1, 3), 1),  # logical (8, 10, 6, 12)
        "fortran": (np.asfortranarray(base[:3]), 1),
        "channels_innermost_axis1": (nhwc.transpose(0, 3, 1, 2), 1),
        "nchw_memory_axis-1": (nchw.transpose(0, 2, 3, 1), -1),
        "steps_axis-1": (base[1::3, ::-1, ::4, ::3], -1),
        "broadcast_batch": (np.broadcast_to(base[:1, :, :3, :3], (5, 6, 3, 3)), 1),
        "broadcast_spatial": (np.broadcast_to(base[:3, :, :1, :4], (3, 6, 4, 4)), 1),
        "column_slice_rank2": (base[0, 0][:, ::3], 1),
    }


# ----------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------


def make_params(rng, shape, affine, dtype=np.float32):
    """(weight, bias) of ``shape``, each None unless named in ``affine`` (see AFFINES)."""
    w = randn(rng, shape, dtype, loc=1.0, scale=0.5) if "weight" in affine else None
    b = randn(rng, shape, dtype) if "bias" in affine else None
    return w, b


def make_running(rng, c, sd):
    rm = (0.5 * rng.standard_normal(c)).astype(sd)
    rv = rng.uniform(0.5, 2.0, c).astype(sd)
    return rm, rv


def readonly(a):
    """A read-only copy of ``a``."""
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


# ----------------------------------------------------------------------------
# error tables: each row mutates a valid call ``a`` (a dict, keyword arguments under "kw")
# ----------------------------------------------------------------------------


def setter(kw_keys=()):
    """``set(key, value)`` mutators: keys in ``kw_keys`` go to ``a["kw"]``, others to ``a``.

    ``value`` may be a function of ``a``.
    """
    def set_(key, value):
        def f(a):
            v = value(a) if callable(value) else value
            if key in kw_keys:
                a["kw"][key] = v
            else:
                a[key] = v
        return f
    return set_


def x_dtype(dt):
    """Cast x to ``dt``; out= is dropped so that the dtype error is about x alone."""
    def f(a):
        a["x"] = np.asarray(a["x"]).astype(dt)
        a["kw"]["out"] = None
    return f


def many(*fs):
    def f(a):
        for g in fs:
            g(a)
    return f


def assert_raises_nothing_written(exc, match, fn, *args, **kw):
    """``fn(*args, **kw)`` raises ``exc`` matching ``match`` and modifies no array argument."""
    keep = snapshot(*[v for v in (*args, *kw.values()) if isinstance(v, np.ndarray)])
    with pytest.raises(exc, match=match):
        fn(*args, **kw)
    assert_unchanged(keep, "argument after an error")


# ----------------------------------------------------------------------------
# threads
# ----------------------------------------------------------------------------


def assert_same_across_thread_counts(compute, names=None, counts=(1, 2, 3)):
    """Run ``compute()`` (a tuple of arrays) under each thread count; all bitwise equal.

    Returns the results of the first count.
    """
    import normkit as nk

    results = []
    for n in counts:
        with num_threads(n):
            assert nk.get_num_threads() == n
            results.append(tuple(compute()))
    names = names or ["value"] * len(results[0])
    for other in results[1:]:
        for nm, a, b in zip(names, results[0], other):
            assert_bitwise_equal(a, b, nm)
    return results[0]


def assert_concurrent_matches_serial(work, jobs):
    """``work(job)`` from 8 Python threads (twice) gives bitwise the serial results."""
    serial = [work(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(2):
            for s, c in zip(serial, pool.map(work, jobs)):
                for a, b in zip(s, c):
                    assert_bitwise_equal(a, b, "concurrent vs serial")
