"""Deployment (SPEC section 6): fold an eval-mode BatchNorm into the layer before it.

In eval mode BatchNorm is one affine map per channel, ``y = scale * z + shift`` (see
``BatchNorm.as_affine``). When ``z = layer(x; weight, bias)`` is a dense or convolution layer
whose output channel ``o`` is ``sum(weight[o] * patch) + bias[o]``, then

    bn(layer(x; weight, bias)) == layer(x; weight * scale[o], bias * scale + shift)

so the network can drop the BatchNorm layer at inference. The products are taken in float64
and rounded once to the weight's dtype.
"""

from __future__ import annotations

import operator
from typing import Optional, Tuple

import numpy as np

from .functional import data_array as _data_array
from .layers import BatchNorm

__all__ = ["fold_batch_norm"]


def fold_batch_norm(weight, bias, bn: BatchNorm, *, out_axis: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Fold the eval-mode BatchNorm ``bn`` into the preceding dense or convolution layer.

    ``weight``: a dense ``(out, in)`` or convolution ``(out, in, *kernel)`` weight, with the
    output channels on ``out_axis`` (``out_axis=1`` for a dense weight stored ``(in, out)`` as
    in ``x @ weight``, or for a transposed convolution's ``(in, out, *kernel)``). ``bias``:
    ``(out,)`` or None (no bias). Returns new arrays ``(weight2, bias2)`` in the weight's dtype
    (bias2 is never None) with ``layer(x; weight2, bias2) == bn(layer(x; weight, bias))``.
    ``bn`` must be in eval mode with tracked running statistics; nothing is modified.
    """
    fn = "fold_batch_norm"
    if not isinstance(bn, BatchNorm):
        raise TypeError(f"{fn}: bn must be a normkit.BatchNorm, got {type(bn).__name__}")
    if bn.training:
        raise ValueError(
            f"{fn}: bn is in training mode, where it normalizes with batch statistics; "
            "call bn.eval() first (folding reproduces eval mode)"
        )
    weight = _data_array(weight, fn, "weight")
    if weight.ndim < 2:
        raise ValueError(
            f"{fn}: weight must be a dense (out, in) or convolution (out, in, *kernel) weight, "
            f"got shape {weight.shape}"
        )
    try:
        axis = operator.index(out_axis)
    except TypeError:
        raise TypeError(f"{fn}: out_axis must be an int, got {out_axis!r}") from None
    if not -weight.ndim <= axis < weight.ndim:
        raise ValueError(f"{fn}: out_axis {axis} is out of range for weight with shape {weight.shape}")
    axis %= weight.ndim
    C = weight.shape[axis]
    if C != bn.num_features:
        raise ValueError(
            f"{fn}: weight has shape {weight.shape} with {C} outputs on out_axis={out_axis}, "
            f"but bn has num_features={bn.num_features}"
        )
    b: Optional[np.ndarray] = None
    if bias is not None:
        b = _data_array(bias, fn, "bias")
        if b.shape != (C,):
            raise ValueError(f"{fn}: bias has shape {b.shape} but weight has {C} outputs, so ({C},) is required")
    scale, shift = bn._affine64(fn)
    shape = [1] * weight.ndim
    shape[axis] = C
    weight2 = (weight.astype(np.float64) * scale.reshape(shape)).astype(weight.dtype)
    bias2 = shift
    if b is not None:
        bias2 = bias2 + b.astype(np.float64) * scale
    return weight2, bias2.astype(weight.dtype)
