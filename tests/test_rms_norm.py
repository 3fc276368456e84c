"""nk.rms_norm / nk.rms_norm_backward against SPEC sections 1-3 and 5.

``y = x * rstd * weight`` with ``rstd = 1/sqrt(mean(x**2) + eps)`` over the trailing
``normalized_shape`` axes; no centring, so the returned ``mean`` and the backward's ``dbias``
are ``None``.  ``eps=None`` is float32's machine epsilon for float32 and half inputs and
float64's for float64 (PyTorch's rule).
"""

from __future__ import annotations

import numpy as np
import pytest

import naive
import reference as ref
from conftest import (
    assert_bitwise_equal,
    assert_close,
    assert_half_rounding,
    assert_unchanged,
    get_dtype,
    is_half,
    randn,
    snapshot,
    stats_dtype,
)
from helpers import (
    assert_raises_nothing_written,
    assert_same_across_thread_counts,
    many,
    readonly,
    setter,
    x_dtype,
)

nk = pytest.importorskip("normkit")

# (x shape, normalized_shape): ranks 1-5, one to three normalized axes, int or tuple
CASES = [
    ((7,), 7),
    ((5, 8), 8),
    ((5, 8), (5, 8)),
    ((3, 4, 6), (6,)),
    ((3, 4, 6), (4, 6)),
    ((2, 3, 4, 5), 5),
    ((2, 3, 4, 5), (3, 4, 5)),
    ((2, 2, 3, 2, 4), (2, 4)),
]


def ns_tuple(ns):
    return (ns,) if isinstance(ns, int) else tuple(ns)


def default_eps(dt):
    return float(np.finfo(np.float64 if np.dtype(dt) == np.float64 else np.float32).eps)


def run_forward(x, normalized_shape, weight=None, **kw):
    """nk.rms_norm plus every check against the reference; returns (out, reference)."""
    xa = np.asarray(x)
    sd = stats_dtype(xa.dtype)
    ns = ns_tuple(normalized_shape)
    eps = kw.get("eps", None)
    keep = snapshot(xa, weight)

    out = nk.rms_norm(x, normalized_shape, weight, **kw)

    assert isinstance(out, nk.NormOutput)
    assert out.mean is None
    assert out.y.shape == xa.shape and out.y.dtype == xa.dtype
    lead = xa.shape[: xa.ndim - len(ns)]
    assert out.rstd.shape == lead and out.rstd.dtype == sd
    assert_unchanged(keep, "input")

    r = ref.rms_norm(xa, ns, weight, eps=eps)
    nv = None
    if is_half(xa.dtype):
        nv = naive.rms_norm(xa, ns, weight, eps=default_eps(xa.dtype) if eps is None else eps)
    assert_close(out.y, r.y, xa.dtype, naive=nv, what="y")
    if nv is not None:
        assert_half_rounding(out.y, r.y, xa.dtype, what="y")
    assert_close(out.rstd, r.rstd, sd, what="rstd")
    return out, r


def run_backward(dy, x, rstd, weight=None):
    """nk.rms_norm_backward against the reference fed the same saved rstd."""
    xa = np.asarray(x)
    sd = stats_dtype(xa.dtype)
    rstd_a = np.asarray(rstd)
    ns = xa.shape[rstd_a.ndim:]
    keep = snapshot(dy, xa, rstd, weight)

    g = nk.rms_norm_backward(dy, x, rstd, weight)

    assert isinstance(g, nk.NormGrads)
    assert g.dbias is None
    assert g.dx.shape == xa.shape and g.dx.dtype == xa.dtype
    assert g.dweight.shape == ns and g.dweight.dtype == sd
    assert_unchanged(keep, "backward input")

    r = ref.rms_norm_backward(dy, xa, np.asarray(rstd, np.float64), weight)
    nv = naive.rms_norm_backward(dy, xa, rstd, weight) if is_half(xa.dtype) else None
    assert_close(g.dx, r.dx, xa.dtype, naive=nv, what="dx")
    if nv is not None:
        assert_half_rounding(g.dx, r.dx, xa.dtype, what="dx")
    assert_close(g.dweight, r.dweight, sd, what="dweight")
    return g, r


