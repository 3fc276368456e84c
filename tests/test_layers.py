"""The stateful layers of SPEC section 4: BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm.

A layer's forward and backward must be exactly the functional kernels with the layer's
parameters and mode (so they are compared bitwise with them); the rest is state: defaults,
train/eval, running statistics and their momentum rules, num_batches_tracked, gradients,
state_dict/load_state_dict, and what a failing call leaves behind.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
from conftest import assert_bitwise_equal, assert_close, get_dtype, randn

nk = pytest.importorskip("normkit")

LAYER_NAMES = ["BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm"]


def make_layer(name, dtype=np.float32, **kw):
    """A small layer of each kind, all with affine parameters unless overridden, and its
    input shape."""
    if name == "BatchNorm":
        return nk.BatchNorm(4, dtype=dtype, **kw), (6, 4, 5)
    if name == "LayerNorm":
        return nk.LayerNorm((3, 5), dtype=dtype, **kw), (4, 3, 5)
    if name == "GroupNorm":
        return nk.GroupNorm(2, 6, dtype=dtype, **kw), (3, 6, 4)
    if name == "InstanceNorm":
        kw.setdefault("affine", True)
        kw.setdefault("track_running_stats", True)
        return nk.InstanceNorm(4, dtype=dtype, **kw), (3, 4, 7)
    if name == "RMSNorm":
        return nk.RMSNorm(8, dtype=dtype, **kw), (5, 8)
    raise AssertionError(name)


def functional(layer, x, training=True, running=None):
    """The functional call equivalent to ``layer(x)``; ``running`` = (rm, rv) to update."""
    rm, rv = running if running is not None else (None, None)
    if isinstance(layer, nk.BatchNorm):
        return nk.batch_norm(x, layer.weight, layer.bias, running_mean=rm, running_var=rv, training=training,
                             momentum=layer.momentum, eps=layer.eps,
                             channel_axis=layer.channel_axis)
    if isinstance(layer, nk.InstanceNorm):
        return nk.instance_norm(x, layer.weight, layer.bias, running_mean=rm, running_var=rv, training=training,
                                momentum=layer.momentum, eps=layer.eps,
                                channel_axis=layer.channel_axis)
    if isinstance(layer, nk.GroupNorm):
        return nk.group_norm(x, layer.num_groups, layer.weight, layer.bias, eps=layer.eps,
                             channel_axis=layer.channel_axis)
    if isinstance(layer, nk.LayerNorm):
        return nk.layer_norm(x, layer.normalized_shape, layer.weight, layer.bias, eps=layer.eps)
    if isinstance(layer, nk.RMSNorm):
        return nk.rms_norm(x, layer.normalized_shape, layer.weight, eps=layer.eps)
    raise AssertionError(type(layer))


def functional_backward(layer, dy, x, out, training=True):
    if isinstance(layer, nk.BatchNorm):
        return nk.batch_norm_backward(dy, x, out.mean, out.rstd, layer.weight,
                                      training=training, channel_axis=layer.channel_axis)
    if isinstance(layer, nk.InstanceNorm):
        return nk.instance_norm_backward(dy, x, out.mean, out.rstd, layer.weight,
                                         training=training, channel_axis=layer.channel_axis)
    if isinstance(layer, nk.GroupNorm):
        return nk.group_norm_backward(dy, x, out.mean, out.rstd, layer.weight,
                                      channel_axis=layer.channel_axis)
    if isinstance(layer, nk.LayerNorm):
        return nk.layer_norm_backward(dy, x, out.mean, out.rstd, layer.weight)
    if isinstance(layer, nk.RMSNorm):
        return nk.rms_norm_backward(dy, x, out.rstd, layer.weight)
    raise AssertionError(type(layer))


def has_running(layer):
    return getattr(layer, "running_mean", None) is not None


def randomize(layer, rng):
    """Non-trivial parameters (in place, keeping dtype) so that comparisons mean something."""
    if layer.weight is not None:
        layer.weight[...] = 1.0 + 0.5 * rng.standard_normal(layer.weight.shape)
    if getattr(layer, "bias", None) is not None:
        layer.bias[...] = rng.standard_normal(layer.bias.shape)


# ----------------------------------------------------------------------------
# construction and defaults
# ----------------------------------------------------------------------------


def test_batch_norm_defaults():
    bn = nk.BatchNorm(5)
    assert bn.training is True
    assert bn.eps == 1e-5 and bn.momentum == 0.1 and bn.channel_axis == 1
    assert bn.affine is True and bn.track_running_stats is True
    for name, value in [("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                        ("running_var", 1.0)]:
        a = getattr(bn, name)
        assert isinstance(a, np.ndarray) and a.shape == (5,) and a.dtype == np.float32, name
        np.testing.assert_array_equal(a, value)
        assert a.flags.writeable
    assert bn.num_batches_tracked == 0
    assert bn.grad_weight is None and bn.grad_bias is None


def test_instance_norm_defaults():
    """PyTorch's defaults: no affine parameters and no running statistics."""
    m = nk.InstanceNorm(3)
    assert m.training is True and m.eps == 1e-5 and m.momentum == 0.1
    assert m.affine is False and m.track_running_stats is False
    assert m.weight is None and m.bias is None
    assert m.running_mean is None and m.running_var is None
    assert m.num_batches_tracked is None
    m2 = nk.InstanceNorm(3, affine=True, track_running_stats=True)
    np.testing.assert_array_equal(m2.weight, np.ones(3))
    np.testing.assert_array_equal(m2.bias, np.zeros(3))
    np.testing.assert_array_equal(m2.running_mean, np.zeros(3))
    np.testing.assert_array_equal(m2.running_var, np.ones(3))
    assert m2.num_batches_tracked == 0


