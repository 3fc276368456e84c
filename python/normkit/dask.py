"""Normalization of Dask arrays (SPEC section 7), through dask (the optional extra ``dask``).

    import normkit.dask as nkd
    m = nkd.moments(darr, axis=0)                  # a normkit.Moments, computed now
    y = nkd.batch_norm(darr, weight, bias)         # a lazy dask array
    y = nkd.layer_norm(darr, 768, weight, bias)    # a lazy dask array

Statistics take one pass over the chunks: each chunk's float64 moments (``normkit.Moments``,
two passes over the chunk in memory) are merged with Chan's formula by a ``dask.array``
reduction tree, whose shape depends only on the chunking, so results do not depend on the
scheduler or on timing. Normalization runs chunk by chunk in the C++ kernels:

* ``batch_norm`` (training-mode statistics of the whole array): the per-channel moments, then
  every chunk goes through the eval-mode kernel with the merged mean and rstd
  (``normkit._sharded``); chunks may split the channel axis or any other.
* ``layer_norm``: each row's statistics are local to it, so the array is first rechunked (only
  if needed) to hold the normalized axes whole in each chunk, then ``normkit.layer_norm`` runs
  on every chunk.

Arguments are checked when the function is called; the work runs when the result is computed.
"""

from __future__ import annotations

import math

import numpy as np

try:
    import dask.array as da
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "normkit.dask needs dask[array], which is not installed: pip install 'normkit[dask]'"
    ) from e

from . import _sharded
from . import _plan as P
from . import functional as F
from .stats import Moments
from .stats import _axes  # axis rules and messages as in Moments.update

__all__ = ["moments", "batch_norm", "layer_norm"]

# What the reduction tree hands over from its last step: per feature, the merged count, mean and
# m2 of every chunk (the state of a Moments).
_PARTIAL = np.dtype([("count", np.int64), ("mean", np.float64), ("m2", np.float64)])


def _dask_input(x, fn: str):
    x = x if isinstance(x, da.Array) else da.asarray(x)
    if not P.is_float_dtype(x.dtype):
        raise TypeError(
            f"{fn}: x has unsupported dtype {x.dtype} (expected float32, float64, float16 or bfloat16)"
        )
    if not x.dtype.isnative:  # e.g. '>f4' read from a file: native values, lazily, per chunk
        x = x.astype(P.native_dtype(x.dtype))
    return x


# -- the reduction tree's three steps (chunk, combine, aggregate) ------------------------------


def _flatten(parts):
    """The chunk results of a nested list (one level per reduced axis), in order."""
    if isinstance(parts, list):
        return [m for p in parts for m in _flatten(p)]
    return [parts]


def _chunk_moments(x, axis, keepdims, computing_meta=False):
    if computing_meta:
        return np.empty((0,) * (x.ndim - len(axis)), _PARTIAL)
    kept = tuple(s for i, s in enumerate(x.shape) if i not in axis)
    return Moments(kept).update(x, axis=axis)


def _combine_moments(parts, axis, keepdims, computing_meta=False):
    if computing_meta:
        return parts
    return _sharded.merge_in_order(_flatten(parts))


def _aggregate_moments(parts, axis, keepdims, computing_meta=False):
    if computing_meta:
        return parts
    state = _sharded.merge_in_order(_flatten(parts)).state_dict()
    out = np.empty(state["mean"].shape, _PARTIAL)
    out["count"] = state["count"]
    out["mean"] = state["mean"]
    out["m2"] = state["m2"]
    return out


def _moments_tree(x, axes):
    """A lazy structured array (count, mean, m2) over the kept axes, chunked as x is there."""
    meta = np.empty((0,) * (x.ndim - len(axes)), _PARTIAL)
    return da.reduction(
        x, _chunk_moments, _aggregate_moments, combine=_combine_moments, axis=axes,
        keepdims=False, dtype=_PARTIAL, concatenate=False, meta=meta, name="normkit-moments",
    )