# ----------------------------------------------------------------------------
# the main grid
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape,normalized_shape", CASES,
                         ids=[f"{s}-{n}" for s, n in CASES])
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_matches_reference(dtype, shape, normalized_shape, with_weight, eps, rng):
    sd = stats_dtype(dtype)
    ns = ns_tuple(normalized_shape)
    x = randn(rng, shape, dtype, loc=0.3, scale=1.5)
    w = randn(rng, ns, sd, loc=1.0, scale=0.5) if with_weight else None
    out, _ = run_forward(x, normalized_shape, w, eps=eps)
    dy = randn(rng, shape, dtype)
    run_backward(dy, x, out.rstd, w)


def test_no_centring(rng):
    """Unlike LayerNorm, a shift changes the result: y = x / rms(x)."""
    x = randn(rng, (4, 16), np.float64, loc=3.0)
    out = nk.rms_norm(x, 16, eps=0.0)
    rms = np.sqrt((x * x).mean(axis=1))
    assert_close(out.y, x / rms[:, None], what="y")
    assert_close(out.rstd, 1 / rms, what="rstd")
    assert np.all(out.y > 0)


@pytest.mark.parametrize("name", ["float32", "float64", "float16", "bfloat16"])
def test_default_eps_rule(name, rng):
    """eps=None: float32's machine epsilon for float32/float16/bfloat16, float64's for
    float64.  Data small enough that eps changes rstd visibly."""
    dt = get_dtype(name)
    scale = {"float64": 1e-8, "float32": 1e-4}.get(name, 1e-3)
    x = randn(rng, (6, 32), dt, scale=scale)
    want_eps = default_eps(dt)
    out, r = run_forward(x, 32)  # eps=None
    explicit = nk.rms_norm(x, 32, eps=want_eps)
    assert_bitwise_equal(out.y, explicit.y, "y (eps=None vs explicit)")
    assert_bitwise_equal(out.rstd, explicit.rstd, "rstd (eps=None vs explicit)")
    # eps matters here: without it, or with the input dtype's own epsilon, rstd differs
    ms = (x.astype(np.float64) ** 2).mean(axis=1)
    assert_close(out.rstd, 1 / np.sqrt(ms + want_eps), stats_dtype(dt), what="rstd")
    assert np.all(np.abs(out.rstd / (1 / np.sqrt(ms)) - 1) > 1e-3)
    # ... nor the other candidate rules: the input dtype's own epsilon (half inputs), or
    # float32's for float64
    wrong = {"float64": np.finfo(np.float32).eps, "float16": np.finfo(np.float16).eps,
             "bfloat16": 2.0 ** -7}.get(name)
    if wrong is not None:
        assert np.all(np.abs(out.rstd * np.sqrt(ms + float(wrong)) - 1) > 1e-3)


def test_explicit_eps(rng):
    x = randn(rng, (5, 10), np.float64, scale=0.1)
    for eps in (0.0, 1e-5, 0.5, 3.0):
        out, _ = run_forward(x, 10, eps=eps)
        assert_close(out.rstd, 1 / np.sqrt((x * x).mean(axis=1) + eps), what=f"rstd eps={eps}")


def test_float64_backward_with_reference_stats(rng):
    x = randn(rng, (6, 4, 5), np.float64)
    w = randn(rng, (4, 5), np.float64, loc=1.0)
    dy = randn(rng, x.shape, np.float64)
    out = nk.rms_norm(x, (4, 5), w)
    g = nk.rms_norm_backward(dy, x, out.rstd, w)
    r = ref.rms_norm(x, (4, 5), w)
    rg = ref.rms_norm_backward(dy, x, r.rstd, w)
    assert_close(g.dx, rg.dx, what="dx")
    assert_close(g.dweight, rg.dweight, what="dweight")


def test_dweight_returned_without_weight(rng):
    x = randn(rng, (5, 12))
    dy = randn(rng, (5, 12))
    out = nk.rms_norm(x, 12)
    g = nk.rms_norm_backward(dy, x, out.rstd)
    g1 = nk.rms_norm_backward(dy, x, out.rstd, np.ones(12, np.float32))
    assert g.dweight is not None and g.dbias is None and g1.dbias is None
    assert_close(g.dx, g1.dx, what="dx")
    assert_close(g.dweight, g1.dweight, what="dweight")


