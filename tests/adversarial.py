"""Adversarial tier: hostile arguments for every public kernel and layer method.

Run as a script (``python tests/adversarial.py --examples N``); ``tests/test_adversarial.py``
starts it in a subprocess, so that a crash (a signal inside the native code) fails that test
instead of taking pytest down, and reports the last call, which this script writes (flushed) to
``--log`` before making it.

Each example draws one operation, a valid call of it (shapes, dtypes, layouts, options), then up
to three *mutations* from a catalogue of hostile changes. Every mutation carries the outcome
SPEC sections 1-4 prescribe: ``OK`` (the call must succeed with the right values: byte-swapped,
unaligned, zero-stride, reversed or list inputs, ``out`` aliasing ``x`` or a parameter, NaN/inf
in the data, NumPy bools and scalars for options) or an exception type (``TypeError``,
``ValueError``). The check, independent of normkit's own validation:

* if any mutation prescribes an error, the call must raise one of the prescribed types, and every
  array the caller passed (and every layer field) must be bitwise unchanged;
* otherwise the call must succeed, and every result (y, mean, rstd, updated running statistics,
  dx, dweight, dbias, ``out``) must match ``tests/reference.py`` — float64 NumPy written plainly
  — evaluated on copies of the inputs taken before the call.

Profiles: ``--examples`` (default 150 per run of the test; ``NORMKIT_ADVERSARIAL_EXAMPLES``
overrides it, e.g. 20000 for the long profile in README's Reliability section) and ``--seed``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hyp_seed
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference as ref  # noqa: E402

import normkit as nk  # noqa: E402

OK = "ok"
try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - the test extra installs it
    BF16 = None

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)] + (
    [BF16] if BF16 is not None else []
)
# |result - reference| <= TOL * (1 + max|reference|), by x's dtype (inputs are O(1) values)
TOL = {"float64": 1e-9, "float32": 2e-4, "float16": 4e-3, "bfloat16": 3e-2}
CHANNEL_OPS = ("batch_norm", "instance_norm", "group_norm")
ROW_OPS = ("layer_norm", "rms_norm")
ADD_OPS = ("add_layer_norm", "add_rms_norm")
OPS = tuple(f"{op}{d}" for op in CHANNEL_OPS + ROW_OPS for d in ("", "_backward")) + ADD_OPS + (
    "BatchNorm", "InstanceNorm", "GroupNorm", "LayerNorm", "RMSNorm",
    "load_state_dict", "set_num_threads",
)
HUGE_INTS = [2**64, -(2**70), 2**63, 2**63 - 1, 2**31, -(2**31) - 1]


def sdtype(dt):
    return np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)


# ------------------------------------------------------------------------------------------
# valid calls


def randn(rng, shape, dt, loc=0.0):
    return (loc + rng.standard_normal(shape)).astype(dt)


def channel_call(draw, rng, op):
    dt = draw(st.sampled_from(DTYPES))
    ca = draw(st.sampled_from([1, -1]))
    N = draw(st.integers(1, 3))
    C = draw(st.sampled_from([1, 2, 4]))
    spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    if op != "batch_norm" and not spatial:
        spatial = (draw(st.integers(2, 4)),)
    S = math.prod(spatial)
    if op == "batch_norm" and N * S < 2:
        N = 2
    if op == "instance_norm" and S < 2:
        spatial, S = (2,), 2
    shape = (N, C, *spatial) if ca == 1 else (N, *spatial, C)
    sd = sdtype(dt)
    a = {"x": randn(rng, shape, dt, loc=draw(st.sampled_from([0.0, 3.0])))}
    a["weight"] = randn(rng, (C,), sd, loc=1.0) if draw(st.booleans()) else None
    a["bias"] = randn(rng, (C,), sd) if draw(st.booleans()) else None
    kw = {"channel_axis": ca, "eps": draw(st.sampled_from([1e-5, 1e-3, 0.5]))}
    if op == "group_norm":
        kw["num_groups"] = draw(st.sampled_from([g for g in (1, 2, 4) if C % g == 0]))
    else:
        running = draw(st.booleans())
        training = draw(st.booleans()) if running else True
        if running:
            a["running_mean"] = randn(rng, (C,), sd, loc=0.5)
            a["running_var"] = rng.uniform(0.5, 2.0, C).astype(sd)
        kw["training"] = training
        kw["momentum"] = draw(st.sampled_from([0.0, 0.1, 1.0]))
    if draw(st.booleans()):
        a["out"] = np.empty(shape, dt)
    return {"op": op, "dt": dt, "arrays": a, "kw": kw}


def row_call(draw, rng, op):
    dt = draw(st.sampled_from(DTYPES))
    lead = tuple(draw(st.lists(st.integers(0, 3), min_size=0, max_size=2)))
    ns = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=2)))
    sd = sdtype(dt)
    a = {"x": randn(rng, lead + ns, dt, loc=draw(st.sampled_from([0.0, 3.0])))}
    a["weight"] = randn(rng, ns, sd, loc=1.0) if draw(st.booleans()) else None
    if op in ADD_OPS:
        a["residual"] = randn(rng, lead + ns, draw(st.sampled_from([dt, np.dtype(np.float64)])))
        if draw(st.booleans()):
            a["h_out"] = np.empty(lead + ns, dt)
    if op in ("layer_norm", "add_layer_norm"):
        a["bias"] = randn(rng, ns, sd) if draw(st.booleans()) else None
        eps = draw(st.sampled_from([1e-5, 0.5]))
    else:
        eps = draw(st.sampled_from([None, 1e-5, 0.5]))
    if draw(st.booleans()):
        a["out"] = np.empty(lead + ns, dt)
    ns_arg = ns[0] if len(ns) == 1 and draw(st.booleans()) else ns
    return {"op": op, "dt": dt, "arrays": a, "kw": {"normalized_shape": ns_arg, "eps": eps}}


def reference_forward(call):
    """tests/reference.py's result for a call's canonical arguments."""
    op, a, kw = call["op"], call["arrays"], call["kw"]
    f64 = {k: (None if v is None else ref.as_f64(v)) for k, v in a.items() if k != "out"}
    if op in ("batch_norm", "instance_norm"):
        return getattr(ref, op)(
            f64["x"], f64.get("weight"), f64.get("bias"), f64.get("running_mean"),
            f64.get("running_var"), training=bool(kw["training"]), momentum=float(kw["momentum"]),
            eps=float(kw["eps"]), channel_axis=int(kw["channel_axis"]))
    if op == "group_norm":
        return ref.group_norm(f64["x"], int(kw["num_groups"]), f64.get("weight"), f64.get("bias"),
                              eps=float(kw["eps"]), channel_axis=int(kw["channel_axis"]))
    ns = kw["normalized_shape"]
    if op in ADD_OPS:  # h = x + residual rounded to x's dtype, as NumPy adds them
        x = native_copy(np.asarray(a["x"]))
        h = np.add(x, native_copy(np.asarray(a["residual"])).astype(x.dtype), dtype=x.dtype)
        base = {"op": op[len("add_"):], "dt": call["dt"], "kw": kw,
                "arrays": {k: v for k, v in a.items() if k not in ("residual", "h_out")}}
        base["arrays"]["x"] = h
        return reference_forward(base), h
    if op == "layer_norm":
        return ref.layer_norm(f64["x"], ns, f64.get("weight"), f64.get("bias"), eps=float(kw["eps"]))
    eps = kw["eps"]
    if eps is None:
        eps = ref.rms_default_eps(a["x"].dtype)
    return ref.rms_norm(f64["x"], ns, f64.get("weight"), eps=float(eps))


def backward_call(draw, rng, op):
    """A valid backward call: statistics from the reference forward, rounded to their dtype."""
    base = op[: -len("_backward")]
    fwd = channel_call(draw, rng, base) if base in CHANNEL_OPS else row_call(draw, rng, base)
    a, kw, dt = fwd["arrays"], fwd["kw"], fwd["dt"]
    r = reference_forward(fwd)
    sd = sdtype(dt)
    out = {"dy": randn(rng, a["x"].shape, dt), "x": a["x"]}
    if base != "rms_norm":
        out["mean"] = np.asarray(r.mean, sd)
    out["rstd"] = np.asarray(r.rstd, sd)
    out["weight"] = a.get("weight")
    bkw = {}
    if base in CHANNEL_OPS:
        bkw["channel_axis"] = kw["channel_axis"]
    if base in ("batch_norm", "instance_norm"):
        bkw["training"] = kw["training"]
    return {"op": op, "dt": dt, "arrays": out, "kw": bkw}


# ------------------------------------------------------------------------------------------
# mutations: each changes the call in place and returns OK or the prescribed exception type

def native_copy(a):
    return np.array(a, dtype=a.dtype.newbyteorder("=")) if isinstance(a, np.ndarray) else a


def m_byteswap(call, name, rng):
    a = call["arrays"][name]
    if BF16 is not None and a.dtype == BF16:
        return OK  # ml_dtypes' bfloat16 has no swapped form
    call["arrays"][name] = a.astype(a.dtype.newbyteorder("S"))
    return OK


def m_unaligned(call, name, rng):
    a = call["arrays"][name]
    buf = np.zeros(a.nbytes + 1, np.uint8)
    u = buf[1:].view(a.dtype).reshape(a.shape)
    u[...] = a
    call["arrays"][name] = u
    return OK


def m_reversed(call, name, rng):
    a = call["arrays"][name]
    if a.ndim == 0:
        return OK
    r = np.empty_like(a)[::-1]
    r[...] = a
    call["arrays"][name] = r
    return OK


def m_zero_stride(call, name, rng):
    a = call["arrays"][name]
    if a.size == 0 or a.ndim == 0:
        return OK
    flat = a.reshape(-1)
    v = np.broadcast_to(flat[:1], a.shape)  # read-only view: every element equal
    call["arrays"][name] = v
    return ValueError if name in ("out", "h_out", "running_mean", "running_var") else OK


def m_list(call, name, rng):
    a = call["arrays"][name]
    if a.dtype != np.float64 or a.size == 0:
        return OK  # a list of Python floats is float64 data (and an empty list has no shape)
    call["arrays"][name] = a.tolist()
    call["list"] = name
    return OK


def m_bad_dtype(call, name, rng, dtypes=("int32", "int64", "bool", "complex64", "U4", "O")):
    a = call["arrays"][name]
    dt = dtypes[int(rng.integers(len(dtypes)))]
    a = np.asarray(a, dtype=np.float64)  # (bfloat16 has no cast to strings)
    call["arrays"][name] = a.astype(dt) if dt != "O" else a.astype(object)
    return ValueError if name in ("out", "h_out") else TypeError


def m_wrong_shape(call, name, rng):
    a = call["arrays"][name]
    # an extra axis of 7: no generated shape has a 7, so the result cannot be read as another
    # valid call (the row backwards infer their axes from the statistics' rank)
    call["arrays"][name] = np.zeros(a.shape + (7,), a.dtype)
    return ValueError


def m_readonly(call, name, rng):
    a = call["arrays"][name].copy()
    a.flags.writeable = False
    call["arrays"][name] = a
    return ValueError


def m_nonfinite(call, name, rng):
    a = call["arrays"][name]
    if isinstance(a, np.ndarray) and a.size and a.flags.writeable and a.dtype.kind == "f":
        idx = tuple(int(rng.integers(n)) for n in a.shape)
        a[idx] = [np.nan, np.inf, -np.inf][int(rng.integers(3))]
    return OK


def m_int_param(call, key, rng):
    """channel_axis / num_groups / normalized_shape: a huge, negative or zero int, or a
    non-int (str, float, None, bool). Integers of any size are a ValueError (SPEC section 3)."""
    choice = int(rng.integers(len(HUGE_INTS) + 5))
    if choice < len(HUGE_INTS):
        v, verdict = HUGE_INTS[choice], ValueError
    else:
        v = ["1", 1.0, None, True, 0][choice - len(HUGE_INTS)]
        if key == "channel_axis":
            verdict = ValueError  # SPEC: channel_axis not 1/-1 is a ValueError
        else:
            verdict = ValueError if v == 0 and v is not True else TypeError
            if v is None and key == "normalized_shape":
                verdict = TypeError
    if key == "normalized_shape" and isinstance(call["kw"][key], tuple) and rng.integers(2):
        v = (*call["kw"][key][:-1], v)  # a tuple entry
    call["kw"][key] = v
    return verdict


def m_training(call, key, rng):
    v = ["False", None, 0, 1, "yes", np.bool_(True), np.bool_(False)][int(rng.integers(7))]
    was = call["kw"]["training"]
    call["kw"]["training"] = v
    if isinstance(v, np.bool_) and call["op"] == "instance_norm_backward" and bool(v) != bool(was):
        return ValueError  # the statistics' shape is (N, C) in training mode, (C,) otherwise
    if isinstance(v, np.bool_):
        if not v and call["op"] in ("batch_norm", "instance_norm") and "running_mean" not in call["arrays"]:
            return ValueError  # eval mode without running statistics
        return OK
    return TypeError


def m_real(call, key, rng):
    vals = ["1e-5", b"0.1", [0.1], 1j, True, None, np.nan, -1.0, -np.inf, 1.5, 10**400,
            np.float32(0.25)]
    v = vals[int(rng.integers(len(vals)))]
    if v is None and key == "eps" and call["op"] in ("rms_norm", "add_rms_norm"):
        v = "1e-5"  # None is rms_norm's default
    call["kw"][key] = v
    if isinstance(v, np.float32):
        return OK
    if v == 1.5:
        return ValueError if key == "momentum" else OK
    if isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)):
        return ValueError
    return TypeError


def m_out_is_x(call, name, rng):
    call["arrays"]["out"] = call["arrays"]["x"]
    return OK


def m_out_overlaps_x(call, name, rng):
    """x and out views of one buffer, shifted by a few elements (NumPy's rule: as if fresh)."""
    x = call["arrays"]["x"]
    if x.size == 0:
        return OK
    shift = int(rng.integers(1, 4))
    buf = np.empty(x.size + shift, x.dtype)
    lo, hi = (buf[:x.size], buf[shift:]) if rng.integers(2) else (buf[shift:], buf[:x.size])
    lo[...] = x.reshape(-1)
    call["arrays"]["x"] = lo.reshape(x.shape)
    call["arrays"]["out"] = hi.reshape(x.shape)
    return OK


def m_out_is_param(call, name, rng):
    """out sharing memory with weight (or bias): the parameter must be read as it was."""
    out = call["arrays"]["out"]
    p = call["arrays"].get(name)
    if p is None or out.dtype != p.dtype or out.size < p.size:
        return OK
    flat = out.reshape(-1)
    flat[: p.size] = p.reshape(-1)
    call["arrays"][name] = flat[: p.size].reshape(p.shape)
    return OK


def m_running_in_x(call, name, rng):
    """A running statistic that is a view of x, in training: it would change while x is read."""
    x = call["arrays"]["x"]
    r = call["arrays"][name]
    if x.dtype != r.dtype or x.size < r.size or not call["kw"]["training"]:
        return OK
    call["arrays"][name] = x.reshape(-1)[: r.size]
    call["arrays"][name][...] = np.abs(r)
    return ValueError


def m_positional_running(call, name, rng):
    call["positional_running"] = True
    return TypeError


ARRAY_MUTATIONS = [m_byteswap, m_unaligned, m_reversed, m_zero_stride, m_list, m_bad_dtype,
                   m_wrong_shape, m_nonfinite]


def candidate_mutations(call):
    """(mutation, target) pairs that apply to this call."""
    op, a, kw = call["op"], call["arrays"], call["kw"]
    out = []
    for name, v in a.items():
        if v is None:
            continue
        for m in ARRAY_MUTATIONS:
            if m is m_list and name != "x":
                continue
            if m is m_nonfinite and name not in ("x", "dy"):
                continue
            if m is m_wrong_shape and name in ("x",):
                continue
            if m is m_wrong_shape and name == "dy":
                out.append((m, name))
                continue
            out.append((m, name))
        if name in ("out", "h_out", "running_mean", "running_var"):
            out.append((m_readonly, name))
    for key in ("channel_axis", "num_groups", "normalized_shape"):
        if key in kw:
            out.append((m_int_param, key))
    if "training" in kw:
        out.append((m_training, "training"))
    for key in ("eps", "momentum"):
        if key in kw:
            out.append((m_real, key))
    if "out" in a:
        out += [(m_out_is_x, "out"), (m_out_overlaps_x, "out"), (m_out_is_param, "weight"),
                (m_out_is_param, "bias")]
    if a.get("running_mean") is not None:
        out += [(m_running_in_x, "running_mean"), (m_positional_running, "running_mean")]
    return out


# ------------------------------------------------------------------------------------------
# making the call and checking it

def invoke(call):
    op, a, kw = call["op"], dict(call["arrays"]), dict(call["kw"])
    f = getattr(nk, op)
    if op in ("batch_norm", "instance_norm"):
        pos = [a.pop("x"), a.pop("weight", None), a.pop("bias", None)]
        if call.get("positional_running"):
            pos += [a.pop("running_mean", None), a.pop("running_var", None)]
        return f(*pos, **a, **kw)
    if op == "group_norm":
        return f(a.pop("x"), kw.pop("num_groups"), a.pop("weight", None), a.pop("bias", None),
                 **a, **kw)
    if op in ROW_OPS:
        pos = [a.pop("x"), kw.pop("normalized_shape"), a.pop("weight", None)]
        if op == "layer_norm":
            pos.append(a.pop("bias", None))
        return f(*pos, **a, **kw)
    if op in ADD_OPS:
        pos = [a.pop("x"), a.pop("residual"), kw.pop("normalized_shape"), a.pop("weight", None)]
        if op == "add_layer_norm":
            pos.append(a.pop("bias", None))
        return f(*pos, **a, **kw)
    if op == "rms_norm_backward":
        return f(a["dy"], a["x"], a["rstd"], a.get("weight"), **kw)
    return f(a["dy"], a["x"], a["mean"], a["rstd"], a.get("weight"), **kw)


def close(got, want, dt, what):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, reference {want.shape}"
    bad_ref = ~np.isfinite(want)
    assert (~np.isfinite(got[bad_ref])).all(), f"{what}: finite where the reference is not"
    fin = ~bad_ref
    if fin.any():
        scale = 1.0 + np.abs(want[fin]).max()
        err = np.abs(got[fin] - want[fin])
        err = np.where(np.isnan(err), np.inf, err)
        tol = TOL[np.dtype(dt).name] * scale
        assert err.max() <= tol, f"{what}: error {err.max():.3g} > {tol:.3g}"


def canonical(call):
    """The call with its accepted-but-unusual arguments in plain form, from the snapshot."""
    c = {"op": call["op"], "dt": call["dt"], "kw": dict(call["kw"]), "arrays": {}}
    for k, v in call["snap"].items():
        c["arrays"][k] = None if v is None else native_copy(np.asarray(v))
    if "training" in c["kw"]:
        c["kw"]["training"] = bool(c["kw"]["training"])
    for k in ("eps", "momentum"):
        if c["kw"].get(k) is not None:
            c["kw"][k] = float(c["kw"][k])
    return c


def check_forward(call, r):
    dt, a = call["dt"], call["arrays"]
    want = reference_forward(canonical(call))
    if call["op"] in ADD_OPS:
        want, h = want
        if a.get("h_out") is not None:
            assert r.h is a["h_out"], "h is not h_out"
        close(r.h, h, dt, "h")
    if a.get("out") is not None:
        assert r.y is a["out"], "y is not out"
    else:
        ydt = np.dtype(dt).newbyteorder("=")
        assert r.y.dtype == ydt, f"y dtype {r.y.dtype}, expected {ydt}"
    close(r.y, want.y, dt, "y")
    if want.mean is not None:
        close(r.mean, want.mean, dt, "mean")
    close(r.rstd, want.rstd, dt, "rstd")
    for k, rk in (("running_mean", "running_mean"), ("running_var", "running_var")):
        if a.get(k) is not None:
            close(a[k], getattr(want, rk), dt, k)


def check_backward(call, g):
    c = canonical(call)
    op, a, kw = c["op"], c["arrays"], c["kw"]
    base = getattr(ref, op)
    if op == "rms_norm_backward":
        want = base(a["dy"], a["x"], a["rstd"], a.get("weight"))
    else:
        want = base(a["dy"], a["x"], a["mean"], a["rstd"], a.get("weight"), **kw)
    close(g.dx, want.dx, c["dt"], "dx")
    close(g.dweight, want.dweight, c["dt"], "dweight")
    if want.dbias is not None:
        close(g.dbias, want.dbias, c["dt"], "dbias")


def arrays_of(call):
    return {k: v for k, v in call["arrays"].items() if isinstance(v, np.ndarray)}


def run_call(call):
    verdicts = call["verdicts"]
    errors = tuple({v for v in verdicts if v is not OK})
    call["snap"] = {k: (np.array(v, copy=True) if v is not None else None)
                    for k, v in call["arrays"].items()}
    before = {k: np.array(v, copy=True) for k, v in arrays_of(call).items()}
    try:
        r = invoke(call)
    except (TypeError, ValueError) as e:
        assert errors, (f"raised {type(e).__name__}: {e}, but every mutation is accepted by "
                        f"SPEC: {describe(call)}")
        assert isinstance(e, errors), f"raised {type(e).__name__}: {e}; SPEC prescribes {errors}"
        for k, v in arrays_of(call).items():
            assert v.tobytes() == before[k].tobytes(), f"{k} was written before the error"
        return
    assert not errors, f"accepted a call for which SPEC prescribes {errors}: {describe(call)}"
    try:
        if call["op"].endswith("_backward"):
            check_backward(call, r)
        else:
            check_forward(call, r)
    except AssertionError as e:
        raise AssertionError(f"{e}: {describe(call)}") from None


# ------------------------------------------------------------------------------------------
# layers and runtime

def layer_case(draw, rng, op):
    """forward + backward of a layer on x with one array mutation (or a hostile train())."""
    dt = np.dtype(np.float64 if draw(st.booleans()) else np.float32)
    if op == "GroupNorm":
        layer = nk.GroupNorm(2, 4, dtype=dt)
        shape = (2, 4, 3)
    elif op in ("BatchNorm", "InstanceNorm"):
        extra = {}
        if op == "BatchNorm":  # renorm / ghost batches in the settings that equal plain BatchNorm
            extra = draw(st.sampled_from([{}, {"virtual_batch_size": 8},
                                          {"renorm": True,
                                           "renorm_clipping": {"rmax": 1.0, "dmax": 0.0}}]))
        layer = getattr(nk, op)(4, dtype=dt, momentum=draw(st.sampled_from([None, 0.1])),
                                affine=draw(st.booleans()), track_running_stats=True, **extra)
        shape = (3, 4, 2)
    else:
        layer = getattr(nk, op)(5, dtype=dt)
        shape = (3, 5)
    x = randn(rng, shape, dt)
    mutate = draw(st.sampled_from(["none", "byteswap", "unaligned", "bad_dtype", "train_str"]))
    verdict = OK
    box = {"op": op, "dt": dt, "arrays": {"x": x}, "kw": {}}
    if mutate == "byteswap":
        m_byteswap(box, "x", rng)
    elif mutate == "unaligned":
        m_unaligned(box, "x", rng)
    elif mutate == "bad_dtype":
        verdict = m_bad_dtype(box, "x", rng)
    x_call = box["arrays"]["x"]
    state = {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}
    return layer, x_call, native_copy(np.asarray(x)), mutate, verdict, state


def layer_dtype(layer):
    for name in ("weight", "running_mean"):
        v = getattr(layer, name, None)
        if v is not None:
            return v.dtype
    return np.dtype(np.float32)


def run_layer(draw, rng, op):
    layer, x_call, x64, mutate, verdict, state = layer_case(draw, rng, op)
    note(f"{op} mutate={mutate}")
    if mutate == "train_str":
        try:
            layer.train("False")
        except TypeError:
            assert layer.training is True
            return
        raise AssertionError("train('False') was accepted")
    try:
        y = layer(x_call)
    except (TypeError, ValueError) as e:
        assert verdict is not OK, f"{op} forward raised {e!r} for an accepted input"
        assert isinstance(e, verdict), f"{op} forward raised {e!r}, SPEC prescribes {verdict}"
        for k, v in layer.state_dict().items():
            assert np.array_equal(v, state[k]), f"{op}: {k} changed by a failed forward"
        return
    assert verdict is OK, f"{op} accepted x of dtype {np.asarray(x_call).dtype}"
    w = None if layer.weight is None else np.asarray(layer.weight, np.float64)
    b = None if getattr(layer, "bias", None) is None else np.asarray(layer.bias, np.float64)
    x64 = ref.as_f64(x64)
    if op == "BatchNorm":
        want = ref.batch_norm(x64, w, b, state["running_mean"], state["running_var"],
                              momentum=1.0 / (int(state["num_batches_tracked"]) + 1)
                              if layer.momentum is None else layer.momentum, eps=layer.eps)
    elif op == "InstanceNorm":
        want = ref.instance_norm(x64, w, b, state["running_mean"], state["running_var"],
                                 momentum=1.0 if layer.momentum is None else layer.momentum,
                                 eps=layer.eps)
    elif op == "GroupNorm":
        want = ref.group_norm(x64, 2, w, b, eps=layer.eps)
    elif op == "LayerNorm":
        want = ref.layer_norm(x64, 5, w, b, eps=layer.eps)
    else:
        want = ref.rms_norm(x64, 5, w, eps=ref.rms_default_eps(layer_dtype(layer)))
    close(y, want.y, layer_dtype(layer), f"{op} y")
    dy = randn(rng, y.shape, y.dtype).astype(y.dtype.newbyteorder("S"))  # byte-swapped dy
    dx = layer.backward(dy)
    assert dx.shape == y.shape and np.isfinite(dx).all(), f"{op} backward"


def run_load_state(draw, rng):
    layer = nk.BatchNorm(3, momentum=None)
    layer(randn(rng, (4, 3), np.float32))
    before = {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}
    state = layer.state_dict()
    key = draw(st.sampled_from(sorted(state)))
    choice = draw(st.integers(0, 7))
    v = state[key]
    if key == "num_batches_tracked":
        new, verdict = [(np.array(-1), ValueError), (np.array(2**70, dtype=object), TypeError),
                        (np.array(1.5), TypeError), (np.array("3"), TypeError),
                        (np.array(7), OK), (np.array(-(2**40)), ValueError),
                        (np.array([1, 2]), TypeError), (np.int64(0), OK)][choice]
    else:
        bad = v.copy()
        bad[0] = np.nan
        neg = np.abs(v) + 1
        neg[0] = -1.0
        new, verdict = [(bad, ValueError if key.startswith("running") else OK),
                        (v.astype(v.dtype.newbyteorder("S")), OK),
                        (v.astype(np.int32), TypeError), (v[:2], ValueError),
                        (neg, ValueError if key == "running_var" else OK),
                        (v.astype(np.float64), TypeError), (v.astype(object), TypeError),
                        (np.full_like(v, np.inf), ValueError if key.startswith("running") else OK)][choice]
    state[key] = new
    note(f"load_state_dict {key}={new!r}")
    try:
        layer.load_state_dict(state)
    except (TypeError, ValueError) as e:
        assert verdict is not OK, f"load_state_dict raised {e!r} for a valid state"
        assert isinstance(e, verdict), f"load_state_dict raised {e!r}, SPEC prescribes {verdict}"
        for k, w in layer.state_dict().items():
            assert np.array_equal(w, before[k], equal_nan=True), f"{k} changed by a failed load"
        return
    assert verdict is OK, f"load_state_dict accepted {key}={new!r}"
    got = layer.state_dict()[key]
    assert np.array_equal(np.asarray(got, np.float64), np.asarray(new, np.float64), equal_nan=True)


def run_threads(draw):
    v = draw(st.sampled_from([0, -1, 2**31, 2**64, -(2**70), 1025, "2", 2.0, None, True, 1, 2]))
    before = nk.get_num_threads()
    note(f"set_num_threads({v!r})")
    try:
        nk.set_num_threads(v)
    except (TypeError, ValueError) as e:
        want = TypeError if isinstance(v, (str, float, bool)) or v is None else ValueError
        assert isinstance(e, want), f"set_num_threads({v!r}) raised {e!r}"
        assert nk.get_num_threads() == before
        return
    assert v in (1, 2) and not isinstance(v, bool), f"set_num_threads accepted {v!r}"
    assert nk.get_num_threads() == v
    nk.set_num_threads(before)


# ------------------------------------------------------------------------------------------

LOG = None


def note(text):
    if LOG is not None:
        LOG.write(text + "\n")
        LOG.flush()


def describe(call):
    parts = [call["op"], f"dtype={call['dt']}", f"mutations={call['names']}"]
    for k, v in call["arrays"].items():
        if isinstance(v, np.ndarray):
            parts.append(f"{k}: {v.dtype.str} {v.shape} strides={v.strides}")
        else:
            parts.append(f"{k}: {type(v).__name__}")
    parts.append(f"kw={call['kw']!r}")
    return " | ".join(parts)


# NORMKIT_ADVERSARIAL_OPS=op1,op2 restricts the run to some operations (to dig into one)
_ONLY = [o for o in os.environ.get("NORMKIT_ADVERSARIAL_OPS", "").split(",") if o]


@st.composite
def example(draw):
    return (draw(st.sampled_from(_ONLY or OPS)), draw(st.integers(0, 2**32 - 1)),
            draw(st.data()))


def one_example(op, rng_seed, data):
    rng = np.random.default_rng(rng_seed)
    draw = data.draw
    if op == "set_num_threads":
        return run_threads(draw)
    if op == "load_state_dict":
        return run_load_state(draw, rng)
    if op[0].isupper():
        return run_layer(draw, rng, op)
    if op.endswith("_backward"):
        call = backward_call(draw, rng, op)
    elif op in CHANNEL_OPS:
        call = channel_call(draw, rng, op)
    else:
        call = row_call(draw, rng, op)  # row norms and the fused residual adds
    cands = candidate_mutations(call)
    k = draw(st.integers(0, min(3, len(cands))))
    picks = sorted(draw(st.lists(st.integers(0, len(cands) - 1), min_size=k, max_size=k,
                                 unique=True))) if cands else []
    call["verdicts"], call["names"] = [], []
    for i in picks:
        m, target = cands[i]
        if target not in call["arrays"] and target not in call["kw"] and m not in (
                m_out_is_param, m_positional_running):
            continue  # an earlier mutation removed it
        if m in (m_out_is_x, m_out_overlaps_x, m_out_is_param) and not isinstance(
                call["arrays"].get("out"), np.ndarray):
            continue
        if m in (m_out_is_x, m_out_overlaps_x, m_out_is_param, m_running_in_x) and (
                call["names"] or not all(isinstance(v, np.ndarray) and v.dtype.isnative
                                         for v in call["arrays"].values() if v is not None)):
            continue  # aliasing only on otherwise plain arrays
        call["verdicts"].append(m(call, target, rng))
        call["names"].append(f"{m.__name__[2:]}({target})")
    note(describe(call))
    run_call(call)


def main(argv=None):
    global LOG
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int,
                   default=int(os.environ.get("NORMKIT_ADVERSARIAL_EXAMPLES", "150")))
    p.add_argument("--seed", type=int, default=int(os.environ.get("NORMKIT_ADVERSARIAL_SEED", "0")))
    p.add_argument("--log", default=None, help="file that receives each call before it is made")
    args = p.parse_args(argv)
    LOG = open(args.log, "w") if args.log else None
    count = {"n": 0}

    @hyp_seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(example())
    def run(ex):
        count["n"] += 1
        with np.errstate(all="ignore"):
            one_example(*ex)

    try:
        run()
    except Exception:
        traceback.print_exc()
        print(f"adversarial: FAILED after {count['n']} calls", flush=True)
        return 1
    print(f"adversarial: {count['n']} calls, every one correct or a clean SPEC error", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
