"""Outputs large enough to be written with streaming stores (8 MiB or more) in the row traversal
(channels innermost): short rows are applied as one flat range per sample there, so a vector
block can run past the end of a row into the next one. Row widths that are not a multiple of
the block, outputs that start mid-line (NumPy aligns to 16 bytes, not 64) and in-place calls are
checked against the float64 reference, and across thread counts bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
from conftest import assert_close

nk = pytest.importorskip("normkit")

# float32, each at least 8 MiB: rows of 68, 64 and 200 channels (272, 256 and 800 bytes)
CASES = [((8, 64, 64, 68), 4), ((9, 64, 64, 64), 8), ((2, 80, 80, 200), 10)]


def _mid_line(shape, dtype=np.float32):
    """An empty array whose data starts 4 bytes past a 64-byte line boundary."""
    n = int(np.prod(shape))
    buf = np.empty(n + 32, dtype)
    off = ((-buf.ctypes.data) % 64) // buf.itemsize + 1
    return buf[off:off + n].reshape(shape)


@pytest.mark.parametrize("shape,groups", CASES)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_batch_norm_channels_last_streamed(shape, groups, activation):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(shape) * 1.5 + 0.4).astype(np.float32)
    c = shape[-1]
    w = (rng.random(c) + 0.5).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    r = ref.batch_norm(x, w, b, channel_axis=-1)
    z = r.y if activation is None else ref.silu(r.y)
    for out in (None, _mid_line(shape)):
        o = nk.batch_norm(x, w, b, channel_axis=-1, activation=activation, out=out)
        assert_close(o.y, z, np.float32, what=f"y (out={'mid-line' if out is not None else None})")
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    ev = nk.batch_norm(x, w, b, running_mean=rm, running_var=rv, training=False, channel_axis=-1)
    ref_ev = ref.batch_norm(x, w, b, rm, rv, training=False, channel_axis=-1)
    assert_close(ev.y, ref_ev.y, np.float32, what="y (evaluation)")
    xi = x.copy()
    nk.batch_norm(xi, w, b, channel_axis=-1, activation=activation, out=xi)
    assert_close(xi, z, np.float32, what="y (in place)")


@pytest.mark.parametrize("shape,groups", CASES)
def test_group_norm_channels_last_streamed(shape, groups):
    rng = np.random.default_rng(12)
    x = rng.standard_normal(shape).astype(np.float32)
    c = shape[-1]
    w = (rng.random(c) + 0.5).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    r = ref.group_norm(x, groups, w, b, channel_axis=-1)
    o = nk.group_norm(x, groups, w, b, channel_axis=-1, out=_mid_line(shape))
    assert_close(o.y, r.y, np.float32, what="y")


@pytest.mark.parametrize("shape,groups", CASES[:2])
def test_streamed_rows_same_bits_across_threads(shape, groups):
    rng = np.random.default_rng(13)
    x = rng.standard_normal(shape).astype(np.float32)
    before = nk.get_num_threads()
    try:
        ys = []
        for t in (1, 2, 3):
            nk.set_num_threads(t)
            ys.append(nk.batch_norm(x, channel_axis=-1, activation="relu").y.copy())
            ys.append(nk.group_norm(x, groups, channel_axis=-1).y.copy())
    finally:
        nk.set_num_threads(before)
    for k in range(2, len(ys)):
        assert np.array_equal(ys[k].view(np.uint32), ys[k % 2].view(np.uint32))
