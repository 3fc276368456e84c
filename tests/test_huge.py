"""Tensors with more than 2**31 elements (64-bit offsets everywhere).

float16 keeps each array at ~4.3 GB (x and y ~8.6 GB together); run with ``python -m pytest -m
slow tests/test_huge.py`` on a machine with at least ~12 GB of free memory. The float64 reference
is computed block by block, never for the whole tensor at once.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

import normkit as nk

from conftest import assert_close, assert_half_rounding

pytestmark = pytest.mark.slow

# 65539 * 32769 = 2_147_647_491 > 2**31 elements; in bytes (float16) more than 2**32.
M, N = 2**16 + 3, 2**15 + 1
BLOCK = 1024  # rows per reference block: 33.5M elements, 268 MB as float64
NEED_BYTES = 13 * 2**30


def _available_bytes():
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return None


@pytest.fixture(scope="module")
def huge_x():
    avail = _available_bytes()
    if avail is not None and avail < NEED_BYTES:
        pytest.skip(f"needs ~{NEED_BYTES / 2**30:.0f} GiB free memory, {avail / 2**30:.1f} GiB available")
    assert M * N > 2**31
    rng = np.random.default_rng(20260)
    x = np.empty((M, N), np.float16)
    # Each row: its own offset and scale, so that a wrong row/offset shows in the statistics.
    row_loc = rng.uniform(-2.0, 2.0, M).astype(np.float32)
    row_scale = rng.uniform(0.5, 2.0, M).astype(np.float32)
    for r0 in range(0, M, BLOCK):
        r1 = min(r0 + BLOCK, M)
        noise = rng.standard_normal((r1 - r0, N), dtype=np.float32)
        noise *= row_scale[r0:r1, None]
        noise += row_loc[r0:r1, None]
        x[r0:r1] = noise
    del noise
    yield x
    del x
    gc.collect()


def test_layer_norm_float16_more_than_2_31_elements(huge_x):
    x = huge_x
    rng = np.random.default_rng(7)
    w = rng.uniform(0.5, 1.5, N).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, N).astype(np.float32)
    eps = 1e-5
    y, mean, rstd = nk.layer_norm(x, N, w, b, eps=eps)
    try:
        assert y.shape == x.shape and y.dtype == np.float16
        assert mean.shape == (M,) and rstd.shape == (M,) and mean.dtype == np.float32
        w64, b64 = w.astype(np.float64), b.astype(np.float64)
        for r0 in range(0, M, BLOCK):
            r1 = min(r0 + BLOCK, M)
            xb = x[r0:r1].astype(np.float64)
            mu = xb.mean(axis=1)
            xb -= mu[:, None]
            var = np.mean(xb * xb, axis=1)
            rs = 1.0 / np.sqrt(var + eps)
            assert_close(mean[r0:r1], mu, np.float32, what=f"mean rows {r0}:{r1}")
            assert_close(rstd[r0:r1], rs, np.float32, what=f"rstd rows {r0}:{r1}")
            xb *= rs[:, None]
            xb *= w64
            xb += b64
            assert_half_rounding(y[r0:r1], xb, np.float16, what=f"y rows {r0}:{r1}")
            del xb
        # The last rows start beyond element 2**31 (byte 2**32): spelled out, as a sample.
        last = M - 1
        assert last * N > 2**31
        xr = x[last].astype(np.float64)
        ref = (xr - xr.mean()) / np.sqrt(xr.var() + eps) * w64 + b64
        assert_half_rounding(y[last], ref, np.float16, what="last row")
    finally:
        del y
        gc.collect()


def test_batch_norm_float16_more_than_2_31_elements(huge_x):
    # (B, C, S) = (65539, 3, 10923): 3 channels of ~716M values each; batch stride 32769.
    B, C, S = M, 3, N // 3
    x = huge_x.reshape(B, C, S)
    eps = 1e-5
    rm = np.zeros(C, np.float32)
    rv = np.ones(C, np.float32)
    weight = np.array([1.0, 0.5, 2.0], np.float32)
    bias = np.array([0.0, 1.0, -1.0], np.float32)
    y, mean, rstd = nk.batch_norm(x, weight, bias, running_mean=rm, running_var=rv, training=True, momentum=0.1, eps=eps)
    try:
        assert y.shape == x.shape and y.dtype == np.float16
        assert mean.shape == (C,) and rstd.shape == (C,)
        # Reference statistics in float64, one block of samples at a time (shifted by a
        # first guess for accuracy, then corrected).
        n = B * S
        shift = x[0].astype(np.float64).mean(axis=1)
        s1 = np.zeros(C)
        s2 = np.zeros(C)
        for b0 in range(0, B, BLOCK):
            xb = x[b0:b0 + BLOCK].astype(np.float64) - shift[None, :, None]
            s1 += xb.sum(axis=(0, 2))
            s2 += np.einsum("bcs,bcs->c", xb, xb)
            del xb
        d = s1 / n
        mu = shift + d
        var = s2 / n - d * d
        rs = 1.0 / np.sqrt(var + eps)
        assert_close(mean, mu, np.float32, what="batch mean")
        assert_close(rstd, rs, np.float32, what="batch rstd")
        assert_close(rm, 0.1 * mu, np.float32, what="running_mean")
        assert_close(rv, 0.9 + 0.1 * var * n / (n - 1), np.float32, what="running_var")
        scale = (rs * weight)[None, :, None]
        for b0 in range(0, B, BLOCK):
            xb = x[b0:b0 + BLOCK].astype(np.float64)
            ref = (xb - mu[None, :, None]) * scale + bias[None, :, None]
            assert_half_rounding(y[b0:b0 + BLOCK], ref, np.float16, what=f"y samples {b0}:")
            del xb, ref
    finally:
        del y
        gc.collect()