def test_layer_norm_group_norm_rms_norm_defaults():
    ln = nk.LayerNorm((2, 3))
    assert ln.normalized_shape == (2, 3) and ln.eps == 1e-5 and ln.elementwise_affine
    np.testing.assert_array_equal(ln.weight, np.ones((2, 3)))
    np.testing.assert_array_equal(ln.bias, np.zeros((2, 3)))
    assert ln.weight.dtype == np.float32
    assert nk.LayerNorm(7).normalized_shape == (7,)
    gn = nk.GroupNorm(2, 6)
    assert gn.num_groups == 2 and gn.num_channels == 6 and gn.eps == 1e-5
    assert gn.affine and gn.channel_axis == 1
    np.testing.assert_array_equal(gn.weight, np.ones(6))
    np.testing.assert_array_equal(gn.bias, np.zeros(6))
    rms = nk.RMSNorm(4)
    assert rms.eps is None and rms.elementwise_affine
    np.testing.assert_array_equal(rms.weight, np.ones(4))
    assert getattr(rms, "bias", None) is None
    for layer in (ln, gn, rms):
        assert layer.training is True
        assert not hasattr(layer, "running_mean") or layer.running_mean is None


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_float64_parameters(name):
    layer, _ = make_layer(name, dtype=np.float64)
    assert layer.weight.dtype == np.float64
    if has_running(layer):
        assert layer.running_mean.dtype == np.float64
        assert layer.running_var.dtype == np.float64


def test_no_affine_parameters():
    assert nk.BatchNorm(3, affine=False).weight is None
    assert nk.BatchNorm(3, affine=False).bias is None
    assert nk.GroupNorm(1, 3, affine=False).weight is None
    assert nk.LayerNorm(3, elementwise_affine=False).bias is None
    assert nk.RMSNorm(3, elementwise_affine=False).weight is None


@pytest.mark.parametrize(
    "factory,exc",
    [
        (lambda: nk.BatchNorm(0), ValueError),
        (lambda: nk.BatchNorm(3, eps=-1.0), ValueError),
        (lambda: nk.BatchNorm(3, momentum=1.5), ValueError),
        (lambda: nk.BatchNorm(3, channel_axis=0), ValueError),
        (lambda: nk.BatchNorm(3, dtype=np.int32), TypeError),
        (lambda: nk.BatchNorm(3, dtype=np.float16), TypeError),
        (lambda: nk.GroupNorm(4, 6), ValueError),
        (lambda: nk.GroupNorm(0, 6), ValueError),
        (lambda: nk.InstanceNorm(3, momentum=-0.5), ValueError),
        (lambda: nk.LayerNorm(0), ValueError),
        (lambda: nk.RMSNorm((4, 0)), ValueError),
        (lambda: nk.RMSNorm(4, eps=float("nan")), ValueError),
    ],
)
def test_constructor_errors(factory, exc):
    with pytest.raises(exc):
        factory()


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_repr_is_readable(name):
    layer, _ = make_layer(name)
    text = repr(layer)
    assert text.startswith(name + "(") and text.endswith(")")
    assert "object at 0x" not in text
    assert "eps" in text
    first = {"BatchNorm": "4", "LayerNorm": "(3, 5)", "GroupNorm": "2, 6",
             "InstanceNorm": "4", "RMSNorm": "(8,)"}[name]
    assert text[len(name) + 1:].startswith(first), text


def test_train_eval_switch():
    bn = nk.BatchNorm(3)
    assert bn.eval() is bn and bn.training is False
    assert bn.train() is bn and bn.training is True
    assert bn.train(False) is bn and bn.training is False
    bn.train(True)
    assert bn.training is True