@pytest.mark.parametrize("x_name", ["float32", "float64", "float16"])
@pytest.mark.parametrize("w_name", ["float32", "float64", "float16", "bfloat16"])
def test_weight_of_another_float_dtype(x_name, w_name, rng):
    xd, wd = get_dtype(x_name), get_dtype(w_name)
    x = randn(rng, (4, 9), xd)
    w = randn(rng, 9, wd, loc=1.0, scale=0.5)
    out, _ = run_forward(x, 9, w)
    g, _ = run_backward(randn(rng, x.shape, xd), x, out.rstd, w)
    assert g.dweight.dtype == stats_dtype(xd)


def test_array_like_input():
    x = [[1.0, 2.0, -2.0], [0.5, 0.0, 3.0]]
    out = nk.rms_norm(x, 3)
    assert out.y.dtype == np.float64 and out.rstd.dtype == np.float64
    r = ref.rms_norm(np.array(x), 3)
    assert_close(out.y, r.y)
    g = nk.rms_norm_backward(x, x, out.rstd)
    assert_close(g.dx, ref.rms_norm_backward(np.array(x), np.array(x), r.rstd).dx)


def test_normalized_shape_as_list_and_numpy_ints(rng):
    x = randn(rng, (3, 4, 5))
    a = nk.rms_norm(x, [4, 5])
    b = nk.rms_norm(x, (np.int64(4), np.int32(5)))
    c = nk.rms_norm(x, (4, 5))
    assert_bitwise_equal(a.y, c.y)
    assert_bitwise_equal(b.y, c.y)
    assert c.rstd.shape == (3,)


# ----------------------------------------------------------------------------
# hard inputs
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("loc,scale", [(1000.0, 0.01), (-3e4, 2.0)])
def test_float32_large_mean_small_spread(loc, scale, rng):
    x = randn(rng, (8, 33), np.float32, loc=loc, scale=scale)
    w = randn(rng, 33, np.float32, loc=1.0, scale=0.2)
    out, _ = run_forward(x, 33, w)
    run_backward(randn(rng, x.shape, np.float32), x, out.rstd, w)


@pytest.mark.parametrize("magnitude", [1e20, 1e-20])
def test_float32_extreme_magnitudes_accumulate_in_float64(magnitude, rng):
    """x**2 over/underflows float32 but not the float64 accumulator; rstd itself fits."""
    x = randn(rng, (4, 16), np.float32, scale=magnitude)
    out, _ = run_forward(x, 16, eps=0.0)
    assert np.all(np.isfinite(out.y)) and np.all(np.isfinite(out.rstd))
    run_backward(randn(rng, x.shape, np.float32), x, out.rstd)


def test_float16_values_whose_squares_overflow(rng):
    x = randn(rng, (4, 16), np.float16, loc=300.0, scale=50.0)  # 300**2 > float16 max
    out, _ = run_forward(x, 16)
    assert np.all(np.isfinite(out.y.astype(np.float64)))


def test_zero_and_constant_rows(dtype, rng):
    """An all-zero row gives rstd = 1/sqrt(eps) and y = 0; a constant row y = sign * ~1."""
    sd = stats_dtype(dtype)
    x = randn(rng, (4, 10), dtype)
    x[1] = 0.0
    x[2] = -3.0
    w = randn(rng, 10, sd, loc=1.0)
    out, _ = run_forward(x, 10, w)
    assert np.all(out.y[1].astype(np.float64) == 0.0)
    assert_close(out.rstd[1], 1 / np.sqrt(default_eps(dtype)), sd, what="rstd of zero row")
    g, _ = run_backward(randn(rng, x.shape, dtype), x, out.rstd, w)
    assert np.all(np.isfinite(g.dx.astype(np.float64)))


def test_zero_row_with_eps_zero_confines_nan(rng):
    x = randn(rng, (3, 8), np.float64)
    x[1] = 0.0
    out = nk.rms_norm(x, 8, eps=0.0)
    assert np.isinf(out.rstd[1])
    assert np.all(np.isfinite(out.y[[0, 2]]))
    assert_close(out.y[[0, 2]], ref.rms_norm(x[[0, 2]], 8, eps=0.0).y)


