"""Normalize a Dask array chunk by chunk with normkit's kernels.

    pip install "normkit[dask]"        # from a checkout: pip install ".[dask]"
    python examples/dask_norm.py

Builds a lazy (N, C, H, W) array, gets its per-channel moments, BatchNorm and LayerNorm of it
as lazy dask arrays, and checks them against the in-memory functions.
"""

import sys

try:
    import dask
    import dask.array as da
except ImportError as e:  # name what to install, rather than a bare ModuleNotFoundError
    sys.exit(
        f"examples/dask_norm.py needs Dask, which is not installed ({e}).\n"
        'Install it with:  pip install "normkit[dask]"   (from a checkout: pip install ".[dask]")'
    )

import numpy as np

import normkit as nk
import normkit.dask as nkd

x = da.random.default_rng(0).normal(5.0, 2.0, size=(64, 16, 12, 12), chunks=(16, 8, 12, 12))
x = x.astype(np.float32)

m = nkd.moments(x, axis=(0, 2, 3))  # a normkit.Moments, one pass over the chunks
print(f"per-channel moments of {m.count} values each: mean[:3] = {m.mean[:3]}, var[:3] = {m.var()[:3]}")

weight = np.linspace(0.5, 1.5, 16, dtype=np.float32)
y_bn = nkd.batch_norm(x, weight, None)         # lazy: nothing computed yet
y_ln = nkd.layer_norm(x, (12, 12), eps=1e-6)    # lazy
print(f"batch_norm -> {y_bn!r}")

with dask.config.set(scheduler="threads"):
    x_np, bn_np, ln_np = dask.compute(x, y_bn, y_ln)
print("max |batch_norm - in memory| =", np.abs(bn_np - nk.batch_norm(x_np, weight).y).max())
print("max |layer_norm - in memory| =", np.abs(ln_np - nk.layer_norm(x_np, (12, 12), eps=1e-6).y).max())
