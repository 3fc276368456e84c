"""Property tests (hypothesis): every SPEC section 1 function on random shapes and layouts.

Each example draws a shape (dimensions of 1, small primes, and zero on the axes that are not
reduced), a dtype, a memory layout (any permutation of the axes in memory, steps, negative
strides), the channel axis, and which of weight / bias / running statistics are present.  The
forward and backward results are checked against the independent float64 reference by the
per-op checkers of the test_<op>.py files (which also check dtypes, shapes and that inputs are
untouched).  Cases the SPEC defines as errors (an empty reduction, one value per channel in
training) must raise ValueError instead.

The number of examples comes from the hypothesis profile, chosen by the environment variable
NORMKIT_HYPOTHESIS_PROFILE (conftest.py): "default" keeps the normal run fast; "long" runs
many more examples:  NORMKIT_HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import test_batch_norm as bn
import test_group_norm as gn
import test_instance_norm as inn
import test_layer_norm as ln
import test_rms_norm as rms
from conftest import DTYPE_NAMES, HAVE_BFLOAT16, get_dtype, stats_dtype
from helpers import AFFINES, make_params, make_running

nk = pytest.importorskip("normkit")

# 1, small primes and a few composites; the kernels' vector widths are 8 and 16 elements.
DIMS = st.sampled_from([1, 1, 2, 3, 5, 7, 11, 13, 17])
DTYPES = st.sampled_from([n for n in DTYPE_NAMES if n != "bfloat16" or HAVE_BFLOAT16])


@st.composite
def layouts(draw, ndim):
    """How an ndim array lies in memory: (axis order in memory, step per axis, flip per axis)."""
    perm = draw(st.permutations(range(ndim)))
    steps = draw(st.lists(st.sampled_from([1, 1, 2, 3]), min_size=ndim, max_size=ndim))
    flips = draw(st.lists(st.booleans(), min_size=ndim, max_size=ndim))
    return tuple(perm), tuple(steps), tuple(flips)


def make_array(seed, shape, dtype, layout, loc=0.0):
    """Normal data of logical ``shape`` laid out in memory as ``layout`` says (a view)."""
    perm, steps, flips = layout
    rng = np.random.default_rng(seed)
    mem_shape = [shape[p] for p in perm]
    big = [max(1, d * s) for d, s in zip(mem_shape, (steps[p] for p in perm))]
    base = (loc + rng.standard_normal(big)).astype(dtype)
    idx = []
    for d, p in zip(mem_shape, perm):
        s = steps[p]
        sl = slice(0, d * s, s) if d else slice(0, 0)
        if flips[p] and d:
            sl = slice((d - 1) * s, None, -s)
        idx.append(sl)
    view = base[tuple(idx)]
    x = view.transpose(np.argsort(perm))
    assert x.shape == tuple(shape)
    return x


def channel_shape(draw, *, zero_batch_ok, c=None):
    """(logical shape, channel_axis) for a channel op; the batch axis may be 0 if allowed."""
    rank = draw(st.integers(2, 4))
    n = draw(st.sampled_from([0, 1, 2, 3, 5]) if zero_batch_ok else DIMS)
    if c is None:
        c = draw(st.sampled_from([0, 1, 2, 3, 5, 7]))
    spatial = [draw(DIMS) for _ in range(rank - 2)]
    ca = draw(st.sampled_from([1, -1]))
    shape = (n, c, *spatial) if ca == 1 else (n, *spatial, c)
    return shape, ca


def _grad_seed(seed):
    return (seed * 7919 + 13) % (2**32)


def running_stats_problem(data, name, training, running, affine, seed, loc):
    """A BatchNorm / InstanceNorm problem: (dtype, shape, channel_axis, C, x, w, b, rm, rv)."""
    dt = get_dtype(name)
    sd = stats_dtype(dt)
    shape, ca = channel_shape(data.draw, zero_batch_ok=True)
    x = make_array(seed, shape, dt, data.draw(layouts(len(shape))), loc=loc)
    c = shape[1] if ca == 1 else shape[-1]
    rng = np.random.default_rng(seed)
    w, b = make_params(rng, (c,), affine, sd)
    rm, rv = make_running(rng, c, sd) if (running or not training) else (None, None)
    return dt, shape, ca, c, x, w, b, rm, rv


# ----------------------------------------------------------------------------
# BatchNorm
# ----------------------------------------------------------------------------


@given(data=st.data(), name=DTYPES, training=st.booleans(), running=st.booleans(),
       affine=st.sampled_from(AFFINES), seed=st.integers(0, 2**32 - 1),
       loc=st.sampled_from([0.0, 3.0]))
def test_batch_norm_property(data, name, training, running, affine, seed, loc):
    dt, shape, ca, c, x, w, b, rm, rv = running_stats_problem(data, name, training, running,
                                                              affine, seed, loc)
    count = math.prod(d for i, d in enumerate(shape) if i != (1 if ca == 1 else len(shape) - 1))
    if training and c and count <= 1:
        with pytest.raises(ValueError):
            nk.batch_norm(x, w, b, running_mean=rm, running_var=rv, training=True, channel_axis=ca)
        return
    out, _ = bn.run_forward(x, w, b, rm, rv, training=training, channel_axis=ca)
    dy = make_array(_grad_seed(seed), shape, dt, data.draw(layouts(len(shape))))
    bn.run_backward(dy, x, out.mean, out.rstd, w, training=training, channel_axis=ca)


# ----------------------------------------------------------------------------
# LayerNorm and RMSNorm
# ----------------------------------------------------------------------------


@st.composite
def row_problem(draw):
    lead = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, 7]), min_size=0, max_size=2))
    ns = tuple(draw(st.lists(DIMS, min_size=1, max_size=2)))
    shape = tuple(lead) + ns
    return shape, ns, draw(layouts(len(shape)))


@given(problem=row_problem(), name=DTYPES, affine=st.sampled_from(AFFINES),
       loc=st.sampled_from([0.0, 3.0]), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_layer_norm_property(problem, name, affine, loc, seed, data):
    shape, ns, lay = problem
    dt = get_dtype(name)
    x = make_array(seed, shape, dt, lay, loc=loc)
    w, b = make_params(np.random.default_rng(seed), ns, affine, stats_dtype(dt))
    out, _ = ln.run_forward(x, ns, w, b)
    dy = make_array(_grad_seed(seed), shape, dt, data.draw(layouts(len(shape))))
    ln.run_backward(dy, x, out.mean, out.rstd, w)


@given(problem=row_problem(), name=DTYPES, weighted=st.booleans(),
       eps=st.sampled_from([None, 1e-5, 0.5]), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_rms_norm_property(problem, name, weighted, eps, seed, data):
    shape, ns, lay = problem
    dt = get_dtype(name)
    x = make_array(seed, shape, dt, lay, loc=0.5)
    w, _ = make_params(np.random.default_rng(seed), ns, "weight" if weighted else "none",
                       stats_dtype(dt))
    out, _ = rms.run_forward(x, ns, w, eps=eps)
    dy = make_array(_grad_seed(seed), shape, dt, data.draw(layouts(len(shape))))
    rms.run_backward(dy, x, out.rstd, w)


# ----------------------------------------------------------------------------
# GroupNorm and InstanceNorm
# ----------------------------------------------------------------------------


@given(data=st.data(), name=DTYPES, affine=st.sampled_from(AFFINES),
       groups=st.sampled_from([1, 2, 3, 5]), per_group=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**32 - 1))
def test_group_norm_property(data, name, affine, groups, per_group, seed):
    dt = get_dtype(name)
    shape, ca = channel_shape(data.draw, zero_batch_ok=True, c=groups * per_group)
    x = make_array(seed, shape, dt, data.draw(layouts(len(shape))), loc=1.0)
    w, b = make_params(np.random.default_rng(seed), (groups * per_group,), affine,
                       stats_dtype(dt))
    out, _ = gn.run_forward(x, groups, w, b, channel_axis=ca)
    dy = make_array(_grad_seed(seed), shape, dt, data.draw(layouts(len(shape))))
    gn.run_backward(dy, x, out.mean, out.rstd, w, channel_axis=ca)


@given(data=st.data(), name=DTYPES, training=st.booleans(), running=st.booleans(),
       affine=st.sampled_from(AFFINES), seed=st.integers(0, 2**32 - 1))
def test_instance_norm_property(data, name, training, running, affine, seed):
    dt, shape, ca, c, x, w, b, rm, rv = running_stats_problem(data, name, training, running,
                                                              affine, seed, -2.0)
    spatial = math.prod(shape[2:] if ca == 1 else shape[1:-1])
    if training and ((spatial <= 1 and shape[0] * c > 0) or (rm is not None and shape[0] == 0)):
        with pytest.raises(ValueError):
            nk.instance_norm(x, w, b, running_mean=rm, running_var=rv, training=True, channel_axis=ca)
        return
    out, _ = inn.run_forward(x, w, b, rm, rv, training=training, channel_axis=ca)
    dy = make_array(_grad_seed(seed), shape, dt, data.draw(layouts(len(shape))))
    inn.run_backward(dy, x, out.mean, out.rstd, w, training=training, channel_axis=ca)
