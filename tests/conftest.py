"""Shared test helpers: the tolerance table, dtypes, thread-count control.

Tolerances (STYLE.md section 7) have the form ``|a - ref| <= atol + rtol * |ref|``
where ``ref`` is the float64 reference of ``tests/reference.py`` evaluated on
the very same (already rounded) inputs:

* float64, float32: fixed values, below.  Tests keep their data and outputs
  of order one, so an absolute atol is meaningful.  A test that loosens them
  must say why in a comment.
* float16, bfloat16 (``y`` and ``dx``, the only outputs kept in that dtype):
  ``max|a - ref| <= 2 * max|naive - ref| + atol`` where ``naive`` is the same
  computation done entirely in that dtype with NumPy (``tests/naive.py``).
  ``atol`` is one unit in the last place at the output's largest magnitude:
  the final rounding of an exact result alone costs half of that, and a tiny
  case can make the naive computation exact.

Statistics and parameter gradients of half inputs are float32 (SPEC section 2)
and use the float32 row.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import NamedTuple

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Hypothesis profiles (tests/test_properties.py, tests/test_layer_norm.py): "default" keeps the
# normal run fast; NORMKIT_HYPOTHESIS_PROFILE=long explores far more examples.
settings.register_profile("default", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("NORMKIT_HYPOTHESIS_PROFILE", "default"))


class Tol(NamedTuple):
    rtol: float
    atol: float


# Per-dtype tolerance table.
#  float64: the library and the reference both accumulate in float64 but in a
#    different order; on well-conditioned O(1) data they agree to ~1e-15.
#  float32: a correct kernel accumulates in float64 and rounds once (~6e-8);
#    float32 arithmetic in the final normalize / dx step costs a few ulp of
#    the O(1) terms.  1e-5 still catches biased/unbiased variance mix-ups
#    (>= 1e-3 at the small group sizes used) and wrong momentum rules; eps
#    placement is caught by dedicated small-variance / large-eps tests.
TOLERANCES = {
    "float64": Tol(rtol=1e-12, atol=1e-12),
    "float32": Tol(rtol=1e-5, atol=1e-5),
}

# Half dtypes: atol = HALF_ATOL_ULPS units in the last place at max|ref|.
HALF_ATOL_ULPS = 1.0
# ... and the naive same-dtype error may be exceeded by at most this factor.
HALF_NAIVE_FACTOR = 2.0

DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16")
HALF_DTYPE_NAMES = ("float16", "bfloat16")

try:
    import ml_dtypes as _ml_dtypes
except ImportError:  # pragma: no cover - depends on the environment
    _ml_dtypes = None

HAVE_BFLOAT16 = _ml_dtypes is not None


def get_dtype(name) -> np.dtype:
    """``np.dtype`` for a name in DTYPE_NAMES; bfloat16 skips without ml_dtypes."""
    if isinstance(name, np.dtype):
        return name
    if name == "bfloat16":
        ml = pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes")
        return np.dtype(ml.bfloat16)
    return np.dtype(name)


def available_dtypes():
    """The dtypes usable in this environment (bfloat16 only with ml_dtypes)."""
    out = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)]
    if HAVE_BFLOAT16:
        out.append(np.dtype(_ml_dtypes.bfloat16))
    return out


AVAILABLE_DTYPES = available_dtypes()


def dtype_name(dt) -> str:
    return np.dtype(dt).name


def is_half(dt) -> bool:
    return dtype_name(dt) in HALF_DTYPE_NAMES


def stats_dtype(dt) -> np.dtype:
    """SPEC section 2: float64 statistics for float64 x, else float32."""
    return np.dtype(np.float64) if np.dtype(dt) == np.float64 else np.dtype(np.float32)


def machine_eps(dt) -> float:
    dt = np.dtype(dt)
    if dt.name == "bfloat16":
        return float(_ml_dtypes.finfo(dt).eps)
    return float(np.finfo(dt).eps)


@pytest.fixture(params=DTYPE_NAMES)
def dtype(request):
    """Every supported x dtype, as ``np.dtype``; bfloat16 skips without ml_dtypes."""
    return get_dtype(request.param)


@pytest.fixture
def rng(request):
    """A generator seeded from the test id, so every test is reproducible."""
    seed = zlib.crc32(request.node.nodeid.encode())  # stable across processes
    return np.random.default_rng(seed)


def randn(rng, shape, dtype=np.float32, *, loc=0.0, scale=1.0):
    """Normal data rounded to ``dtype`` (the reference then sees the rounded values)."""
    a = loc + scale * rng.standard_normal(shape)
    return a.astype(get_dtype(dtype))


# ----------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------


def _f64(a):
    return np.asarray(a).astype(np.float64)


def _check_nonfinite(a, r, what):
    """NaN where the reference is NaN, the same infinities, and nowhere else."""
    a_nan, r_nan = np.isnan(a), np.isnan(r)
    if not np.array_equal(a_nan, r_nan):
        bad = np.argwhere(a_nan != r_nan)
        raise AssertionError(
            f"{what}: NaN pattern differs from the reference at {len(bad)} positions, "
            f"first {tuple(bad[0])}: actual {a[tuple(bad[0])]!r}, ref {r[tuple(bad[0])]!r}"
        )
    a_inf, r_inf = np.isinf(a), np.isinf(r)
    if not np.array_equal(a_inf, r_inf) or not np.array_equal(a[a_inf], r[r_inf]):
        raise AssertionError(f"{what}: infinities differ from the reference")


def assert_close(actual, ref, dtype=None, *, naive=None, rtol=None, atol=None, what="value"):
    """Compare ``actual`` with the float64 reference under the dtype's tolerance.

    ``dtype`` is the precision ``actual`` was produced in (default: its dtype).
    For float16/bfloat16, ``naive`` (the same computation in that dtype, see
    ``tests/naive.py``) sets the bar; without it an elementwise one-ulp bound
    is used.  ``rtol``/``atol`` override the table (say why where you do).
    """
    actual = np.asarray(actual)
    ref = np.asarray(ref)
    dt = np.dtype(dtype) if dtype is not None else actual.dtype
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != reference {ref.shape}"
    a = _f64(actual)
    r = _f64(ref)
    _check_nonfinite(a, r, what)
    fin = np.isfinite(r)
    a, r = a[fin], r[fin]
    if a.size == 0:
        return
    err = np.abs(a - r)

    if dt.name in HALF_DTYPE_NAMES and naive is not None and rtol is None and atol is None:
        nv = _f64(naive)[fin]
        scale = max(1.0, float(np.max(np.abs(r))))
        atol_h = HALF_ATOL_ULPS * machine_eps(dt) * scale
        with np.errstate(invalid="ignore"):
            nerr = np.abs(nv - r)
        naive_err = float(np.max(np.where(np.isnan(nerr), np.inf, nerr)))
        lib_err = float(np.max(err))
        bound = HALF_NAIVE_FACTOR * naive_err + atol_h
        if not lib_err <= bound:
            i = int(np.argmax(err))
            raise AssertionError(
                f"{what} ({dt.name}): max error {lib_err:.3g} > {HALF_NAIVE_FACTOR} * naive "
                f"error {naive_err:.3g} + atol {atol_h:.3g}; worst actual {a[i]!r} vs ref {r[i]!r}"
            )
        return

    if dt.name in HALF_DTYPE_NAMES:
        e = machine_eps(dt)
        tol = Tol(rtol=e, atol=e * max(1.0, float(np.max(np.abs(r)))))
    else:
        key = dt.name if dt.name in TOLERANCES else "float32"
        tol = TOLERANCES[key]
    rt = tol.rtol if rtol is None else rtol
    at = tol.atol if atol is None else atol
    limit = at + rt * np.abs(r)
    bad = err > limit
    if np.any(bad):
        i = int(np.argmax(err - limit))
        raise AssertionError(
            f"{what} ({dt.name}): {int(bad.sum())} of {err.size} elements outside "
            f"atol={at:g} + rtol={rt:g}*|ref|; worst: actual {a[i]!r} vs ref {r[i]!r} "
            f"(|diff| {err[i]:.3g}); max |diff| {float(err.max()):.3g}"
        )


# Stricter companion to the 2x-naive rule for float16/bfloat16 y and dx on the CPU:
# SPEC section 2 has the CPU kernels accumulate in float64, so each output is the
# exact result rounded once (<= half an ulp <= eps/2 * |ref|).  Allow twice that,
# plus float32-intermediate noise near zero (1e-5 * the output's scale).
HALF_ROUNDING_ATOL = 1e-5


def assert_half_rounding(actual, ref, dtype=None, what="value"):
    """Elementwise ``|a - ref| <= eps * |ref| + 1e-5 * max(1, max|ref|)`` for half outputs."""
    actual = np.asarray(actual)
    dt = np.dtype(dtype) if dtype is not None else actual.dtype
    a = _f64(actual)
    r = _f64(ref)
    assert a.shape == r.shape, f"{what}: shape {a.shape} != reference {r.shape}"
    fin = np.isfinite(r) & np.isfinite(a)
    a, r = a[fin], r[fin]
    if a.size == 0:
        return
    e = machine_eps(dt)
    limit = e * np.abs(r) + HALF_ROUNDING_ATOL * max(1.0, float(np.max(np.abs(r))))
    err = np.abs(a - r)
    bad = err > limit
    if np.any(bad):
        i = int(np.argmax(err - limit))
        raise AssertionError(
            f"{what} ({dt.name}): {int(bad.sum())} of {err.size} elements more than one "
            f"rounding from the reference; worst actual {a[i]!r} vs ref {r[i]!r}"
        )


def assert_bitwise_equal(a, b, what="value"):
    """Same dtype, shape and bytes (NaN payloads included)."""
    a = np.asarray(a)
    b = np.asarray(b)
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    if a.tobytes() != b.tobytes():
        ab = np.frombuffer(a.tobytes(), np.uint8).reshape(a.size, -1) if a.size else None
        bb = np.frombuffer(b.tobytes(), np.uint8).reshape(b.size, -1) if b.size else None
        n = int(np.any(ab != bb, axis=1).sum())
        raise AssertionError(f"{what}: not bitwise equal ({n} of {a.size} elements differ)")


def snapshot(*arrays):
    """Copies of ``arrays`` (``None`` kept) for ``assert_unchanged``."""
    return [None if a is None else (a, np.array(a, copy=True)) for a in arrays]


def assert_unchanged(snap, what="input"):
    for i, item in enumerate(snap):
        if item is None:
            continue
        a, saved = item
        assert np.asarray(a).tobytes() == saved.tobytes(), f"{what} #{i} was modified"


# ----------------------------------------------------------------------------
# thread count
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def num_threads(n):
    """Set ``normkit.set_num_threads(n)`` inside the block, restoring the old value."""
    import normkit

    prev = normkit.get_num_threads()
    normkit.set_num_threads(n)
    try:
        yield
    finally:
        normkit.set_num_threads(prev)


@pytest.fixture
def restore_num_threads():
    """Yield normkit; whatever the test sets, the thread count is restored after it."""
    nk = pytest.importorskip("normkit")
    prev = nk.get_num_threads()
    try:
        yield nk
    finally:
        nk.set_num_threads(prev)
