"""Fused residual add + LayerNorm / RMSNorm (add_layer_norm, add_rms_norm) and their
backwards: against the float64 reference, the unfused composition (bit for bit), finite
differences, aliasing of out/h_out with the inputs, and the argument errors."""

import numpy as np
import pytest

import normkit as nk
import reference as ref
from conftest import AVAILABLE_DTYPES, assert_close, dtype_name, randn
from helpers import assert_raises_nothing_written

OPS = {
    "layer": (nk.add_layer_norm, nk.layer_norm, nk.add_layer_norm_backward, True),
    "rms": (nk.add_rms_norm, nk.rms_norm, nk.add_rms_norm_backward, False),
}


def _pair(rng, shape, dtype):
    return randn(rng, shape, dtype, loc=0.3), randn(rng, shape, dtype, scale=0.5)


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("dtype", AVAILABLE_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape, ns", [((6, 33), 33), ((2, 3, 4, 5), (4, 5)), ((0, 8), 8),
                                       ((3, 1), 1), ((2, 1000), 1000)])
def test_matches_reference_and_unfused_composition(op, dtype, shape, ns, rng):
    fused, plain, _, center = OPS[op]
    x, r = _pair(rng, shape, dtype)
    nsh = (ns,) if isinstance(ns, int) else ns
    w = randn(rng, nsh, np.float64 if dtype == np.float64 else np.float32, loc=1.0)
    args = (w, randn(rng, nsh, w.dtype)) if center else (w,)
    got = fused(x, r, ns, *args)
    h = x + r  # NumPy's sum, rounded to the dtype
    np.testing.assert_array_equal(got.h, h)
    want = plain(h, ns, *args)
    for a, b in zip((got.y, got.mean, got.rstd), want):
        if b is None:
            assert a is None
        else:
            np.testing.assert_array_equal(a, b)
    f64 = [ref.as_f64(a) for a in args]
    rr = (ref.layer_norm(ref.as_f64(h), ns, *f64) if center
          else ref.rms_norm(ref.as_f64(h), ns, *f64, eps=ref.rms_default_eps(dtype)))
    assert_close(got.y, rr.y, dtype, what="y")


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("case", ["out_x", "out_res", "h_x", "h_res", "h_x_out_res",
                                  "out_is_h_out", "out_overlaps_x", "h_overlaps_res"])
def test_out_and_h_out_aliasing_is_as_if_fresh(op, case, rng):
    fused, _, _, _ = OPS[op]
    shape = (4, 9)
    buf = randn(rng, 2 * 36 + 3, np.float32)
    x, r = buf[:36].reshape(shape), buf[36:72].reshape(shape)
    want = fused(x.copy(), r.copy(), 9)
    kw = {}
    if case == "out_x":
        kw = {"out": x}
    elif case == "out_res":
        kw = {"out": r}
    elif case == "h_x":
        kw = {"h_out": x}
    elif case == "h_res":
        kw = {"h_out": r}
    elif case == "h_x_out_res":
        kw = {"h_out": x, "out": r}
    elif case == "out_is_h_out":
        o = np.empty(shape, np.float32)
        kw = {"out": o, "h_out": o}
    elif case == "out_overlaps_x":
        kw = {"out": buf[2:38].reshape(shape)}
    elif case == "h_overlaps_res":
        kw = {"h_out": buf[39:75].reshape(shape)}
    got = fused(x, r, 9, **kw)
    if case == "out_is_h_out":  # both results land in one array: y is written last
        np.testing.assert_array_equal(got.y, want.y)
        return
    np.testing.assert_array_equal(got.y, want.y)
    np.testing.assert_array_equal(got.h, want.h)
    np.testing.assert_array_equal(got.rstd, want.rstd)


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("with_dh", [True, False])
def test_backward_by_finite_differences(op, with_dh, rng):
    fused, _, backward, center = OPS[op]
    x, r = _pair(rng, (3, 7), np.float64)
    w = randn(rng, 7, np.float64, loc=1.0)
    gy, gh = randn(rng, (3, 7), np.float64), randn(rng, (3, 7), np.float64)

    def loss(xv, rv, wv):
        o = fused(xv, rv, 7, wv)
        return float((o.y * gy).sum() + ((o.h * gh).sum() if with_dh else 0.0))

    o = fused(x, r, 7, w)
    g = (backward(gy, gh if with_dh else None, o.h, o.mean, o.rstd, w) if center
         else backward(gy, gh if with_dh else None, o.h, o.rstd, w))
    eps = 1e-6
    for target in ("x", "r"):
        num = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            e = np.zeros_like(x)
            e[i] = eps
            if target == "x":
                num[i] = (loss(x + e, r, w) - loss(x - e, r, w)) / (2 * eps)
            else:
                num[i] = (loss(x, r + e, w) - loss(x, r - e, w)) / (2 * eps)
        np.testing.assert_allclose(g.dx, num, rtol=1e-6, atol=1e-8, err_msg=f"d{target}")
    num_w = np.array([(loss(x, r, w + eps * np.eye(7)[j]) - loss(x, r, w - eps * np.eye(7)[j]))
                      / (2 * eps) for j in range(7)])
    np.testing.assert_allclose(g.dweight, num_w, rtol=1e-6, atol=1e-8)
    if center:
        np.testing.assert_allclose(g.dbias, gy.sum(0), rtol=1e-12)
    else:
        assert g.dbias is None


@pytest.mark.parametrize("op", sorted(OPS))
def test_errors_write_nothing(op, rng):
    fused = OPS[op][0]
    x, r = _pair(rng, (4, 5), np.float32)
    out, h_out = np.zeros((4, 5), np.float32), np.zeros((4, 5), np.float32)
    ro = np.zeros((4, 5), np.float32)
    ro.flags.writeable = False
    for args, kw, exc, match in [
        ((x, r[:, :4], 5), {}, ValueError, "residual has shape"),
        ((x, r.astype(np.int32), 5), {}, TypeError, "residual has unsupported dtype"),
        ((x, r, 4), {}, ValueError, "normalized_shape"),
        ((x, r, 5), {"h_out": ro}, ValueError, "h_out is read-only"),
        ((x, r, 5), {"h_out": np.zeros((4, 5))}, ValueError, "h_out has shape"),
        ((x, r, 5), {"eps": "1e-5"}, TypeError, "eps must be a real number"),
    ]:
        kw = {"out": out, **kw}
        if "h_out" not in kw:
            kw["h_out"] = h_out
        assert_raises_nothing_written(exc, match, fused, *args, **kw)
    np.testing.assert_array_equal(out, 0)
    np.testing.assert_array_equal(h_out, 0)


def test_eps_zero_denormal_spread_float32():
    x = np.array([[1e-40, -1e-40] * 4], np.float32)
    o = nk.add_layer_norm(x, np.zeros_like(x), 8, eps=0.0)
    np.testing.assert_array_equal(o.y, np.sign(x))
