"""Fused activations of batch_norm / group_norm (activation="relu" | "silu", issue 15): forward
and backward against a float64 reference written here with NumPy, finite differences, the
unfused composition, every dtype and both layouts, extreme pre-activations, the layers, and the
argument errors (nothing written)."""

import numpy as np
import pytest

import normkit as nk
import reference as ref
from conftest import AVAILABLE_DTYPES, assert_close, dtype_name, randn, stats_dtype
from helpers import assert_raises_nothing_written


silu64 = ref.silu
ACT = ref.ACTIVATIONS  # name -> (f, f') in float64


def _bshape(x, ca):
    shape = [1] * x.ndim
    shape[1 if ca == 1 else x.ndim - 1] = x.shape[1 if ca == 1 else -1]
    return shape


def _pre_activation(op, x, w, b, ca, **kw):
    """z = xhat * w + b and the statistics, from the float64 reference."""
    f64 = ref.as_f64
    if op == "batch":
        r = ref.batch_norm(f64(x), f64(w), f64(b), channel_axis=ca, **kw)
    else:
        r = ref.group_norm(f64(x), kw.pop("groups"), f64(w), f64(b), channel_axis=ca)
    return r


def _ref_backward(op, dy, x, mean, rstd, w, ca, groups=None, training=True):
    f64 = ref.as_f64
    if op == "batch":
        return ref.batch_norm_backward(f64(dy), f64(x), mean, rstd, f64(w), training=training,
                                       channel_axis=ca)
    return ref.group_norm_backward(f64(dy), f64(x), mean, rstd, f64(w), channel_axis=ca)


# Shapes that take each CPU traversal: planes (I >= 64), rows (short planes / channels-last),
# sample planes (BatchNorm planes shorter than 1024), and a tail that is not a multiple of 8.
SHAPES = [(4, 6, 9, 13), (33, 8, 7), (16, 5), (3, 4, 130)]


def _call(op, x, w, b, ca, act, **kw):
    if op == "batch":
        return nk.batch_norm(x, w, b, channel_axis=ca, activation=act, **kw)
    return nk.group_norm(x, _groups(x, ca), w, b, channel_axis=ca, activation=act, **kw)


def _groups(x, ca):
    """Two groups where the channel count allows it, else one."""
    return 2 if x.shape[1 if ca == 1 else -1] % 2 == 0 else 1


def _call_backward(op, dy, x, o, w, b, ca, act, **kw):
    if op == "batch":
        return nk.batch_norm_backward(dy, x, o.mean, o.rstd, w, channel_axis=ca, bias=b,
                                      activation=act, **kw)
    return nk.group_norm_backward(dy, x, o.mean, o.rstd, w, channel_axis=ca, bias=b,
                                  activation=act)


