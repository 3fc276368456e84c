"""CUDA support (SPEC section 5): whether normkit's GPU kernels can run here.

Arrays that expose ``__cuda_array_interface__`` (CuPy arrays) passed to any ``normkit`` function
run on the GPU, on the array's current stream, and come back as CuPy arrays::

    import cupy as cp
    import normkit as nk
    if nk.cuda.is_available():
        y, mean, rstd = nk.layer_norm(cp.asarray(x), 768)

The kernels live in the separate extension ``normkit._cuda``, built only when a CUDA toolkit was
found at build time. It links the CUDA runtime statically and is imported lazily, so a CUDA build
imports and runs the CPU paths unchanged on a machine without a GPU or driver.
"""

from __future__ import annotations

import functools
from typing import Optional

__all__ = ["is_compiled", "is_available", "device_count", "unavailable_reason"]


@functools.lru_cache(maxsize=None)
def _module():
    """``normkit._cuda``, or None when this build has no CUDA kernels (or they fail to load)."""
    try:
        from . import _cuda
    except ImportError:
        return None
    return _cuda


def is_compiled() -> bool:
    """Whether this build of normkit contains the CUDA kernels."""
    return _module() is not None


@functools.lru_cache(maxsize=None)
def device_count() -> int:
    """Number of CUDA devices the kernels can use: 0 without the kernels, a driver or a GPU."""
    m = _module()
    return int(m.device_count()) if m is not None else 0


def is_available() -> bool:
    """Whether CUDA arrays can be processed here (kernels compiled and a GPU present)."""
    return device_count() > 0


def unavailable_reason() -> Optional[str]:
    """Why :func:`is_available` is False (None when it is True)."""
    m = _module()
    if m is None:
        return "normkit was built without CUDA (no CUDA toolkit at build time, or NORMKIT_CUDA=OFF)"
    if device_count() > 0:
        return None
    return f"no usable CUDA device ({m.device_error() or 'none found'})"