@pytest.mark.parametrize(
    "shape,ns",
    [
        ((1, 4099), 4099),  # one long row: several chunks
        ((4099, 3), 3),  # many short rows
        ((7, 11, 13), (11, 13)),  # primes
        ((5, 1), 1),  # one element per row: y = sign(x) * |x| / sqrt(x^2 + eps)
        ((2, 3, 1030), 1030),
    ],
)
def test_sizes(shape, ns, rng):
    x = randn(rng, shape, np.float32, loc=0.5)
    w = randn(rng, ns_tuple(ns), np.float32, loc=1.0)
    out, _ = run_forward(x, ns, w)
    run_backward(randn(rng, shape, np.float32), x, out.rstd, w)


@pytest.mark.parametrize("name", ["float64", "float16", "bfloat16"])
def test_medium_size(name, rng):
    dt = get_dtype(name)
    x = randn(rng, (37, 1030), dt, loc=-1.0, scale=2.0)
    w = randn(rng, 1030, stats_dtype(dt), loc=1.0)
    out, _ = run_forward(x, 1030, w)
    run_backward(randn(rng, x.shape, dt), x, out.rstd, w)


# ----------------------------------------------------------------------------
# empty non-reduced axes
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape,ns", [((0, 8), 8), ((2, 0, 8), 8), ((0, 3, 4), (3, 4))])
def test_empty_leading_axes(shape, ns, dtype, rng):
    sd = stats_dtype(dtype)
    x = np.zeros(shape, dtype)
    w = randn(rng, ns_tuple(ns), sd, loc=1.0)
    out = nk.rms_norm(x, ns, w)
    lead = shape[: len(shape) - len(ns_tuple(ns))]
    assert out.y.shape == shape and out.y.dtype == dtype
    assert out.mean is None
    assert out.rstd.shape == lead and out.rstd.dtype == sd
    o = np.empty(shape, dtype)
    assert nk.rms_norm(x, ns, w, out=o).y is o
    g = nk.rms_norm_backward(x, x, out.rstd, w)
    assert g.dx.shape == shape and g.dx.dtype == dtype and g.dbias is None
    assert g.dweight.shape == ns_tuple(ns) and g.dweight.dtype == sd
    np.testing.assert_array_equal(g.dweight, 0.0)


# ----------------------------------------------------------------------------
# layouts and strides
# ----------------------------------------------------------------------------


def _strided_cases(rng, dt):
    base = randn(rng, (6, 10, 12), dt, loc=0.2)
    return {
        # (x, normalized_shape)
        "transposed": (base[0].T, 10),
        "transposed_3d": (base.transpose(2, 0, 1), (6, 10)),
        "steps": (base[::2, 1::3, ::5], 3),
        "negative": (base[::-1, :, ::-1], 12),
        "negative_2axes": (base[:, ::-2, ::-1], (5, 12)),
        "fortran": (np.asfortranarray(base), (10, 12)),
        "column_slice": (base[0][:, 2:9], 7),
        "broadcast_rows": (np.broadcast_to(base[0, 0], (5, 12)), 12),
        "broadcast_inside_row": (np.broadcast_to(base[:, :1, :], (6, 4, 12)), (4, 12)),
    }


CASE_NAMES = ["transposed", "transposed_3d", "steps", "negative", "negative_2axes", "fortran",
              "column_slice", "broadcast_rows", "broadcast_inside_row"]


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("name", ["float32", "float64", "float16"])
def test_arbitrary_strides(case, name, rng):
    dt = get_dtype(name)
    sd = stats_dtype(dt)
    x, ns = _strided_cases(rng, dt)[case]
    shape = ns_tuple(ns)
    w = randn(rng, (2,) + shape, sd, loc=1.0)[1, ..., ::-1]  # a strided weight too
    out, _ = run_forward(x, ns, w)
    out_c = nk.rms_norm(np.ascontiguousarray(x), ns, w)
    assert_close(out.y, out_c.y.astype(np.float64), dt if is_half(dt) else sd,
                 what="strided vs contiguous")
    dy = randn(rng, tuple(reversed(x.shape)), dt).T
    run_backward(dy, x, out.rstd, w)
    run_backward(dy, x, out.rstd[..., None][..., 0], w)  # a non-owning rstd view