# ----------------------------------------------------------------------------
# forward and backward == the functional kernels
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAYER_NAMES)
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_call_returns_y_equal_to_functional(name, dtype_name, rng):
    dt = get_dtype(dtype_name)
    layer, shape = make_layer(name, dtype=dt)
    randomize(layer, rng)
    x = randn(rng, shape, dt, loc=0.5, scale=2.0)
    running = None
    if has_running(layer):
        running = (layer.running_mean.copy(), layer.running_var.copy())
    want = functional(layer, x, running=running)
    y = layer(x)
    assert isinstance(y, np.ndarray)  # y only, not a NormOutput
    assert y.shape == shape and y.dtype == dt
    assert_bitwise_equal(y, want.y, "layer(x) vs functional")
    assert_bitwise_equal(layer.forward(x), want.y, "forward(x) vs functional")
    if running is not None:
        # the functional call was made once, the layer twice: redo the second update
        functional(layer, x, running=running)
        assert_bitwise_equal(layer.running_mean, running[0], "running_mean")
        assert_bitwise_equal(layer.running_var, running[1], "running_var")
        assert layer.num_batches_tracked == 2


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_backward_returns_dx_and_sets_grads(name, rng):
    layer, shape = make_layer(name, dtype=np.float64)
    randomize(layer, rng)
    x = randn(rng, shape, np.float64, loc=0.5)
    out = functional(layer, x)
    layer(x)
    dy1 = randn(rng, shape, np.float64)
    dy2 = randn(rng, shape, np.float64)
    g1 = functional_backward(layer, dy1, x, out)
    g2 = functional_backward(layer, dy2, x, out)
    dx = layer.backward(dy1)
    assert isinstance(dx, np.ndarray)
    assert_bitwise_equal(dx, g1.dx, "dx")
    assert_bitwise_equal(layer.grad_weight, g1.dweight, "grad_weight")
    assert layer.grad_weight.shape == layer.weight.shape
    if name == "RMSNorm":
        assert layer.grad_bias is None
    else:
        assert_bitwise_equal(layer.grad_bias, g1.dbias, "grad_bias")
    # a second backward overwrites (does not accumulate)
    dx2 = layer.backward(dy2)
    assert_bitwise_equal(dx2, g2.dx, "dx (second call)")
    assert_bitwise_equal(layer.grad_weight, g2.dweight, "grad_weight (second call)")
    if name != "RMSNorm":
        assert_bitwise_equal(layer.grad_bias, g2.dbias, "grad_bias (second call)")


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_gradients_match_reference(name, rng):
    """The layer's dx/grads against the float64 reference (fed its saved statistics)."""
    layer, shape = make_layer(name, dtype=np.float64)
    randomize(layer, rng)
    x = randn(rng, shape, np.float64, loc=0.5)
    dy = randn(rng, shape, np.float64)
    out = functional(layer, x)
    layer(x)
    dx = layer.backward(dy)
    if name == "BatchNorm":
        r = ref.batch_norm_backward(dy, x, out.mean, out.rstd, layer.weight)
    elif name == "InstanceNorm":
        r = ref.instance_norm_backward(dy, x, out.mean, out.rstd, layer.weight)
    elif name == "GroupNorm":
        r = ref.group_norm_backward(dy, x, out.mean, out.rstd, layer.weight)
    elif name == "LayerNorm":
        r = ref.layer_norm_backward(dy, x, out.mean, out.rstd, layer.weight)
    else:
        r = ref.rms_norm_backward(dy, x, out.rstd, layer.weight)
    assert_close(dx, r.dx, what="dx")
    assert_close(layer.grad_weight, r.dweight, what="grad_weight")
    if r.dbias is not None:
        assert_close(layer.grad_bias, r.dbias, what="grad_bias")


@pytest.mark.parametrize(
    "layer",
    [nk.BatchNorm(3, affine=False), nk.GroupNorm(1, 3, affine=False), nk.InstanceNorm(3),
     nk.LayerNorm(3, elementwise_affine=False), nk.RMSNorm(3, elementwise_affine=False)],
    ids=LAYER_NAMES,
)
def test_grads_are_none_without_affine(layer, rng):
    x = randn(rng, (4, 3, 3))
    y = layer(x)
    dx = layer.backward(np.ones_like(y))
    assert dx.shape == x.shape
    assert layer.grad_weight is None and layer.grad_bias is None


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_backward_before_forward_raises(name, rng):
    layer, shape = make_layer(name)
    with pytest.raises(RuntimeError, match=name):
        layer.backward(np.ones(shape, np.float32))
    assert layer.grad_weight is None


def test_parameters_are_used_by_reference(rng):
    """Changing weight/bias in place changes the output (no hidden copy)."""
    bn = nk.BatchNorm(3, dtype=np.float64)
    x = randn(rng, (5, 3, 4), np.float64)
    y0 = bn(x)
    bn.weight[:] = 2.0
    bn.bias[:] = 1.0
    assert_close(bn(x), 2.0 * y0 + 1.0, what="scaled output")