@pytest.mark.parametrize("act", sorted(ACT))
@pytest.mark.parametrize("op", ["batch", "group"])
@pytest.mark.parametrize("dtype", AVAILABLE_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ca", [1, -1])
def test_forward_and_backward_match_the_float64_reference(act, op, dtype, shape, ca, rng):
    x = randn(rng, shape, dtype, loc=0.5, scale=2.0)
    C = shape[1 if ca == 1 else -1]
    sd = stats_dtype(dtype)
    w = randn(rng, (C,), sd, loc=1.0)
    b = randn(rng, (C,), sd, scale=0.5)
    dy = randn(rng, shape, dtype)
    f, fgrad = ACT[act]
    o = _call(op, x, w, b, ca, act)
    kw = {} if op == "batch" else {"groups": _groups(x, ca)}
    r = _pre_activation(op, x, w, b, ca, **kw)
    assert_close(o.y, f(r.y), dtype, what="y")
    assert_close(o.mean, r.mean, sd, what="mean")
    g = _call_backward(op, dy, x, o, w, b, ca, act)
    g_pre = ref.as_f64(dy) * fgrad(r.y)  # the gradient reaching the norm's output
    want = _ref_backward(op, g_pre, x, r.mean, r.rstd, w, ca)
    assert_close(g.dx, want.dx, dtype, what="dx")
    assert_close(g.dweight, want.dweight, sd, what="dweight")
    assert_close(g.dbias, want.dbias, sd, what="dbias")


@pytest.mark.parametrize("act", sorted(ACT))
def test_batch_norm_evaluation_mode(act, rng):
    x = randn(rng, (8, 3, 70), np.float32, scale=2.0)
    w, b = randn(rng, (3,), np.float32, loc=1.0), randn(rng, (3,), np.float32)
    rm, rv = randn(rng, (3,), np.float32), np.abs(randn(rng, (3,), np.float32)) + 0.5
    o = nk.batch_norm(x, w, b, running_mean=rm, running_var=rv, training=False, activation=act)
    f, fgrad = ACT[act]
    r = ref.batch_norm(ref.as_f64(x), ref.as_f64(w), ref.as_f64(b), running_mean=ref.as_f64(rm),
                       running_var=ref.as_f64(rv), training=False)
    assert_close(o.y, f(r.y), np.float32, what="y")
    dy = randn(rng, x.shape, np.float32)
    g = nk.batch_norm_backward(dy, x, o.mean, o.rstd, w, training=False, bias=b, activation=act)
    shape = (1, 3, 1)
    want_dx = ref.as_f64(dy) * fgrad(r.y) * ref.as_f64(w).reshape(shape) * r.rstd.reshape(shape)
    assert_close(g.dx, want_dx, np.float32, what="dx")


def _fd_check(fwd, bwd, x, w, b, rng, h=1e-6):
    """Central differences of L = sum(y * r) against the backward, in float64."""
    r = rng.standard_normal(x.shape)
    g = bwd(r)
    for name, a, analytic in (("x", x, g.dx), ("weight", w, g.dweight), ("bias", b, g.dbias)):
        idx = [tuple(rng.integers(0, s) for s in a.shape) for _ in range(6)]
        for i in idx:
            old = a[i]
            a[i] = old + h
            lp = float(np.sum(fwd() * r))
            a[i] = old - h
            lm = float(np.sum(fwd() * r))
            a[i] = old
            num = (lp - lm) / (2 * h)
            assert abs(num - analytic[i]) <= 1e-5 * max(1.0, abs(num)), (name, i, num, analytic[i])


@pytest.mark.parametrize("act", sorted(ACT))
@pytest.mark.parametrize("op", ["batch", "group"])
@pytest.mark.parametrize("ca", [1, -1])
def test_gradients_match_finite_differences(act, op, ca, rng):
    shape = (5, 4, 11) if ca == 1 else (5, 11, 4)
    x = rng.standard_normal(shape) * 1.5 + 0.2
    w = rng.standard_normal(4) + 1.0
    b = rng.standard_normal(4) * 0.5
    fwd = lambda: _call(op, x, w, b, ca, act).y  # noqa: E731
    if act == "relu":  # finite differences need every pre-activation away from the kink
        z = _pre_activation(op, x, w, b, ca, **({} if op == "batch" else {"groups": _groups(x, ca)})).y
        assert np.min(np.abs(z)) > 1e-4
    o = _call(op, x, w, b, ca, act)
    _fd_check(fwd, lambda r: _call_backward(op, r, x, o, w, b, ca, act), x, w, b, rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_name)
@pytest.mark.parametrize("op", ["batch", "group"])
def test_relu_equals_relu_of_the_unfused_output_bit_for_bit(dtype, op, rng):
    x = randn(rng, (6, 4, 33), dtype, scale=3.0)
    w, b = randn(rng, (4,), stats_dtype(dtype), loc=1.0), randn(rng, (4,), stats_dtype(dtype))
    fused = _call(op, x, w, b, 1, "relu")
    plain = _call(op, x, w, b, 1, None)
    np.testing.assert_array_equal(fused.y, np.where(plain.y < 0, 0, plain.y))
    np.testing.assert_array_equal(fused.mean, plain.mean)
    np.testing.assert_array_equal(fused.rstd, plain.rstd)
    # absent weight / bias: the same as explicit ones / zeros
    np.testing.assert_array_equal(_call(op, x, None, None, 1, "silu").y,
                                  _call(op, x, np.ones(4, w.dtype), np.zeros(4, w.dtype), 1, "silu").y)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_name)
