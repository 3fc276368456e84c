"""Stateful normalization layers for NumPy networks (SPEC section 4).

Each layer holds its parameters (``weight``, ``bias``), running statistics where the operation
has them, and what its last forward needs for ``backward``: a reference to the input (not a copy:
do not modify an input in place between ``forward`` and ``backward``) and the saved statistics.
``backward(dy)`` returns ``dx`` and overwrites ``grad_weight``/``grad_bias``.
"""

from __future__ import annotations

import operator
from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _plan as P
from . import functional as F
from . import stats as _stats

__all__ = ["BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm"]


def _param_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64 (the statistics dtypes), got {dt}")
    return dt


def _positive_int(v, what: str) -> int:
    try:
        n = operator.index(v)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {v!r}") from None
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {n}")
    if n > _MAX_SIZE:
        raise ValueError(f"{what} must be at most 2**62, got {n}")
    return n


_MAX_SIZE = 2**62  # beyond any array NumPy can allocate; larger ints are a ValueError up front


class _Norm:
    """Shared machinery: train/eval, parameters, state_dict, saved context for backward."""

    _state_names: Tuple[str, ...] = ()

    def __init__(self) -> None:
        self.training = True
        self.grad_weight: Optional[np.ndarray] = None
        self.grad_bias: Optional[np.ndarray] = None
        self._saved: Optional[Tuple[Any, ...]] = None

    # -- mode -----------------------------------------------------------------------------
    def train(self, mode: bool = True):
        """Training mode (batch statistics; running statistics updated). Returns self.
        ``mode`` must be a bool (TypeError otherwise: ``train('False')`` would mean True)."""
        self.training = P.training_flag(mode, f"{type(self).__name__}.train")
        return self

    def eval(self):
        """Evaluation mode (running statistics used where tracked). Returns self."""
        return self.train(False)

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):  # pragma: no cover - overridden
        raise NotImplementedError

    def _saved_context(self):
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return self._saved

    def _set_grads(self, grads: F.NormGrads) -> np.ndarray:
        self.grad_weight = grads.dweight if getattr(self, "weight", None) is not None else None
        self.grad_bias = grads.dbias if getattr(self, "bias", None) is not None else None
        return grads.dx

    # -- state ----------------------------------------------------------------------------
    def _state_items(self):
        for name in self._state_names:
            value = getattr(self, name)
            if value is not None:
                yield name, value

    def state_dict(self) -> Dict[str, np.ndarray]:
        """A plain dict of NumPy arrays (copies): parameters, running statistics and
        ``num_batches_tracked`` where the layer has them."""
        out = {}
        for name, value in self._state_items():
            out[name] = np.array(value, copy=True) if isinstance(value, np.ndarray) else np.array(value, dtype=np.int64)
        return out

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Copy arrays from ``state`` into this layer. Keys must match ``state_dict()`` exactly;
        shapes and dtypes must match. On any error nothing is changed."""
        own = dict(self._state_items())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(
                f"{type(self).__name__}.load_state_dict: missing keys {missing}, unexpected keys {unexpected}"
            )
        staged = {}
        for name, current in own.items():
            value = np.asarray(state[name])
            fn = f"{type(self).__name__}.load_state_dict"
            if name == "num_batches_tracked":
                if value.shape != () or value.dtype.kind not in "iu":
                    raise TypeError(
                        f"{fn}: num_batches_tracked must be an integer scalar, "
                        f"got shape {value.shape} and dtype {value.dtype}"
                    )
                if int(value) < 0:
                    raise ValueError(f"{fn}: num_batches_tracked must be >= 0, got {int(value)}")
                staged[name] = int(value)
                continue
            if value.shape != current.shape:
                raise ValueError(
                    f"{fn}: {name} has shape {value.shape} but {current.shape} is required"
                )
            if P.native_dtype(value.dtype) != current.dtype:  # either byte order is read right
                raise TypeError(
                    f"{fn}: {name} has dtype {value.dtype} but {current.dtype} is required"
                )
            if name in ("running_mean", "running_var") and not np.isfinite(value).all():
                raise ValueError(f"{fn}: {name} has non-finite entries (NaN or inf)")
            if name == "running_var" and (value < 0).any():
                raise ValueError(f"{fn}: running_var has negative entries")
            staged[name] = value
        for name, value in staged.items():
            if name == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                np.copyto(getattr(self, name), value)

    def extra_repr(self) -> str:  # pragma: no cover - overridden
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class _RunningStatsNorm(_Norm):
    """BatchNorm and InstanceNorm: momentum, running statistics, num_batches_tracked."""

    _state_names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    _functional = staticmethod(F.batch_norm)
    _functional_backward = staticmethod(F.batch_norm_backward)

    def __init__(self, num_features, eps, momentum, affine, track_running_stats, channel_axis, dtype):
        super().__init__()
        self.num_features = _positive_int(num_features, f"{type(self).__name__}: num_features")
        self.eps = P.eps_value(eps, type(self).__name__)
        if momentum is not None:
            momentum = P.momentum_value(momentum, type(self).__name__)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.channel_axis = P.channel_axis(channel_axis, type(self).__name__)
        dt = _param_dtype(dtype)
        C = self.num_features
        self.weight = np.ones(C, dt) if self.affine else None
        self.bias = np.zeros(C, dt) if self.affine else None
        if self.track_running_stats:
            self.running_mean: Optional[np.ndarray] = np.zeros(C, dt)
            self.running_var: Optional[np.ndarray] = np.ones(C, dt)
            self.num_batches_tracked: Optional[int] = 0
        else:
            self.running_mean = self.running_var = None
            self.num_batches_tracked = None

    def forward(self, x):
        """Normalize x; in training mode (with tracked statistics) update the running ones."""
        use_batch = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        momentum = self.momentum
        if update and momentum is None:  # cumulative moving average
            momentum = 1.0 / (self.num_batches_tracked + 1)
        result = self._functional(
            x,
            self.weight,
            self.bias,
            running_mean=self.running_mean if (update or not use_batch) else None,
            running_var=self.running_var if (update or not use_batch) else None,
            training=use_batch,
            momentum=0.0 if momentum is None else momentum,
            eps=self.eps,
            channel_axis=self.channel_axis,
        )
        if update:
            self.num_batches_tracked += 1
        self._saved = (np.asarray(x), result.mean, result.rstd, use_batch)
        return result.y

    def backward(self, dy):
        """Gradient with respect to the last forward's input; sets grad_weight/grad_bias."""
        x, mean, rstd, use_batch = self._saved_context()
        grads = self._functional_backward(
            dy, x, mean, rstd, self.weight, training=use_batch, channel_axis=self.channel_axis
        )
        return self._set_grads(grads)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, channel_axis={self.channel_axis}"
        )