def test_channels_last_layers(rng):
    x = randn(rng, (3, 5, 6, 4), np.float64)
    bn = nk.BatchNorm(4, channel_axis=-1, dtype=np.float64)
    assert_bitwise_equal(bn(x), nk.batch_norm(x, bn.weight, bn.bias, channel_axis=-1).y)
    gn = nk.GroupNorm(2, 4, channel_axis=-1, dtype=np.float64)
    assert_bitwise_equal(gn(x), nk.group_norm(x, 2, channel_axis=-1).y)
    inn = nk.InstanceNorm(4, channel_axis=-1)
    y = inn(x)
    assert_bitwise_equal(y, nk.instance_norm(x, channel_axis=-1).y)
    dy = randn(rng, x.shape, np.float64)
    out = nk.group_norm(x, 2, gn.weight, channel_axis=-1)
    gn(x)
    assert_bitwise_equal(gn.backward(dy),
                         nk.group_norm_backward(dy, x, out.mean, out.rstd, gn.weight,
                                                channel_axis=-1).dx)


def test_half_input_with_float32_layer(rng):
    bn = nk.BatchNorm(3)
    x = randn(rng, (8, 3, 4), np.float16)
    y = bn(x)
    assert y.dtype == np.float16
    assert bn.running_mean.dtype == np.float32
    dx = bn.backward(randn(rng, x.shape, np.float16))
    assert dx.dtype == np.float16 and bn.grad_weight.dtype == np.float32


# ----------------------------------------------------------------------------
# modes and running statistics
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["BatchNorm", "InstanceNorm"])
def test_eval_uses_running_stats(name, rng):
    layer, shape = make_layer(name, dtype=np.float64)
    randomize(layer, rng)
    for _ in range(3):
        layer(randn(rng, shape, np.float64, loc=1.0, scale=2.0))
    assert layer.num_batches_tracked == 3
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    layer.eval()
    x = randn(rng, shape, np.float64, loc=-1.0)
    y = layer(x)
    want = functional(layer, x, training=False, running=(rm, rv))
    assert_bitwise_equal(y, want.y, "eval y")
    # y uses the running statistics, not the batch ones
    per = (1, -1) + (1,) * (len(shape) - 2)
    manual = ((x - rm.reshape(per)) / np.sqrt(rv.reshape(per) + layer.eps)
              * layer.weight.reshape(per) + layer.bias.reshape(per))
    assert_close(y, manual, what="eval y from running statistics")
    # nothing is updated in eval
    assert_bitwise_equal(layer.running_mean, rm, "running_mean")
    assert_bitwise_equal(layer.running_var, rv, "running_var")
    assert layer.num_batches_tracked == 3
    # and the backward holds the statistics constant
    dy = randn(rng, shape, np.float64)
    dx = layer.backward(dy)
    g = functional_backward(layer, dy, x, want, training=False)
    assert_bitwise_equal(dx, g.dx, "eval dx")
    assert_close(dx, dy * (layer.weight / np.sqrt(rv + layer.eps)).reshape(per), what="eval dx")
    assert_bitwise_equal(layer.grad_weight, g.dweight, "eval grad_weight")
    # back to training: batch statistics again, and tracking resumes
    layer.train()
    assert_bitwise_equal(layer(x), functional(layer, x, running=(rm.copy(), rv.copy())).y)
    assert layer.num_batches_tracked == 4


@pytest.mark.parametrize(
    "factory,shape",
    [(lambda: nk.BatchNorm(3, track_running_stats=False, dtype=np.float64), (6, 3, 4)),
     (lambda: nk.InstanceNorm(3, dtype=np.float64), (4, 3, 5)),
     (lambda: nk.InstanceNorm(3, affine=True, dtype=np.float64), (4, 3, 5))],
    ids=["BatchNorm", "InstanceNorm", "InstanceNorm-affine"],
)
def test_untracked_layer_uses_batch_stats_in_eval(factory, shape, rng):
    layer = factory()
    assert layer.running_mean is None and layer.num_batches_tracked is None
    x = randn(rng, shape, np.float64, loc=2.0, scale=3.0)
    dy = randn(rng, shape, np.float64)
    y_train = layer(x)
    dx_train = layer.backward(dy)
    layer.eval()
    y_eval = layer(x)
    dx_eval = layer.backward(dy)
    assert_bitwise_equal(y_eval, y_train, "eval y == batch-statistics y")
    assert_bitwise_equal(dx_eval, dx_train, "eval dx == batch-statistics dx")
    assert layer.running_mean is None and layer.num_batches_tracked is None
    m = y_eval.mean(axis=(0, 2) if isinstance(layer, nk.BatchNorm) else 2)
    assert_close(m, np.zeros_like(m), what="normalized with batch statistics")