def moments(darr, axis) -> Moments:
    """The count, mean and variance of ``darr`` over ``axis`` (an int, a tuple of ints, or None
    for every axis) as a :class:`normkit.Moments` whose ``feature_shape`` is the shape of the
    kept axes. Computes now, with the current dask scheduler, in one pass over the chunks."""
    fn = "normkit.dask.moments"
    x = _dask_input(darr, fn)
    axes = _axes(axis, x.ndim, x.shape, fn)
    result = _moments_tree(x, axes).compute()
    count = math.prod(x.shape[a] for a in axes)
    return Moments.from_state_dict(
        {"count": np.int64(count), "mean": result["mean"], "m2": result["m2"]}
    )


# -- batch_norm -------------------------------------------------------------------------------


def _batch_norm_block(x, stats, weight, bias, eps, ca):
    rstd = _sharded.rstd_of(stats["m2"] / stats["count"], eps)
    return _sharded.normalize(x, stats["mean"], rstd, weight, bias, ca)


def batch_norm(darr, weight=None, bias=None, *, eps=1e-5, channel_axis=1):
    """:func:`normkit.batch_norm` in training mode (statistics of the whole array) of a dask
    array ``(N, C, *spatial)`` (``channel_axis=1``) or ``(N, *spatial, C)`` (``-1``); returns a
    lazy dask array of y, in darr's dtype and chunks. weight, bias: ``(C,)`` or None."""
    fn = "normkit.dask.batch_norm"
    x = _dask_input(darr, fn)
    w, b = (None if v is None else F.host_array(v, fn, name)
            for v, name in ((weight, "weight"), (bias, "bias")))
    plan = P.batch_norm(fn, x, w, b, None, None, True, 0.0, eps, channel_axis, None)
    cax, e = plan.ca, plan.eps  # channel_axis 1 or -1, as the kernels take it
    ca = cax % x.ndim
    w, b = F.param(w, plan.sd), F.param(b, plan.sd)
    axes = _sharded.channel_axes(x.ndim, ca)
    stats = _moments_tree(x, axes)
    ind = tuple(range(x.ndim))
    per_channel = {"chunks": (x.chunks[ca],)}
    return da.blockwise(
        _batch_norm_block, ind, x, ind, stats, (ca,),
        None if w is None else da.from_array(w, **per_channel), None if w is None else (ca,),
        None if b is None else da.from_array(b, **per_channel), None if b is None else (ca,),
        e, None, cax, None,
        dtype=x.dtype, meta=np.empty((0,) * x.ndim, x.dtype), name="normkit-batch-norm",
    )


# -- layer_norm -------------------------------------------------------------------------------


def _layer_norm_block(x, normalized_shape, weight, bias, eps):
    return F.layer_norm(x, normalized_shape, weight, bias, eps=eps).y


def layer_norm(darr, normalized_shape, weight=None, bias=None, *, eps=1e-5):
    """:func:`normkit.layer_norm` of a dask array over its trailing ``normalized_shape`` axes;
    returns a lazy dask array of y in darr's dtype. The normalized axes are made whole in each
    chunk first (a rechunk, only when they are split)."""
    fn = "normkit.dask.layer_norm"
    x = _dask_input(darr, fn)
    w, b = (None if v is None else F.host_array(v, fn, name)
            for v, name in ((weight, "weight"), (bias, "bias")))
    plan = P.row_forward(fn, x, normalized_shape, w, b, eps, None, True)
    ns, e, k = plan.ns, plan.eps, len(plan.ns)
    w, b = F.param(w, plan.sd), F.param(b, plan.sd)
    trailing = range(x.ndim - k, x.ndim)
    if any(x.numblocks[a] > 1 for a in trailing):
        # whole normalized axes; the leading axes re-sized so chunks stay near dask's chunk size
        x = x.rechunk({a: (-1 if a in trailing else "auto") for a in range(x.ndim)})
    return x.map_blocks(_layer_norm_block, ns, w, b, e, dtype=x.dtype,
                        meta=np.empty((0,) * x.ndim, x.dtype), name="normkit-layer-norm")
