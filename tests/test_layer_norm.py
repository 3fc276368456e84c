"""nk.layer_norm / nk.layer_norm_backward against SPEC sections 1-3 and 5.

Every result is compared with the float64 reference (tests/reference.py) under
the per-dtype tolerance table of conftest.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    AFFINES,
    assert_concurrent_matches_serial,
    assert_raises_nothing_written,
    assert_same_across_thread_counts,
    make_params,
    many,
    readonly,
    setter,
    x_dtype,
)

nk = pytest.importorskip("normkit")

# (x shape, normalized_shape): ranks 1 to 5, one to three normalized axes.
CASES = [
    ((64,), (64,)),
    ((8, 33), (33,)),
    ((4, 5, 16), (16,)),
    ((4, 5, 16), (5, 16)),
    ((2, 3, 4, 10), (10,)),
    ((2, 3, 4, 10), (3, 4, 10)),
    ((2, 2, 3, 4, 5), (4, 5)),
]
CASE_IDS = [f"{s}-{n}" for s, n in CASES]


def lead(shape, ns):
    return tuple(shape[: len(shape) - len(ns)])


def run_forward(x, normalized_shape, weight=None, bias=None, **kw):
    """nk.layer_norm plus every check against the reference; returns (out, reference)."""
    xa = np.asarray(x)
    sd = stats_dtype(xa.dtype)
    ns = tuple(normalized_shape)
    r = ref.layer_norm(xa, ns, weight, bias, **kw)
    keep = snapshot(xa, weight, bias)

    out = nk.layer_norm(x, normalized_shape, weight, bias, **kw)
    if kw.get("out") is None:
        assert not np.shares_memory(out.y, xa), "y must be a new array"

    assert type(out).__name__ == "NormOutput"
    assert out._fields == ("y", "mean", "rstd")
    assert out.y.shape == xa.shape and out.y.dtype == xa.dtype
    assert np.shape(out.mean) == lead(xa.shape, ns) and np.asarray(out.mean).dtype == sd
    assert np.shape(out.rstd) == lead(xa.shape, ns) and np.asarray(out.rstd).dtype == sd
    assert_unchanged(keep, "input")

    nv = naive.layer_norm(xa, ns, weight, bias, **kw) if is_half(xa.dtype) else None
    assert_close(out.y, r.y, xa.dtype, naive=nv, what="y")
    if nv is not None:
        assert_half_rounding(out.y, r.y, xa.dtype, what="y")
    assert_close(out.mean, r.mean, sd, what="mean")
    assert_close(out.rstd, r.rstd, sd, what="rstd")
    return out, r


def run_backward(dy, x, mean, rstd, weight=None):
    """nk.layer_norm_backward checked against the reference fed the same saved statistics."""
    xa = np.asarray(x)
    sd = stats_dtype(xa.dtype)
    k = xa.ndim - np.ndim(mean)
    ns = xa.shape[xa.ndim - k:]
    keep = snapshot(dy, xa, mean, rstd, weight)

    g = nk.layer_norm_backward(dy, x, mean, rstd, weight)

    assert type(g).__name__ == "NormGrads"
    assert g._fields == ("dx", "dweight", "dbias")
    assert g.dx.shape == xa.shape and g.dx.dtype == xa.dtype
    assert g.dweight.shape == ns and g.dweight.dtype == sd
    assert g.dbias.shape == ns and g.dbias.dtype == sd
    assert_unchanged(keep, "backward input")

    r = ref.layer_norm_backward(dy, xa, np.asarray(mean, np.float64),
                                np.asarray(rstd, np.float64), weight)
    nv = naive.layer_norm_backward(dy, xa, mean, rstd, weight) if is_half(xa.dtype) else None
    assert_close(g.dx, r.dx, xa.dtype, naive=nv, what="dx")
    if nv is not None:
        assert_half_rounding(g.dx, r.dx, xa.dtype, what="dx")
    assert_close(g.dweight, r.dweight, sd, what="dweight")
    assert_close(g.dbias, r.dbias, sd, what="dbias")
    return g, r


# ----------------------------------------------------------------------------
# result types, the main grid
# ----------------------------------------------------------------------------


def test_result_namedtuples(rng):
    x = randn(rng, (4, 6))
    out = nk.layer_norm(x, (6,))
    assert isinstance(out, tuple) and out._fields == ("y", "mean", "rstd")
    y, mean, rstd = out
    assert y is out.y and mean is out.mean and rstd is out.rstd
    g = nk.layer_norm_backward(x, x, mean, rstd)
    assert isinstance(g, tuple) and g._fields == ("dx", "dweight", "dbias")
    dx, dweight, dbias = g
    assert dx is g.dx and dweight is g.dweight and dbias is g.dbias
    if hasattr(nk, "NormOutput"):
        assert isinstance(out, nk.NormOutput)
    if hasattr(nk, "NormGrads"):
        assert isinstance(g, nk.NormGrads)


@pytest.mark.parametrize("shape,ns", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("affine", AFFINES)
def test_matches_reference(dtype, shape, ns, affine, rng):
    sd = stats_dtype(dtype)
    x = randn(rng, shape, dtype, loc=-0.4, scale=1.7)
    w, b = make_params(rng, ns, affine, sd)
    out, _ = run_forward(x, ns, w, b, eps=1e-5)
    dy = randn(rng, shape, dtype)
    run_backward(dy, x, out.mean, out.rstd, w)


@pytest.mark.parametrize("shape,ns", CASES, ids=CASE_IDS)
def test_float64_backward_matches_reference_recomputing_stats(shape, ns, rng):
    x = randn(rng, shape, np.float64, loc=0.5)
    w = randn(rng, ns, np.float64, loc=1.0)
    dy = randn(rng, shape, np.float64)
    out = nk.layer_norm(x, ns, w)
    g = nk.layer_norm_backward(dy, x, out.mean, out.rstd, w)
    r = ref.layer_norm(x, ns, w)
    rg = ref.layer_norm_backward(dy, x, r.mean, r.rstd, w)
    assert_close(g.dx, rg.dx, what="dx")
    assert_close(g.dweight, rg.dweight, what="dweight")
    assert_close(g.dbias, rg.dbias, what="dbias")


def test_dweight_dbias_returned_without_weight(rng):
    x = randn(rng, (5, 7))
    dy = randn(rng, (5, 7))
    out = nk.layer_norm(x, (7,))
    g = nk.layer_norm_backward(dy, x, out.mean, out.rstd)
    g1 = nk.layer_norm_backward(dy, x, out.mean, out.rstd, np.ones(7, np.float32))
    assert g.dweight is not None and g.dbias is not None
    assert_close(g.dx, g1.dx, what="dx")
    assert_close(g.dweight, g1.dweight, what="dweight")
    assert_close(g.dbias, g1.dbias, what="dbias")


def test_default_eps(rng):
    x = randn(rng, (3, 8), np.float64, scale=0.003)  # var ~ eps: eps matters
    out = nk.layer_norm(x, (8,))
    assert_close(out.y, ref.layer_norm(x, (8,), eps=1e-5).y)


@pytest.mark.parametrize("ns", [[16], (16,), [5, 16]])
def test_normalized_shape_as_list_or_tuple(ns, rng):
    x = randn(rng, (4, 5, 16), np.float64)
    out = nk.layer_norm(x, ns)
    assert_close(out.y, ref.layer_norm(x, tuple(ns)).y)


@pytest.mark.parametrize("eps", [1e-5, 0.1, 0.0, 3.0])
def test_eps_placement(dtype, eps, rng):
    """Row variance of the order of eps makes 1/sqrt(var + eps) differ from 1/(sqrt(var) + eps)."""
    x = randn(rng, (6, 40), dtype, scale=0.003)
    run_forward(x, (40,), eps=eps)


# ----------------------------------------------------------------------------
# dtypes of the parameters, array-likes
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("x_name", ["float32", "float64", "float16"])
@pytest.mark.parametrize("w_name", ["float32", "float64", "float16", "bfloat16"])
def test_weight_of_another_float_dtype(x_name, w_name, rng):
    xd, wd = get_dtype(x_name), get_dtype(w_name)
    sd = stats_dtype(xd)
    x = randn(rng, (5, 24), xd)
    w = randn(rng, 24, wd, loc=1.0, scale=0.5)
    b = randn(rng, 24, wd)
    out, _ = run_forward(x, (24,), w, b)
    assert out.mean.dtype == sd
    dy = randn(rng, x.shape, xd)
    g, _ = run_backward(dy, x, out.mean, out.rstd, w)
    assert g.dweight.dtype == sd and g.dbias.dtype == sd


def test_array_like_input():
    x = [[1.0, 2.0, 4.0], [3.0, 5.0, 5.0]]
    out = nk.layer_norm(x, (3,))
    assert out.y.dtype == np.float64 and out.mean.dtype == np.float64
    r = ref.layer_norm(np.array(x), (3,))
    assert_close(out.y, r.y)
    g = nk.layer_norm_backward(x, x, out.mean, out.rstd)
    assert g.dx.dtype == np.float64
    assert_close(g.dx, ref.layer_norm_backward(np.array(x), np.array(x), r.mean, r.rstd).dx)


def test_one_dimensional_x_has_scalar_statistics(rng):
    x = randn(rng, (37,), np.float64)
    out, _ = run_forward(x, (37,))
    assert np.shape(out.mean) == () and np.shape(out.rstd) == ()
    dy = randn(rng, (37,), np.float64)
    run_backward(dy, x, out.mean, out.rstd)


# ----------------------------------------------------------------------------
# hard inputs
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("loc,scale", [(1e4, 1.0), (1000.0, 0.01), (-3e4, 2.0)])
@pytest.mark.parametrize("n", [64, 1031])
def test_float32_large_mean_small_spread(loc, scale, n, rng):
    """Exact float32 inputs far from zero: a stable float64-accumulating kernel is as
    accurate as for centred data (E[x^2] - E[x]^2 or float32 folding is not)."""
    x = randn(rng, (33, n), np.float32, loc=loc, scale=scale)
    w = randn(rng, n, np.float32, loc=1.0, scale=0.2)
    b = randn(rng, n, np.float32)
    out, _ = run_forward(x, (n,), w, b)
    dy = randn(rng, x.shape, np.float32, scale=scale)  # keeps dx ~ dy * rstd of order one
    run_backward(dy, x, out.mean, out.rstd, w)


def test_float64_large_mean_is_stable(rng):
    """1e8 + N(0, 1) in float64: E[x^2] - E[x]^2 would lose every digit of the variance."""
    x = randn(rng, (16, 512), np.float64, loc=1e8, scale=1.0)
    out = nk.layer_norm(x, (512,))
    r = ref.layer_norm(x, (512,))
    # Loosened: the mean carries ~1e-16 * 1e8 of rounding in any summation order,
    # amplified by rstd ~ 1 into y; both library and reference have it.  1e-6
    # still fails the one-pass formula (error of order one in the variance).
    assert_close(out.y, r.y, rtol=1e-6, atol=1e-6, what="y")
    assert_close(out.rstd, r.rstd, rtol=1e-6, atol=0, what="rstd")


@pytest.mark.parametrize(
    "name,scale,eps",
    [("float16", 6e4, 1e-5),  # x*x overflows float16
     ("bfloat16", 1e30, 1e-5),  # x*x overflows float32
     ("float32", 3e19, 1e-5),  # the sum of squares overflows float32
     ("float32", 1e-20, 0.0),  # the variance underflows float32
     ("bfloat16", 1e-30, 0.0)],
)
def test_extreme_magnitudes(name, scale, eps, rng):
    """Statistics accumulate in float64 (SPEC section 2): no overflow or underflow in
    intermediates while the inputs and outputs are representable."""
    dt = get_dtype(name)
    x = (rng.uniform(-1.0, 1.0, (6, 64)) * scale).astype(dt)
    out, _ = run_forward(x, (64,), eps=eps)
    assert np.all(np.isfinite(out.rstd))
    dy = (rng.uniform(-1.0, 1.0, x.shape) * scale).astype(dt)  # dx = O(dy * rstd) = O(1)
    run_backward(dy, x, out.mean, out.rstd)


def test_constant_rows(dtype, rng):
    """var = 0: y == bias, rstd = 1/sqrt(eps), no NaN."""
    sd = stats_dtype(dtype)
    x = randn(rng, (5, 48), dtype)
    x[1] = 3.0  # exactly representable: mean exact, x - mean == 0
    x[3] = -0.1
    w = randn(rng, 48, sd, loc=1.0)
    b = randn(rng, 48, sd)
    out, _ = run_forward(x, (48,), w, b)
    assert np.all(np.isfinite(out.y.astype(np.float64)))
    np.testing.assert_array_equal(out.y[1].astype(np.float64), b.astype(dtype).astype(np.float64))
    assert out.mean[1] == 3.0
    assert_close(out.rstd[[1, 3]], np.full(2, 1 / math.sqrt(1e-5)), sd, what="rstd")
    dy = randn(rng, x.shape, dtype)
    g, _ = run_backward(dy, x, out.mean, out.rstd, w)
    assert np.all(np.isfinite(g.dx.astype(np.float64)))


@pytest.mark.parametrize("name", ["float32", "float64"])
def test_broadcast_constant_rows(name, rng):
    """A zero-stride normalized axis: every row constant."""
    dt = get_dtype(name)
    col = randn(rng, (6, 1), dt)
    x = np.broadcast_to(col, (6, 40))
    b = randn(rng, 40, stats_dtype(dt))
    out, _ = run_forward(x, (40,), None, b)
    np.testing.assert_allclose(out.y, np.broadcast_to(b, (6, 40)), rtol=0, atol=1e-6)


def test_n_equals_one(dtype, rng):
    """A single element per row: xhat = 0, y == bias, dx == 0."""
    sd = stats_dtype(dtype)
    x = randn(rng, (7, 1), dtype)
    w = randn(rng, 1, sd, loc=2.0)
    b = randn(rng, 1, sd)
    out, _ = run_forward(x, (1,), w, b)
    np.testing.assert_array_equal(out.y.astype(np.float64),
                                  np.full((7, 1), b[0].astype(dtype).astype(np.float64)))
    assert_bitwise_equal(out.mean, x[:, 0].astype(sd), "mean")
    dy = randn(rng, x.shape, dtype)
    g, _ = run_backward(dy, x, out.mean, out.rstd, w)
    np.testing.assert_array_equal(g.dx.astype(np.float64), 0.0)


@pytest.mark.parametrize(
    "shape",
    [(4099, 7), (3, 1031), (5, 5003), (2, 65537), (1, 8192), (3, 8193), (1, 2), (2, 3)],
)
def test_sizes(shape, rng):
    x = randn(rng, shape, np.float32, loc=0.7)
    ns = shape[-1:]
    w, b = make_params(rng, ns, "weight+bias")
    out, _ = run_forward(x, ns, w, b)
    dy = randn(rng, shape, np.float32)
    run_backward(dy, x, out.mean, out.rstd, w)


@pytest.mark.parametrize("name", ["float64", "float16", "bfloat16"])
def test_medium_size(name, rng):
    dt = get_dtype(name)
    x = randn(rng, (257, 1030), dt, loc=1.0, scale=2.0)
    w, b = make_params(rng, (1030,), "weight+bias", stats_dtype(dt))
    out, _ = run_forward(x, (1030,), w, b)
    dy = randn(rng, x.shape, dt)
    run_backward(dy, x, out.mean, out.rstd, w)


# ----------------------------------------------------------------------------
# empty non-reduced axes
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape,ns", [((0, 64), (64,)), ((3, 0, 64), (64,)),
                                      ((0, 4, 5), (4, 5)), ((2, 0, 3), (3,))])
def test_empty_rows(dtype, shape, ns, rng):
    sd = stats_dtype(dtype)
    x = np.zeros(shape, dtype)
    w, b = make_params(rng, ns, "weight+bias", sd)
    out = nk.layer_norm(x, ns, w, b)
    assert out.y.shape == shape and out.y.dtype == dtype
    assert out.mean.shape == lead(shape, ns) and out.mean.dtype == sd
    assert out.rstd.shape == lead(shape, ns) and out.rstd.dtype == sd
    g = nk.layer_norm_backward(x, x, out.mean, out.rstd, w)
    assert g.dx.shape == shape and g.dx.dtype == dtype
    assert g.dweight.shape == ns and g.dweight.dtype == sd
    assert g.dbias.shape == ns and g.dbias.dtype == sd
    np.testing.assert_array_equal(g.dweight, 0.0)
    np.testing.assert_array_equal(g.dbias, 0.0)
    o = np.empty(shape, dtype)
    assert nk.layer_norm(x, ns, w, b, out=o).y is o


# ----------------------------------------------------------------------------
# layouts and strides
# ----------------------------------------------------------------------------


def _strided_cases(rng, dt):
    base = randn(rng, (12, 10, 48), dt, loc=0.3)
    return {
        "row_steps": (base[::3, 2], (48,)),
        "col_steps": (base[:, 1, ::3], (16,)),
        "negative": (base[::-1, :, ::-1], (48,)),
        "negative_2axes": (base[::-2, ::-1, :], (10, 48)),
        "misaligned_rows": (base[:, 0, 1:], (47,)),
        "fortran": (np.asfortranarray(base[:, 0]), (48,)),
        "transposed": (base.transpose(2, 0, 1), (12, 10)),
        "transposed_2d": (base[:, 3].T, (12,)),
        "broadcast_rows": (np.broadcast_to(base[0, 0], (9, 48)), (48,)),
        "broadcast_middle": (np.broadcast_to(base[:, :1], (12, 5, 48)), (5, 48)),
    }


STRIDED = ["row_steps", "col_steps", "negative", "negative_2axes", "misaligned_rows", "fortran",
           "transposed", "transposed_2d", "broadcast_rows", "broadcast_middle"]


@pytest.mark.parametrize("case", STRIDED)
@pytest.mark.parametrize("name", ["float32", "float64", "float16"])
def test_arbitrary_strides(case, name, rng):
    dt = get_dtype(name)
    sd = stats_dtype(dt)
    x, ns = _strided_cases(rng, dt)[case]
    wbig = randn(rng, (2,) + ns, sd, loc=1.0)
    w = wbig[1, ...]  # offset view
    b = randn(rng, ns, sd)[..., ::-1]  # negative-stride bias
    out, _ = run_forward(x, ns, w, b)
    out_c = nk.layer_norm(np.ascontiguousarray(x), ns, w, b)
    assert_close(out.y, out_c.y.astype(np.float64), dt if is_half(dt) else sd,
                 what="strided vs contiguous")
    dy = randn(rng, tuple(reversed(x.shape)), dt).T  # Fortran-ordered dy
    run_backward(dy, x, out.mean, out.rstd, w)
    # statistics given as strided views too
    mean2 = np.repeat(np.asarray(out.mean)[..., None], 2, axis=-1)[..., 0]
    run_backward(dy, x, mean2, out.rstd, w)


# ----------------------------------------------------------------------------
# out=
# ----------------------------------------------------------------------------


def test_out_fresh(dtype, rng):
    sd = stats_dtype(dtype)
    x = randn(rng, (6, 5, 20), dtype)
    w, b = make_params(rng, (5, 20), "weight+bias", sd)
    want = nk.layer_norm(x, (5, 20), w, b)
    out = np.full(x.shape, np.nan, dtype)
    got = nk.layer_norm(x, (5, 20), w, b, out=out)
    assert got.y is out
    assert_bitwise_equal(out, want.y, "out")
    assert_bitwise_equal(got.mean, want.mean, "mean")
    assert_bitwise_equal(got.rstd, want.rstd, "rstd")


def test_out_strided(rng):
    x = randn(rng, (6, 20))
    want = nk.layer_norm(x, (20,))
    big = np.zeros((12, 40), np.float32)
    out = big[::2, ::-2]
    got = nk.layer_norm(x, (20,), out=out)
    assert got.y is out
    assert_close(out, want.y.astype(np.float64), np.float32, what="strided out")
    assert np.all(big[1::2] == 0) and np.all(big[::2, ::2] == 0)


@pytest.mark.parametrize("kind", ["contiguous", "misaligned", "strided", "fortran"])
def test_out_is_x(dtype, kind, rng):
    """In place: the result is as if computed into a fresh array."""
    sd = stats_dtype(dtype)
    base = randn(rng, (9, 66), dtype, loc=0.5)
    x = {"contiguous": base[:, :64], "misaligned": base[:, 1:65], "strided": base[::2, ::2],
         "fortran": np.asfortranarray(base)}[kind]
    if kind == "contiguous":
        x = np.ascontiguousarray(x)
    n = x.shape[-1]
    x0 = np.copy(x, order="K")
    w, b = make_params(rng, (n,), "weight+bias", sd)
    want = nk.layer_norm(x0, (n,), w, b)
    got = nk.layer_norm(x, (n,), w, b, out=x)
    assert got.y is x
    assert_close(x, want.y.astype(np.float64), dtype if is_half(dtype) else sd, what="in-place y")
    assert_close(got.mean, want.mean.astype(np.float64), sd, what="mean")
    if kind == "contiguous":
        assert_bitwise_equal(x, want.y, "in-place y")
        assert_bitwise_equal(got.mean, want.mean, "mean")


@pytest.mark.parametrize("shift", [1, -1, 3, -5, 64, -64, 65])
def test_out_overlaps_x(shift, rng):
    shape = (7, 64)
    n = 7 * 64
    buf = randn(rng, n + abs(shift), np.float32, loc=1.0)
    if shift > 0:
        x, out = buf[:n].reshape(shape), buf[shift:].reshape(shape)
    else:
        x, out = buf[-shift:].reshape(shape), buf[:n].reshape(shape)
    x0 = x.copy()
    w, b = make_params(rng, (64,), "weight+bias")
    want = ref.layer_norm(x0, (64,), w, b)
    got = nk.layer_norm(x, (64,), w, b, out=out)
    assert got.y is out
    assert_close(out, want.y, what="overlapping out")
    assert_close(got.mean, want.mean, what="mean")
    assert_close(got.rstd, want.rstd, what="rstd")


@pytest.mark.parametrize("view", ["rows_reversed", "cols_reversed", "both_reversed",
                                  "transposed"])
def test_out_is_a_permuted_view_of_x(view, rng):
    """Overlap with a different element order: a kernel that writes row i while
    still reading x from the same memory gets this wrong."""
    x = randn(rng, (16, 16), np.float64, loc=2.0)
    x0 = x.copy()
    out = {"rows_reversed": x[::-1], "cols_reversed": x[:, ::-1], "both_reversed": x[::-1, ::-1],
           "transposed": x.T}[view]
    w, b = make_params(rng, (16,), "weight+bias", np.float64)
    want = ref.layer_norm(x0, (16,), w, b)
    got = nk.layer_norm(x, (16,), w, b, out=out)
    assert got.y is out
    assert_close(out, want.y, what="y into a permuted view of x")
    assert_close(got.mean, want.mean, what="mean")


@pytest.mark.parametrize("param", ["weight", "bias"])
@pytest.mark.parametrize("row", [0, 5, -1])
def test_out_overlaps_weight_or_bias(param, row, rng):
    """SPEC section 2 gives out= NumPy's ufunc rule (result as if computed into a fresh
    array), which covers every input: here one row of out is the weight (or bias)."""
    shape = (40, 16)
    out = np.empty(shape)
    w = out[row]
    w[...] = randn(rng, 16, np.float64, loc=1.0)
    other = randn(rng, 16, np.float64, loc=1.0)
    weight, bias = (w, other) if param == "weight" else (other, w)
    x = randn(rng, shape, np.float64)
    want = ref.layer_norm(x, (16,), weight.copy(), bias.copy())
    got = nk.layer_norm(x, (16,), weight, bias, out=out)
    assert got.y is out
    assert_close(out, want.y, what=f"y with out overlapping {param}")


# ----------------------------------------------------------------------------
# NaN / Inf
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_confined_to_its_row(dtype, bad, rng):
    """NaN/Inf propagate to the affected row only (its values are unspecified)."""
    sd = stats_dtype(dtype)
    x = randn(rng, (6, 4, 10), dtype)
    x[2, 1, 7] = bad
    w, b = make_params(rng, (10,), "weight+bias", sd)
    out = nk.layer_norm(x, (10,), w, b)
    r = ref.layer_norm(x, (10,), w, b)
    mask = np.ones((6, 4), bool)
    mask[2, 1] = False
    assert not np.any(np.isfinite(out.y[2, 1].astype(np.float64)))
    if np.isnan(bad):
        assert np.isnan(out.mean[2, 1]) and np.isnan(out.rstd[2, 1])
    nv = naive.layer_norm(x, (10,), w, b)[mask] if is_half(dtype) else None
    assert_close(out.y[mask], r.y[mask], dtype, naive=nv, what="y (other rows)")
    assert_close(out.mean[mask], r.mean[mask], sd, what="mean (other rows)")
    assert_close(out.rstd[mask], r.rstd[mask], sd, what="rstd (other rows)")

    dy = randn(rng, x.shape, dtype)
    g = nk.layer_norm_backward(dy, x, out.mean, out.rstd, w)
    rg = ref.layer_norm_backward(dy, x, out.mean.astype(np.float64),
                                 out.rstd.astype(np.float64), w)
    nvg = naive.layer_norm_backward(dy, x, out.mean, out.rstd, w)[mask] if is_half(dtype) \
        else None
    assert_close(g.dx[mask], rg.dx[mask], dtype, naive=nvg, what="dx (other rows)")
    assert_close(g.dbias, rg.dbias, sd, what="dbias")  # sum of dy: finite


# ----------------------------------------------------------------------------
# errors: right exception, message naming the argument, nothing written
# ----------------------------------------------------------------------------


def _valid_call(rng):
    x = randn(rng, (4, 3, 5))
    return dict(x=x, ns=(5,), weight=randn(rng, 5, loc=1.0), bias=randn(rng, 5),
                kw=dict(eps=1e-5, out=np.full(x.shape, 7.0, np.float32)))


_set = setter(kw_keys=("eps", "out"))


LN = r"layer_norm"
FORWARD_ERRORS = [
    ("x_int32", x_dtype(np.int32), TypeError, LN + r".*dtype"),
    ("x_int64", x_dtype(np.int64), TypeError, LN + r".*dtype"),
    ("x_uint16", x_dtype(np.uint16), TypeError, LN + r".*dtype"),
    ("x_bool", x_dtype(np.bool_), TypeError, LN + r".*dtype"),
    ("x_complex64", x_dtype(np.complex64), TypeError, LN + r".*dtype"),
    ("x_complex128", x_dtype(np.complex128), TypeError, LN + r".*dtype"),
    ("x_object", x_dtype(object), TypeError, LN + r".*dtype"),
    ("x_str", x_dtype(str), TypeError, LN + r".*dtype"),
    ("ns_not_trailing", _set("ns", (3,)), ValueError, LN + r".*normalized_shape"),
    ("ns_wrong_size", _set("ns", (4,)), ValueError, LN + r".*normalized_shape"),
    ("ns_two_axes_wrong", _set("ns", (4, 5)), ValueError, LN + r".*normalized_shape"),
    ("ns_longer_than_x", _set("ns", (2, 4, 3, 5)), ValueError, LN + r".*normalized_shape"),
    ("x_0d", many(_set("x", lambda a: a["x"][0, 0, 0]), _set("ns", (1,)), _set("weight", None),
                   _set("bias", None), _set("out", None)), ValueError, LN),
    ("weight_shape", _set("weight", lambda a: np.ones(4, np.float32)), ValueError,
     LN + r".*weight"),
    ("weight_2d", _set("weight", lambda a: np.ones((1, 5), np.float32)), ValueError,
     LN + r".*weight"),
    ("weight_flat_for_2_axes", many(_set("ns", (3, 5)),
                                     _set("weight", lambda a: np.ones(15, np.float32)),
                                     _set("bias", None)),
     ValueError, LN + r".*weight"),
    ("bias_shape", _set("bias", lambda a: np.ones(6, np.float32)), ValueError, LN + r".*bias"),
    ("empty_reduction", many(_set("x", lambda a: a["x"][:, :, :0]), _set("ns", (0,)),
                              _set("weight", None), _set("bias", None), _set("out", None)),
     ValueError, LN),
    ("empty_reduction_2axes", many(_set("x", lambda a: a["x"][:, :0, :]), _set("ns", (0, 5)),
                                    _set("weight", None), _set("bias", None), _set("out", None)),
     ValueError, LN),
    ("eps_negative", _set("eps", -1.0), ValueError, LN + r".*eps"),
    ("eps_nan", _set("eps", float("nan")), ValueError, LN + r".*eps"),
    ("out_shape", _set("out", lambda a: np.full((4, 3, 6), 7.0, np.float32)), ValueError,
     LN + r".*\bout\b"),
    ("out_shape_same_size", _set("out", lambda a: np.full((4, 5, 3), 7.0, np.float32)),
     ValueError, LN + r".*\bout\b"),
    ("out_dtype", _set("out", lambda a: np.full((4, 3, 5), 7.0, np.float16)), ValueError,
     LN + r".*\bout\b"),
    ("out_readonly", _set("out", lambda a: readonly(a["kw"]["out"])), ValueError,
     LN + r".*\bout\b"),
]


@pytest.mark.parametrize("name,mutate,exc,match", FORWARD_ERRORS,
                         ids=[e[0] for e in FORWARD_ERRORS])
def test_forward_errors(name, mutate, exc, match, rng):
    a = _valid_call(rng)
    mutate(a)
    assert_raises_nothing_written(exc, match, nk.layer_norm, a["x"], a["ns"], a["weight"],
                                  a["bias"], **a["kw"])


def test_valid_call_of_error_table_works(rng):
    a = _valid_call(rng)
    out = nk.layer_norm(a["x"], a["ns"], a["weight"], a["bias"], **a["kw"])
    assert out.y is a["kw"]["out"]


def _valid_backward(rng):
    x = randn(rng, (4, 3, 5))
    out = nk.layer_norm(x, (5,))
    return dict(dy=randn(rng, (4, 3, 5)), x=x, mean=out.mean, rstd=out.rstd,
                weight=randn(rng, 5, loc=1.0))


_bset = setter()


LNB = r"layer_norm_backward"
BACKWARD_ERRORS = [
    ("x_int", _bset("x", lambda a: a["x"].astype(np.int16)), TypeError, LNB + r".*dtype"),
    ("x_complex", _bset("x", lambda a: a["x"].astype(np.complex64)), TypeError,
     LNB + r".*dtype"),
    ("dy_int", _bset("dy", lambda a: a["dy"].astype(np.int32)), TypeError, LNB + r".*dtype"),
    ("dy_shape", _bset("dy", lambda a: a["dy"][:3]), ValueError, LNB + r".*\bdy\b"),
    ("mean_shape", _bset("mean", lambda a: a["mean"][:, :2]), ValueError, LNB + r".*\bmean\b"),
    ("mean_not_leading", _bset("mean", lambda a: np.zeros((3, 5), np.float32)), ValueError,
     LNB + r".*\bmean\b"),
    ("mean_full_rank", _bset("mean", lambda a: np.zeros((4, 3, 5), np.float32)), ValueError,
     LNB + r".*\bmean\b"),
    ("rstd_shape", _bset("rstd", lambda a: a["rstd"][:2]), ValueError, LNB + r".*\brstd\b"),
    ("weight_shape", _bset("weight", lambda a: np.ones(3, np.float32)), ValueError,
     LNB + r".*weight"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BACKWARD_ERRORS,
                         ids=[e[0] for e in BACKWARD_ERRORS])
def test_backward_errors(name, mutate, exc, match, rng):
    a = _valid_backward(rng)
    mutate(a)
    assert_raises_nothing_written(exc, match, nk.layer_norm_backward, a["dy"], a["x"], a["mean"],
                                  a["rstd"], a["weight"])


# ----------------------------------------------------------------------------
# threads: bitwise determinism and concurrent callers
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape,ns", [((4099, 1030), (1030,)), ((4099, 2, 515), (2, 515))])
@pytest.mark.parametrize("name", ["float32", "float64"])
def test_bitwise_identical_across_thread_counts(shape, ns, name, restore_num_threads):
    rng = np.random.default_rng(4321)
    dt = get_dtype(name)
    sd = stats_dtype(dt)
    x = randn(rng, shape, dt, loc=2.0, scale=3.0)
    dy = randn(rng, shape, dt)
    w, b = make_params(rng, ns, "weight+bias", sd)

    def compute():
        out = nk.layer_norm(x, ns, w, b)
        g = nk.layer_norm_backward(dy, x, out.mean, out.rstd, w)
        return out.y, out.mean, out.rstd, g.dx, g.dweight, g.dbias

    first = assert_same_across_thread_counts(compute, ["y", "mean", "rstd", "dx", "dweight",
                                                       "dbias"])
    rg = ref.layer_norm_backward(dy, x, first[1], first[2], w)
    assert_close(first[4], rg.dweight, sd, what="dweight")


def test_half_bitwise_identical_across_thread_counts(restore_num_threads):
    rng = np.random.default_rng(5)
    x = randn(rng, (2053, 777), np.float16)
    dy = randn(rng, x.shape, np.float16)

    def compute():
        out = nk.layer_norm(x, (777,))
        g = nk.layer_norm_backward(dy, x, out.mean, out.rstd)
        return out.y, out.mean, out.rstd, g.dx, g.dweight, g.dbias

    assert_same_across_thread_counts(compute, counts=(1, 3))


def test_concurrent_calls_from_python_threads():
    rng = np.random.default_rng(11)
    jobs = []
    for i in range(16):
        shape = (300 + 37 * i, 257 + i)
        jobs.append((randn(rng, shape, np.float32, loc=i), randn(rng, shape, np.float32),
                     randn(rng, shape[-1:], np.float32, loc=1.0)))

    def work(job):
        x, dy, w = job
        out = nk.layer_norm(x, x.shape[-1:], w)
        g = nk.layer_norm_backward(dy, x, out.mean, out.rstd, w)
        return out.y, out.mean, out.rstd, g.dx, g.dweight, g.dbias

    assert_concurrent_matches_serial(work, jobs)


# ----------------------------------------------------------------------------
# property test: random shapes, strides and parameters
# ----------------------------------------------------------------------------


@settings(max_examples=max(40, settings.default.max_examples))
@given(
    lead_shape=st.lists(st.integers(0, 5), min_size=0, max_size=2),
    norm_shape=st.lists(st.integers(1, 9), min_size=1, max_size=2),
    step=st.integers(1, 2),
    reverse=st.booleans(),
    affine=st.sampled_from(AFFINES),
    name=st.sampled_from(["float32", "float64"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_random_layouts(lead_shape, norm_shape, step, reverse, affine, name, seed):
    rng = np.random.default_rng(seed)
    dt = get_dtype(name)
    ns = tuple(norm_shape)
    full = tuple(lead_shape) + ns[:-1] + (ns[-1] * step,)
    x = randn(rng, full, dt)[..., ::step]
    if reverse:
        x = x[..., ::-1]
    w, b = make_params(rng, ns, affine, stats_dtype(dt))
    out, _ = run_forward(x, ns, w, b)
    dy = randn(rng, x.shape, dt)
    run_backward(dy, x, out.mean, out.rstd, w)