@pytest.mark.parametrize("name", ["BatchNorm", "InstanceNorm"])
def test_momentum_rule(name, rng):
    layer, shape = make_layer(name, dtype=np.float64, momentum=0.3)
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    for _ in range(4):
        x = randn(rng, shape, np.float64, loc=1.0, scale=2.0)
        layer(x)
        r = (ref.batch_norm if name == "BatchNorm" else ref.instance_norm)(
            x, None, None, rm, rv, momentum=0.3)
        rm, rv = r.running_mean, r.running_var
    assert_close(layer.running_mean, rm, what="running_mean")
    assert_close(layer.running_var, rv, what="running_var")


@pytest.mark.parametrize("name", ["BatchNorm", "InstanceNorm"])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_momentum_none_is_cumulative_average(name, channel_axis, rng):
    """After k batches the running statistics are the plain averages of the k batch
    statistics (means, and unbiased variances)."""
    layer, shape = make_layer(name, dtype=np.float64, momentum=None,
                              channel_axis=channel_axis)
    assert layer.momentum is None
    if channel_axis == -1:
        shape = (shape[0],) + shape[2:] + (shape[1],)
    cax = 1 if channel_axis == 1 else len(shape) - 1
    means, vars_ = [], []
    for k in range(1, 6):
        x = randn(rng, (shape[0] + k,) + shape[1:], np.float64, loc=k, scale=1.0 + k)
        layer(x)
        xs = np.moveaxis(x, cax, 1).reshape(x.shape[0], shape[cax], -1)
        if name == "BatchNorm":
            means.append(xs.mean(axis=(0, 2)))
            vars_.append(xs.transpose(1, 0, 2).reshape(shape[cax], -1).var(axis=1, ddof=1))
        else:
            means.append(xs.mean(axis=2).mean(axis=0))
            vars_.append(xs.var(axis=2, ddof=1).mean(axis=0))
        assert layer.num_batches_tracked == k
        assert_close(layer.running_mean, np.mean(means, axis=0), what=f"running_mean, k={k}")
        assert_close(layer.running_var, np.mean(vars_, axis=0), what=f"running_var, k={k}")


def test_momentum_none_continues_from_loaded_count(rng):
    """The cumulative average weights the next batch by 1/(num_batches_tracked + 1)."""
    bn = nk.BatchNorm(2, momentum=None, dtype=np.float64)
    state = bn.state_dict()
    state["running_mean"] = np.array([1.0, 2.0])
    state["num_batches_tracked"] = np.array(3)
    bn.load_state_dict(state)
    x = randn(rng, (5, 2, 3), np.float64)
    bn(x)
    assert bn.num_batches_tracked == 4
    assert_close(bn.running_mean, (3 * np.array([1.0, 2.0]) + x.mean(axis=(0, 2))) / 4)


def test_num_batches_tracked_only_in_training(rng):
    bn = nk.BatchNorm(3)
    x = randn(rng, (4, 3, 2))
    bn(x)
    bn(x)
    assert bn.num_batches_tracked == 2
    bn.eval()
    bn(x)
    assert bn.num_batches_tracked == 2
    bn.train()
    bn(x)
    assert bn.num_batches_tracked == 3


def test_momentum_zero_and_one(rng):
    x = randn(rng, (6, 3, 4), np.float64, loc=2.0)
    frozen = nk.BatchNorm(3, momentum=0.0, dtype=np.float64)
    frozen(x)
    np.testing.assert_array_equal(frozen.running_mean, 0.0)
    np.testing.assert_array_equal(frozen.running_var, 1.0)
    assert frozen.num_batches_tracked == 1
    latest = nk.BatchNorm(3, momentum=1.0, dtype=np.float64)
    latest(x)
    assert_close(latest.running_mean, x.mean(axis=(0, 2)))
    assert_close(latest.running_var, x.transpose(1, 0, 2).reshape(3, -1).var(axis=1, ddof=1))


# ----------------------------------------------------------------------------
# failing calls change nothing
# ----------------------------------------------------------------------------


def _state_copy(layer):
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


def _assert_state_equal(layer, state):
    now = layer.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert_bitwise_equal(now[k], state[k], k)