# ----------------------------------------------------------------------------
# out=
# ----------------------------------------------------------------------------


def test_out_fresh(dtype, rng):
    x = randn(rng, (4, 3, 10), dtype)
    w = randn(rng, 10, stats_dtype(dtype), loc=1.0)
    want = nk.rms_norm(x, 10, w)
    out = np.full(x.shape, np.nan, dtype)
    got = nk.rms_norm(x, 10, w, out=out)
    assert got.y is out
    assert_bitwise_equal(out, want.y, "out")
    assert_bitwise_equal(got.rstd, want.rstd, "rstd")


def test_out_strided(rng):
    x = randn(rng, (4, 10))
    want = nk.rms_norm(x, 10)
    big = np.zeros((4, 20), np.float32)
    out = big[:, ::-2]
    got = nk.rms_norm(x, 10, out=out)
    assert got.y is out
    assert_close(out, want.y.astype(np.float64), np.float32, what="strided out")
    assert np.all(big[:, ::2] == 0)


@pytest.mark.parametrize("layout_kind", ["contiguous", "transposed", "strided"])
def test_out_is_x(dtype, layout_kind, rng):
    if layout_kind == "contiguous":
        x = randn(rng, (5, 3, 8), dtype)
    elif layout_kind == "transposed":
        x = randn(rng, (8, 3, 5), dtype).transpose(2, 1, 0)
    else:
        x = randn(rng, (10, 3, 16), dtype)[::2, :, ::2]
    x0 = x.copy()
    w = randn(rng, 8, stats_dtype(dtype), loc=1.0)
    want = nk.rms_norm(x0, 8, w)
    r = ref.rms_norm(x0, 8, w)
    got = nk.rms_norm(x, 8, w, out=x)
    assert got.y is x
    nv = naive.rms_norm(x0, (8,), w, eps=default_eps(dtype)) if is_half(dtype) else None
    assert_close(x, r.y, dtype, naive=nv, what="in-place y")
    assert_close(got.rstd, r.rstd, stats_dtype(dtype), what="rstd")
    if layout_kind == "contiguous":
        assert_bitwise_equal(x, want.y, "in-place y vs fresh")


@pytest.mark.parametrize("shift", [1, -1, 7, -13])
def test_out_overlaps_x(shift, rng):
    shape = (5, 3, 9)
    n = int(np.prod(shape))
    buf = randn(rng, n + abs(shift), np.float32, loc=1.0)
    if shift > 0:
        x, out = buf[:n].reshape(shape), buf[shift:].reshape(shape)
    else:
        x, out = buf[-shift:].reshape(shape), buf[:n].reshape(shape)
    x0 = x.copy()
    want = ref.rms_norm(x0, (3, 9))
    got = nk.rms_norm(x, (3, 9), out=out)
    assert got.y is out
    assert_close(out, want.y, what="overlapping out")
    assert_close(got.rstd, want.rstd, what="rstd")


@pytest.mark.parametrize("row", [0, 3, -1])
def test_out_overlaps_weight(row, rng):
    """out= follows NumPy's ufunc rule for every input: here one row of out is the weight."""
    out = np.empty((20, 16))
    w = out[row]
    w[...] = randn(rng, 16, np.float64, loc=1.0)
    x = randn(rng, out.shape, np.float64)
    want = ref.rms_norm(x, 16, w.copy())
    got = nk.rms_norm(x, 16, w, out=out)
    assert got.y is out
    assert_close(out, want.y, what="y with out overlapping weight")


def test_out_reversed_view_of_x(rng):
    x = randn(rng, (6, 8))
    x0 = x.copy()
    out = x[::-1, ::-1]
    got = nk.rms_norm(x, 8, out=out)
    assert got.y is out
    assert_close(out, ref.rms_norm(x0, 8).y, what="reversed overlapping out")