class BatchNorm(_RunningStatsNorm):
    """Batch normalization layer (SPEC section 4); see :func:`normkit.batch_norm`."""

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, channel_axis=1, dtype=np.float32):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, channel_axis, dtype)

    # -- SPEC section 6: population statistics and the inference map ----------------------
    def _require_running_stats(self, fn: str) -> None:
        if not self.track_running_stats:
            raise ValueError(
                f"{fn}: this BatchNorm has track_running_stats=False, so it has no running "
                "statistics (and normalizes with batch statistics even in eval mode)"
            )

    def recompute_statistics(self, batches, *, method: str = "population") -> None:
        """Replace ``running_mean``/``running_var`` by statistics of ``batches``, an iterable
        of arrays laid out like this layer's input (the inputs it would see, e.g. every
        training batch passed through the network's earlier layers in eval mode).

        ``method="population"``: the exact mean and unbiased variance of every value seen
        (``Moments`` merges). ``method="paper"``: the BatchNorm paper's Algorithm 2, the mean of
        the batch means and ``m/(m-1)`` times the mean of the batch variances (batches of
        different sizes each get their own ``m/(m-1)``). Statistics accumulate in float64.
        The mode, parameters and ``num_batches_tracked`` are unchanged; on any error the
        running statistics are untouched.
        """
        fn = "BatchNorm.recompute_statistics"
        self._require_running_stats(fn)
        mean, var = _stats.channel_statistics(batches, self.num_features, self.channel_axis, method, fn)
        np.copyto(self.running_mean, mean, casting="unsafe")
        np.copyto(self.running_var, var, casting="unsafe")

    def as_affine(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(scale, shift)`` per channel such that eval mode computes ``y = scale * x + shift``:
        ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``
        (computed in float64, returned in the layer's dtype). Needs tracked running
        statistics; the current mode does not matter."""
        dt = self.running_mean.dtype if self.running_mean is not None else None
        scale, shift = self._affine64("BatchNorm.as_affine")
        return scale.astype(dt), shift.astype(dt)

    def _affine64(self, fn: str) -> Tuple[np.ndarray, np.ndarray]:
        self._require_running_stats(fn)
        if (self.running_var < 0).any():
            raise ValueError(f"{fn}: running_var has negative entries")
        scale = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return scale, shift


class InstanceNorm(_RunningStatsNorm):
    """Instance normalization layer; see :func:`normkit.instance_norm`."""

    _functional = staticmethod(F.instance_norm)
    _functional_backward = staticmethod(F.instance_norm_backward)

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, channel_axis=1, dtype=np.float32):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, channel_axis, dtype)


class GroupNorm(_Norm):
    """Group normalization layer; see :func:`normkit.group_norm`."""

    _state_names = ("weight", "bias")

    def __init__(self, num_groups, num_channels, *, eps=1e-5, affine=True, channel_axis=1,
                 dtype=np.float32):
        super().__init__()
        self.num_groups = _positive_int(num_groups, "GroupNorm: num_groups")
        self.num_channels = _positive_int(num_channels, "GroupNorm: num_channels")
        if self.num_channels % self.num_groups:
            raise ValueError(
                f"GroupNorm: num_groups {self.num_groups} does not divide num_channels {self.num_channels}"
            )
        self.eps = P.eps_value(eps, "GroupNorm")
        self.affine = bool(affine)
        self.channel_axis = P.channel_axis(channel_axis, "GroupNorm")
        dt = _param_dtype(dtype)
        self.weight = np.ones(self.num_channels, dt) if self.affine else None
        self.bias = np.zeros(self.num_channels, dt) if self.affine else None

    def forward(self, x):
        r = F.group_norm(x, self.num_groups, self.weight, self.bias, eps=self.eps,
                         channel_axis=self.channel_axis)
        self._saved = (np.asarray(x), r.mean, r.rstd)
        return r.y

    def backward(self, dy):
        x, mean, rstd = self._saved_context()
        return self._set_grads(
            F.group_norm_backward(dy, x, mean, rstd, self.weight, channel_axis=self.channel_axis)
        )

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"channel_axis={self.channel_axis}")


class _RowNorm(_Norm):
    def __init__(self, normalized_shape, eps, elementwise_affine, with_bias, dtype, name):
        super().__init__()
        self.normalized_shape = P.normalized_shape(normalized_shape, name)
        for n in self.normalized_shape:
            _positive_int(n, f"{name}: normalized_shape entries")
        if P.prod(self.normalized_shape) > _MAX_SIZE:
            raise ValueError(f"{name}: normalized_shape {self.normalized_shape} has too many elements")
        self.eps = None if eps is None else P.eps_value(eps, name)
        self.elementwise_affine = bool(elementwise_affine)
        dt = _param_dtype(dtype)
        self.weight = np.ones(self.normalized_shape, dt) if self.elementwise_affine else None
        self.bias = (np.zeros(self.normalized_shape, dt)
                     if self.elementwise_affine and with_bias else None)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class LayerNorm(_RowNorm):
    """Layer normalization layer; see :func:`normkit.layer_norm`."""

    _state_names = ("weight", "bias")

    def __init__(self, normalized_shape, *, eps=1e-5, elementwise_affine=True, dtype=np.float32):
        super().__init__(normalized_shape, eps, elementwise_affine, True, dtype, "LayerNorm")

    def forward(self, x):
        r = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, eps=self.eps)
        self._saved = (np.asarray(x), r.mean, r.rstd)
        return r.y

    def backward(self, dy):
        x, mean, rstd = self._saved_context()
        return self._set_grads(F.layer_norm_backward(dy, x, mean, rstd, self.weight))


class RMSNorm(_RowNorm):
    """RMS normalization layer; see :func:`normkit.rms_norm`."""

    _state_names = ("weight",)

    def __init__(self, normalized_shape, *, eps=None, elementwise_affine=True, dtype=np.float32):
        super().__init__(normalized_shape, eps, elementwise_affine, False, dtype, "RMSNorm")

    def forward(self, x):
        r = F.rms_norm(x, self.normalized_shape, self.weight, eps=self.eps)
        self._saved = (np.asarray(x), r.rstd)
        return r.y

    def backward(self, dy):
        x, rstd = self._saved_context()
        return self._set_grads(F.rms_norm_backward(dy, x, rstd, self.weight))