@pytest.mark.parametrize(
    "name,bad,exc",
    [
        ("BatchNorm", lambda s: np.ones((6, 5, 5), np.float32), ValueError),  # channels
        ("BatchNorm", lambda s: np.ones(s, np.int32), TypeError),
        ("BatchNorm", lambda s: np.ones(s, np.float64), TypeError),  # float32 running stats
        ("BatchNorm", lambda s: np.ones((1, 4), np.float32), ValueError),  # 1 value/channel
        ("BatchNorm", lambda s: np.ones((4,), np.float32), ValueError),  # rank
        ("InstanceNorm", lambda s: np.ones((3, 5, 7), np.float32), ValueError),
        ("InstanceNorm", lambda s: np.ones((3, 4), np.float32), ValueError),  # 1 value
        ("InstanceNorm", lambda s: np.ones(s, np.complex64), TypeError),
        ("GroupNorm", lambda s: np.ones((3, 5, 4), np.float32), ValueError),
        ("LayerNorm", lambda s: np.ones((4, 5, 3), np.float32), ValueError),
        ("RMSNorm", lambda s: np.ones((5, 9), np.float32), ValueError),
    ],
)
def test_failing_forward_changes_nothing(name, bad, exc, rng):
    layer, shape = make_layer(name)
    randomize(layer, rng)
    x = randn(rng, shape, loc=1.0)
    layer(x)
    dy = randn(rng, shape)
    dx0 = layer.backward(dy)
    before = _state_copy(layer)
    with pytest.raises(exc, match=r"(?i)norm"):
        layer(bad(shape))
    _assert_state_equal(layer, before)
    if has_running(layer):
        assert layer.num_batches_tracked == 1
    # the context of the last successful forward is intact
    assert_bitwise_equal(layer.backward(dy), dx0, "backward after a failed forward")


def test_failing_eval_forward_changes_nothing(rng):
    bn = nk.BatchNorm(3)
    bn.running_var[1] = -1.0  # corrupt, as a bad load might
    bn.eval()
    before = _state_copy(bn)
    with pytest.raises(ValueError, match="running_var"):
        bn(randn(rng, (4, 3, 2)))
    _assert_state_equal(bn, before)


# ----------------------------------------------------------------------------
# state_dict / load_state_dict
# ----------------------------------------------------------------------------


