"""Checks of tests/reference.py itself: backwards by central finite differences,
forwards and running statistics against hand-computed values.  Needs no normkit."""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
from conftest import get_dtype

# Central differences in float64 on O(1) data: truncation ~h^2, rounding
# ~eps*|loss|/h ~ 1e-9, so 1e-6 relative is comfortably above both.
FD_H = 1e-6
FD_RTOL = 1e-6
FD_ATOL = 1e-7


def fd_grad(loss, a, h=FD_H):
    """Central finite-difference gradient of ``loss()`` w.r.t. ``a`` (perturbed in place,
    restored)."""
    g = np.zeros_like(a)
    flat = a.reshape(-1)  # a is contiguous: a view
    gflat = g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        lp = loss()
        flat[i] = old - h
        lm = loss()
        flat[i] = old
        gflat[i] = (lp - lm) / (2 * h)
    return g


def check(actual, expected, what):
    np.testing.assert_allclose(actual, expected, rtol=FD_RTOL, atol=FD_ATOL, err_msg=what)


def _params(rng, c, with_weight, with_bias):
    w = 1.0 + 0.5 * rng.standard_normal(c) if with_weight else None
    b = rng.standard_normal(c) if with_bias else None
    return w, b


def _grad_check(fwd, bwd, x, w, b, r, affine_shape, has_bias_grad=True):
    """Compare bwd(r) with FD of sum(fwd(x, w, b) * r) for x, weight and bias.

    ``fwd(x, w, b)`` returns y; ``bwd(x, w)`` returns RefGrads for dy = r.
    When w (or b) is None, dweight (dbias) is checked against the FD at
    weight = 1 (bias = 0): SPEC says they are computed regardless.
    """
    wv = np.ones(affine_shape) if w is None else w.copy()
    bv = np.zeros(affine_shape) if b is None else b.copy()
    xv = x.copy()

    def loss():
        return float(np.sum(fwd(xv, wv, bv) * r))

    grads = bwd(x, w)
    check(grads.dx, fd_grad(loss, xv), "dx")
    check(grads.dweight, fd_grad(loss, wv), "dweight")
    if has_bias_grad:
        check(grads.dbias, fd_grad(loss, bv), "dbias")
    else:
        assert grads.dbias is None
    # weight=None must mean weight=1 for dx too
    if w is None:
        g1 = bwd(x, np.ones(affine_shape))
        np.testing.assert_allclose(grads.dx, g1.dx, rtol=1e-14, atol=1e-14)


CHANNEL_SHAPES = [(5, 3), (3, 4, 5), (2, 3, 3, 2), (2, 2, 2, 3, 2)]
AFFINE = [(True, True), (False, False), (True, False)]


def _c(shape, channel_axis):
    return shape[1] if channel_axis == 1 else shape[-1]


# ----------------------------------------------------------------------------
# finite-difference checks of every backward
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", CHANNEL_SHAPES)
@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("affine", AFFINE)
def test_batch_norm_backward_fd(shape, channel_axis, affine):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    r = rng.standard_normal(shape)
    c = _c(shape, channel_axis)
    w, b = _params(rng, c, *affine)
    out = ref.batch_norm(x, w, b, channel_axis=channel_axis)
    _grad_check(
        lambda x_, w_, b_: ref.batch_norm(x_, w_, b_, channel_axis=channel_axis).y,
        lambda x_, w_: ref.batch_norm_backward(r, x_, out.mean, out.rstd, w_,
                                               channel_axis=channel_axis),
        x, w, b, r, (c,),
    )


