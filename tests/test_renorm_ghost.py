"""Batch renormalization (Ioffe, 2017) and ghost batch normalization (Hoffer et al., 2017) in
nk.BatchNorm, against float64 references written here from the papers' formulas and against
finite differences."""

import numpy as np
import pytest

import normkit as nk
import reference as ref
from conftest import assert_close

RNG = np.random.default_rng(7)


def _x(shape=(6, 3, 4), dtype=np.float64, loc=0.5):
    return (loc + RNG.standard_normal(shape)).astype(dtype)


def _layer(dtype=np.float64, **kw):
    bn = nk.BatchNorm(3, dtype=dtype, **kw)
    bn.weight[...] = [1.5, -0.5, 2.0]
    bn.bias[...] = [0.1, 0.2, -0.3]
    bn.running_mean[...] = [0.2, -0.1, 0.4]
    bn.running_var[...] = [0.8, 1.5, 2.5]
    return bn


def _renorm_reference(x, bn_before, clip, momentum=0.1, eps=1e-5, omega=None):
    """y, r, d and the updated running statistics, in float64, from the paper's Algorithm 1.
    omega (N, S): position weights (a mask as 0/1): the batch statistics are the weighted ones
    and the running variance takes the reliability-weights correction (README)."""
    xs = x.astype(np.float64)
    axes = (0, 2)
    om = np.ones((xs.shape[0], xs.shape[2])) if omega is None else np.asarray(omega, np.float64)
    om = om[:, None, :]
    W = om.sum(axes) * np.ones(xs.shape[1])
    mu_b = (om * xs).sum(axes) / W
    var_b = (om * (xs - mu_b[None, :, None]) ** 2).sum(axes) / W
    unbias = W / (W - (om * om).sum(axes) / W)
    sig_b = np.sqrt(var_b + eps)
    mu, sig = bn_before["running_mean"], np.sqrt(bn_before["running_var"] + eps)
    r = np.clip(sig_b / sig, clip.get("rmin", 1 / clip.get("rmax", np.inf)), clip.get("rmax", np.inf))
    d = np.clip((mu_b - mu) / sig, -clip.get("dmax", np.inf), clip.get("dmax", np.inf))
    xhat = (xs - mu_b[None, :, None]) / sig_b[None, :, None]
    w, b = bn_before["weight"], bn_before["bias"]
    y = (xhat * r[None, :, None] + d[None, :, None]) * w[None, :, None] + b[None, :, None]
    rm = (1 - momentum) * mu + momentum * mu_b
    rv = (1 - momentum) * bn_before["running_var"] + momentum * var_b * unbias
    return y, r, d, rm, rv


def _state(bn):
    return {k: np.array(v, np.float64) for k, v in bn.state_dict().items()}


