"""Masked and weighted statistics (mask= on batch_norm / instance_norm / group_norm,
sample_weight= on batch_norm; issue 15): forward and backward against a float64 reference
written here with NumPy, finite differences, every dtype and both layouts, the bit-identity
rules (all-true mask, all-one weights), running statistics, and the argument errors."""

import numpy as np
import pytest

import normkit as nk
import reference as ref
from conftest import AVAILABLE_DTYPES, assert_close, dtype_name, randn, stats_dtype
from helpers import assert_raises_nothing_written


def _ncs(x, ca):
    """x as (N, C, S) float64, channels on axis 1."""
    x = np.asarray(x, np.float64)
    if ca == -1:
        x = np.moveaxis(x, -1, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _from_ncs(a, shape, ca):
    if ca == -1:
        s = (shape[0], shape[-1], *shape[1:-1])
        return np.moveaxis(a.reshape(s), 1, -1)
    return a.reshape(shape)


def ref_forward(x, omega, groups, w, b, ca, eps=1e-5):
    """Weighted statistics per group, plainly. omega (N, S); groups None = BatchNorm."""
    xs = _ncs(x, ca)
    N, C, S = xs.shape
    om = np.broadcast_to(omega[:, None, :], (N, C, S))
    if groups is None:
        W = om.sum(axis=(0, 2))
        mean = (om * xs).sum(axis=(0, 2)) / W
        var = (om * (xs - mean[None, :, None]) ** 2).sum(axis=(0, 2)) / W
        m, v = mean[None, :, None], var[None, :, None]
    else:
        D = C // groups
        xg, og = xs.reshape(N, groups, D * S), om.reshape(N, groups, D * S)
        W = og.sum(axis=-1)
        mean = (og * xg).sum(axis=-1) / W
        var = (og * (xg - mean[..., None]) ** 2).sum(axis=-1) / W
        m = np.repeat(mean, D, axis=1)[..., None]
        v = np.repeat(var, D, axis=1)[..., None]
    rstd = 1.0 / np.sqrt(v + eps)
    xhat = (xs - m) * rstd
    y = xhat * w[None, :, None] + b[None, :, None]
    return _from_ncs(y, np.shape(x), ca), mean, 1.0 / np.sqrt(var + eps), xhat, rstd, W


def ref_backward(dy, x, omega, groups, w, b, ca):
    """dx = rstd * (g - omega * (c2 + xhat * c1)) with g = dy * w and c1 = sum(g xhat) / W,
    c2 = sum(g) / W over each group, derived by hand from the weighted statistics."""
    _, _, _, xhat, rstd, W = ref_forward(x, omega, groups, w, b, ca)
    g = _ncs(dy, ca)
    N, C, S = g.shape
    gw = g * w[None, :, None]
    om = np.broadcast_to(omega[:, None, :], (N, C, S))
    if groups is None:
        c1 = ((gw * xhat).sum(axis=(0, 2)) / W)[None, :, None]
        c2 = (gw.sum(axis=(0, 2)) / W)[None, :, None]
    else:
        D = C // groups
        c1 = np.repeat((gw * xhat).reshape(N, groups, -1).sum(-1) / W, D, axis=1)[..., None]
        c2 = np.repeat(gw.reshape(N, groups, -1).sum(-1) / W, D, axis=1)[..., None]
    dx = rstd * (gw - om * (c2 + xhat * c1))
    return (_from_ncs(dx, np.shape(x), ca), (g * xhat).sum(axis=(0, 2)), g.sum(axis=(0, 2)))


OPS = {"batch": None, "instance": "C", "group": 2}


def _forward(op, x, w, b, ca, mask=None, sample_weight=None, **kw):
    if op == "batch":
        return nk.batch_norm(x, w, b, channel_axis=ca, mask=mask, sample_weight=sample_weight, **kw)
    if op == "instance":
        return nk.instance_norm(x, w, b, channel_axis=ca, mask=mask, **kw)
    return nk.group_norm(x, 2, w, b, channel_axis=ca, mask=mask, **kw)


def _backward(op, dy, x, o, w, ca, mask=None, sample_weight=None):
    if op == "batch":
        return nk.batch_norm_backward(dy, x, o.mean, o.rstd, w, channel_axis=ca, mask=mask,
                                      sample_weight=sample_weight)
    if op == "instance":
        return nk.instance_norm_backward(dy, x, o.mean, o.rstd, w, channel_axis=ca, mask=mask)
    return nk.group_norm_backward(dy, x, o.mean, o.rstd, w, channel_axis=ca, mask=mask)


def _groups(op, C):
    return None if op == "batch" else (C if op == "instance" else 2)


def _omega(mask, sw, N, spatial):
    om = np.ones((N, int(np.prod(spatial))))
    if mask is not None:
        om = np.broadcast_to(mask, (N, *spatial)).reshape(N, -1).astype(np.float64)
    if sw is not None:
        om = om * np.asarray(sw, np.float64)[:, None]
    return om


# planes longer than the shift piece (4100), short planes, channels innermost
# (4, 4, 9, 10): BatchNorm planes of 90 elements take the sample-major weighted statistics
SHAPES = [(5, 4, 6, 7), (12, 4, 3), (3, 2, 4100), (40, 6), (4, 4, 9, 10)]


# sample_weight is a batch_norm option only
CASES = [(op, kind) for op in sorted(OPS) for kind in ("mask", "broadcast_mask")] + [
    ("batch", "weights"), ("batch", "both")]


@pytest.mark.parametrize("op, kind", CASES)
@pytest.mark.parametrize("dtype", AVAILABLE_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ca", [1, -1])
def test_matches_the_float64_reference(op, kind, dtype, shape, ca, rng):
    if op != "batch" and len(shape) == 2:  # per-sample statistics need spatial positions
        shape = (shape[0], shape[1], 16)
    if ca == -1:  # the same (N, C, *spatial) problem, channels last
        shape = (shape[0], *shape[2:], shape[1])
    x = randn(rng, shape, dtype, loc=3.0, scale=2.0)
    C = shape[1 if ca == 1 else -1]
    N = shape[0]
    spatial = shape[2:] if ca == 1 else shape[1:-1]
    mask = sw = None
    if kind in ("mask", "both"):
        mask = rng.random((N, *spatial)) < 0.6
        mask.reshape(N, -1)[:, :2] = True  # every sample keeps two positions
    elif kind == "broadcast_mask":  # one mask for every sample: (*spatial,), broadcast over N
        mask = rng.random(spatial if spatial else (N,)) < 0.6  # (no spatial axes: per sample)
        mask.reshape(-1)[:2] = True
    if kind in ("weights", "both"):
        sw = rng.random(N) * 2
    sd = stats_dtype(dtype)
    w, b = randn(rng, (C,), sd, loc=1.0), randn(rng, (C,), sd)
    o = _forward(op, x, w, b, ca, mask, sw)
    om = _omega(mask, sw, N, spatial)
    groups = _groups(op, C)
    y, mean, rstd, *_ = ref_forward(x, om, groups, np.float64(w), np.float64(b), ca)
    assert_close(o.y, y, dtype, what="y")
    assert_close(o.mean.reshape(-1), mean.reshape(-1), sd, what="mean")
    assert_close(o.rstd.reshape(-1), rstd.reshape(-1), sd, what="rstd")
    dy = randn(rng, shape, dtype)
    g = _backward(op, dy, x, o, w, ca, mask, sw)
    dx, dw, db = ref_backward(dy, x, om, groups, np.float64(w), np.float64(b), ca)
    assert_close(g.dx, dx, dtype, what="dx")
    assert_close(g.dweight, dw, sd, what="dweight")
    assert_close(g.dbias, db, sd, what="dbias")


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("ca", [1, -1])
def test_gradients_match_finite_differences(op, ca, rng):
    shape = (6, 4, 9) if ca == 1 else (6, 9, 4)
    x = rng.standard_normal(shape) + 0.5
    w, b = rng.standard_normal(4) + 1.0, rng.standard_normal(4)
    mask = rng.random((6, 9)) < 0.6
    mask[:, :2] = True
    sw = rng.random(6) + 0.1 if op == "batch" else None
    r = rng.standard_normal(shape)
    o = _forward(op, x, w, b, ca, mask, sw)
    g = _backward(op, r, x, o, w, ca, mask, sw)
    _fd_check(lambda: _forward(op, x, w, b, ca, mask, sw).y, r, (x, w, b), g, rng)


def _fd_check(forward, r, params, grads, rng, h=1e-6):
    """Central differences of L = sum(forward() * r) at 8 random entries of each of x, weight,
    bias (changed in place and restored) against grads (dx, dweight, dbias)."""
    for name, a, analytic in zip(("x", "weight", "bias"), params, grads):
        for _ in range(8):
            i = tuple(rng.integers(0, s) for s in a.shape)
            old = a[i]
            a[i] = old + h
            lp = float(np.sum(forward() * r))
            a[i] = old - h
            lm = float(np.sum(forward() * r))
            a[i] = old
            num = (lp - lm) / (2 * h)
            assert abs(num - analytic[i]) <= 1e-5 * max(1.0, abs(num)), (name, i, num, analytic[i])


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_name)
def test_all_true_mask_and_unit_weights_are_the_unmasked_result_bit_for_bit(op, dtype, rng):
    x = randn(rng, (8, 4, 5, 5), dtype)
    w, b = randn(rng, (4,), stats_dtype(dtype), loc=1.0), randn(rng, (4,), stats_dtype(dtype))
    plain = _forward(op, x, w, b, 1)
    dy = randn(rng, x.shape, dtype)
    gp = _backward(op, dy, x, plain, w, 1)
    variants = [{"mask": np.ones((8, 5, 5), bool)}, {"mask": np.ones((8, 1, 1), bool)}]
    if op == "batch":
        variants += [{"sample_weight": np.ones(8)}, {"sample_weight": np.ones(8, np.float32),
                                                     "mask": np.ones((8, 5, 5), bool)}]
    for kw in variants:
        o = _forward(op, x, w, b, 1, **kw)
        for a, c in zip(o, plain):
            np.testing.assert_array_equal(a, c)
        for a, c in zip(_backward(op, dy, x, o, w, 1, **kw), gp):
            np.testing.assert_array_equal(a, c)


def test_masked_positions_do_not_reach_the_statistics(rng):
    x = rng.standard_normal((4, 3, 10)).astype(np.float32)
    mask = np.ones((4, 10), bool)
    mask[:, 7:] = False
    poisoned = x.copy()
    poisoned[:, :, 7:] = np.nan  # padding may hold anything
    a = nk.batch_norm(x, mask=mask)
    p = nk.batch_norm(poisoned, mask=mask)
    np.testing.assert_array_equal(a.mean, p.mean)
    np.testing.assert_array_equal(a.rstd, p.rstd)
    np.testing.assert_array_equal(a.y[:, :, :7], p.y[:, :, :7])
    g = nk.group_norm(poisoned, 3, mask=mask)
    assert np.isfinite(g.mean).all() and np.isfinite(g.y[:, :, :7]).all()


def test_running_statistics_use_the_weighted_batch_statistics(rng):
    x = rng.standard_normal((6, 3, 8)) * 2 + 1
    mask = rng.random((6, 8)) < 0.5
    mask[:, 0] = True
    rm, rv = np.zeros(3), np.ones(3)
    nk.batch_norm(x, running_mean=rm, running_var=rv, momentum=0.25, mask=mask)
    sel = np.moveaxis(x, 1, -1)[mask]  # (count, C)
    np.testing.assert_allclose(rm, 0.25 * sel.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(rv, 0.75 + 0.25 * sel.var(axis=0, ddof=1), rtol=1e-12)
    # sample weights: reliability weights, M2 / (W - sum(w^2) / W)
    sw = rng.random(6) + 0.2
    rm, rv = np.zeros(3), np.zeros(3)
    nk.batch_norm(x, running_mean=rm, running_var=rv, momentum=1.0, sample_weight=sw)
    om = np.broadcast_to(sw[:, None, None], x.shape)
    W, Q = om.sum(axis=(0, 2)), (om * om).sum(axis=(0, 2))
    mean = (om * x).sum(axis=(0, 2)) / W
    m2 = (om * (x - mean[None, :, None]) ** 2).sum(axis=(0, 2))
    np.testing.assert_allclose(rm, mean, rtol=1e-12)
    np.testing.assert_allclose(rv, m2 / (W - Q / W), rtol=1e-12)
    # instance norm: batch averages of the masked per-instance statistics
    rm, rv = np.zeros(3), np.zeros(3)
    nk.instance_norm(x, running_mean=rm, running_var=rv, momentum=1.0, mask=mask)
    means = [[x[n, c][mask[n]].mean() for c in range(3)] for n in range(6)]
    vars_ = [[x[n, c][mask[n]].var(ddof=1) for c in range(3)] for n in range(6)]
    np.testing.assert_allclose(rm, np.mean(means, axis=0), rtol=1e-12)
    np.testing.assert_allclose(rv, np.mean(vars_, axis=0), rtol=1e-12)


def test_evaluation_mode_ignores_the_mask(rng):
    x = rng.standard_normal((4, 3, 5))
    rm, rv = rng.standard_normal(3), rng.random(3) + 0.5
    a = nk.batch_norm(x, running_mean=rm, running_var=rv, training=False)
    b = nk.batch_norm(x, running_mean=rm, running_var=rv, training=False,
                      mask=np.zeros((4, 5), bool))
    np.testing.assert_array_equal(a.y, b.y)


def test_errors_write_nothing(rng):
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    out = np.full_like(x, 7.0)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    kw = {"out": out, "running_mean": rm, "running_var": rv}
    assert_raises_nothing_written(TypeError, "boolean", nk.batch_norm, x,
                                  mask=np.ones((4, 5)), **kw)
    assert_raises_nothing_written(ValueError, "does not broadcast", nk.batch_norm, x,
                                  mask=np.ones((4, 3, 5), bool), **kw)
    assert_raises_nothing_written(ValueError, "does not broadcast", nk.batch_norm, x,
                                  mask=np.ones((5,), bool).reshape(1, 5)[:, :4], **kw)
    none = np.zeros((4, 5), bool)
    assert_raises_nothing_written(ValueError, "more than one weighted value", nk.batch_norm, x,
                                  mask=none, **kw)
    one = none.copy()
    one[2, 3] = True
    assert_raises_nothing_written(ValueError, "more than one weighted value", nk.batch_norm, x,
                                  mask=one, **kw)
    assert_raises_nothing_written(ValueError, "a weighted value", nk.group_norm, x, 3,
                                  mask=np.array([[True] * 5] * 3 + [[False] * 5]), out=out)
    for bad in (np.array([1.0, -1.0, 1.0, 1.0]), np.array([1.0, np.nan, 1.0, 1.0])):
        assert_raises_nothing_written(ValueError, "finite and >= 0", nk.batch_norm, x,
                                      sample_weight=bad, **kw)
    assert_raises_nothing_written(ValueError, r"\(N,\)", nk.batch_norm, x,
                                  sample_weight=np.ones(5), **kw)
    assert_raises_nothing_written(TypeError, "real numbers", nk.batch_norm, x,
                                  sample_weight=np.ones(4, complex), **kw)
    with pytest.raises(TypeError):
        nk.group_norm(x, 3, sample_weight=np.ones(4))  # a batch_norm option only


# --------------------------------------------------------------------------------------------
# weighted statistics together with a fused activation (batch_norm / group_norm): y = act(z),
# z = xhat * w + b with the weighted statistics; the backward takes the gradient of y


def _act_forward(op, x, w, b, ca, act, mask=None, sample_weight=None):
    if op == "batch":
        return nk.batch_norm(x, w, b, channel_axis=ca, mask=mask, sample_weight=sample_weight,
                             activation=act)
    return nk.group_norm(x, 2, w, b, channel_axis=ca, mask=mask, activation=act)


def _act_backward(op, dy, x, o, w, b, ca, act, mask=None, sample_weight=None):
    if op == "batch":
        return nk.batch_norm_backward(dy, x, o.mean, o.rstd, w, channel_axis=ca, bias=b,
                                      activation=act, mask=mask, sample_weight=sample_weight)
    return nk.group_norm_backward(dy, x, o.mean, o.rstd, w, channel_axis=ca, bias=b,
                                  activation=act, mask=mask)


def _act_problem(rng, op, shape, ca, dtype, weights):
    """x, w, b, mask, sample_weight and omega (N, S) for shape (N, C, *spatial) laid out as ca."""
    if op == "group" and len(shape) == 2:
        shape = (shape[0], shape[1], 16)
    if ca == -1:
        shape = (shape[0], *shape[2:], shape[1])
    N, C = shape[0], shape[1 if ca == 1 else -1]
    spatial = shape[2:] if ca == 1 else shape[1:-1]
    x = randn(rng, shape, dtype, loc=0.5, scale=2.0)
    sd = stats_dtype(dtype)
    w, b = randn(rng, (C,), sd, loc=1.0), randn(rng, (C,), sd, scale=0.5)
    mask = rng.random((N, *spatial)) < 0.6
    mask.reshape(N, -1)[:, :2] = True
    sw = rng.random(N) * 2 + 0.1 if weights else None
    return x, w, b, mask, sw, _omega(mask, sw, N, spatial)


@pytest.mark.parametrize("act", sorted(ref.ACTIVATIONS))
@pytest.mark.parametrize("op, weights", [("batch", False), ("batch", True), ("group", False)])
@pytest.mark.parametrize("dtype", AVAILABLE_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES + [(3, 4, 70)], ids=str)  # + BatchNorm's sample planes
@pytest.mark.parametrize("ca", [1, -1])
def test_masked_activation_matches_the_float64_reference(act, op, weights, dtype, shape, ca, rng):
    x, w, b, mask, sw, om = _act_problem(rng, op, shape, ca, dtype, weights)
    f, fgrad = ref.ACTIVATIONS[act]
    o = _act_forward(op, x, w, b, ca, act, mask, sw)
    groups = None if op == "batch" else 2
    z, mean, rstd, *_ = ref_forward(x, om, groups, np.float64(w), np.float64(b), ca)
    sd = stats_dtype(x.dtype)
    assert_close(o.y, f(z), x.dtype, what="y")
    assert_close(o.mean.reshape(-1), mean.reshape(-1), sd, what="mean")
    assert_close(o.rstd.reshape(-1), rstd.reshape(-1), sd, what="rstd")
    dy = randn(rng, x.shape, x.dtype)
    g = _act_backward(op, dy, x, o, w, b, ca, act, mask, sw)
    g_pre = ref.as_f64(dy) * fgrad(z)  # the gradient reaching the norm's output
    dx, dw, db = ref_backward(g_pre, x, om, groups, np.float64(w), np.float64(b), ca)
    assert_close(g.dx, dx, x.dtype, what="dx")
    assert_close(g.dweight, dw, sd, what="dweight")
    assert_close(g.dbias, db, sd, what="dbias")


@pytest.mark.parametrize("act", sorted(ref.ACTIVATIONS))
@pytest.mark.parametrize("op", ["batch", "group"])
@pytest.mark.parametrize("ca", [1, -1])
def test_masked_activation_gradients_match_finite_differences(act, op, ca, rng):
    x, w, b, mask, sw, om = _act_problem(rng, op, (6, 4, 9), ca, np.float64, op == "batch")
    if act == "relu":  # finite differences need every pre-activation away from the kink
        z = ref_forward(x, om, None if op == "batch" else 2, w, b, ca)[0]
        assert np.min(np.abs(z)) > 1e-4
    r = rng.standard_normal(x.shape)
    o = _act_forward(op, x, w, b, ca, act, mask, sw)
    g = _act_backward(op, r, x, o, w, b, ca, act, mask, sw)
    _fd_check(lambda: _act_forward(op, x, w, b, ca, act, mask, sw).y, r, (x, w, b), g, rng)


@pytest.mark.parametrize("act", sorted(ref.ACTIVATIONS))
@pytest.mark.parametrize("op", ["batch", "group"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_name)
def test_masked_activation_all_true_mask_is_the_unmasked_result_bit_for_bit(act, op, dtype, rng):
    x, w, b, _, _, _ = _act_problem(rng, op, (8, 4, 5, 5), 1, dtype, False)
    plain = _act_forward(op, x, w, b, 1, act)
    dy = randn(rng, x.shape, dtype)
    gp = _act_backward(op, dy, x, plain, w, b, 1, act)
    kw = {"mask": np.ones((8, 5, 5), bool)}
    if op == "batch":
        kw["sample_weight"] = np.ones(8)
    o = _act_forward(op, x, w, b, 1, act, **kw)
    for a, c in zip(o, plain):
        np.testing.assert_array_equal(a, c)
    for a, c in zip(_act_backward(op, dy, x, o, w, b, 1, act, **kw), gp):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("act", sorted(ref.ACTIVATIONS))
def test_masked_activation_relu_is_relu_of_the_masked_output(act, rng):
    """The fused activation applies to the masked normalization's output: relu exactly, silu
    within a few ulps of its float64 value."""
    x, w, b, mask, sw, _ = _act_problem(rng, "batch", (7, 3, 20), 1, np.float32, True)
    z = nk.batch_norm(x, w, b, mask=mask, sample_weight=sw).y
    y = _act_forward("batch", x, w, b, 1, act, mask, sw).y
    if act == "relu":
        np.testing.assert_array_equal(y, np.maximum(z, 0))
    else:
        assert_close(y, ref.silu(ref.as_f64(z)), np.float32, what="y")


def test_layers_take_a_mask_with_an_activation(rng):
    x = rng.standard_normal((8, 4, 6)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    mask = rng.random((8, 6)) < 0.7
    mask[:, :2] = True
    bn = nk.BatchNorm(4, activation="relu")
    bn.bias[...] = [0.1, -0.2, 0.3, 0.0]
    o = nk.batch_norm(x, bn.weight, bn.bias, mask=mask, activation="relu")
    np.testing.assert_array_equal(bn(x, mask=mask), o.y)
    want = nk.batch_norm_backward(dy, x, o.mean, o.rstd, bn.weight, bias=bn.bias,
                                  activation="relu", mask=mask)
    np.testing.assert_array_equal(bn.backward(dy), want.dx)
    np.testing.assert_array_equal(bn.grad_weight, want.dweight)
    gn = nk.GroupNorm(2, 4, activation="silu")
    o = nk.group_norm(x, 2, gn.weight, gn.bias, mask=mask, activation="silu")
    np.testing.assert_array_equal(gn(x, mask=mask), o.y)
    want = nk.group_norm_backward(dy, x, o.mean, o.rstd, gn.weight, bias=gn.bias,
                                  activation="silu", mask=mask)
    np.testing.assert_array_equal(gn.backward(dy), want.dx)


# --------------------------------------------------------------------------------------------
# Moments(sample_weight=)


def test_moments_sample_weight_matches_the_weighted_formulas(rng):
    x = rng.standard_normal((50, 3, 4)) * 3 + 10
    w = rng.random(50) * 2
    w[[3, 7]] = 0.0
    x[3] = np.nan  # a zero weight leaves its values out entirely
    m = nk.Moments((4,)).update(x, axis=(0, 1), sample_weight=w[:, None])
    keep = w > 0
    xs, ws = x[keep].reshape(-1, 4), np.repeat(w[keep], 3)
    W, Q = ws.sum(), (ws * ws).sum()
    mean = (ws[:, None] * xs).sum(axis=0) / W
    m2 = (ws[:, None] * (xs - mean) ** 2).sum(axis=0)
    np.testing.assert_allclose(m.mean, mean, rtol=1e-13)
    np.testing.assert_allclose(m.var(), m2 / W, rtol=1e-12)
    np.testing.assert_allclose(m.var(ddof=1), m2 / (W - Q / W), rtol=1e-12)
    assert m.count == xs.shape[0]
    # pieces merged in any order give the same statistics as one update
    parts = [nk.Moments((4,)).update(x[i:i + 17], axis=(0, 1), sample_weight=w[i:i + 17, None])
             for i in range(0, 50, 17)]
    total = parts[2] + parts[0] + parts[1]
    np.testing.assert_allclose(total.mean, m.mean, rtol=1e-13)
    np.testing.assert_allclose(total.var(ddof=1), m.var(ddof=1), rtol=1e-12)
    # weighted and unweighted updates mix: an unweighted batch counts with weight 1
    mixed = nk.Moments((4,)).update(x[keep][:10], axis=(0, 1)).update(
        x[keep][10:], axis=(0, 1), sample_weight=np.ones((int(keep.sum()) - 10, 1)) * 2)
    wm = np.concatenate([np.ones(30), np.full(xs.shape[0] - 30, 2.0)])
    np.testing.assert_allclose(mixed.mean, (wm[:, None] * xs).sum(0) / wm.sum(), rtol=1e-13)
    # the state round-trips, weights included
    back = nk.Moments.from_state_dict(m.state_dict())
    np.testing.assert_array_equal(back.var(ddof=1), m.var(ddof=1))


def test_moments_unit_weights_are_the_unweighted_update_bit_for_bit(rng):
    x = rng.standard_normal((40, 5)).astype(np.float32)
    a = nk.Moments((5,)).update(x)
    b = nk.Moments((5,)).update(x, sample_weight=np.ones(40))
    for f in ("mean", "count"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    np.testing.assert_array_equal(a.var(ddof=1), b.var(ddof=1))
    assert set(b.state_dict()) == set(a.state_dict())


def test_moments_sample_weight_errors(rng):
    m = nk.Moments((5,))
    x = rng.standard_normal((4, 5))
    with pytest.raises(ValueError, match="finite and >= 0"):
        m.update(x, sample_weight=np.array([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="does not broadcast"):
        m.update(x, sample_weight=np.ones(5))
    with pytest.raises(TypeError, match="real numbers"):
        m.update(x, sample_weight=np.array(["a"] * 4))
    assert m.count == 0


def test_layers_take_mask_and_sample_weight(rng):
    x = rng.standard_normal((8, 3, 6)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    mask = rng.random((8, 6)) < 0.7
    mask[:, :2] = True
    sw = (rng.random(8) + 0.5).astype(np.float32)
    for layer, kw, fwd, bwd in (
        (nk.BatchNorm(3), {"mask": mask, "sample_weight": sw}, nk.batch_norm, nk.batch_norm_backward),
        (nk.InstanceNorm(3, affine=True), {"mask": mask}, nk.instance_norm, nk.instance_norm_backward),
    ):
        y = layer(x, **kw)
        o = fwd(x, layer.weight, layer.bias, **kw)
        np.testing.assert_array_equal(y, o.y)
        np.testing.assert_array_equal(layer.backward(dy), bwd(dy, x, o.mean, o.rstd, layer.weight, **kw).dx)
    gn = nk.GroupNorm(3, 3)
    np.testing.assert_array_equal(gn(x, mask=mask), nk.group_norm(x, 3, gn.weight, gn.bias, mask=mask).y)
    o = nk.group_norm(x, 3, gn.weight, gn.bias, mask=mask)
    np.testing.assert_array_equal(gn.backward(dy), nk.group_norm_backward(dy, x, o.mean, o.rstd, gn.weight, mask=mask).dx)
    # ghost batches slice the mask and the weights per ghost batch
    ghost = nk.BatchNorm(3, virtual_batch_size=4)
    y = ghost(x, mask=mask, sample_weight=sw)
    np.testing.assert_array_equal(y[4:], nk.batch_norm(x[4:], mask=mask[4:], sample_weight=sw[4:]).y)
    g = ghost.backward(dy)
    o = nk.batch_norm(x[:4], mask=mask[:4], sample_weight=sw[:4])
    np.testing.assert_array_equal(g[:4], nk.batch_norm_backward(dy[:4], x[:4], o.mean, o.rstd,
                                                                mask=mask[:4], sample_weight=sw[:4]).dx)
    # a later forward without a mask forgets it
    bn = nk.BatchNorm(3)
    bn(x, mask=mask)
    bn(x)
    o = nk.batch_norm(x, bn.weight, bn.bias)
    np.testing.assert_array_equal(bn.backward(dy), nk.batch_norm_backward(dy, x, o.mean, o.rstd, bn.weight).dx)


# --------------------------------------------------------------------------------------------
# random masks and weights: a clean error exactly when a statistic lacks weighted values,
# otherwise the float64 reference, forward and backward

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as hst  # noqa: E402


@settings(max_examples=80, deadline=None)
@given(data=hst.data())
def test_random_masks_and_weights_give_the_reference_or_a_clean_error(data):
    op = data.draw(hst.sampled_from(sorted(OPS)), "op")
    N = data.draw(hst.integers(1, 4), "N")
    C = data.draw(hst.sampled_from([2, 4] if op == "group" else [1, 2, 4]), "C")  # 2 groups
    spatial = tuple(data.draw(hst.lists(hst.integers(1, 5), min_size=0, max_size=2), "spatial"))
    ca = data.draw(hst.sampled_from([1, -1]), "ca")
    seed = data.draw(hst.integers(0, 2**31 - 1), "seed")
    rng = np.random.default_rng(seed)
    shape = (N, C, *spatial) if ca == 1 else (N, *spatial, C)
    x = rng.standard_normal(shape) * 2 + 1
    full = (N, *spatial)
    p_keep = data.draw(hst.sampled_from([0.0, 0.3, 0.8, 1.0]), "p_keep")
    mask = rng.random(full) < p_keep
    # a broadcastable form: drop leading axes that are all alike
    form = data.draw(hst.sampled_from(["full", "no_batch", "scalar"]), "form")
    if form == "no_batch":
        mask = mask[0]
    elif form == "scalar":
        mask = np.array(p_keep > 0.5)
    sw = None
    if op == "batch" and data.draw(hst.booleans(), "weights"):
        sw = rng.random(N) * data.draw(hst.sampled_from([0.0, 1.0, 3.0]), "scale")
        sw[rng.random(N) < 0.3] = 0.0
    om = _omega(mask, sw, N, spatial)
    groups = _groups(op, C)
    per_sample = (om > 0).sum(axis=1)
    need_ok = (per_sample.sum() >= 2 if op == "batch" else
               bool(np.all(per_sample >= (2 if op == "instance" else 1))))
    w, b = rng.standard_normal(C) + 1, rng.standard_normal(C)
    keep = x.copy()
    if not need_ok:
        with pytest.raises(ValueError):
            _forward(op, x, w, b, ca, mask, sw)
        np.testing.assert_array_equal(x, keep)
        return
    o = _forward(op, x, w, b, ca, mask, sw)
    y, mean, rstd, *_ = ref_forward(x, om, groups, w, b, ca)
    np.testing.assert_allclose(o.y, y, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(o.mean.reshape(-1), mean.reshape(-1), rtol=1e-9, atol=1e-12)
    dy = rng.standard_normal(shape)
    g = _backward(op, dy, x, o, w, ca, mask, sw)
    dx, dw, db = ref_backward(dy, x, om, groups, w, b, ca)
    scale = max(1.0, float(np.abs(dx).max()))
    np.testing.assert_allclose(g.dx, dx, rtol=1e-8, atol=1e-9 * scale)
    np.testing.assert_allclose(g.dweight, dw, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(g.dbias, db, rtol=1e-8, atol=1e-9)