@pytest.mark.parametrize("shape", CHANNEL_SHAPES)
@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("affine", AFFINE)
def test_batch_norm_eval_backward_fd(shape, channel_axis, affine):
    """training=False: the statistics are constants, dx = dy * w * rstd."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    r = rng.standard_normal(shape)
    c = _c(shape, channel_axis)
    w, b = _params(rng, c, *affine)
    rm = rng.standard_normal(c)
    rv = rng.uniform(0.5, 2.0, c)
    eps = 1e-3
    out = ref.batch_norm(x, w, b, rm, rv, training=False, eps=eps, channel_axis=channel_axis)
    np.testing.assert_array_equal(out.mean, rm)
    np.testing.assert_allclose(out.rstd, 1 / np.sqrt(rv + eps), rtol=1e-15)
    _grad_check(
        lambda x_, w_, b_: ref.batch_norm(x_, w_, b_, rm, rv, training=False, eps=eps,
                                          channel_axis=channel_axis).y,
        lambda x_, w_: ref.batch_norm_backward(r, x_, out.mean, out.rstd, w_, training=False,
                                               channel_axis=channel_axis),
        x, w, b, r, (c,),
    )
    g = ref.batch_norm_backward(r, x, out.mean, out.rstd, w, training=False,
                                channel_axis=channel_axis)
    wb = (np.ones(c) if w is None else w) * out.rstd
    wb = wb.reshape((1, c) + (1,) * (len(shape) - 2)) if channel_axis == 1 else wb
    np.testing.assert_allclose(g.dx, r * wb, rtol=1e-14)


@pytest.mark.parametrize(
    "shape,normalized_shape",
    [((4, 5), (5,)), ((2, 3, 4), (4,)), ((2, 3, 4), (3, 4)), ((6,), (6,)), ((2, 1, 2, 3), (2, 3))],
)
@pytest.mark.parametrize("affine", AFFINE)
def test_layer_norm_backward_fd(shape, normalized_shape, affine):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    r = rng.standard_normal(shape)
    w = 1.0 + 0.5 * rng.standard_normal(normalized_shape) if affine[0] else None
    b = rng.standard_normal(normalized_shape) if affine[1] else None
    out = ref.layer_norm(x, normalized_shape, w, b)
    assert out.mean.shape == shape[: len(shape) - len(normalized_shape)]
    _grad_check(
        lambda x_, w_, b_: ref.layer_norm(x_, normalized_shape, w_, b_).y,
        lambda x_, w_: ref.layer_norm_backward(r, x_, out.mean, out.rstd, w_),
        x, w, b, r, normalized_shape,
    )


@pytest.mark.parametrize(
    "shape,normalized_shape", [((4, 5), (5,)), ((2, 3, 4), (3, 4)), ((7,), (7,))]
)
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rms_norm_backward_fd(shape, normalized_shape, with_weight, eps):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape)
    r = rng.standard_normal(shape)
    w = 1.0 + 0.5 * rng.standard_normal(normalized_shape) if with_weight else None
    out = ref.rms_norm(x, normalized_shape, w, eps=eps)
    assert out.mean is None

    def fwd(x_, w_, b_):
        return ref.rms_norm(x_, normalized_shape, w_, eps=eps).y

    _grad_check(
        fwd,
        lambda x_, w_: ref.rms_norm_backward(r, x_, out.rstd, w_),
        x, w, None, r, normalized_shape, has_bias_grad=False,
    )


@pytest.mark.parametrize("shape,groups", [((2, 4, 3), 2), ((3, 6, 2, 2), 3), ((2, 4, 5), 1),
                                          ((2, 4, 3), 4)])
@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("affine", AFFINE)
def test_group_norm_backward_fd(shape, groups, channel_axis, affine):
    rng = np.random.default_rng(5)
    if channel_axis == -1:
        shape = (shape[0],) + shape[2:] + (shape[1],)
    x = rng.standard_normal(shape)
    r = rng.standard_normal(shape)
    c = _c(shape, channel_axis)
    w, b = _params(rng, c, *affine)
    out = ref.group_norm(x, groups, w, b, channel_axis=channel_axis)
    assert out.mean.shape == (shape[0], groups)
    _grad_check(
        lambda x_, w_, b_: ref.group_norm(x_, groups, w_, b_, channel_axis=channel_axis).y,
        lambda x_, w_: ref.group_norm_backward(r, x_, out.mean, out.rstd, w_,
                                               channel_axis=channel_axis),
        x, w, b, r, (c,),
    )


@pytest.mark.parametrize("shape", [(2, 3, 4), (3, 2, 2, 3)])
@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("training", [True, False])
def test_instance_norm_backward_fd(shape, channel_axis, affine, training):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(shape)
    r = rng.standard_normal(shape)
    c = _c(shape, channel_axis)
    w, b = _params(rng, c, *affine)
    rm = rng.standard_normal(c)
    rv = rng.uniform(0.5, 2.0, c)
    kw = dict(training=training, channel_axis=channel_axis)
    out = ref.instance_norm(x, w, b, rm, rv, **kw)
    assert out.mean.shape == ((shape[0], c) if training else (c,))
    _grad_check(
        lambda x_, w_, b_: ref.instance_norm(x_, w_, b_, rm, rv, **kw).y,
        lambda x_, w_: ref.instance_norm_backward(r, x_, out.mean, out.rstd, w_, **kw),
        x, w, b, r, (c,),
    )


def test_backward_uses_the_given_statistics():
    """Backwards must use the mean/rstd they are given, not recompute them."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 6))
    dy = rng.standard_normal((4, 6))
    out = ref.layer_norm(x, (6,))
    g0 = ref.layer_norm_backward(dy, x, out.mean, out.rstd)
    g1 = ref.layer_norm_backward(dy, x, out.mean + 0.1, out.rstd)
    assert not np.allclose(g0.dweight, g1.dweight)
    outb = ref.batch_norm(x, channel_axis=1)
    h0 = ref.batch_norm_backward(dy, x, outb.mean, outb.rstd)
    h1 = ref.batch_norm_backward(dy, x, outb.mean, outb.rstd * 1.01)
    assert not np.allclose(h0.dx, h1.dx)


