"""Streaming, mergeable moments (SPEC section 6) and the population statistics of BatchNorm.

``Moments`` holds, per feature, the count ``n``, the mean and ``m2``, the sum of squared
deviations from the mean, all in float64 whatever the input dtype. An update reduces its batch
by two passes (the mean first, then the squared deviations from it, so never
``E[x²] − E[x]²``), over blocks of rows so that the float64 temporaries stay small, and joins
it to the running state with Chan, Golub and LeVeque's pairwise formula:

    n = na + nb,   delta = mean_b − mean_a,
    mean = mean_a + delta · nb / n,   m2 = m2_a + m2_b + delta² · na · nb / n.

The same formula merges two ``Moments`` (``merge``, ``+``), so statistics gathered on shards of
the data (threads, processes, chunks of a dask array) combine into those of the whole.

``channel_statistics`` gives the mean and variance per channel over an iterable of BatchNorm
batches, as ``BatchNorm.recompute_statistics`` uses them: ``"population"`` merges every value,
``"paper"`` is Algorithm 2 of Ioffe and Szegedy (2015).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from ._plan import is_float_dtype as _is_float_dtype
from ._plan import weight_values
from .functional import data_array as _float_input

__all__ = ["Moments", "channel_statistics"]

# Rows of float64 temporaries per block in an update: about 8 MiB whatever the feature size.
_BLOCK_ELEMENTS = 1 << 20


def _ints(v, fn: str, name: str, what: str) -> Tuple[int, ...]:
    """An int or an iterable of ints as a tuple (``feature_shape``, ``axis``)."""
    try:
        return (operator.index(v),)
    except TypeError:
        pass
    try:
        return tuple(operator.index(s) for s in v)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be {what}, got {v!r}") from None


def _shape(shape, fn: str, name: str) -> Tuple[int, ...]:
    out = _ints(shape, fn, name, "an int or a tuple of ints")
    if any(s < 0 for s in out):
        raise ValueError(f"{fn}: {name} must not have negative entries, got {out}")
    return out


def _result_dtype(dtype, fn: str) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{fn}: dtype must be a float dtype, got {dtype!r}") from None
    if not _is_float_dtype(dt):
        raise TypeError(f"{fn}: dtype must be a float dtype (float16, float32, float64), got {dt}")
    return dt


def _axes(axis, ndim: int, shape, fn: str) -> Tuple[int, ...]:
    """Normalize ``axis`` (None, an int or a tuple of ints) to sorted non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    raw = _ints(axis, fn, "axis", "an int, a tuple of ints or None")
    out = []
    for a in raw:
        if not -ndim <= a < ndim:
            raise ValueError(f"{fn}: axis {a} is out of range for x with shape {tuple(shape)}")
        a %= ndim
        if a in out:
            raise ValueError(f"{fn}: axis {axis!r} repeats axis {a}")
        out.append(a)
    return tuple(sorted(out))


