"""Stateful normalization layers for NumPy networks, shaped like PyTorch's ``torch.nn`` layers.

Each layer holds its parameters (``weight``, ``bias``), running statistics where the operation
has them, and what its last forward needs for ``backward``: a reference to the input (not a copy:
do not modify an input in place between ``forward`` and ``backward``) and the saved statistics.
``layer(x)`` (or ``layer.forward(x)``) returns ``y``; ``layer.backward(dy)`` returns ``dx`` and
overwrites ``grad_weight``/``grad_bias``. ``parameters()``, ``named_parameters()`` and
``zero_grad()`` serve a hand-written optimizer loop; ``state_dict()``/``load_state_dict()``
save and restore a layer as a plain dict of NumPy arrays.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Dict, List, Optional, Tuple

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


def _bool(v, fn: str, name: str) -> bool:
    """A Python or NumPy bool (an array or a string passed by mistake is a TypeError)."""
    if v is True or v is False:
        return v
    if isinstance(v, np.bool_):
        return bool(v)
    raise TypeError(f"{fn}: {name} must be a bool, got {v!r}")


class _Norm:
    """Shared machinery: train/eval, parameters, state_dict, saved context for backward."""

    _state_names: Tuple[str, ...] = ()
    _param_names: Tuple[str, ...] = ("weight", "bias")

    def __init__(self) -> None:
        self.training = True
        self.grad_weight: Optional[np.ndarray] = None
        self.grad_bias: Optional[np.ndarray] = None
        self._saved: Optional[Tuple[Any, ...]] = None

    # -- mode -----------------------------------------------------------------------------
    def train(self, mode: bool = True):
        """Set training mode (``mode=True``) or evaluation mode (``mode=False``).

        In training mode a layer normalizes with the statistics of its input batch and updates
        its running statistics, where it tracks them; in evaluation mode a layer with running
        statistics uses them instead. Layers without running statistics behave the same in
        both modes.

        Parameters
        ----------
        mode : bool, default True
            Python or NumPy bool.

        Returns
        -------
        layer
            This layer (so that ``layer = Layer(...).train()`` works).

        Raises
        ------
        TypeError
            ``mode`` is not a bool (a string such as ``'False'`` would otherwise mean True).
        """
        self.training = P.training_flag(mode, f"{type(self).__name__}.train")
        return self

    def eval(self):
        """Set evaluation mode; the same as ``train(False)``.

        Returns
        -------
        layer
            This layer.
        """
        return self.train(False)

    def __call__(self, x, **options):
        """Apply the layer: ``layer(x)`` is ``layer.forward(x)``.

        Parameters
        ----------
        x : array_like
            The input, as :meth:`forward` takes it.
        **options
            Passed to :meth:`forward` (``mask=`` for the channel norms, ``sample_weight=`` for
            BatchNorm).

        Returns
        -------
        numpy.ndarray
            ``y``, as :meth:`forward` returns it (errors as :meth:`forward` raises them).
        """
        return self.forward(x, **options)

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

    # -- parameters -----------------------------------------------------------------------
    def named_parameters(self) -> List[Tuple[str, np.ndarray]]:
        """The learnable parameters with their names, as PyTorch's ``named_parameters()``.

        Returns
        -------
        list of (str, numpy.ndarray)
            ``("weight", weight)`` then ``("bias", bias)``, leaving out those the layer does
            not have (``affine=False``, ``elementwise_affine=False``, ``bias=False``, RMSNorm's
            bias). The arrays are the layer's own (not copies): update them in place, e.g.
            ``p -= lr * getattr(layer, "grad_" + name)``.
        """
        out = []
        for name in self._param_names:
            value = getattr(self, name, None)
            if value is not None:
                out.append((name, value))
        return out

    def parameters(self) -> List[np.ndarray]:
        """The learnable parameter arrays, as PyTorch's ``parameters()``.

        Returns
        -------
        list of numpy.ndarray
            ``weight`` then ``bias``, leaving out those that are None; the layer's own arrays
            (not copies), so an optimizer can update them in place. The gradients after
            :meth:`backward` are, in the same order, ``grad_weight`` and ``grad_bias``.
        """
        return [value for _, value in self.named_parameters()]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameter gradients ``grad_weight`` and ``grad_bias``.

        As in PyTorch (whose default is also ``set_to_none=True``), the gradients are set to
        None. Note that :meth:`backward` *overwrites* the gradients rather than adding to them,
        so calling ``zero_grad()`` between steps is not needed; it serves loops written for
        PyTorch and makes a stale gradient impossible to use by mistake.

        Parameters
        ----------
        set_to_none : bool, default True
            True: set both gradients to None. False: fill the existing gradient arrays with
            zeros in place (gradients that are None stay None).

        Raises
        ------
        TypeError
            ``set_to_none`` is not a bool.
        """
        set_to_none = _bool(set_to_none, f"{type(self).__name__}.zero_grad", "set_to_none")
        if set_to_none:
            self.grad_weight = None
            self.grad_bias = None
            return
        for g in (self.grad_weight, self.grad_bias):
            if g is not None:
                g[...] = 0

    # -- state ----------------------------------------------------------------------------
    def _state_items(self):
        for name in self._state_names:
            value = getattr(self, name)
            if value is not None:
                yield name, value

    def state_dict(self) -> Dict[str, np.ndarray]:
        """The layer's state as a plain dict of NumPy arrays, for saving (e.g. ``np.savez``).

        Returns
        -------
        dict of str to numpy.ndarray
            Copies of ``weight``, ``bias``, ``running_mean``, ``running_var`` and
            ``num_batches_tracked`` (an int64 scalar array), each only where the layer has it:
            a layer without bias has no ``"bias"`` key, one without running statistics no
            running entries.
        """
        out = {}
        for name, value in self._state_items():
            out[name] = np.array(value, copy=True) if isinstance(value, np.ndarray) else np.array(value, dtype=np.int64)
        return out

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Copy the arrays of ``state`` (as made by :meth:`state_dict`) into this layer.

        The values are copied into the layer's existing arrays (which keep their identity, so
        references from an optimizer stay valid). Everything is checked before anything is
        copied: on any error the layer is unchanged.

        Parameters
        ----------
        state : mapping of str to array_like
            Exactly the keys of ``state_dict()``, with the same shapes and dtypes (either byte
            order); ``num_batches_tracked`` an integer scalar ``>= 0``.

        Raises
        ------
        KeyError
            Keys are missing or unexpected (both lists are named).
        ValueError
            An array has the wrong shape; running statistics hold NaN or inf, or
            ``running_var`` negative entries; ``num_batches_tracked`` is negative.
        TypeError
            An array has the wrong dtype; ``num_batches_tracked`` is not an integer scalar.
        """
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
        """The constructor arguments shown by ``repr(layer)``, as PyTorch's ``extra_repr``.

        Returns
        -------
        str
        """
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def _renorm_clipping(c, fn: str):
    """``{"rmax", "rmin", "dmax"}`` with defaults: no clipping (Keras' rule), rmin = 1/rmax."""
    if c is None:
        return {"rmax": math.inf, "rmin": 0.0, "dmax": math.inf}
    if not isinstance(c, dict):
        raise TypeError(f"{fn}: renorm_clipping must be a dict with keys rmax, rmin, dmax, got {c!r}")
    unknown = sorted(set(c) - {"rmax", "rmin", "dmax"})
    if unknown:
        raise ValueError(f"{fn}: renorm_clipping has unknown keys {unknown} (rmax, rmin, dmax)")
    rmax = P.real(c.get("rmax", math.inf), fn, "renorm_clipping['rmax']")
    rmin = P.real(c.get("rmin", 1.0 / rmax), fn, "renorm_clipping['rmin']")
    dmax = P.real(c.get("dmax", math.inf), fn, "renorm_clipping['dmax']")
    if not (rmax >= 1.0) or not (0.0 <= rmin <= 1.0) or not (dmax >= 0.0):
        raise ValueError(f"{fn}: renorm_clipping needs rmax >= 1, 0 <= rmin <= 1 and dmax >= 0, "
                         f"got {c!r}")
    return {"rmax": rmax, "rmin": rmin, "dmax": dmax}


_MOMENTUM_DOC = """momentum : float in [0, 1] or None, default 0.1
        How fast the running statistics follow the batches, with PyTorch's convention (the
        opposite of Keras'): each training step does
        ``running = (1 - momentum) * running + momentum * batch_stat``, with the unbiased
        (``n/(n-1)``) batch variance for ``running_var``. None: a cumulative moving average,
        ``momentum = 1 / num_batches_tracked`` after the step is counted, so the running
        statistics are the plain average of every batch's statistics so far."""


def _weights_kw(mask, sample_weight) -> dict:
    """The mask= / sample_weight= keywords that were given."""
    return {k: v for k, v in (("mask", mask), ("sample_weight", sample_weight)) if v is not None}


class _RunningStatsNorm(_Norm):
    """BatchNorm and InstanceNorm: momentum, running statistics, num_batches_tracked."""

    _state_names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    _functional = staticmethod(F.batch_norm)
    _functional_backward = staticmethod(F.batch_norm_backward)
    activation: Optional[str] = None  # fused activation (BatchNorm's option)
    _saved_weights: dict = {}  # the last forward's mask= / sample_weight= (never mutated)

    def _act(self) -> dict:
        """The forward's activation keyword, when the layer has one."""
        return {} if self.activation is None else {"activation": self.activation}

    def _act_backward(self) -> dict:
        """The backward's activation and bias keywords, when the layer has an activation."""
        return {} if self.activation is None else {"activation": self.activation,
                                                   "bias": self.bias}

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

    def _check_running_dtype(self, x):
        """The running statistics are updated in place, so they cannot be converted to the
        input's statistics dtype (float64 for float64 input, else float32): name the fix."""
        dt = getattr(x, "dtype", None)
        if not isinstance(dt, np.dtype) or not P.is_float_dtype(dt):
            return  # not a float array: the functional raises its own TypeError
        needed = P.stat_dtype(P.native_dtype(dt))
        have = self.running_mean.dtype
        if needed == have:
            return
        name = type(self).__name__
        data = "float32 (or float16, bfloat16)" if have == np.float32 else "float64"
        raise TypeError(
            f"{name}({self.num_features}, dtype={have.name}) got {P.native_dtype(dt).name} "
            f"input; create the layer with dtype=np.{needed.name} or pass {data} data "
            f"(its running statistics are updated in place, so they are not converted)"
        )

    def forward(self, x, mask=None, sample_weight=None):
        """Normalize ``x`` per channel; in training mode, update the running statistics.

        Training mode uses the statistics of ``x``: per channel over every other axis for
        BatchNorm, per sample and channel for InstanceNorm; with tracked running statistics it
        also updates them (see ``momentum``) and increments ``num_batches_tracked``.
        Evaluation mode uses the running statistics where the layer tracks them, else the
        statistics of ``x``. What :meth:`backward` needs is kept. On any error nothing is
        changed (running statistics, ``num_batches_tracked``, the saved context).

        Parameters
        ----------
        x : array_like
            ``(N, C, *spatial)`` (``channel_axis=1``) or ``(N, *spatial, C)``
            (``channel_axis=-1``) with ``C == num_features``; float32, float64, float16 or
            bfloat16.
        mask : array_like of bool, optional
            Training statistics over the positions where it is True (:func:`normkit.batch_norm`);
            :meth:`backward` uses it too.
        sample_weight : array_like of shape ``(N,)``, optional
            BatchNorm only: weighted training statistics (:func:`normkit.batch_norm`).

        Returns
        -------
        numpy.ndarray
            ``y``, the shape and dtype of ``x``.

        Raises
        ------
        TypeError
            ``x`` has a non-float dtype; or the layer tracks running statistics and ``x``'s
            statistics dtype (float64 for float64 ``x``, else float32) is not the layer's
            ``dtype`` (the message says which ``dtype=`` to create the layer with).
        ValueError
            ``x`` has fewer than 2 dimensions or the wrong number of channels; BatchNorm in
            training mode with one value per channel; an empty reduction.
        """
        use_batch = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        # Only for the local functionals: a collective one (SyncBatchNorm's) must see every
        # error on every rank, or the ranks without it would wait for this one forever.
        if self.track_running_stats and self._functional in (F.batch_norm, F.instance_norm):
            if not hasattr(x, "dtype"):  # a list: convert once, here
                x = np.asarray(x)
            self._check_running_dtype(x)
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
            **self._act(),
            **_weights_kw(mask, sample_weight),
        )
        if update:
            self.num_batches_tracked += 1
        self._saved = (np.asarray(x), result.mean, result.rstd, use_batch)
        self._saved_weights = _weights_kw(mask, sample_weight)
        return result.y

    def backward(self, dy):
        """Gradient of the last :meth:`forward`; sets ``grad_weight`` and ``grad_bias``.

        In training mode (batch statistics) the gradient flows through the statistics; in
        evaluation mode with running statistics they are constants (``dx = dy * weight *
        rstd``). ``grad_weight``/``grad_bias`` are overwritten (not accumulated), and are None
        for a layer without affine parameters.

        Parameters
        ----------
        dy : array_like
            Gradient of the loss with respect to the last forward's ``y``: its shape.

        Returns
        -------
        numpy.ndarray
            ``dx``, the shape and dtype of the last forward's input.

        Raises
        ------
        RuntimeError
            No forward has been run yet.
        TypeError
            ``dy`` has a non-float dtype.
        ValueError
            ``dy`` does not have the shape of the last input.
        """
        x, mean, rstd, use_batch = self._saved_context()
        grads = self._functional_backward(
            dy, x, mean, rstd, self.weight, training=use_batch, channel_axis=self.channel_axis,
            **self._act_backward(), **self._saved_weights
        )
        return self._set_grads(grads)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, channel_axis={self.channel_axis}"
            + ("" if self.activation is None else f", activation={self.activation!r}")
        )