# ----------------------------------------------------------------------------
# NaN / Inf: confined to the affected row
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_confined_to_its_row(dtype, bad, rng):
    sd = stats_dtype(dtype)
    x = randn(rng, (5, 3, 8), dtype)
    x[2, 1, 5] = bad
    w = randn(rng, 8, sd, loc=1.0)
    r = ref.rms_norm(x, 8, w)
    out = nk.rms_norm(x, 8, w)
    ok = np.ones((5, 3), bool)
    ok[2, 1] = False
    nv = naive.rms_norm(x, (8,), w, eps=default_eps(dtype))[ok] if is_half(dtype) else None
    assert_close(out.y[ok], r.y[ok], dtype, naive=nv, what="y (other rows)")
    assert_close(out.rstd[ok], r.rstd[ok], sd, what="rstd (other rows)")
    if np.isnan(bad):
        assert np.isnan(out.rstd[2, 1])
        assert np.all(np.isnan(out.y[2, 1].astype(np.float64)))
    else:
        assert out.rstd[2, 1] == 0.0  # 1/sqrt(inf)
        assert not np.isfinite(float(out.y[2, 1, 5]))
    dy = randn(rng, x.shape, dtype)
    g = nk.rms_norm_backward(dy, x, out.rstd, w)
    rg = ref.rms_norm_backward(dy, x, out.rstd.astype(np.float64), w)
    nvg = naive.rms_norm_backward(dy, x, out.rstd, w)[ok] if is_half(dtype) else None
    assert_close(g.dx[ok], rg.dx[ok], dtype, naive=nvg, what="dx (other rows)")


# ----------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------


def _valid_call(rng):
    x = randn(rng, (4, 3, 6))
    return dict(x=x, normalized_shape=(3, 6), weight=randn(rng, (3, 6), loc=1.0),
                kw=dict(eps=None, out=np.full(x.shape, 7.0, np.float32)))


_set = setter(kw_keys=("eps", "out"))


RN = r"rms_norm"
FORWARD_ERRORS = [
    ("x_int32", x_dtype(np.int32), TypeError, RN + r".*\bx\b.*dtype"),
    ("x_int8", x_dtype(np.int8), TypeError, RN + r".*\bx\b.*dtype"),
    ("x_bool", x_dtype(np.bool_), TypeError, RN + r".*\bx\b.*dtype"),
    ("x_complex", x_dtype(np.complex64), TypeError, RN + r".*\bx\b.*dtype"),
    ("x_object", x_dtype(object), TypeError, RN + r".*\bx\b.*dtype"),
    ("x_str", x_dtype(str), TypeError, RN + r".*\bx\b.*dtype"),
    ("normalized_shape_mismatch", _set("normalized_shape", (4, 6)), ValueError,
     RN + r".*normalized_shape"),
    ("normalized_shape_leading_axes", _set("normalized_shape", (4, 3)), ValueError,
     RN + r".*normalized_shape"),
    ("normalized_shape_too_long", _set("normalized_shape", (2, 4, 3, 6)), ValueError,
     RN + r".*normalized_shape"),
    ("normalized_shape_empty", _set("normalized_shape", ()), ValueError,
     RN + r".*normalized_shape"),
    ("normalized_shape_float", _set("normalized_shape", 6.0), TypeError,
     RN + r".*normalized_shape"),
    ("empty_reduction", many(_set("x", lambda a: a["x"][:, :, :0]), _set("out", None),
                              _set("normalized_shape", 0), _set("weight", None)),
     ValueError, RN),
    ("weight_shape", _set("weight", lambda a: np.ones(6, np.float32)), ValueError,
     RN + r".*weight"),
    ("weight_transposed", _set("weight", lambda a: np.ones((6, 3), np.float32)), ValueError,
     RN + r".*weight"),
    ("weight_int", _set("weight", lambda a: np.ones((3, 6), np.int32)), TypeError,
     RN + r".*weight"),
    ("eps_negative", _set("eps", -1e-6), ValueError, RN + r".*eps"),
    ("eps_nan", _set("eps", float("nan")), ValueError, RN + r".*eps"),
    ("eps_string", _set("eps", "small"), TypeError, RN + r".*eps"),
    ("out_shape", _set("out", lambda a: np.full((4, 6, 3), 7.0, np.float32)), ValueError,
     RN + r".*\bout\b"),
    ("out_dtype", _set("out", lambda a: np.full((4, 3, 6), 7.0, np.float64)), ValueError,
     RN + r".*\bout\b"),
    ("out_readonly", _set("out", lambda a: readonly(a["kw"]["out"])), ValueError,
     RN + r".*\bout\b"),
]


