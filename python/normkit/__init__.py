"""normkit: fast, accurate forward and backward normalization kernels for NumPy.

    import numpy as np
    import normkit as nk
    y, mean, rstd = nk.layer_norm(x, 768, weight, bias)
    dx, dweight, dbias = nk.layer_norm_backward(dy, x, mean, rstd, weight)

See SPEC-level documentation in the README. The native core is the private ``normkit._core``.
"""

from __future__ import annotations

from . import _core, cuda
from .layers import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from .stats import Moments
from .deploy import fold_batch_norm
from .functional import (
    AddNormOutput,
    NormGrads,
    NormOutput,
    add_layer_norm,
    add_layer_norm_backward,
    add_rms_norm,
    add_rms_norm_backward,
    batch_norm,
    batch_norm_backward,
    group_norm,
    group_norm_backward,
    instance_norm,
    instance_norm_backward,
    layer_norm,
    layer_norm_backward,
    rms_norm,
    rms_norm_backward,
)

__version__ = _core.build_info()["version"]

__all__ = [
    "BatchNorm",
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm",
    "RMSNorm",
    "Moments",
    "fold_batch_norm",
    "NormOutput",
    "NormGrads",
    "batch_norm",
    "batch_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "rms_norm",
    "rms_norm_backward",
    "AddNormOutput",
    "add_layer_norm",
    "add_layer_norm_backward",
    "add_rms_norm",
    "add_rms_norm_backward",
    "set_num_threads",
    "get_num_threads",
    "build_info",
    "set_buffer_cache_limit",
    "buffer_cache_info",
]


def set_num_threads(n: int) -> None:
    """Set the number of threads the CPU kernels use, ``1 <= n <= 1024``. Results do not
    depend on it. Raises TypeError for a non-integer, ValueError for an int out of range."""
    if type(n).__name__ in ("bool", "bool_"):  # Python's or NumPy's bool
        raise TypeError(f"set_num_threads: n must be an int, got {n!r}")
    if not isinstance(n, int):
        try:
            import operator

            n = operator.index(n)
        except TypeError:
            raise TypeError(f"set_num_threads: n must be an int, got {n!r}") from None
    if not 1 <= n <= _core.MAX_THREADS:
        raise ValueError(f"set_num_threads: n must be between 1 and {_core.MAX_THREADS}, got {n}")
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of threads the CPU kernels use (default: every core)."""
    return _core.get_num_threads()


def set_buffer_cache_limit(nbytes: int) -> int:
    """Set how many bytes of freed output buffers normkit keeps for reuse; returns the old limit.

    Outputs of 256 KiB or more that no ``out=`` receives (every ``dx``, and ``y`` when ``out`` is
    None) take their memory from this cache and give it back when the array is freed, so a
    training loop does not pay the page faults of fresh memory on every step. The default is
    256 MiB, or ``NORMKIT_BUFFER_CACHE_MB`` from the environment at import; 0 turns the cache off
    and frees what it holds. Arrays in use are never affected.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"set_buffer_cache_limit: nbytes must be an int, got {nbytes!r}")
    if nbytes < 0:
        raise ValueError(f"set_buffer_cache_limit: nbytes must be >= 0, got {nbytes}")
    return int(_core.set_buffer_cache_limit(min(nbytes, 2**62)))


def buffer_cache_info() -> dict:
    """The buffer cache's state: limit, cached_bytes, cached_buffers, hits, misses, min_bytes."""
    return dict(_core.buffer_cache_info())


def _limit_from_env() -> None:
    import os

    value = os.environ.get("NORMKIT_BUFFER_CACHE_MB")
    if value is None or not value.strip():
        return
    try:
        mb = float(value)
        if not mb >= 0 or mb == float("inf"):
            raise ValueError
    except ValueError:
        import warnings

        warnings.warn(
            f"normkit: ignoring NORMKIT_BUFFER_CACHE_MB={value!r} (expected a number of MiB >= 0)",
            RuntimeWarning, stacklevel=2,
        )
        return
    _core.set_buffer_cache_limit(int(mb * 2**20))


_limit_from_env()


def build_info() -> dict:
    """Build facts: version, compiler, SIMD level, threading backend, CUDA compiled/usable."""
    info = dict(_core.build_info())
    info["cuda_compiled"] = cuda.is_compiled()  # the normkit._cuda module is present
    info["cuda_available"] = cuda.is_available()  # ... and a GPU it can use
    info["num_threads"] = _core.get_num_threads()
    return info