@pytest.mark.parametrize("clip", [{}, {"rmax": 1.2, "dmax": 0.1}, {"rmax": 3.0, "rmin": 0.5}])
def test_renorm_forward_matches_the_paper(clip):
    x = _x()
    bn = _layer(renorm=True, renorm_clipping=clip or None)
    before = _state(bn)
    y = bn(x)
    y_ref, r, d, rm, rv = _renorm_reference(x, before, clip)
    assert_close(y, y_ref, np.float64, what="y")
    assert_close(bn.running_mean, rm, np.float64, what="running_mean")
    assert_close(bn.running_var, rv, np.float64, what="running_var")
    assert bn.num_batches_tracked == 1
    assert not (np.all(r == 1) and np.all(d == 0))  # the test exercises the correction


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_renorm_with_rmax_1_dmax_0_is_plain_batch_norm_bit_for_bit(dtype):
    x = _x(dtype=dtype)
    a, b = _layer(dtype, renorm=True, renorm_clipping={"rmax": 1.0, "dmax": 0.0}), _layer(dtype)
    np.testing.assert_array_equal(a(x), b(x))
    for k in ("running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    dy = _x(dtype=dtype, loc=0.0)
    np.testing.assert_array_equal(a.backward(dy), b.backward(dy))
    np.testing.assert_array_equal(a.grad_weight, b.grad_weight)
    np.testing.assert_array_equal(a.grad_bias, b.grad_bias)


@pytest.mark.parametrize("masked", [False, True])
def test_renorm_backward_by_finite_differences_with_r_and_d_constant(masked):
    x = _x((4, 3, 3))
    mask = _mask((4, 3)) if masked else None
    clip = {"rmax": 1.5, "dmax": 0.5}
    bn = _layer(renorm=True, renorm_clipping=clip)
    before = _state(bn)
    bn(x, mask=mask)
    _, r, d, _, _ = _renorm_reference(x, before, clip, omega=mask)
    g = RNG.standard_normal(x.shape)
    dx = bn.backward(g)
    w, b = before["weight"], before["bias"]
    om = None if mask is None else mask[:, None, :].astype(np.float64)

    def loss(xv, wv):  # r, d frozen at the forward's values
        if om is None:
            y = ref.batch_norm(xv, wv * r, b + wv * d).y
        else:  # masked statistics, written plainly
            W = om.sum((0, 2))
            mu = (om * xv).sum((0, 2)) / W
            var = (om * (xv - mu[None, :, None]) ** 2).sum((0, 2)) / W
            xhat = (xv - mu[None, :, None]) / np.sqrt(var + 1e-5)[None, :, None]
            y = (xhat * r[None, :, None] + d[None, :, None]) * wv[None, :, None] + b[None, :, None]
        return float((y * g).sum())

    h = 1e-6
    num = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        num[i] = (loss(x + e, w) - loss(x - e, w)) / (2 * h)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-7)
    num_w = np.array([(loss(x, w + h * np.eye(3)[c]) - loss(x, w - h * np.eye(3)[c])) / (2 * h)
                      for c in range(3)])
    np.testing.assert_allclose(bn.grad_weight, num_w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bn.grad_bias, g.sum((0, 2)), rtol=1e-12)


def _mask(shape=(6, 4), p=0.7):
    m = RNG.random(shape) < p
    m[:, :2] = True  # every channel keeps values
    return m


@pytest.mark.parametrize("weights", ["mask", "sample_weight", "both"])
def test_renorm_with_a_mask_or_weights_uses_the_weighted_batch_statistics(weights):
    x = _x()
    mask = _mask() if weights != "sample_weight" else None
    sw = RNG.random(6) + 0.2 if weights != "mask" else None
    kw = {k: v for k, v in (("mask", mask), ("sample_weight", sw)) if v is not None}
    omega = np.ones((6, 4)) if mask is None else mask.astype(np.float64)
    if sw is not None:
        omega = omega * sw[:, None]
    clip = {"rmax": 1.3, "dmax": 0.2}
    bn = _layer(renorm=True, renorm_clipping=clip)
    before = _state(bn)
    y = bn(x, **kw)
    y_ref, r, d, rm, rv = _renorm_reference(x, before, clip, omega=omega)
    assert_close(y, y_ref, np.float64, what="y")
    assert_close(bn.running_mean, rm, np.float64, what="running_mean")
    assert_close(bn.running_var, rv, np.float64, what="running_var")
    assert not (np.all(r == 1) and np.all(d == 0))
    # backward: r and d constant, the weighted statistics' gradient (the plain weighted
    # backward with weight * r, and grad_weight = r * sum(dy xhat) + d * sum(dy))
    dy = _x(loc=0.0)
    dx = bn.backward(dy)
    w = before["weight"]
    o = nk.batch_norm(x, w * r, before["bias"] + w * d, **kw)
    g = nk.batch_norm_backward(dy, x, o.mean, o.rstd, w * r, **kw)
    assert_close(dx, g.dx, np.float64, what="dx")
    assert_close(bn.grad_weight, r * g.dweight + d * g.dbias, np.float64, what="grad_weight")
    assert_close(bn.grad_bias, dy.sum((0, 2)), np.float64, what="grad_bias")