class BatchNorm(_RunningStatsNorm):
    __doc__ = """Batch normalization layer, like PyTorch's ``BatchNorm1d/2d/3d`` in one class.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per channel, where ``mean`` and ``var``
    (biased) are the batch statistics over every axis but the channel axis in training mode,
    and the running statistics in evaluation mode. The functional form is
    :func:`normkit.batch_norm`.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels.
    eps : float, default 1e-5
        Added to the variance, ``>= 0``.
    """ + _MOMENTUM_DOC + """
    affine : bool, default True
        Whether the layer has ``weight`` (ones) and ``bias`` (zeros) of shape ``(C,)``.
    track_running_stats : bool, default True
        Whether the layer keeps ``running_mean`` (zeros), ``running_var`` (ones) and
        ``num_batches_tracked`` (0). Without them evaluation mode also uses batch statistics.
    channel_axis : {1, -1}, default 1
        1: input ``(N, C, *spatial)`` (``(N, C)`` for dense features); -1: channels last,
        ``(N, *spatial, C)``.
    dtype : {numpy.float32, numpy.float64}, default numpy.float32
        Dtype of the parameters and running statistics.
    renorm : bool, default False
        Batch renormalization (Ioffe, 2017), training mode: ``y = (xhat * r + d) * weight +
        bias`` with ``r = clip(sigma_B / sigma, rmin, rmax)`` and ``d = clip((mu_B - mu) /
        sigma, -dmax, dmax)``, where ``mu``, ``sigma = sqrt(running_var + eps)`` are the running
        statistics before the step; r and d are constants in the backward, as in the paper.
        With ``mask``/``sample_weight`` in :meth:`forward`, ``mu_B`` and ``sigma_B`` are the
        weighted batch statistics. Needs ``track_running_stats``. Evaluation mode is unchanged.
    renorm_clipping : dict, optional
        ``{"rmax": ..., "rmin": ..., "dmax": ...}``; missing keys: no clipping
        (``rmin = 1/rmax``). ``rmax=1, dmax=0`` gives plain BatchNorm, bit for bit.
    virtual_batch_size : int, optional
        Ghost batch normalization (Hoffer et al., 2017): in training mode the batch (axis 0) is
        split into pieces of this many samples (the last may be smaller), each normalized with
        its own statistics; with tracked running statistics each piece updates them in turn,
        one momentum step per ghost batch in order. A size of at least the batch is plain
        BatchNorm, bit for bit. Cannot be combined with ``renorm``.

    Attributes
    ----------
    weight, bias : numpy.ndarray or None
        Affine parameters, ``(C,)``.
    running_mean, running_var : numpy.ndarray or None
        Running statistics, ``(C,)``, updated in place.
    num_batches_tracked : int or None
        Training steps that updated the running statistics.
    grad_weight, grad_bias : numpy.ndarray or None
        Parameter gradients of the last :meth:`backward`.
    training : bool
        The mode (see :meth:`train`, :meth:`eval`).

    Raises
    ------
    TypeError
        ``num_features`` is not an int; ``eps``/``momentum`` are not real numbers; ``dtype`` is
        not float32 or float64.
    ValueError
        ``num_features < 1``; ``eps < 0``; ``momentum`` outside ``[0, 1]``; ``channel_axis``
        not 1 or -1.

    Notes
    -----
    Dtypes: the running statistics are updated in place, so input must have the layer's
    statistics dtype: a float32 layer takes float32, float16 or bfloat16 input, a float64
    layer float64 input; anything else raises a TypeError that names the ``dtype=`` to use.
    (Without tracked running statistics the parameters are converted to the input's statistics
    dtype, as for the layers without running statistics.)

    Examples
    --------
    >>> import numpy as np
    >>> import normkit as nk
    >>> x = np.random.default_rng(0).standard_normal((32, 3)).astype(np.float32)
    >>> bn = nk.BatchNorm(3)                  # float32 parameters and statistics
    >>> y = bn(x)                             # training mode: batch statistics
    >>> dx = bn.backward(np.ones_like(y))     # sets bn.grad_weight, bn.grad_bias
    >>> for name, p in bn.named_parameters():
    ...     p -= 0.1 * getattr(bn, "grad_" + name)
    >>> bn = bn.eval()                        # running statistics from now on
    >>> bn.num_batches_tracked
    1
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, channel_axis=1, dtype=np.float32, renorm=False,
                 renorm_clipping=None, virtual_batch_size=None, activation=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, channel_axis, dtype)
        fn = "BatchNorm"
        P.activation_code(activation, fn)
        self.activation = activation
        self.renorm = P.training_flag(renorm, f"{fn}: renorm")
        self.renorm_clipping = _renorm_clipping(renorm_clipping, fn)
        if renorm_clipping is not None and not self.renorm:
            raise ValueError(f"{fn}: renorm_clipping needs renorm=True")
        if self.renorm and not self.track_running_stats:
            raise ValueError(f"{fn}: renorm=True needs track_running_stats=True (r and d "
                             "compare the batch statistics with the running ones)")
        self.virtual_batch_size = (None if virtual_batch_size is None else
                                   _positive_int(virtual_batch_size, f"{fn}: virtual_batch_size"))
        if self.renorm and self.virtual_batch_size is not None:
            raise ValueError(f"{fn}: renorm and virtual_batch_size cannot be combined")
        if self.renorm and activation is not None:
            raise ValueError(f"{fn}: renorm and activation cannot be combined (the r, d "
                             "correction applies before the activation)")

    # -- batch renormalization (Ioffe, 2017) and ghost batches (Hoffer et al., 2017) --------
    def forward(self, x, mask=None, sample_weight=None):
        use_batch = self.training or not self.track_running_stats
        if use_batch and self.renorm and self.training:
            return self._forward_renorm(x, mask, sample_weight)
        if use_batch and self.virtual_batch_size is not None:
            return self._forward_ghost(x, mask, sample_weight)
        return super().forward(x, mask, sample_weight)

    forward.__doc__ = _RunningStatsNorm.forward.__doc__

    def backward(self, dy):
        saved = self._saved_context()
        if not isinstance(saved[0], str):  # the plain path's (x, mean, rstd, use_batch)
            return super().backward(dy)
        kind = saved[0]
        if kind == "renorm":
            _, x, mean, rstd, r, d, weights = saved
            w = r if self.weight is None else self.weight * r
            g = F.batch_norm_backward(dy, x, mean, rstd, w.astype(mean.dtype), training=True,
                                      channel_axis=self.channel_axis, **weights)
            dw = r * g.dweight.astype(np.float64) + d * g.dbias.astype(np.float64)
            return self._set_grads(F.NormGrads(g.dx, dw.astype(mean.dtype), g.dbias))
        _, x, pieces, weights = saved  # ghost batches
        dy = F.data_array(dy, "BatchNorm.backward", "dy")
        if dy.shape != x.shape:
            raise ValueError(f"BatchNorm.backward: dy has shape {dy.shape} but x has shape {x.shape}")
        dx = np.empty(x.shape, x.dtype)
        dw = np.zeros(self.num_features)
        db = np.zeros(self.num_features)
        for sl, mean, rstd in pieces:
            g = F.batch_norm_backward(dy[sl], x[sl], mean, rstd, self.weight, training=True,
                                      channel_axis=self.channel_axis, **self._act_backward(),
                                      **{k: v[sl] for k, v in weights.items()})
            dx[sl] = g.dx
            dw += g.dweight
            db += g.dbias
        sd = pieces[0][1].dtype
        return self._set_grads(F.NormGrads(dx, dw.astype(sd), db.astype(sd)))

    backward.__doc__ = _RunningStatsNorm.backward.__doc__

    def _channel_shape(self, ndim: int):
        """Shape that broadcasts a (C,) vector along the channel axis of an ndim-D input."""
        shape = [1] * ndim
        shape[self.channel_axis if self.channel_axis == 1 else ndim - 1] = self.num_features
        return tuple(shape)

    def _forward_renorm(self, x, mask=None, sample_weight=None):
        """Batch renormalization: ``y = (xhat * r + d) * weight + bias`` with
        ``r = clip(sigma_B / sigma, 1/rmax.., rmax)`` and ``d = clip((mu_B - mu) / sigma, -dmax,
        dmax)`` from the running statistics before this step (sigma = sqrt(running_var + eps));
        r and d are constants for the backward. One kernel pass gives xhat * weight + bias and
        updates the running statistics; where r != 1 or d != 0 y is corrected in place. With
        ``mask``/``sample_weight`` the batch statistics (mu_B, sigma_B, and so r and d) are the
        weighted ones, as in plain BatchNorm."""
        if not hasattr(x, "dtype"):
            x = np.asarray(x)
        self._check_running_dtype(x)
        mu = self.running_mean.astype(np.float64)
        sigma = np.sqrt(self.running_var.astype(np.float64) + self.eps)
        momentum = self.momentum
        if momentum is None:
            momentum = 1.0 / (self.num_batches_tracked + 1)
        weights = _weights_kw(mask, sample_weight)
        res = F.batch_norm(x, self.weight, self.bias, running_mean=self.running_mean,
                           running_var=self.running_var, training=True, momentum=momentum,
                           eps=self.eps, channel_axis=self.channel_axis, **weights)
        self.num_batches_tracked += 1
        c = self.renorm_clipping
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.clip(1.0 / (res.rstd.astype(np.float64) * sigma), c["rmin"], c["rmax"])
            d = np.clip((res.mean.astype(np.float64) - mu) / sigma, -c["dmax"], c["dmax"])
        y = res.y
        if np.any(r != 1.0) or np.any(d != 0.0):
            w = np.ones(self.num_features) if self.weight is None else self.weight.astype(np.float64)
            b = np.zeros(self.num_features) if self.bias is None else self.bias.astype(np.float64)
            shape = self._channel_shape(y.ndim)
            # y = r * (xhat * w + b) + (1 - r) * b + d * w
            np.multiply(y, r.reshape(shape), out=y, casting="unsafe")
            np.add(y, ((1.0 - r) * b + d * w).reshape(shape), out=y, casting="unsafe")
        self._saved = ("renorm", np.asarray(x), res.mean, res.rstd, r, d, weights)
        return y

    def _forward_ghost(self, x, mask=None, sample_weight=None):
        """Ghost batch normalization: the batch (axis 0) in pieces of ``virtual_batch_size``
        samples, each normalized with its own statistics. With tracked running statistics each
        piece updates them in turn (one momentum step per ghost batch, in order, as when the
        ghost batches were separate batches); ``num_batches_tracked`` counts the call once."""
        x = np.asarray(x)
        if self.track_running_stats:
            self._check_running_dtype(x)
        if x.ndim < 2:
            raise ValueError(f"BatchNorm: x must have at least 2 dimensions (N, C, ...), got shape {x.shape}")
        k, N, C = self.virtual_batch_size, x.shape[0], x.shape[self._ca(x)]
        S = P.prod(x.shape[1:]) // C if C else 0
        bounds = [(i, min(i + k, N)) for i in range(0, N, k)] or [(0, 0)]
        weights = _weights_kw(mask, sample_weight)
        if "mask" in weights:  # sliced per ghost batch: the whole (N, *spatial) mask
            spatial = x.shape[2:] if self.channel_axis == 1 else x.shape[1:-1]
            weights["mask"] = np.broadcast_to(np.asarray(weights["mask"]), (N, *spatial))
        for lo, hi in bounds:  # every piece checked before anything is written
            P.per_channel_count("BatchNorm", (hi - lo) * S, C, (hi - lo, *x.shape[1:]))
        update = self.training and self.track_running_stats
        momentum = self.momentum
        if update and momentum is None:
            momentum = 1.0 / (self.num_batches_tracked + 1)
        y = np.empty(x.shape, P.native_dtype(x.dtype))
        pieces = []
        for lo, hi in bounds:
            sl = slice(lo, hi)
            r = F.batch_norm(x[sl], self.weight, self.bias,
                             running_mean=self.running_mean if update else None,
                             running_var=self.running_var if update else None, training=True,
                             momentum=0.0 if momentum is None else momentum, eps=self.eps,
                             channel_axis=self.channel_axis, out=y[sl], **self._act(),
                             **{k: v[sl] for k, v in weights.items()})
            pieces.append((sl, r.mean, r.rstd))
        if update:
            self.num_batches_tracked += 1
        self._saved = ("ghost", x, pieces, weights)
        return y

    def _ca(self, x) -> int:
        return 1 if self.channel_axis == 1 else x.ndim - 1

    # -- population statistics and the inference map --------------------------------------
    def _require_running_stats(self, fn: str) -> None:
        if not self.track_running_stats:
            raise ValueError(
                f"{fn}: this BatchNorm has track_running_stats=False, so it has no running "
                "statistics (and normalizes with batch statistics even in eval mode)"
            )

    def recompute_statistics(self, batches, *, method: str = "population") -> None:
        """Replace ``running_mean``/``running_var`` by statistics of ``batches``.

        Useful after training, when the running averages lag behind the final weights: pass
        the inputs this layer would see (e.g. every training batch through the network's
        earlier layers, in evaluation mode). Statistics accumulate in float64 and are stored
        in the layer's dtype. The mode, parameters and ``num_batches_tracked`` are unchanged;
        on any error the running statistics are unchanged too.

        Parameters
        ----------
        batches : iterable of array_like
            Arrays laid out like this layer's input (a generator is streamed). Batches with no
            values are skipped.
        method : {"population", "paper"}, default "population"
            ``"population"``: the exact mean and unbiased variance of every value seen (Chan
            merges of :class:`normkit.Moments`). ``"paper"``: Algorithm 2 of the BatchNorm
            paper, the mean of the batch means and ``m/(m-1)`` times the mean of the batch
            variances (batches of different sizes each get their own ``m/(m-1)``).

        Raises
        ------
        TypeError
            ``batches`` is one array or not iterable; a batch has a non-float dtype.
        ValueError
            The layer has ``track_running_stats=False``; ``method`` is unknown; a batch has
            the wrong rank or number of channels; no values at all; too few values for an
            unbiased variance.
        """
        fn = "BatchNorm.recompute_statistics"
        self._require_running_stats(fn)
        mean, var = _stats.channel_statistics(batches, self.num_features, self.channel_axis, method, fn)
        np.copyto(self.running_mean, mean, casting="unsafe")
        np.copyto(self.running_var, var, casting="unsafe")

    def as_affine(self) -> Tuple[np.ndarray, np.ndarray]:
        """The evaluation-mode map as one scale and shift per channel.

        Evaluation mode computes ``y = scale * x + shift`` with
        ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``
        (computed in float64). The current mode does not matter.

        Returns
        -------
        scale, shift : numpy.ndarray
            ``(C,)`` each, in the layer's dtype.

        Raises
        ------
        ValueError
            The layer has ``track_running_stats=False``, or ``running_var`` has negative
            entries.
        """
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
    __doc__ = """Instance normalization layer, like PyTorch's ``InstanceNorm1d/2d/3d``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` where ``mean`` and ``var`` (biased) are
    taken per sample and channel over the spatial axes. With tracked running statistics,
    training mode also updates ``running_mean``/``running_var`` (shape ``(C,)``) with the batch
    averages of the per-instance means and unbiased variances, and evaluation mode uses them.
    The functional form is :func:`normkit.instance_norm`.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels.
    eps : float, default 1e-5
        Added to the variance, ``>= 0``.
    """ + _MOMENTUM_DOC + """
    affine : bool, default False
        Whether the layer has ``weight`` (ones) and ``bias`` (zeros) of shape ``(C,)``.
    track_running_stats : bool, default False
        Whether the layer keeps ``running_mean``, ``running_var`` and ``num_batches_tracked``.
    channel_axis : {1, -1}, default 1
        1: input ``(N, C, *spatial)``; -1: channels last, ``(N, *spatial, C)``.
    dtype : {numpy.float32, numpy.float64}, default numpy.float32
        Dtype of the parameters and running statistics.

    Raises
    ------
    TypeError
        ``num_features`` is not an int; ``eps``/``momentum`` are not real numbers; ``dtype`` is
        not float32 or float64.
    ValueError
        ``num_features < 1``; ``eps < 0``; ``momentum`` outside ``[0, 1]``; ``channel_axis``
        not 1 or -1.

    Notes
    -----
    Attributes and dtype rules are those of :class:`BatchNorm`: with tracked running
    statistics the input must have the layer's statistics dtype (TypeError naming the fix
    otherwise); without them (the default) any float input works and the parameters are
    converted to its statistics dtype.
    """

    _functional = staticmethod(F.instance_norm)
    _functional_backward = staticmethod(F.instance_norm_backward)

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, channel_axis=1, dtype=np.float32):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, channel_axis, dtype)


_CONVERTED_DOC = """The parameters are converted to the input's statistics dtype for the
    computation (float64 for float64 input, else float32), so a float32 layer also takes float64
    data: the float32 parameters are widened exactly, and ``y``, ``grad_weight`` and
    ``grad_bias`` are float64 while ``weight``/``bias`` stay float32 (an optimizer update
    ``p -= lr * g`` rounds back to float32). A float64 layer on float32 data uses its
    parameters rounded to float32. Create the layer with the dtype of your data to avoid
    either conversion."""

class GroupNorm(_Norm):
    __doc__ = """Group normalization layer, like PyTorch's ``GroupNorm``.

    The ``C`` channels are split into ``num_groups`` groups of ``C / num_groups`` consecutive
    channels; ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with ``mean`` and ``var``
    (biased) per sample and group, over the group's channels and all spatial axes. The same in
    training and evaluation mode. The functional form is :func:`normkit.group_norm`.

    Parameters
    ----------
    num_groups : int
        ``G``, which must divide ``num_channels``.
    num_channels : int
        ``C``.
    eps : float, default 1e-5
        Added to the variance, ``>= 0``.
    affine : bool, default True
        Whether the layer has ``weight`` (ones) and ``bias`` (zeros) of shape ``(C,)``.
    channel_axis : {1, -1}, default 1
        1: input ``(N, C, *spatial)``; -1: channels last, ``(N, *spatial, C)``.
    dtype : {numpy.float32, numpy.float64}, default numpy.float32
        Dtype of the parameters.

    Raises
    ------
    TypeError
        ``num_groups``/``num_channels`` are not ints; ``eps`` is not a real number; ``dtype``
        is not float32 or float64.
    ValueError
        ``num_groups`` or ``num_channels`` below 1; ``num_groups`` does not divide
        ``num_channels``; ``eps < 0``; ``channel_axis`` not 1 or -1.

    Notes
    -----
    """ + _CONVERTED_DOC + """
    """

    _state_names = ("weight", "bias")

    def __init__(self, num_groups, num_channels, *, eps=1e-5, affine=True, channel_axis=1,
                 dtype=np.float32, activation=None):
        super().__init__()
        P.activation_code(activation, "GroupNorm")
        self.activation = activation
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

    def forward(self, x, mask=None):
        """Normalize ``x`` per sample and group of channels (``mask``: statistics over the
        positions where it is True, as :func:`normkit.group_norm`).

        Parameters
        ----------
        x : array_like
            ``(N, C, *spatial)`` (``channel_axis=1``) or ``(N, *spatial, C)``
            (``channel_axis=-1``) with ``C == num_channels``; float32, float64, float16 or
            bfloat16.

        Returns
        -------
        numpy.ndarray
            ``y``, the shape and dtype of ``x``.

        Raises
        ------
        TypeError
            ``x`` has a non-float dtype.
        ValueError
            ``x`` has fewer than 2 dimensions or the wrong number of channels; an empty
            reduction.
        """
        r = F.group_norm(x, self.num_groups, self.weight, self.bias, eps=self.eps,
                         channel_axis=self.channel_axis, activation=self.activation, mask=mask)
        self._saved = (np.asarray(x), r.mean, r.rstd, mask)
        return r.y

    def backward(self, dy):
        """Gradient of the last :meth:`forward`; sets ``grad_weight`` and ``grad_bias``
        (overwritten, not accumulated; None without affine parameters).

        Parameters
        ----------
        dy : array_like
            Gradient of the loss with respect to the last forward's ``y``: its shape.

        Returns
        -------
        numpy.ndarray
            ``dx``, the shape and dtype of the last forward's input.

        Raises
        ------
        RuntimeError
            No forward has been run yet.
        TypeError
            ``dy`` has a non-float dtype.
        ValueError
            ``dy`` does not have the shape of the last input.
        """
        x, mean, rstd, mask = self._saved_context()
        return self._set_grads(
            F.group_norm_backward(dy, x, mean, rstd, self.weight, channel_axis=self.channel_axis,
                                  bias=self.bias, activation=self.activation, mask=mask)
        )

    def extra_repr(self) -> str:
        act = "" if self.activation is None else f", activation={self.activation!r}"
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"channel_axis={self.channel_axis}{act}")


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
    __doc__ = """Layer normalization layer, like PyTorch's ``LayerNorm`` (including ``bias=``).

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` where ``mean`` and ``var`` (biased) are
    taken over the trailing ``normalized_shape`` axes of each sample. The same in training and
    evaluation mode. The functional form is :func:`normkit.layer_norm`.

    Parameters
    ----------
    normalized_shape : int or tuple of int
        Shape of the trailing axes to normalize over (e.g. ``768`` or ``(H, W)``).
    eps : float, default 1e-5
        Added to the variance, ``>= 0``.
    elementwise_affine : bool, default True
        Whether the layer has ``weight`` (ones, shape ``normalized_shape``) and, with
        ``bias=True``, ``bias`` (zeros).
    bias : bool, default True
        False: no ``bias`` (``bias`` is None, ``state_dict()`` has no ``"bias"`` key and
        ``parameters()`` only the weight), as in PyTorch 2.1 and later. Ignored when
        ``elementwise_affine=False``.
    dtype : {numpy.float32, numpy.float64}, default numpy.float32
        Dtype of the parameters.

    Raises
    ------
    TypeError
        ``normalized_shape`` is not an int or a sequence of ints; ``eps`` is not a real
        number; ``bias`` is not a bool; ``dtype`` is not float32 or float64.
    ValueError
        ``normalized_shape`` is empty or has entries below 1; ``eps < 0``.

    Notes
    -----
    """ + _CONVERTED_DOC + """
    """

    _state_names = ("weight", "bias")

    def __init__(self, normalized_shape, *, eps=1e-5, elementwise_affine=True, bias=True,
                 dtype=np.float32):
        with_bias = _bool(bias, "LayerNorm", "bias")
        super().__init__(normalized_shape, eps, elementwise_affine, with_bias, dtype, "LayerNorm")

    def forward(self, x):
        """Normalize each sample of ``x`` over its trailing ``normalized_shape`` axes.

        Parameters
        ----------
        x : array_like
            ``(..., *normalized_shape)``: the trailing axes must equal ``normalized_shape``;
            float32, float64, float16 or bfloat16.

        Returns
        -------
        numpy.ndarray
            ``y``, the shape and dtype of ``x``.

        Raises
        ------
        TypeError
            ``x`` has a non-float dtype.
        ValueError
            The trailing axes of ``x`` do not match ``normalized_shape``.
        """
        r = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, eps=self.eps)
        self._saved = (np.asarray(x), r.mean, r.rstd)
        return r.y

    def backward(self, dy):
        """Gradient of the last :meth:`forward`; sets ``grad_weight`` and ``grad_bias``
        (overwritten, not accumulated; None for parameters the layer does not have).

        Parameters
        ----------
        dy : array_like
            Gradient of the loss with respect to the last forward's ``y``: its shape.

        Returns
        -------
        numpy.ndarray
            ``dx``, the shape and dtype of the last forward's input.

        Raises
        ------
        RuntimeError
            No forward has been run yet.
        TypeError
            ``dy`` has a non-float dtype.
        ValueError
            ``dy`` does not have the shape of the last input.
        """
        x, mean, rstd = self._saved_context()
        return self._set_grads(F.layer_norm_backward(dy, x, mean, rstd, self.weight))

    def extra_repr(self) -> str:
        out = super().extra_repr()
        if self.elementwise_affine and self.bias is None:
            out += ", bias=False"
        return out


class RMSNorm(_RowNorm):
    __doc__ = """RMS normalization layer, like PyTorch's ``RMSNorm``.

    ``y = x / sqrt(mean(x**2) + eps) * weight`` over the trailing ``normalized_shape`` axes of
    each sample (no centring, no bias). The same in training and evaluation mode. The
    functional form is :func:`normkit.rms_norm`.

    Parameters
    ----------
    normalized_shape : int or tuple of int
        Shape of the trailing axes to normalize over.
    eps : float or None, default None
        Added to the mean square, ``>= 0``. None: the machine epsilon of the input's
        statistics dtype (float32's for float32 and half inputs, float64's for float64), as
        PyTorch does.
    elementwise_affine : bool, default True
        Whether the layer has ``weight`` (ones, shape ``normalized_shape``).
    dtype : {numpy.float32, numpy.float64}, default numpy.float32
        Dtype of the weight.

    Raises
    ------
    TypeError
        ``normalized_shape`` is not an int or a sequence of ints; ``eps`` is not a real number
        or None; ``dtype`` is not float32 or float64.
    ValueError
        ``normalized_shape`` is empty or has entries below 1; ``eps < 0``.

    Notes
    -----
    """ + _CONVERTED_DOC + """ ``grad_bias`` is always None.
    """

    _state_names = ("weight",)

    def __init__(self, normalized_shape, *, eps=None, elementwise_affine=True, dtype=np.float32):
        super().__init__(normalized_shape, eps, elementwise_affine, False, dtype, "RMSNorm")

    def forward(self, x):
        """Divide each sample of ``x`` by its root mean square over the trailing axes.

        Parameters
        ----------
        x : array_like
            ``(..., *normalized_shape)``: the trailing axes must equal ``normalized_shape``;
            float32, float64, float16 or bfloat16.

        Returns
        -------
        numpy.ndarray
            ``y``, the shape and dtype of ``x``.

        Raises
        ------
        TypeError
            ``x`` has a non-float dtype.
        ValueError
            The trailing axes of ``x`` do not match ``normalized_shape``.
        """
        r = F.rms_norm(x, self.normalized_shape, self.weight, eps=self.eps)
        self._saved = (np.asarray(x), r.rstd)
        return r.y

    def backward(self, dy):
        """Gradient of the last :meth:`forward`; sets ``grad_weight`` (overwritten, not
        accumulated; None without a weight). ``grad_bias`` is always None.

        Parameters
        ----------
        dy : array_like
            Gradient of the loss with respect to the last forward's ``y``: its shape.

        Returns
        -------
        numpy.ndarray
            ``dx``, the shape and dtype of the last forward's input.

        Raises
        ------
        RuntimeError
            No forward has been run yet.
        TypeError
            ``dy`` has a non-float dtype.
        ValueError
            ``dy`` does not have the shape of the last input.
        """
        x, rstd = self._saved_context()
        return self._set_grads(F.rms_norm_backward(dy, x, rstd, self.weight))