def test_silu_is_accurate_over_the_whole_range(dtype):
    """Evaluation mode with mean 0 and var 1 - eps makes xhat = x: y = silu(x) directly, for x
    from -1000 to 1000 (exp's reduction, polynomial and underflow branch)."""
    z = np.concatenate([np.linspace(-1000, 1000, 4001), np.linspace(-30, 30, 6001),
                        [-800.0, -708.5, -708.3, -104.0, -88.0, -87.0, -1e-30, 0.0, 1e-30]])
    x = z.astype(dtype).reshape(1, 1, -1)
    sd = stats_dtype(dtype)
    o = nk.batch_norm(x, running_mean=np.zeros(1, sd), running_var=np.full(1, 1 - 1e-5, sd),
                      training=False, eps=1e-5, activation="silu")
    xhat = ref.as_f64(x) / np.sqrt(ref.as_f64(np.full(1, 1 - 1e-5, sd))[0] + 1e-5)
    want = silu64(xhat)
    tol = 8 * np.finfo(dtype).eps
    tiny = np.finfo(dtype).tiny * 1e3  # where the result underflows, an absolute bound
    err = np.abs(ref.as_f64(o.y) - want)
    assert np.all(err <= tol * np.abs(want) + tiny), float(np.max(err / (np.abs(want) + tiny)))


def test_nan_and_inf_propagate_through_the_activation():
    x = np.array([[0.5, np.nan, -1.0, 2.0]], np.float32).reshape(1, 1, 4)
    for act in ("relu", "silu"):
        y = nk.batch_norm(x, running_mean=np.zeros(1, np.float32),
                          running_var=np.ones(1, np.float32), training=False, activation=act).y
        assert np.isnan(y[0, 0, 1]) and np.isfinite(y[0, 0, [0, 2, 3]]).all()
    x = np.array([-np.inf, np.inf], np.float64).reshape(1, 1, 2)
    y = nk.batch_norm(x, running_mean=np.zeros(1), running_var=np.ones(1), training=False,
                      activation="relu").y
    assert y[0, 0, 0] == 0 and y[0, 0, 1] == np.inf


@pytest.mark.parametrize("act", sorted(ACT))
def test_layers_take_the_activation(act, rng):
    x = randn(rng, (8, 6, 5, 5), np.float32)
    dy = randn(rng, x.shape, np.float32)
    for layer, fwd, bwd in (
        (nk.BatchNorm(6, activation=act),
         lambda L: nk.batch_norm(x, L.weight, L.bias, activation=act),
         lambda L, o: nk.batch_norm_backward(dy, x, o.mean, o.rstd, L.weight, bias=L.bias,
                                             activation=act)),
        (nk.GroupNorm(3, 6, activation=act),
         lambda L: nk.group_norm(x, 3, L.weight, L.bias, activation=act),
         lambda L, o: nk.group_norm_backward(dy, x, o.mean, o.rstd, L.weight, bias=L.bias,
                                             activation=act)),
    ):
        layer.bias[:] = np.linspace(-0.5, 0.5, 6)
        o = fwd(layer)
        np.testing.assert_array_equal(layer(x), o.y)
        g = bwd(layer, o)
        np.testing.assert_array_equal(layer.backward(dy), g.dx)
        np.testing.assert_array_equal(layer.grad_bias, g.dbias)
        assert repr(layer).count(act) == 1
    # ghost batches run the activation per ghost batch
    ghost = nk.BatchNorm(6, activation=act, virtual_batch_size=4)
    y = ghost(x)
    np.testing.assert_array_equal(y[:4], nk.batch_norm(x[:4], activation=act).y)


def test_argument_errors_write_nothing(rng):
    x = randn(rng, (4, 3, 8), np.float32)
    out = np.full_like(x, 7.0)
    assert_raises_nothing_written(ValueError, "activation must be", nk.batch_norm, x,
                                  activation="tanh", out=out)
    assert_raises_nothing_written(TypeError, "activation must be", nk.group_norm, x, 3,
                                  activation=1, out=out)
    assert_raises_nothing_written(TypeError, "activation must be", nk.batch_norm, x,
                                  activation=True, out=out)
    o = nk.batch_norm(x, activation="relu")
    with pytest.raises(ValueError, match="bias has shape"):
        nk.batch_norm_backward(x, x, o.mean, o.rstd, bias=np.zeros(4), activation="relu")
    with pytest.raises(ValueError, match="activation must be"):
        nk.group_norm_backward(x, x, np.zeros((4, 3)), np.ones((4, 3)), activation="gelu")
    with pytest.raises(ValueError, match="activation must be"):
        nk.BatchNorm(3, activation="elu")
    with pytest.raises(ValueError, match="cannot be combined"):
        nk.BatchNorm(3, activation="relu", renorm=True)
    with pytest.raises(TypeError):
        nk.instance_norm(x, activation="relu")  # not an option of instance_norm