# ----------------------------------------------------------------------------
# forwards against hand-computed values
# ----------------------------------------------------------------------------


def test_layer_norm_hand_case():
    x = np.array([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
    eps = 1e-5
    out = ref.layer_norm(x, (4,), np.array([1.0, 2.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.0, 1.0]),
                         eps=eps)
    np.testing.assert_array_equal(out.mean, [2.5, 2.0])
    np.testing.assert_allclose(out.rstd, [1 / np.sqrt(1.25 + eps), 1 / np.sqrt(eps)], rtol=1e-15)
    s = 1 / np.sqrt(1.25 + eps)
    np.testing.assert_allclose(out.y[0], [-1.5 * s, -0.5 * s * 2, 0.5 * s, 1.5 * s + 1],
                               rtol=1e-15)
    np.testing.assert_array_equal(out.y[1], [0.0, 0.0, 0.0, 1.0])


def test_batch_norm_hand_case_and_running_stats():
    # one channel, values 1, 3, 5, 7: mean 4, biased var 5, unbiased 20/3
    x = np.array([[[1.0, 3.0]], [[5.0, 7.0]]])  # (N=2, C=1, S=2)
    eps = 1e-5
    out = ref.batch_norm(x, None, None, np.array([0.0]), np.array([1.0]), momentum=0.1, eps=eps)
    np.testing.assert_array_equal(out.mean, [4.0])
    np.testing.assert_allclose(out.rstd, [1 / np.sqrt(5 + eps)], rtol=1e-15)
    np.testing.assert_allclose(out.y.ravel(), np.array([-3, -1, 1, 3]) / np.sqrt(5 + eps),
                               rtol=1e-15)
    np.testing.assert_allclose(out.running_mean, [0.4], rtol=1e-15)
    np.testing.assert_allclose(out.running_var, [0.9 + 0.1 * 20 / 3], rtol=1e-15)

    # channels last, rank 2: two independent columns
    x2 = np.array([[1.0, 10.0], [3.0, 30.0]])
    o2 = ref.batch_norm(x2, channel_axis=-1, eps=0.0)
    np.testing.assert_array_equal(o2.mean, [2.0, 20.0])
    np.testing.assert_allclose(o2.rstd, [1.0, 0.1], rtol=1e-15)
    np.testing.assert_allclose(o2.y, [[-1.0, -1.0], [1.0, 1.0]], rtol=1e-15)

    # eval uses the running statistics and returns them
    o3 = ref.batch_norm(x2, np.array([2.0, 1.0]), np.array([0.5, 0.0]), np.array([1.0, 0.0]),
                        np.array([4.0, 1.0]), training=False, eps=0.0)
    np.testing.assert_array_equal(o3.mean, [1.0, 0.0])
    np.testing.assert_array_equal(o3.rstd, [0.5, 1.0])
    np.testing.assert_allclose(o3.y, [[0.5, 10.0], [2.5, 30.0]], rtol=1e-15)
    np.testing.assert_array_equal(o3.running_mean, [1.0, 0.0])
    np.testing.assert_array_equal(o3.running_var, [4.0, 1.0])


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
def test_batch_norm_running_stats_formula(channel_axis, momentum):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 4, 5, 2))
    axes = (0, 2, 3) if channel_axis == 1 else (0, 1, 2)
    c = x.shape[1] if channel_axis == 1 else x.shape[-1]
    rm0 = rng.standard_normal(c)
    rv0 = rng.uniform(0.5, 2, c)
    out = ref.batch_norm(x, None, None, rm0, rv0, momentum=momentum, channel_axis=channel_axis)
    np.testing.assert_allclose(out.mean, x.mean(axis=axes), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(out.rstd, 1 / np.sqrt(x.var(axis=axes) + 1e-5), rtol=1e-13)
    np.testing.assert_allclose(
        out.running_mean, (1 - momentum) * rm0 + momentum * x.mean(axis=axes), rtol=1e-13,
        atol=1e-15)
    np.testing.assert_allclose(
        out.running_var, (1 - momentum) * rv0 + momentum * x.var(axis=axes, ddof=1), rtol=1e-13)
    # the reference must not write into its arguments
    out2 = ref.batch_norm(x, None, None, rm0, rv0, momentum=momentum, channel_axis=channel_axis)
    np.testing.assert_array_equal(out.running_mean, out2.running_mean)


def test_group_norm_hand_case():
    x = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1)
    out = ref.group_norm(x, 2, eps=0.0)
    np.testing.assert_array_equal(out.mean, [[1.5, 3.5]])
    np.testing.assert_array_equal(out.rstd, [[2.0, 2.0]])
    np.testing.assert_array_equal(out.y.ravel(), [-1.0, 1.0, -1.0, 1.0])
    # channels last: the same numbers laid out as (N, S, C)
    out_cl = ref.group_norm(x.reshape(1, 1, 4), 2, eps=0.0, channel_axis=-1)
    np.testing.assert_array_equal(out_cl.y.ravel(), [-1.0, 1.0, -1.0, 1.0])