def _batch_moments(x2: np.ndarray) -> Tuple[int, np.ndarray, np.ndarray]:
    """(n, mean, m2) in float64 of the rows of a 2-D array ``(n, F)``: two passes over blocks of
    rows (sums of the rows, then squared deviations from the mean)."""
    n, F = x2.shape
    rows = max(1, _BLOCK_ELEMENTS // max(F, 1))
    # float32/float64 blocks are widened inside the ufuncs (no float64 copy of each block; the
    # same row-by-row sums, so the same bits); other dtypes are converted first
    direct = x2.dtype in (np.float32, np.float64)
    total = np.zeros(F, np.float64)
    for start in range(0, n, rows):
        block = x2[start:start + rows]
        total += (block.sum(axis=0, dtype=np.float64) if direct
                  else block.astype(np.float64).sum(axis=0))
    mean = total / n
    m2 = np.zeros(F, np.float64)
    buf = np.empty((min(rows, n), F), np.float64)
    for start in range(0, n, rows):
        block = x2[start:start + rows]
        d = buf[: block.shape[0]]
        if direct:
            np.subtract(block, mean, out=d)
        else:
            np.subtract(block.astype(np.float64), mean, out=d)
        m2 += np.einsum("ij,ij->j", d, d)
    return n, mean, m2


def _weighted_batch_moments(x2: np.ndarray, w: np.ndarray):
    """(W, mean, m2) in float64 of the rows of ``x2`` (n, F) with row weights ``w`` (n,) > 0:
    W = sum w, mean = sum w x / W, m2 = sum w (x - mean)^2 (two passes over blocks of rows)."""
    n, F = x2.shape
    rows = max(1, _BLOCK_ELEMENTS // max(F, 1))
    W = float(w.sum())
    total = np.zeros(F, np.float64)
    for start in range(0, n, rows):
        total += w[start:start + rows] @ x2[start:start + rows].astype(np.float64)
    mean = total / W
    m2 = np.zeros(F, np.float64)
    for start in range(0, n, rows):
        d = x2[start:start + rows].astype(np.float64) - mean
        m2 += w[start:start + rows] @ (d * d)
    return W, mean, m2


def _combine(na: int, mean_a, m2_a, nb: int, mean_b, m2_b):
    """Chan's pairwise formula; either side may be empty (count 0)."""
    if nb == 0:
        return na, mean_a, m2_a
    if na == 0:
        return nb, mean_b.copy(), m2_b.copy()
    n = na + nb
    delta = mean_b - mean_a
    mean = mean_a + delta * (nb / n)
    m2 = m2_a + m2_b + delta * delta * (na * nb / n)
    return n, mean, m2


class Moments:
    """Streaming, mergeable count, mean and variance per feature, accumulated in float64.

    ``Moments(feature_shape=(), dtype=np.float64)``: ``feature_shape`` is the shape of the
    statistics (the axes an update keeps); ``dtype`` is the dtype of what ``mean``, ``var`` and
    ``std`` return (the state itself is always float64)::

        m = Moments((64,))
        for x in batches:            # x of shape (N, 64, H, W)
            m.update(x, axis=(0, 2, 3))
        m.mean, m.var(ddof=1)

    With no values (``count == 0``) the mean is NaN; ``var(ddof)`` is NaN while
    ``count <= ddof``. NaN or Inf in the data make the statistics of their feature NaN only.

    Weighted updates (``update(x, axis, sample_weight=w)``) make the statistics weighted: the
    mean is ``sum w x / W`` and ``var(ddof) = m2 / (W - ddof * sum(w^2) / W)`` with
    ``W = sum w`` (``ddof=1``: the unbiased variance for reliability weights; unweighted values
    count with weight 1, so without weights this is ``m2 / (count - ddof)``).
    """

    def __init__(self, feature_shape=(), dtype=np.float64):
        self.feature_shape = _shape(feature_shape, "Moments", "feature_shape")
        self.dtype = _result_dtype(dtype, "Moments")
        self._n = 0
        self._w = 0.0  # sum of the weights (the count while every weight is 1)
        self._w2 = 0.0  # sum of the squared weights
        self._mean = np.zeros(self.feature_shape, np.float64)
        self._m2 = np.zeros(self.feature_shape, np.float64)

    # -- accumulate ------------------------------------------------------------------------
    def update(self, x, axis=0, sample_weight=None) -> "Moments":
        """Add the values of ``x`` reduced over ``axis`` (an int, a tuple of ints, or None for
        every axis); the axes kept, in order, must have the shape ``feature_shape``. Returns
        self. An update with no values (a reduced axis of length 0) changes nothing.

        ``sample_weight``: real weights >= 0, broadcastable to the reduced axes' shape (in
        order; ``(N,)`` for ``axis=0``), shared by the features. A zero weight leaves its value
        out entirely (even a NaN); weights that are all 1 give the unweighted update's bits."""
        fn = "Moments.update"
        x = _float_input(x, fn)
        reduced = _axes(axis, x.ndim, x.shape, fn)
        kept = tuple(a for a in range(x.ndim) if a not in reduced)
        kept_shape = tuple(x.shape[a] for a in kept)
        if kept_shape != self.feature_shape:
            raise ValueError(
                f"{fn}: x has shape {x.shape} and axis={axis!r} keeps shape {kept_shape}, "
                f"but feature_shape is {self.feature_shape}"
            )
        if sample_weight is not None:
            return self._update_weighted(x, reduced, kept, sample_weight, fn)
        n = math.prod(x.shape[a] for a in reduced)
        if n == 0:
            return self
        x2 = x.transpose(reduced + kept).reshape(n, math.prod(kept_shape))
        nb, mean_b, m2_b = _batch_moments(x2)
        self._absorb(nb, mean_b.reshape(self.feature_shape), m2_b.reshape(self.feature_shape))
        return self

    def _update_weighted(self, x, reduced, kept, sample_weight, fn) -> "Moments":
        red_shape = tuple(x.shape[a] for a in reduced)
        w = weight_values(fn, sample_weight)
        try:
            w = np.broadcast_to(w, red_shape).reshape(-1)
        except ValueError:
            raise ValueError(f"{fn}: sample_weight has shape {np.shape(sample_weight)}, which does "
                             f"not broadcast to the reduced axes' shape {red_shape}") from None
        n = w.size
        if n == 0:
            return self
        x2 = x.transpose(reduced + kept).reshape(n, math.prod(self.feature_shape))
        if np.all(w == 1.0):
            nb, mean_b, m2_b = _batch_moments(x2)
            wb, w2b = float(nb), float(nb)
        else:
            keep = w > 0
            x2, w = x2[keep], w[keep]
            nb = int(w.size)
            if nb == 0:
                return self
            wb, mean_b, m2_b = _weighted_batch_moments(x2, w)
            w2b = float(w @ w)
        self._absorb(nb, mean_b.reshape(self.feature_shape), m2_b.reshape(self.feature_shape),
                     wb, w2b)
        return self

    def _absorb(self, nb: int, mean_b: np.ndarray, m2_b: np.ndarray, wb=None, w2b=None) -> None:
        """Chan's merge, with the weights' totals in place of the counts."""
        wb = float(nb) if wb is None else wb
        w2b = float(nb) if w2b is None else w2b
        if self._w == self._n and wb == nb:  # both unweighted so far: integer counts, as before
            self._n, self._mean, self._m2 = _combine(self._n, self._mean, self._m2, nb, mean_b, m2_b)
        else:
            _, self._mean, self._m2 = _combine(self._w, self._mean, self._m2, wb, mean_b, m2_b)
            self._n += nb
        self._w += wb
        self._w2 += w2b

    def merge(self, other: "Moments") -> "Moments":
        """Add ``other``'s values to this one's (Chan's formula). Returns self."""
        if not isinstance(other, Moments):
            raise TypeError(f"Moments.merge: other must be a Moments, got {type(other).__name__}")
        if other.feature_shape != self.feature_shape:
            raise ValueError(
                f"Moments.merge: other has feature_shape {other.feature_shape} "
                f"but this one has {self.feature_shape}"
            )
        self._absorb(other._n, other._mean, other._m2, other._w, other._w2)
        return self

    def __add__(self, other):
        if not isinstance(other, Moments):
            return NotImplemented
        return self.copy().merge(other)

    def __radd__(self, other):
        if isinstance(other, numbers.Number) and other == 0:  # sum([m1, m2, ...])
            return self.copy()
        return NotImplemented

    def copy(self) -> "Moments":
        """An independent copy."""
        new = Moments(self.feature_shape, self.dtype)
        new._n, new._mean, new._m2 = self._n, self._mean.copy(), self._m2.copy()
        new._w, new._w2 = self._w, self._w2
        return new

    # -- read ------------------------------------------------------------------------------
    def _out(self, a: np.ndarray):
        a = a.astype(self.dtype)
        return a[()] if a.ndim == 0 else a

    @property
    def count(self) -> int:
        """How many values each feature has seen."""
        return self._n

    @property
    def mean(self):
        """The mean per feature (``feature_shape``, ``dtype``); NaN with no values."""
        if self._n == 0:
            return self._out(np.full(self.feature_shape, np.nan))
        return self._out(self._mean)

    def var(self, ddof=0):
        """``m2 / (count - ddof)``: ``ddof=0`` the population variance, ``ddof=1`` the unbiased
        one. NaN where ``count <= ddof``."""
        ddof = self._ddof(ddof, "Moments.var")
        return self._out(self._var64(ddof))

    def std(self, ddof=0):
        """The square root of ``var(ddof)``."""
        ddof = self._ddof(ddof, "Moments.std")
        return self._out(np.sqrt(self._var64(ddof)))

    @staticmethod
    def _ddof(ddof, fn: str) -> float:
        if isinstance(ddof, bool) or not isinstance(ddof, numbers.Real):
            raise TypeError(f"{fn}: ddof must be a real number, got {ddof!r}")
        if not ddof >= 0:
            raise ValueError(f"{fn}: ddof must be >= 0, got {ddof!r}")
        return float(ddof)

    def _var64(self, ddof: float) -> np.ndarray:
        if self._n <= ddof:
            return np.full(self.feature_shape, np.nan)
        if self._w == self._n and self._w2 == self._n:  # unweighted
            return self._m2 / (self._n - ddof)
        denom = self._w - ddof * self._w2 / self._w
        if not denom > 0:
            return np.full(self.feature_shape, np.nan)
        return self._m2 / denom

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, np.ndarray]:
        """A plain dict of NumPy arrays (copies): ``count`` (int64), ``mean`` and ``m2`` (float64,
        ``feature_shape``) and ``dtype`` (the result dtype's name)."""
        state = {
            "count": np.array(self._n, dtype=np.int64),
            "mean": self._mean.copy(),
            "m2": self._m2.copy(),
            "dtype": np.array(self.dtype.name),
        }
        if not (self._w == self._n and self._w2 == self._n):  # weighted: the weights' totals
            state["sum_weights"] = np.array(self._w)
            state["sum_sq_weights"] = np.array(self._w2)
        return state

    @classmethod
    def from_state_dict(cls, state: Dict[str, np.ndarray]) -> "Moments":
        """A new ``Moments`` from ``state_dict()``'s output (arrays are copied)."""
        fn = "Moments.from_state_dict"
        required = {"count", "mean", "m2"}
        missing = sorted(required - set(state))
        unexpected = sorted(set(state) - required - {"dtype", "sum_weights", "sum_sq_weights"})
        if missing or unexpected:
            raise KeyError(f"{fn}: missing keys {missing}, unexpected keys {unexpected}")
        count = np.asarray(state["count"])
        if count.shape != () or count.dtype.kind not in "iu":
            raise TypeError(
                f"{fn}: count must be an integer scalar, got shape {count.shape} and dtype {count.dtype}"
            )
        if int(count) < 0:
            raise ValueError(f"{fn}: count must be >= 0, got {int(count)}")
        mean = _float_input(state["mean"], fn, "mean")
        m2 = _float_input(state["m2"], fn, "m2")
        if mean.shape != m2.shape:
            raise ValueError(f"{fn}: mean has shape {mean.shape} but m2 has shape {m2.shape}")
        dtype = str(np.asarray(state["dtype"])) if "dtype" in state else "float64"
        new = cls(mean.shape, dtype)
        new._n = int(count)
        new._mean = np.array(mean, dtype=np.float64)
        new._m2 = np.array(m2, dtype=np.float64)
        new._w = float(state.get("sum_weights", new._n))
        new._w2 = float(state.get("sum_sq_weights", new._n))
        if not (np.isfinite(new._w) and np.isfinite(new._w2) and new._w >= 0 and new._w2 >= 0):
            raise ValueError(f"{fn}: sum_weights and sum_sq_weights must be finite and >= 0")
        return new

    def __repr__(self) -> str:
        return f"Moments(feature_shape={self.feature_shape}, dtype={self.dtype.name}, count={self._n})"


# --------------------------------------------------------------------------------------------
# population statistics of BatchNorm


def channel_statistics(
    batches: Iterable, num_features: int, channel_axis: int, method: str, fn: str
) -> Tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased variance) per channel, float64, over an iterable of BatchNorm inputs.

    ``"population"``: every value of every batch merged (``Moments``), variance with ddof=1.
    ``"paper"``: Algorithm 2 of the BatchNorm paper, the mean of the batch means and
    ``m/(m-1)`` times the mean of the batch (population) variances, for batches of m values
    per channel. Batches of different sizes get their own ``m_i/(m_i-1)`` (the mean of the
    per-batch unbiased variances), which is the paper's formula when all sizes are equal.
    Batches with no values are skipped; a batch with one value per channel has no unbiased
    variance and is an error under ``"paper"``.
    """
    if method not in ("population", "paper"):
        raise ValueError(f"{fn}: method must be 'population' or 'paper', got {method!r}")
    if isinstance(batches, np.ndarray) or hasattr(batches, "__cuda_array_interface__"):
        raise TypeError(
            f"{fn}: batches must be an iterable of arrays (a list, a generator), got one array "
            f"of shape {getattr(batches, 'shape', None)}; wrap it as [x] to use it as one batch"
        )
    try:
        iterator = iter(batches)
    except TypeError:
        raise TypeError(f"{fn}: batches must be an iterable of arrays, got {type(batches).__name__}") from None
    total = Moments((num_features,))
    mean_sum = np.zeros(num_features, np.float64)
    var_sum = np.zeros(num_features, np.float64)
    used = 0
    for i, x in enumerate(iterator):
        x = _float_input(x, fn, f"batch {i}")
        if x.ndim < 2:
            raise ValueError(f"{fn}: batch {i} must have at least 2 dimensions, got shape {x.shape}")
        if x.shape[channel_axis] != num_features:
            raise ValueError(
                f"{fn}: batch {i} has shape {x.shape} with {x.shape[channel_axis]} channels on "
                f"channel_axis={channel_axis}, but the layer has {num_features}"
            )
        axes = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
        batch = Moments((num_features,)).update(x, axis=axes)
        if batch.count == 0:
            continue
        if method == "paper":
            if batch.count < 2:
                raise ValueError(
                    f"{fn}: batch {i} of shape {x.shape} has 1 value per channel; method='paper' "
                    "needs at least 2 for the unbiased m/(m-1) variance"
                )
            mean_sum += batch._mean
            var_sum += batch._var64(1.0)
            used += 1
        total.merge(batch)
    if total.count == 0:
        raise ValueError(f"{fn}: batches held no values; the statistics are unchanged")
    if method == "paper":
        return mean_sum / used, var_sum / used
    if total.count < 2:
        raise ValueError(
            f"{fn}: the batches hold 1 value per channel; the unbiased variance needs at least 2"
        )
    return total._mean.copy(), total._var64(1.0)