@pytest.mark.parametrize("name,mutate,exc,match", FORWARD_ERRORS,
                         ids=[e[0] for e in FORWARD_ERRORS])
def test_forward_errors(name, mutate, exc, match, rng):
    a = _valid_call(rng)
    mutate(a)
    assert_raises_nothing_written(exc, match, nk.rms_norm, a["x"], a["normalized_shape"],
                                  a["weight"], **a["kw"])


def test_valid_call_of_error_table_works(rng):
    a = _valid_call(rng)
    out = nk.rms_norm(a["x"], a["normalized_shape"], a["weight"], **a["kw"])
    assert out.y is a["kw"]["out"]


def test_no_bias_argument(rng):
    x = randn(rng, (2, 4))
    with pytest.raises(TypeError):
        nk.rms_norm(x, 4, None, np.zeros(4, np.float32))


def _valid_backward(rng):
    x = randn(rng, (4, 3, 6))
    out = nk.rms_norm(x, 6)
    return dict(dy=randn(rng, x.shape), x=x, rstd=out.rstd, weight=randn(rng, 6, loc=1.0))


_bset = setter()


RNB = r"rms_norm_backward"
BACKWARD_ERRORS = [
    ("x_int", _bset("x", lambda a: a["x"].astype(np.int32)), TypeError, RNB + r".*dtype"),
    ("dy_int", _bset("dy", lambda a: a["dy"].astype(np.int32)), TypeError, RNB + r".*dtype"),
    ("dy_shape", _bset("dy", lambda a: a["dy"][:, :, :5]), ValueError, RNB + r".*\bdy\b"),
    ("rstd_wrong_lead", _bset("rstd", lambda a: a["rstd"][:3]), ValueError,
     RNB + r".*\brstd\b"),
    ("rstd_as_many_axes_as_x", _bset("rstd", lambda a: np.ones((4, 3, 6), np.float32)),
     ValueError, RNB + r".*\brstd\b"),
    ("rstd_none", _bset("rstd", None), ValueError, RNB),
    ("weight_shape", _bset("weight", lambda a: np.ones(5, np.float32)), ValueError,
     RNB + r".*weight"),
    ("weight_for_two_axes", _bset("weight", lambda a: np.ones((3, 6), np.float32)), ValueError,
     RNB + r".*weight"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BACKWARD_ERRORS,
                         ids=[e[0] for e in BACKWARD_ERRORS])
def test_backward_errors(name, mutate, exc, match, rng):
    a = _valid_backward(rng)
    mutate(a)
    assert_raises_nothing_written(exc, match, nk.rms_norm_backward, a["dy"], a["x"], a["rstd"],
                                  a["weight"])


# ----------------------------------------------------------------------------
# threads: bitwise identical results whatever the thread count
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["float32", "float64", "float16"])
def test_bitwise_identical_across_thread_counts(name, restore_num_threads):
    rng = np.random.default_rng(4099)
    dt = get_dtype(name)
    sd = stats_dtype(dt)
    x = randn(rng, (4099, 1030), dt, loc=0.5, scale=2.0)
    dy = randn(rng, x.shape, dt)
    w = randn(rng, 1030, sd, loc=1.0)

    def compute():
        out = nk.rms_norm(x, 1030, w)
        g = nk.rms_norm_backward(dy, x, out.rstd, w)
        return out.y, out.rstd, g.dx, g.dweight

    first = assert_same_across_thread_counts(compute, ["y", "rstd", "dx", "dweight"])
    if name == "float32":
        r = ref.rms_norm(x, 1030, w)
        assert_close(first[0], r.y, what="y")
        rg = ref.rms_norm_backward(dy, x, first[1].astype(np.float64), w)
        # Loosened for dweight only: a sum over 4099 rows of O(1) terms (|dweight| ~ 64)
        assert_close(first[3], rg.dweight, rtol=1e-5, atol=1e-4, what="dweight")