def test_instance_norm_hand_case_and_running_stats():
    # two instances of one channel: [1, 2, 3] and [2, 4, 6]
    x = np.array([[[1.0, 2.0, 3.0]], [[2.0, 4.0, 6.0]]])
    out = ref.instance_norm(x, None, None, np.array([0.0]), np.array([1.0]), momentum=0.1, eps=0.0)
    np.testing.assert_array_equal(out.mean, [[2.0], [4.0]])
    np.testing.assert_allclose(out.rstd, [[np.sqrt(1.5)], [np.sqrt(3 / 8)]], rtol=1e-15)
    # mean of means 3; mean of unbiased variances (1 + 4) / 2
    np.testing.assert_allclose(out.running_mean, [0.3], rtol=1e-15)
    np.testing.assert_allclose(out.running_var, [0.9 + 0.1 * 2.5], rtol=1e-15)
    ev = ref.instance_norm(x, None, None, np.array([1.0]), np.array([4.0]), training=False,
                           eps=0.0)
    np.testing.assert_array_equal(ev.mean, [1.0])
    np.testing.assert_array_equal(ev.rstd, [0.5])
    np.testing.assert_array_equal(ev.y.ravel(), [0.0, 0.5, 1.0, 0.5, 1.5, 2.5])


def test_rms_norm_hand_case_and_default_eps():
    x = np.array([[3.0, 4.0]])
    out = ref.rms_norm(x, (2,), np.array([1.0, 2.0]), eps=0.0)
    assert out.mean is None
    np.testing.assert_allclose(out.rstd, [1 / np.sqrt(12.5)], rtol=1e-15)
    np.testing.assert_allclose(out.y, [[3 / np.sqrt(12.5), 8 / np.sqrt(12.5)]], rtol=1e-15)
    # eps=None: float32's epsilon for float32/half inputs, float64's for float64
    assert ref.rms_default_eps(np.float64) == 2.0**-52
    for name in ("float32", "float16", "bfloat16"):
        assert ref.rms_default_eps(get_dtype(name)) == 2.0**-23
    tiny = np.array([[1e-4, -1e-4]])
    for dt, eps in ((np.float64, 2.0**-52), (np.float32, 2.0**-23)):
        xt = tiny.astype(dt)
        got = ref.rms_norm(xt, (2,)).rstd
        want = 1 / np.sqrt(np.mean(xt.astype(np.float64) ** 2) + eps)
        np.testing.assert_allclose(got, [want], rtol=1e-15)


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16"])
def test_reference_casts_inputs_itself(name):
    dt = get_dtype(name)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 4, 5)).astype(dt)
    w = (1 + rng.standard_normal(4)).astype(dt)
    x64 = x.astype(np.float64)
    w64 = w.astype(np.float64)
    a = ref.batch_norm(x, w)
    b = ref.batch_norm(x64, w64)
    assert a.y.dtype == np.float64 and a.mean.dtype == np.float64
    np.testing.assert_array_equal(a.y, b.y)
    la = ref.layer_norm(x, (4, 5))
    lb = ref.layer_norm(x64, (4, 5))
    np.testing.assert_array_equal(la.y, lb.y)
    ga = ref.batch_norm_backward(x, x, a.mean.astype(np.float32), a.rstd.astype(np.float32), w)
    gb = ref.batch_norm_backward(x64, x64, a.mean.astype(np.float32).astype(np.float64),
                                 a.rstd.astype(np.float32).astype(np.float64), w64)
    np.testing.assert_array_equal(ga.dx, gb.dx)
    assert ga.dx.dtype == ga.dweight.dtype == np.float64


