"""The C++ fast paths for plain calls (dense ndarray, parameters already in the statistics dtype,
Python float options, no out=) must give bitwise what the general path gives, and must hand
every unusual or invalid call to the general path (which validates and raises)."""

from __future__ import annotations

import numpy as np
import pytest

nk = pytest.importorskip("normkit")
from normkit import _core  # noqa: E402


def _bits(a):
    return None if a is None else np.ascontiguousarray(a).view(np.uint8)


def _same(r1, r2):
    assert len(r1) == len(r2)
    for a, b in zip(r1, r2):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape", [(8, 64), (3, 5, 130), (1, 1), (0, 7)])
def test_row_fast_path_matches_general_path(dtype, shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    sd = np.float64 if dtype == np.float64 else np.float32
    w = rng.standard_normal(shape[-1]).astype(sd)
    b = rng.standard_normal(shape[-1]).astype(sd)
    fast = _core.row_norm_fast(x, shape[-1], w, b, 1e-5, None, True)
    assert fast is not None and isinstance(fast, nk.NormOutput)
    general = nk.layer_norm(x, (shape[-1],), list(w), list(b), eps=1e-5)  # tuple shape, lists: general path
    _same(fast, general)
    _same(nk.layer_norm(x, shape[-1], w, b), general)
    fast = _core.row_norm_fast(x, shape[-1], w, None, None, None, False)
    assert fast is not None and fast.mean is None
    _same(fast, nk.rms_norm(x, (shape[-1],), list(w)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,ca", [((8, 64), 1), ((4, 6, 5, 5), 1), ((4, 5, 5, 6), -1), ((2, 3, 100), 1)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_fast_path_matches_general_path(dtype, shape, ca, training):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) - 1).astype(dtype)
    C = shape[ca]
    w = rng.standard_normal(C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    rm1, rv1 = rng.standard_normal(C).astype(dtype), rng.random(C).astype(dtype) + 0.5
    rm2, rv2 = rm1.copy(), rv1.copy()
    fast = _core.batch_norm_fast(x, w, b, rm1, rv1, training, 0.1, 1e-5, ca, None)
    assert fast is not None
    # integer momentum / channel_axis as a NumPy integer: general path
    general = nk.batch_norm(x, w, b, running_mean=rm2, running_var=rv2, training=training, momentum=np.float64(0.1),
                            eps=1e-5, channel_axis=np.int64(ca))
    _same(fast, general)
    assert np.array_equal(rm1, rm2) and np.array_equal(rv1, rv2)


def test_unusual_or_invalid_calls_are_left_to_the_general_path():
    x = np.ones((4, 8), np.float32)
    w32 = np.ones(8, np.float32)
    cases = [
        (x.astype(np.int32), 8, None, None, 1e-5, None),  # integer dtype
        (x[:, ::2], 4, None, None, 1e-5, None),  # not contiguous
        (x, 7, None, None, 1e-5, None),  # shape mismatch
        (x, 8, w32.astype(np.float64), None, 1e-5, None),  # weight dtype differs
        (x, 8, w32[:4], None, 1e-5, None),  # weight shape
        (x, 8, None, None, -1.0, None),  # negative eps
        (x, 8, None, None, float("nan"), None),  # NaN eps
        (x, 8, None, None, 1, None),  # int eps
        (x, 8, None, None, 1e-5, np.empty((4, 8), np.float64)),  # out of another dtype
        (x, 8, None, None, 1e-5, np.empty((8, 4), np.float32).T),  # out not C-contiguous
        (x, 8, None, None, 1e-5, np.broadcast_to(np.float32(0), (4, 8))),  # read-only out
        (x, (8, 1), None, None, 1e-5, None),  # normalized_shape not the trailing axes
        (x.tolist(), 8, None, None, 1e-5, None),  # not an array
    ]
    buf = np.zeros(40, np.float32)
    cases.append((buf[:32].reshape(4, 8), 8, None, None, 1e-5, buf[4:36].reshape(4, 8)))  # overlap
    cases.append((x, 8, buf[:8], None, 1e-5, buf[:32].reshape(4, 8)))  # out overlaps weight
    for args in cases:
        assert _core.row_norm_fast(*args, True) is None
    rv_neg = -np.ones(8, np.float32)
    rm = np.zeros(8, np.float32)
    bcases = [
        (x, None, None, None, None, True, 0.1, 1e-5, 2, None),  # bad channel axis
        (x, None, None, rm, None, True, 0.1, 1e-5, 1, None),  # one running stat
        (x, None, None, None, None, False, 0.1, 1e-5, 1, None),  # eval without running stats
        (x, None, None, rm, rv_neg, False, 0.1, 1e-5, 1, None),  # negative running_var
        (x, None, None, rm, rm, True, 0.1, 1e-5, 1, None),  # aliased running stats
        (x, None, None, None, None, True, 1.5, 1e-5, 1, None),  # momentum out of range
        (x[:1], None, None, None, None, True, 0.1, 1e-5, 1, None),  # one value per channel
        (x, None, None, None, None, 1, 0.1, 1e-5, 1, None),  # training not a bool
    ]
    for args in bcases:
        assert _core.batch_norm_fast(*args) is None
    assert np.array_equal(rm, np.zeros(8, np.float32))


def test_fast_path_out_and_in_place():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 5, 16)).astype(np.float32)
    w = rng.standard_normal((5, 16)).astype(np.float32)
    want = nk.layer_norm(x, [5, 16], w.tolist())  # general path
    out = np.empty_like(x)
    got = _core.row_norm_fast(x, (5, 16), w, None, 1e-5, out, True)
    assert got is not None and got.y is out
    _same(got, want)
    xi = x.copy()
    got = _core.row_norm_fast(xi, (5, 16), w, None, 1e-5, xi, True)
    assert got is not None and got.y is xi
    _same(got, want)
    xb = rng.standard_normal((7, 3, 4, 4)).astype(np.float32)
    want = nk.batch_norm(xb, channel_axis=np.int64(1))
    out = np.empty_like(xb)
    got = _core.batch_norm_fast(xb, None, None, None, None, True, 0.1, 1e-5, 1, out)
    assert got is not None and got.y is out
    _same(got, want)