EXPECTED_KEYS = {
    "BatchNorm": {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"},
    "InstanceNorm": {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"},
    "GroupNorm": {"weight", "bias"},
    "LayerNorm": {"weight", "bias"},
    "RMSNorm": {"weight"},
}


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_state_dict_is_plain_dict_of_copies(name, rng):
    layer, shape = make_layer(name)
    randomize(layer, rng)
    layer(randn(rng, shape, loc=1.0))
    state = layer.state_dict()
    assert type(state) is dict
    assert set(state) == EXPECTED_KEYS[name]
    for k, v in state.items():
        assert type(v) is np.ndarray, k
        if k == "num_batches_tracked":
            assert v.shape == () and v.dtype.kind in "iu" and int(v) == 1
            continue
        attr = getattr(layer, k)
        assert_bitwise_equal(v, attr, k)
        assert not np.shares_memory(v, attr), f"{k} is not a copy"
    # mutating the dict does not touch the layer, and vice versa
    saved = {k: v.copy() for k, v in state.items()}
    state["weight"][...] = 42.0
    assert not np.any(layer.weight == 42.0)
    layer.weight[...] = -7.0
    assert_bitwise_equal(state["weight"], np.full_like(saved["weight"], 42.0))


def test_state_dict_without_optional_entries():
    assert nk.InstanceNorm(3).state_dict() == {}
    assert set(nk.BatchNorm(3, affine=False).state_dict()) == {
        "running_mean", "running_var", "num_batches_tracked"}
    assert set(nk.BatchNorm(3, track_running_stats=False).state_dict()) == {"weight", "bias"}
    assert set(nk.LayerNorm(3, elementwise_affine=False).state_dict()) == set()


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_load_state_dict_round_trip_copies(name, rng):
    src, shape = make_layer(name, dtype=np.float64)
    randomize(src, rng)
    for _ in range(2):
        src(randn(rng, shape, np.float64, loc=1.0, scale=2.0))
    dst, _ = make_layer(name, dtype=np.float64)
    ids = {k: id(getattr(dst, k)) for k in EXPECTED_KEYS[name] if k != "num_batches_tracked"}
    state = src.state_dict()
    dst.load_state_dict(state)
    _assert_state_equal(dst, src.state_dict())
    for k, i in ids.items():
        assert id(getattr(dst, k)) == i, f"{k} replaced instead of copied into"
        assert not np.shares_memory(getattr(dst, k), state[k])
    # later changes to the dict do not reach the layer
    state["weight"][...] = 13.0
    assert not np.any(dst.weight == 13.0)
    # and the two layers compute the same thing
    x = randn(rng, shape, np.float64)
    src.eval()
    dst.eval()
    assert_bitwise_equal(dst(x), src(x), "eval output after load")


def test_load_state_dict_accepts_array_likes():
    bn = nk.BatchNorm(2, dtype=np.float64)
    bn.load_state_dict({"weight": np.array([2.0, 3.0]), "bias": np.array([0.5, 0.25]),
                        "running_mean": np.array([1.0, -1.0]),
                        "running_var": np.array([4.0, 9.0]), "num_batches_tracked": 7})
    np.testing.assert_array_equal(bn.weight, [2.0, 3.0])
    np.testing.assert_array_equal(bn.running_var, [4.0, 9.0])
    assert bn.num_batches_tracked == 7


def _bad_state(kind):
    def f(state):
        if kind == "missing":
            del state["running_var"]
        elif kind == "unexpected":
            state["extra"] = np.zeros(4, np.float32)
        elif kind == "missing_count":
            del state["num_batches_tracked"]
        elif kind == "shape":
            state["running_var"] = np.ones(5, np.float32)
        elif kind == "shape_2d":
            state["bias"] = np.zeros((4, 1), np.float32)
        elif kind == "dtype":
            state["running_var"] = np.ones(4, np.float64)
        elif kind == "dtype_int":
            state["weight"] = np.ones(4, np.int32)
        elif kind == "count_float":
            state["num_batches_tracked"] = np.array(2.5)
        return state
    return f


@pytest.mark.parametrize(
    "kind,exc,match",
    [("missing", KeyError, "running_var"), ("unexpected", KeyError, "extra"),
     ("missing_count", KeyError, "num_batches_tracked"), ("shape", ValueError, "running_var"),
     ("shape_2d", ValueError, "bias"), ("dtype", TypeError, "running_var"),
     ("dtype_int", TypeError, "weight"), ("count_float", TypeError, "num_batches_tracked")],
)
def test_load_state_dict_errors_change_nothing(kind, exc, match, rng):
    bn = nk.BatchNorm(4)
    randomize(bn, rng)
    bn(randn(rng, (5, 4, 3), loc=1.0))
    before = _state_copy(bn)
    # every other entry is a valid new value, so a partial load would show
    state = {k: (v + 1 if k != "num_batches_tracked" else np.array(9))
             for k, v in bn.state_dict().items()}
    state = _bad_state(kind)(state)
    with pytest.raises(exc, match=match):
        bn.load_state_dict(state)
    _assert_state_equal(bn, before)


# ----------------------------------------------------------------------------
# a few training steps: layer state equals the functional sequence
# ----------------------------------------------------------------------------


def test_layer_sequence_matches_functional_sequence(rng):
    bn = nk.BatchNorm(4, momentum=0.2, channel_axis=-1, dtype=np.float64)
    randomize(bn, rng)
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    for step in range(4):
        x = randn(rng, (5, 3, 4), np.float64, loc=step)
        y = bn(x)
        want = nk.batch_norm(x, bn.weight, bn.bias, running_mean=rm, running_var=rv, momentum=0.2, channel_axis=-1)
        assert_bitwise_equal(y, want.y, f"y at step {step}")
        dy = randn(rng, x.shape, np.float64)
        dx = bn.backward(dy)
        g = nk.batch_norm_backward(dy, x, want.mean, want.rstd, bn.weight, channel_axis=-1)
        assert_bitwise_equal(dx, g.dx, f"dx at step {step}")
        bn.weight -= 0.1 * bn.grad_weight
        bn.bias -= 0.1 * bn.grad_bias
    assert_bitwise_equal(bn.running_mean, rm)
    assert_bitwise_equal(bn.running_var, rv)
    assert bn.num_batches_tracked == 4


# ----------------------------------------------------------------------------
# bad-input sweep (SPEC section 3 for the layers): every case, both modes, forward and
# backward; each must raise before anything changes: parameters, running statistics,
# num_batches_tracked, gradients, the saved forward context and the caller's arrays.
# ----------------------------------------------------------------------------


def _bad_dtype_inputs(shape):
    return {
        "int32": (np.ones(shape, np.int32), TypeError),
        "int64": (np.ones(shape, np.int64), TypeError),
        "bool": (np.ones(shape, bool), TypeError),
        "complex": (np.ones(shape, np.complex64), TypeError),
        "object": (np.ones(shape, object), TypeError),
        "str": (np.full(shape, "a"), TypeError),
    }


def _bad_shape_inputs(name, shape):
    """Inputs whose shape the layer must reject with ValueError: name -> (array, modes), where
    modes says in which of "train"/"eval" the input is invalid (in eval the running statistics
    are used, so one value per channel or an empty spatial extent is fine there)."""
    f = np.float32
    both, train = ("train", "eval"), ("train",)
    cases = {"scalar": (np.float32(1.0), both)}
    if name != "RMSNorm":  # RMSNorm(8) normalizes a single (8,) vector
        cases["rank1"] = (np.ones(shape[-1:], f), both)
    if name in ("BatchNorm", "InstanceNorm", "GroupNorm"):
        n, c, s = shape
        cases["channels"] = (np.ones((n, c + 1, s), f), both)
        cases["channels_last_position"] = (np.ones((n, s, c), f), both)
    if name == "GroupNorm":
        cases["empty_reduction"] = (np.ones(shape[:2] + (0,), f), both)
    if name == "BatchNorm":
        cases["one_value_per_channel"] = (np.ones((1, shape[1]), f), train)
        cases["one_value_per_channel_spatial"] = (np.ones((1, shape[1], 1), f), train)
        cases["empty_reduction"] = (np.ones((0,) + shape[1:], f), train)
    if name == "InstanceNorm":
        cases["one_spatial_value"] = (np.ones(shape[:2], f), train)
        cases["empty_reduction"] = (np.ones(shape[:2] + (0,), f), train)
        cases["empty_batch_with_running_stats"] = (np.ones((0,) + shape[1:], f), train)
    if name in ("LayerNorm", "RMSNorm"):
        cases["trailing"] = (np.ones(shape[:-1] + (shape[-1] + 1,), f), both)
        cases["transposed"] = (np.ones(shape[::-1], f), both)
    return cases


def _sweep_cases():
    out = []
    for name in LAYER_NAMES:
        _, shape = make_layer(name)
        for key, (bad, exc) in _bad_dtype_inputs(shape).items():
            for mode in ("train", "eval"):
                out.append(pytest.param(name, bad, exc, mode, id=f"{name}-{key}-{mode}"))
        for key, (bad, modes) in _bad_shape_inputs(name, shape).items():
            for mode in modes:
                out.append(pytest.param(name, bad, ValueError, mode, id=f"{name}-{key}-{mode}"))
    return out


def _prime(layer, rng, shape):
    """One good training step, so that there is state and a saved context to protect."""
    randomize(layer, rng)
    x = randn(rng, shape, loc=1.0)
    layer(x)
    dy = randn(rng, shape)
    dx = layer.backward(dy)
    grads = tuple(None if g is None else g.copy() for g in (layer.grad_weight, layer.grad_bias))
    return dy, dx, grads


@pytest.mark.parametrize("name,bad,exc,mode", _sweep_cases())
def test_bad_input_sweep_changes_nothing(name, bad, exc, mode, rng):
    layer, shape = make_layer(name)
    dy, dx0, grads = _prime(layer, rng, shape)
    if mode == "eval":
        layer.eval()
    before = _state_copy(layer)
    bad_copy = np.array(bad, copy=True)
    fn = {"BatchNorm": "batch_norm", "LayerNorm": "layer_norm", "GroupNorm": "group_norm",
          "InstanceNorm": "instance_norm", "RMSNorm": "rms_norm"}[name]
    with pytest.raises(exc, match=f"{fn}|{name}"):
        layer(bad)
    _assert_state_equal(layer, before)
    if has_running(layer):
        assert layer.num_batches_tracked == 1
    assert np.array_equal(np.asarray(bad), bad_copy)
    # the context of the last successful forward and its gradients are intact
    if mode == "train":
        for g, g0 in zip((layer.grad_weight, layer.grad_bias), grads):
            assert (g is None and g0 is None) or np.array_equal(g, g0)
        assert_bitwise_equal(layer.backward(dy), dx0, "backward after a failed forward")


@pytest.mark.parametrize("name", LAYER_NAMES)
@pytest.mark.parametrize(
    "kind,exc",
    [("wrong_shape", ValueError), ("int", TypeError), ("complex", TypeError),
     ("transposed_shape", ValueError), ("rank1", ValueError)],
)
def test_bad_backward_changes_nothing(name, kind, exc, rng):
    layer, shape = make_layer(name)
    dy, dx0, grads = _prime(layer, rng, shape)
    before = _state_copy(layer)
    bad = {
        "wrong_shape": lambda: np.ones(shape[:-1] + (shape[-1] + 1,), np.float32),
        "int": lambda: np.ones(shape, np.int32),
        "complex": lambda: np.ones(shape, np.complex64),
        "transposed_shape": lambda: np.ones(shape[::-1], np.float32),
        "rank1": lambda: np.ones(shape[-1:], np.float32),
    }[kind]()
    with pytest.raises(exc):
        layer.backward(bad)
    _assert_state_equal(layer, before)
    for g, g0 in zip((layer.grad_weight, layer.grad_bias), grads):
        assert (g is None and g0 is None) or np.array_equal(g, g0)
    assert_bitwise_equal(layer.backward(dy), dx0, "backward after a failed backward")


@pytest.mark.parametrize("name", LAYER_NAMES)
@pytest.mark.parametrize("what", ["weight_shape", "weight_dtype"])
def test_corrupted_parameters_raise_and_change_nothing(name, what, rng):
    """A user who replaces a parameter with a bad array gets an error naming it, not a crash."""
    layer, shape = make_layer(name)
    _prime(layer, rng, shape)
    if what == "weight_shape":
        layer.weight = np.ones(layer.weight.shape[:-1] + (layer.weight.shape[-1] + 1,),
                               np.float32)
        exc = ValueError
    else:
        layer.weight = np.ones(layer.weight.shape, np.int32)
        exc = (TypeError, ValueError)
    before = _state_copy(layer)
    x = randn(rng, shape)
    keep = x.copy()
    with pytest.raises(exc, match="weight"):
        layer(x)
    _assert_state_equal(layer, before)
    assert np.array_equal(x, keep)
