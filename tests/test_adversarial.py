"""Hostile arguments: one test per class of defect found by the adversarial campaign (issue 17),
the keyword-only running statistics (PyTorch's argument order must not write into the caller's
weight and bias), and the adversarial tier itself (tests/adversarial.py, run in a subprocess so
that a crash fails one test instead of the whole run)."""

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest

import normkit as nk
import reference as ref
from conftest import assert_close
from helpers import assert_raises_nothing_written

HERE = os.path.dirname(os.path.abspath(__file__))


def _x(shape=(4, 3, 5), dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ---- 1. non-native byte order -------------------------------------------------------------

BIG = {np.dtype(np.float32): ">f4", np.dtype(np.float64): ">f8", np.dtype(np.float16): ">f2"}


def _swapped(a):
    """The same values in the other byte order ('>f4' on a little-endian machine)."""
    return a.astype(a.dtype.newbyteorder("S"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_batch_norm_swapped_x_and_running_stats(dtype, channel_axis):
    x = _x(dtype=dtype)
    sd = np.float64 if dtype == np.float64 else np.float32
    C = x.shape[channel_axis]
    rm, rv = np.linspace(-1, 1, C).astype(sd), np.linspace(0.5, 2, C).astype(sd)
    want = ref.batch_norm(ref.as_f64(x), None, None, rm.astype(np.float64), rv.astype(np.float64),
                          momentum=0.3, channel_axis=channel_axis)
    rm_s, rv_s = _swapped(rm), _swapped(rv)
    got = nk.batch_norm(_swapped(x), running_mean=rm_s, running_var=rv_s, momentum=0.3,
                        channel_axis=channel_axis)
    assert got.y.dtype == np.dtype(dtype) and got.y.dtype.isnative
    assert_close(got.y, want.y, dtype, what="y")
    assert_close(got.mean, want.mean, dtype, what="mean")
    # updated in their own byte order, with the right values
    assert not rm_s.dtype.isnative and not rv_s.dtype.isnative
    assert_close(rm_s, want.running_mean, dtype, what="running_mean")
    assert_close(rv_s, want.running_var, dtype, what="running_var")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_norms_swapped_input_weight_out(dtype):
    x = _x((6, 7), dtype)
    w = np.linspace(0.5, 1.5, 7).astype(dtype)
    out = _swapped(np.empty_like(x))
    want = ref.layer_norm(ref.as_f64(x), 7, ref.as_f64(w))
    got = nk.layer_norm(_swapped(x), 7, _swapped(w), out=out)
    assert got.y is out
    assert_close(out.astype(dtype), want.y, dtype, what="y into a big-endian out")
    r = nk.rms_norm(_swapped(x), 7)
    assert_close(r.y, ref.rms_norm(ref.as_f64(x), 7, eps=ref.rms_default_eps(dtype)).y, dtype)


def test_backwards_read_swapped_arrays():
    x, dy = _x((5, 6), np.float64), _x((5, 6), np.float64, seed=1)
    f = nk.layer_norm(x, 6)
    want = nk.layer_norm_backward(dy, x, f.mean, f.rstd)
    got = nk.layer_norm_backward(_swapped(dy), _swapped(x), _swapped(f.mean), _swapped(f.rstd))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(os.environ.get("NORMKIT_SANITIZER_RUN") == "1",
                    reason="a C++ exception aborts under the sanitizer tier's preloaded libasan "
                    "(ASan's __cxa_throw interceptor without libstdc++ in python); the check "
                    "itself runs in the main tier")
def test_core_rejects_non_native_arrays():
    """The private _core does not convert: it raises TypeError naming the byte order."""
    from normkit import _core

    x = _swapped(_x((2, 3)))
    with pytest.raises(TypeError, match="non-native byte order"):
        _core.row_norm_forward(x, None, None, 1e-5, np.empty((2, 3), np.float32),
                               np.empty(2, np.float32), np.empty(2, np.float32))


# ---- 2./3. huge integers ------------------------------------------------------------------

@pytest.mark.parametrize("ca", [2**64, -(2**64), 2**63, 2**31 + 1, -(2**70)])
def test_huge_channel_axis_is_value_error_and_writes_nothing(ca):
    x = _x()
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = np.zeros_like(x)
    assert_raises_nothing_written(ValueError, "channel_axis must be 1 or -1", nk.batch_norm, x,
                                  running_mean=rm, running_var=rv, channel_axis=ca, out=out)


@pytest.mark.parametrize("ns", [2**64, (2**64,), (3, 2**64), -(2**70), (2**63,)])
@pytest.mark.parametrize("fn", [nk.layer_norm, nk.rms_norm])
def test_huge_normalized_shape_is_value_error(fn, ns):
    x = _x((3, 5))
    out = np.zeros_like(x)
    assert_raises_nothing_written(ValueError, "normalized_shape", fn, x, ns, out=out)


@pytest.mark.parametrize("g", [2**64, 2**63, 2**40])
def test_huge_num_groups_is_value_error(g):
    assert_raises_nothing_written(ValueError, "num_groups", nk.group_norm, _x(), g,
                                  out=np.zeros((4, 3, 5), np.float32))


@pytest.mark.parametrize("bad", [True, np.bool_(True)])
def test_bool_is_not_an_integer_argument(bad):
    with pytest.raises(TypeError, match="num_groups"):
        nk.group_norm(_x(), bad)
    with pytest.raises(TypeError, match="normalized_shape"):
        nk.layer_norm(_x((2, 1)), bad)
    with pytest.raises(ValueError, match="channel_axis"):
        nk.batch_norm(_x(), channel_axis=bad)
    with pytest.raises(TypeError, match="set_num_threads"):
        nk.set_num_threads(bad)


@pytest.mark.parametrize("n", [2**64, 2**70, 1025])
def test_layer_sizes_beyond_any_array_are_value_errors(n):
    with pytest.raises(ValueError, match="BatchNorm: num_features"):
        nk.BatchNorm(2**64)
    with pytest.raises(ValueError, match="LayerNorm: normalized_shape"):
        nk.LayerNorm(2**64)
    with pytest.raises(ValueError, match="LayerNorm: normalized_shape"):
        nk.LayerNorm((2**40, 2**40))


# ---- 4. statistics beyond float32's range -------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_eps_zero_with_denormal_spread_gives_plus_minus_one(dtype):
    tiny = 1e-40 if dtype == np.float32 else 6e-8  # a subnormal of the dtype
    row = np.array([tiny, -tiny] * 4, dtype)
    for r in (nk.layer_norm(row[None], 8, eps=0.0), nk.rms_norm(row[None], 8, eps=0.0)):
        np.testing.assert_array_equal(r.y[0], np.array([1.0, -1.0] * 4, dtype))
        assert r.rstd.dtype == np.float32
    x = row.reshape(2, 2, 2)
    for r in (nk.batch_norm(x, eps=0.0), nk.group_norm(x, 1, eps=0.0),
              nk.instance_norm(x, eps=0.0)):
        np.testing.assert_array_equal(r.y.reshape(-1), np.array([1.0, -1.0] * 4, dtype))
    # the saved rstd is the float32 rounding of the float64 one (documented): inf for float32
    if dtype == np.float32:
        assert np.isinf(nk.layer_norm(row[None], 8, eps=0.0).rstd).all()


def test_eps_zero_float32_running_stats_and_out():
    x = np.array([[1e-40, -1e-40], [-1e-40, 1e-40]] * 2, np.float32)  # spread in each channel
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    out = np.empty_like(x)
    r = nk.batch_norm(x, running_mean=rm, running_var=rv, eps=0.0, momentum=1.0, out=out)
    assert r.y is out
    np.testing.assert_array_equal(out, np.sign(x))
    np.testing.assert_allclose(rm, 0.0)
    np.testing.assert_allclose(rv, np.float32(4 / 3 * 1e-80), atol=1e-45)  # underflows to 0


# ---- 5. loaded state ------------------------------------------------------------------------

def test_load_state_dict_rejects_negative_count_and_bad_statistics():
    bn = nk.BatchNorm(3, momentum=None)
    good = bn.state_dict()
    for key, value, exc in [
        ("num_batches_tracked", np.array(-1), ValueError),
        ("running_var", np.array([1.0, -0.5, 1.0], np.float32), ValueError),
        ("running_mean", np.array([np.nan, 0, 0], np.float32), ValueError),
        ("running_var", np.array([np.inf, 1, 1], np.float32), ValueError),
    ]:
        state = dict(good, **{key: value})
        with pytest.raises(exc, match=key):
            bn.load_state_dict(state)
        for k, v in bn.state_dict().items():
            np.testing.assert_array_equal(v, good[k])
    bn(_x((4, 3)))  # momentum=None still works: no division by zero


def test_load_state_dict_accepts_swapped_arrays():
    bn = nk.BatchNorm(3)
    state = {k: (_swapped(v) if v.ndim else v) for k, v in bn.state_dict().items()}
    state["running_mean"] = _swapped(np.array([1.0, 2.0, 3.0], np.float32))
    bn.load_state_dict(state)
    np.testing.assert_array_equal(bn.running_mean, [1.0, 2.0, 3.0])
    assert bn.running_mean.dtype.isnative


# ---- 6. thread count ------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2**31, 2**64, 1025, 0, -(2**70)])
def test_set_num_threads_out_of_range_is_value_error(n):
    before = nk.get_num_threads()
    with pytest.raises(ValueError, match="set_num_threads: n must be between 1 and 1024"):
        nk.set_num_threads(n)
    assert nk.get_num_threads() == before


# ---- 7. loose flags -------------------------------------------------------------------------

@pytest.mark.parametrize("training", ["False", None, 0, 1, "yes", 1.0])
@pytest.mark.parametrize("fn", [nk.batch_norm, nk.instance_norm])
def test_training_must_be_a_bool(fn, training):
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    assert_raises_nothing_written(TypeError, "training must be a bool", fn, _x(),
                                  running_mean=rm, running_var=rv, training=training,
                                  out=np.zeros((4, 3, 5), np.float32))


@pytest.mark.parametrize("fn", [nk.batch_norm_backward, nk.instance_norm_backward])
def test_backward_training_must_be_a_bool(fn):
    x = _x()
    with pytest.raises(TypeError, match="training must be a bool"):
        fn(x, x, np.zeros(3, np.float32), np.ones(3, np.float32), training="False")


def test_numpy_bool_training_is_accepted():
    x = _x()
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    a = nk.batch_norm(x, running_mean=rm, running_var=rv, training=np.bool_(False))
    b = nk.batch_norm(x, running_mean=rm, running_var=rv, training=False)
    np.testing.assert_array_equal(a.y, b.y)
    with pytest.raises(TypeError, match="training must be a bool"):
        nk.BatchNorm(3).train("False")


@pytest.mark.parametrize("bad", ["1e-5", b"1e-5", [1e-5], 1j, True, np.array(1e-5)])
def test_eps_and_momentum_must_be_real_numbers(bad):
    x = _x()
    out = np.zeros_like(x)
    assert_raises_nothing_written(TypeError, "eps must be a real number", nk.batch_norm, x,
                                  eps=bad, out=out)
    assert_raises_nothing_written(TypeError, "eps must be a real number", nk.layer_norm, x, 5,
                                  eps=bad, out=out)
    assert_raises_nothing_written(TypeError, "momentum must be a real number", nk.batch_norm, x,
                                  momentum=bad, out=out)
    with pytest.raises(TypeError, match="eps must be a real number"):
        nk.LayerNorm(5, eps=bad)


def test_numpy_scalars_are_real_numbers():
    x = _x()
    a = nk.batch_norm(x, eps=np.float32(1e-3), momentum=np.float64(0.2))
    b = nk.batch_norm(x, eps=float(np.float32(1e-3)), momentum=0.2)
    np.testing.assert_array_equal(a.y, b.y)


# ---- running statistics are keyword-only (issue 16, item 1) ------------------------------

@pytest.mark.parametrize("fn", [nk.batch_norm, nk.instance_norm])
def test_pytorch_argument_order_raises_and_writes_nothing(fn):
    """torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias) order."""
    x = _x()
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    w, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    for args in [(x, rm, rv, w, b), (x, w, b, rm, rv), (x, w, b, rm)]:
        assert_raises_nothing_written(TypeError, r"running_mean and running_var are keyword-only",
                                      fn, *args)
    np.testing.assert_array_equal(w, 1.0)
    np.testing.assert_array_equal(b, 0.0)


@pytest.mark.parametrize("fn", [nk.batch_norm, nk.instance_norm])
def test_signature_shows_keyword_only_running_statistics(fn):
    params = inspect.signature(fn).parameters
    assert list(params)[:3] == ["x", "weight", "bias"]
    for name in ("running_mean", "running_var"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params.values())


def test_running_statistic_inside_x_is_rejected():
    x = _x((4, 3), np.float32)
    rv = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="running_mean overlaps x"):
        nk.batch_norm(x, running_mean=x[0], running_var=rv)


# ---- the adversarial tier --------------------------------------------------------------------

def test_adversarial_tier(tmp_path):
    """tests/adversarial.py in a subprocess: every hostile call is right or a clean SPEC error.
    Examples: NORMKIT_ADVERSARIAL_EXAMPLES (default 150; README's Reliability section has the
    long profile). A crash shows up here with the last call the subprocess started."""
    log = tmp_path / "calls.log"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "adversarial.py"), "--log", str(log)],
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        last = log.read_text().splitlines()[-3:] if log.exists() else []
        pytest.fail(
            f"adversarial tier exited with {proc.returncode}"
            f"{' (killed by a signal: a crash)' if proc.returncode < 0 else ''}\n"
            f"last calls:\n" + "\n".join(last) + f"\n--- output ---\n{proc.stdout[-4000:]}"
            f"{proc.stderr[-4000:]}"
        )
    assert "every one correct" in proc.stdout


@pytest.mark.parametrize("fn, channel_axis", [(nk.batch_norm_backward, 1),
                                              (nk.batch_norm_backward, -1),
                                              (nk.instance_norm_backward, 1)])
def test_eval_backward_dx_does_not_read_x(fn, channel_axis):
    """Found by the adversarial tier's long profile: with the statistics held constant
    (training=False) dx = dy * weight * rstd must not turn NaN where x is NaN or inf."""
    x = _x((4, 3, 6), np.float32)
    if channel_axis == -1:
        x = np.ascontiguousarray(x.transpose(0, 2, 1))
    x.reshape(-1)[[0, 7]] = [np.nan, np.inf]
    dy = _x(x.shape, np.float32, seed=3)
    w = np.array([0.5, 2.0, -1.0], np.float32)
    mean, rstd = np.zeros(3, np.float32), np.array([1.0, 0.5, 2.0], np.float32)
    g = fn(dy, x, mean, rstd, w, training=False, channel_axis=channel_axis)
    shape = (1, 3, 1) if channel_axis == 1 else (1, 1, 3)
    np.testing.assert_allclose(g.dx, dy * (w * rstd).reshape(shape), rtol=1e-6)