@pytest.mark.parametrize("op", ["batch_norm", "group_norm", "instance_norm"])
def test_channels_last_matches_channels_first(op):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 4, 3, 5))  # NCHW
    w = rng.standard_normal(4)
    b = rng.standard_normal(4)
    x_cl = np.moveaxis(x, 1, -1).copy()
    args = (2,) if op == "group_norm" else ()
    f = getattr(ref, op)
    a = f(x, *args, w, b, channel_axis=1)
    c = f(x_cl, *args, w, b, channel_axis=-1)
    np.testing.assert_allclose(np.moveaxis(c.y, -1, 1), a.y, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(c.mean, a.mean, rtol=1e-13, atol=1e-15)
    dy = rng.standard_normal(x.shape)
    fb = getattr(ref, op + "_backward")
    ga = fb(dy, x, a.mean, a.rstd, w, channel_axis=1)
    gc = fb(np.moveaxis(dy, 1, -1), x_cl, a.mean, a.rstd, w, channel_axis=-1)
    np.testing.assert_allclose(np.moveaxis(gc.dx, -1, 1), ga.dx, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(gc.dweight, ga.dweight, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(gc.dbias, ga.dbias, rtol=1e-12, atol=1e-13)


def test_nan_stays_in_its_group():
    x = np.random.default_rng(11).standard_normal((4, 3, 5))
    x[1, 2, 3] = np.nan
    out = ref.layer_norm(x, (5,))
    assert np.isnan(out.y[1, 2]).all()
    assert np.isfinite(np.delete(out.y.reshape(12, 5), 1 * 3 + 2, axis=0)).all()
    bn = ref.batch_norm(x, channel_axis=1)
    assert np.isnan(bn.y[:, 2]).all() and np.isfinite(bn.y[:, :2]).all()