def test_masked_renorm_with_rmax_1_dmax_0_is_masked_batch_norm_bit_for_bit():
    x, mask = _x(), _mask()
    a, b = _layer(renorm=True, renorm_clipping={"rmax": 1.0, "dmax": 0.0}), _layer()
    np.testing.assert_array_equal(a(x, mask=mask), b(x, mask=mask))
    for k in ("running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    dy = _x(loc=0.0)
    np.testing.assert_array_equal(a.backward(dy), b.backward(dy))
    np.testing.assert_array_equal(a.grad_weight, b.grad_weight)
    np.testing.assert_array_equal(a.grad_bias, b.grad_bias)


def test_renorm_eval_mode_is_unchanged():
    x = _x()
    a, b = _layer(renorm=True), _layer()
    np.testing.assert_array_equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("k", [7, 100])
def test_ghost_batch_at_least_the_batch_is_plain_batch_norm(k, channel_axis):
    x = _x((7, 3, 4)) if channel_axis == 1 else _x((7, 4, 3))
    a = _layer(virtual_batch_size=k, channel_axis=channel_axis)
    b = _layer(channel_axis=channel_axis)
    np.testing.assert_array_equal(a(x), b(x))
    np.testing.assert_array_equal(a.running_var, b.running_var)
    dy = _x(x.shape, loc=0.0)
    np.testing.assert_array_equal(a.backward(dy), b.backward(dy))
    np.testing.assert_array_equal(a.grad_weight, b.grad_weight)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ghost_batches_normalize_each_piece_and_update_in_order(dtype):
    x = _x((7, 3, 4), dtype)
    bn = _layer(dtype, virtual_batch_size=3)
    st = _state(bn)
    y = bn(x)
    rm, rv = st["running_mean"], st["running_var"]
    w, b = st["weight"], st["bias"]
    dy = _x((7, 3, 4), dtype, loc=0.0)
    dx = bn.backward(dy)
    dw = np.zeros(3)
    db = np.zeros(3)
    for lo, hi in [(0, 3), (3, 6), (6, 7)]:
        r = ref.batch_norm(x[lo:hi], w, b, rm, rv, momentum=0.1)
        assert_close(y[lo:hi], r.y, dtype, what=f"y of ghost batch {lo}:{hi}")
        rm, rv = r.running_mean, r.running_var
        g = ref.batch_norm_backward(dy[lo:hi], x[lo:hi], r.mean, r.rstd, w)
        assert_close(dx[lo:hi], g.dx, dtype, what="dx")
        dw += g.dweight
        db += g.dbias
    assert_close(bn.running_mean, rm, dtype, what="running_mean")
    assert_close(bn.running_var, rv, dtype, what="running_var")
    assert_close(bn.grad_weight, dw, dtype, what="dweight")
    assert_close(bn.grad_bias, db, dtype, what="dbias")
    assert bn.num_batches_tracked == 1


def test_ghost_piece_with_one_value_raises_and_writes_nothing():
    bn = _layer(virtual_batch_size=2)
    before = _state(bn)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(_x((5, 3)))  # pieces 2, 2, 1: the last has one value per channel
    for k, v in _state(bn).items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("kw, exc, match", [
    ({"renorm": True, "track_running_stats": False}, ValueError, "track_running_stats"),
    ({"renorm": True, "renorm_clipping": {"rmax": 0.5}}, ValueError, "rmax >= 1"),
    ({"renorm": True, "renorm_clipping": {"dmax": -1}}, ValueError, "dmax >= 0"),
    ({"renorm": True, "renorm_clipping": {"rmx": 2}}, ValueError, "unknown keys"),
    ({"renorm": True, "renorm_clipping": {"rmax": "2"}}, TypeError, "real number"),
    ({"renorm": True, "renorm_clipping": [2, 1]}, TypeError, "dict"),
    ({"renorm_clipping": {"rmax": 2}}, ValueError, "renorm=True"),
    ({"renorm": "yes"}, TypeError, "bool"),
    ({"virtual_batch_size": 0}, ValueError, "virtual_batch_size"),
    ({"virtual_batch_size": 2.0}, TypeError, "virtual_batch_size"),
    ({"virtual_batch_size": 2, "renorm": True}, ValueError, "cannot be combined"),
])
def test_renorm_and_ghost_argument_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        nk.BatchNorm(3, **kw)
