"""scikit-learn transformers built on normkit's statistics (the optional extra ``sklearn``).

    from normkit.sklearn import Standardizer
    pipe = sklearn.pipeline.make_pipeline(Standardizer(), LogisticRegression())

:class:`Standardizer` is a drop-in replacement for scikit-learn's ``StandardScaler`` on dense
data: the same parameters, attributes and NaN policy, with float64 statistics computed by two
passes and exact Chan merges (as :class:`normkit.Moments`), and a float32 transform that keeps
the mean's low-order bits, so float32 data with a large offset is standardized to float32
round-off rather than to the float32 rounding of the mean.

Importing ``normkit`` never imports scikit-learn; only ``import normkit.sklearn`` does.
"""

from __future__ import annotations

import numbers

import numpy as np

_INSTALL = 'pip install "normkit[sklearn]"  (from a checkout: pip install ".[sklearn]")'
try:
    from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as e:  # scikit-learn missing, or older than 1.6 (no validate_data)
    found = ""
    try:
        import sklearn as _sk

        found = f"; found scikit-learn {_sk.__version__}"
    except ImportError:
        pass
    raise ImportError(
        f"normkit.sklearn needs scikit-learn >= 1.6{found} ({e}). Install it with: {_INSTALL}"
    ) from e

from . import _core
from .stats import Moments

__all__ = ["Standardizer"]

# Rows per block when the transform or a weighted/NaN fit works block by block: about 256 KiB
# of float64 temporaries whatever the number of features, so they stay in cache.
_BLOCK_ELEMENTS = 1 << 15
_F64 = np.dtype(np.float64)
_DTYPES = [np.float64, np.float32, np.float16]  # kept as they are; anything else -> float64


def _block_rows(n_features: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(n_features, 1))


# --------------------------------------------------------------------------------------------
# statistics: per feature (sum of weights, mean, m2) in float64, merged with Chan's formula


def _combine(na, mean_a, m2_a, nb, mean_b, m2_b):
    """Chan, Golub and LeVeque's pairwise update, per feature. ``na``/``nb`` are arrays of
    counts or sums of weights; a side with count 0 leaves the other unchanged (exactly)."""
    n = na + nb
    safe = np.where(n > 0, n, 1)
    frac_b = np.where(nb > 0, nb / safe, 0.0)
    delta = np.where(nb > 0, mean_b - mean_a, 0.0)
    mean = mean_a + delta * frac_b
    m2 = m2_a + np.where(nb > 0, m2_b, 0.0) + delta * delta * (na * frac_b)
    return n, mean, m2


def _moments_dense(X: np.ndarray):
    """(mean, m2) of the columns of a 2-D array (at least one row) in float64. A column with
    NaN or infinity gets a non-finite mean.

    float32 arrays in either memory order: the BatchNorm statistics kernel, which reads X once
    (shifted sums in float64 over pieces of rows, merged with Chan's formula) and returns the
    float64 moments; their error (about eps64 * |mean| relative to the spread) is far below
    float32's. Other arrays, float64 included: :class:`normkit.Moments` (two passes over the
    whole column in float64, NumPy), which keeps float64 data at StandardScaler's accuracy when
    the mean is many spreads from zero."""
    if X.dtype == np.float32 and X.dtype.isnative and X.flags.aligned:
        if X.flags.c_contiguous:
            return _core.column_moments(X, True)
        if X.flags.f_contiguous:
            return _core.column_moments(X.T, False)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, looked at later
        state = Moments((X.shape[1],)).update(X, axis=0).state_dict()
    return state["mean"], state["m2"]


def _moments_general(X: np.ndarray, w):
    """(sum of weights, mean, m2) per column, ignoring NaN entries, with optional sample
    weights ``w`` (float64, ``(n,)``): two passes over blocks of rows in float64."""
    with np.errstate(invalid="ignore", over="ignore"):  # infinity: NaN, looked at later
        return _moments_general_blocks(X, w)


def _moments_general_blocks(X, w):
    n, F = X.shape
    rows = _block_rows(F)
    count = np.zeros(F)
    total = np.zeros(F)
    for start in range(0, n, rows):
        b = X[start:start + rows].astype(_F64)
        present = ~np.isnan(b)
        b[~present] = 0.0
        if w is None:
            count += present.sum(axis=0)
            total += b.sum(axis=0)
        else:
            wb = w[start:start + rows]
            count += wb @ present
            total += wb @ b
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.where(count > 0, count, 1), np.nan)
    center = np.where(count > 0, mean, 0.0)
    m2 = np.zeros(F)
    for start in range(0, n, rows):
        b = X[start:start + rows].astype(_F64)
        b -= center
        b[np.isnan(b)] = 0.0
        m2 += (b * b).sum(axis=0) if w is None else w[start:start + rows] @ (b * b)
    return count, mean, m2


def _reject_infinity(X, features):
    """ValueError when one of the ``features`` (a boolean mask of columns) holds infinity, as
    scikit-learn's validation would raise it (NaN is allowed: a missing value)."""
    if np.isinf(X[:, features]).any():
        raise ValueError(
            f"Input X contains infinity or a value too large for {X.dtype!r}. NaN entries are "
            "allowed (missing values); infinite ones are not."
        )


def _is_constant(var, mean, n):
    """Features whose variance is within round-off of zero (scikit-learn's rule for
    ``StandardScaler``, so both give ``scale_ = 1`` on the same features)."""
    eps = np.finfo(np.float64).eps
    return var <= n * eps * var + (n * mean * eps) ** 2


# --------------------------------------------------------------------------------------------
# the transform


def _standardize(X, out, mean, scale, rows):
    """``out = (X - mean) / scale`` per column (``mean``/``scale`` float64 or None), in X's
    dtype, block by block so that temporaries stay in cache. ``out`` may be ``X``."""
    dt = X.dtype
    n = X.shape[0]
    if mean is None and scale is None:  # with_mean=False, with_std=False: the data as it is
        if out is not X:
            np.copyto(out, X)
        return out
    if dt == np.float64:
        for start in range(0, n, rows):
            xb, yb = X[start:start + rows], out[start:start + rows]
            if mean is not None:
                np.subtract(xb, mean, out=yb)
                xb = yb
            if scale is not None:
                np.divide(xb, scale, out=yb)
        return out
    if dt == np.float32:
        # float32 keeps the mean's low bits: mean = hi + lo with hi = float32(mean). x - hi is
        # exact for x within a factor 2 of hi (Sterbenz), and otherwise rounded relative to a
        # large result; the small lo is then removed after scaling. Error: a few float32 ulps
        # of the result, where subtracting float32(mean) costs up to half an ulp of the mean.
        f32 = np.float32
        inv = None if scale is None else (1.0 / scale).astype(f32)
        if mean is not None:
            hi = mean.astype(f32)
            lo = mean - hi.astype(_F64)
            lo_scaled = (lo if scale is None else lo / scale).astype(f32)
        for start in range(0, n, rows):
            xb, yb = X[start:start + rows], out[start:start + rows]
            if mean is not None:
                np.subtract(xb, hi, out=yb)
                xb = yb
            if inv is not None:
                np.multiply(xb, inv, out=yb)
            if mean is not None:
                yb -= lo_scaled
        return out
    # float16 and other float dtypes: compute in float64, round once
    for start in range(0, n, rows):
        b = X[start:start + rows].astype(_F64)
        if mean is not None:
            b -= mean
        if scale is not None:
            b /= scale
        out[start:start + rows] = b
    return out


def _unstandardize(X, out, mean, scale, rows):
    """``out = X * scale + mean`` in float64, rounded once to X's dtype, block by block."""
    for start in range(0, X.shape[0], rows):
        b = X[start:start + rows].astype(_F64)
        if scale is not None:
            b *= scale
        if mean is not None:
            b += mean
        out[start:start + rows] = b
    return out


def _check_bool(value, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"Standardizer: {name} must be a bool, got {value!r}")


class Standardizer(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Standardize features to zero mean and unit variance, like scikit-learn's ``StandardScaler``.

    ``z = (x - mean_) / scale_`` per feature, with the mean and the population standard
    deviation (``ddof=0``) of the training data. A drop-in replacement for ``StandardScaler`` on
    dense data (same parameters, attributes, NaN policy, pandas output), built on normkit's
    statistics:

    - the statistics are float64 whatever the input dtype, computed by two passes over the data
      (the mean, then the squared deviations from it, never ``E[x²] − E[x]²``) and merged
      across :meth:`partial_fit` calls with Chan's exact pairwise formula (as
      :class:`normkit.Moments`), so streaming the data in batches gives the statistics of the
      whole;
    - float32 data is transformed in float32 without losing the mean's low-order bits, so data
      with a large offset (e.g. mean 1e4, spread 1) is standardized to float32 round-off
      (about 1e-7) where subtracting a float32-rounded mean loses up to half an ulp of the mean
      (about 5e-4 in standardized units);
    - float32 and float64 are preserved, float16 too (a DataFrame whose columns all have one
      of these dtypes as well); anything else (ints, Python lists, mixed columns) becomes
      float64.

    Parameters
    ----------
    copy : bool, default True
        False: transform in place (and return) a writeable NumPy array that is already
        float32/float64 (or the array behind a DataFrame of such columns); other input is
        still converted into a new array.
    with_mean : bool, default True
        Whether to subtract the mean.
    with_std : bool, default True
        Whether to divide by the standard deviation.

    Attributes
    ----------
    mean_ : numpy.ndarray of shape (n_features,) or None
        Mean per feature (float64). None when ``with_mean=False`` and ``with_std=False``.
    var_ : numpy.ndarray of shape (n_features,) or None
        Population variance per feature (float64). None when ``with_std=False``.
    scale_ : numpy.ndarray of shape (n_features,) or None
        ``sqrt(var_)``, with 1 where the variance is zero to round-off (such features are
        only centred). None when ``with_std=False``.
    n_samples_seen_ : int or numpy.ndarray of shape (n_features,)
        Samples seen per feature (NaN entries are not counted): an int when every feature
        saw the same number, else an int64 array; with ``sample_weight``, the sum of the
        weights (a float or a float64 array). Reset by :meth:`fit`, increased by
        :meth:`partial_fit`.
    n_features_in_ : int
        Number of features seen in fit.
    feature_names_in_ : numpy.ndarray of shape ``(n_features_in_,)``
        Feature names seen in fit, when the input had string column names (a DataFrame).

    Notes
    -----
    NaN entries are missing values: ignored (per feature) by :meth:`fit`, kept as NaN by
    :meth:`transform`. Infinite values raise ``ValueError``. A feature with no values has NaN
    statistics. Sparse input is not supported (use ``StandardScaler(with_mean=False)``).

    Examples
    --------
    >>> import numpy as np
    >>> from normkit.sklearn import Standardizer
    >>> X = np.array([[0.0, 10.0], [1.0, 10.0], [2.0, 13.0], [3.0, 15.0]])
    >>> st = Standardizer().fit(X)
    >>> st.mean_
    array([ 1.5, 12. ])
    >>> st.transform([[1.5, 12.0]])
    array([[0., 0.]])
    """

    def __init__(self, *, copy=True, with_mean=True, with_std=True):
        self.copy = copy
        self.with_mean = with_mean
        self.with_std = with_std

    # -- fit -------------------------------------------------------------------------------
    def _reset(self):
        for name in ("mean_", "var_", "scale_", "n_samples_seen_", "_count", "_mean", "_m2"):
            if hasattr(self, name):
                delattr(self, name)

    def fit(self, X, y=None, sample_weight=None):
        """Compute the mean and standard deviation of ``X``, forgetting earlier fits.

        Parameters
        ----------
        X : array_like of shape (n_samples, n_features)
            Training data (a NumPy array, a list of rows, a DataFrame). NaN entries are ignored.
        y : None
            Ignored; present for the pipeline API.
        sample_weight : array_like of shape (n_samples,), optional
            Non-negative weight of each sample (a scalar is used for every sample); not all
            zero.

        Returns
        -------
        Standardizer
            This estimator, fitted.

        Raises
        ------
        ValueError
            ``X`` is not 2-D, is empty, or holds infinite values; ``sample_weight`` has the
            wrong shape, negative or non-finite entries, or is all zero.
        TypeError
            ``X`` is sparse, complex or not numeric; ``copy``/``with_mean``/``with_std`` are
            not bools.
        """
        self._reset()
        return self.partial_fit(X, y, sample_weight)

    def partial_fit(self, X, y=None, sample_weight=None):
        """Add a batch ``X`` to the statistics (exact Chan merges), for data seen in batches.

        After ``partial_fit`` on batches ``X1, X2, ...`` the statistics are those of their
        concatenation, to float64 round-off, whatever the batch sizes.

        Parameters
        ----------
        X : array_like of shape (n_samples, n_features)
            A batch of data; NaN entries are ignored. Later batches must have the features of
            the first (number, and names for a DataFrame).
        y : None
            Ignored.
        sample_weight : array_like of shape (n_samples,), optional
            Non-negative weight of each sample; not all zero.

        Returns
        -------
        Standardizer
            This estimator.

        Raises
        ------
        ValueError
            ``X`` is not 2-D, is empty, holds infinite values or has another number of
            features than earlier batches; ``sample_weight`` is invalid (see :meth:`fit`).
        TypeError
            ``X`` is sparse, complex or not numeric; a parameter is not a bool.
        """
        for name in ("copy", "with_mean", "with_std"):
            _check_bool(getattr(self, name), name)
        first_call = not hasattr(self, "n_samples_seen_")
        X = self._validate_fit_input(X, reset=first_call)
        return self._accumulate(X, sample_weight, first_call)

    def _validate_fit_input(self, X, reset):
        # Infinity is looked for by _accumulate, where the statistics show which features can
        # hold any (a non-finite mean): this saves validate_data's pass over all of X.
        return validate_data(self, X, accept_sparse=False, dtype=_DTYPES,
                             ensure_all_finite=False, reset=reset)

    def _accumulate(self, X, sample_weight, first_call):
        n, F = X.shape
        w = self._sample_weight(sample_weight, n)
        if first_call:
            self._count = np.zeros(F, dtype=np.int64 if w is None else _F64)
            self._mean = np.zeros(F)
            self._m2 = np.zeros(F)
        elif w is not None and self._count.dtype != _F64:
            self._count = self._count.astype(_F64)  # weights from now on: sums of weights

        if w is None:
            mean_b, m2_b = _moments_dense(X)
            count_b = np.full(F, n, dtype=np.int64)
            bad = ~np.isfinite(mean_b)
            if bad.any():  # NaN (or infinity) entries
                _reject_infinity(X, bad)
                count_b, mean_b, m2_b = _moments_general(X, None)  # NaN counted out per feature
                count_b = count_b.astype(np.int64)
        else:
            count_b, mean_b, m2_b = _moments_general(X, w)
            bad = ~np.isfinite(mean_b)
            if bad.any():
                _reject_infinity(X, bad)
        self._count, self._mean, self._m2 = _combine(
            self._count, self._mean, self._m2, count_b, mean_b, m2_b
        )
        self._publish()
        return self

    @staticmethod
    def _sample_weight(sample_weight, n):
        if sample_weight is None:
            return None
        if isinstance(sample_weight, numbers.Number):
            w = np.full(n, sample_weight, dtype=_F64)
        else:
            try:
                w = np.asarray(sample_weight, dtype=_F64)
            except (TypeError, ValueError):
                raise TypeError(
                    "Standardizer: sample_weight must be numeric, got "
                    f"{type(sample_weight).__name__}"
                ) from None
        if w.ndim == 0:
            w = np.full(n, float(w))
        if w.shape != (n,):
            raise ValueError(
                f"Standardizer: sample_weight has shape {w.shape} but X has {n} samples; "
                f"expected shape ({n},)"
            )
        if not np.isfinite(w).all():
            raise ValueError("Standardizer: sample_weight has non-finite entries (NaN or inf)")
        if (w < 0).any():
            raise ValueError("Standardizer: sample_weight has negative entries")
        if not w.any():
            raise ValueError(
                "Standardizer: sample weights are all zero; at least one must be non-zero"
            )
        return w

    def _publish(self):
        """Fitted attributes from the float64 state, as ``StandardScaler`` names them."""
        count = self._count
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, self._mean, np.nan)
            var = np.where(count > 0, self._m2 / np.where(count > 0, count, 1), np.nan)
        if not self.with_mean and not self.with_std:
            self.mean_ = None
            self.var_ = None
        else:
            self.mean_ = mean
            self.var_ = var if self.with_std else None
        if self.with_std:
            scale = np.sqrt(var)
            scale[_is_constant(var, mean, count)] = 1.0
            self.scale_ = scale
        else:
            self.scale_ = None
        if count.min() == count.max():
            value = count[0]
            self.n_samples_seen_ = int(value) if count.dtype.kind == "i" else float(value)
        else:
            self.n_samples_seen_ = count.copy()

    # -- transform ---------------------------------------------------------------------------
    def _center_scale(self):
        """(mean, scale) that the transforms apply; None for a step the flags turn off."""
        return (self.mean_ if self.with_mean else None, self.scale_ if self.with_std else None)

    def _validated(self, X, copy, fn):
        check_is_fitted(self)
        copy = self.copy if copy is None else copy
        _check_bool(copy, "copy")
        original = X
        if fn == "transform":
            X = validate_data(self, X, reset=False, accept_sparse=False, dtype=_DTYPES,
                              ensure_all_finite="allow-nan")
        else:
            X = _check_inverse_input(X, self.n_features_in_)
        return X, _output(X, original, copy)

    def fit_transform(self, X, y=None, sample_weight=None):
        """Fit to ``X``, then standardize it; the same as ``fit(X).transform(X)``, with the
        input checked once.

        Parameters
        ----------
        X : array_like of shape (n_samples, n_features)
            Training data; NaN entries are ignored by the fit and stay NaN.
        y : None
            Ignored.
        sample_weight : array_like of shape (n_samples,), optional
            Non-negative weight of each sample; not all zero.

        Returns
        -------
        numpy.ndarray of shape (n_samples, n_features)
            As :meth:`transform` returns.

        Raises
        ------
        ValueError, TypeError
            As :meth:`fit` raises.
        """
        self._reset()
        for name in ("copy", "with_mean", "with_std"):
            _check_bool(getattr(self, name), name)
        original = X
        X = self._validate_fit_input(X, reset=True)
        self._accumulate(X, sample_weight, True)
        return _standardize(X, _output(X, original, self.copy), *self._center_scale(),
                            _block_rows(X.shape[1]))

    def transform(self, X, copy=None):
        """Standardize ``X``: ``(X - mean_) / scale_`` per feature.

        Parameters
        ----------
        X : array_like of shape (n_samples, n_features)
            Data with the features seen in fit. NaN entries stay NaN.
        copy : bool, optional
            Overrides the ``copy`` parameter for this call.

        Returns
        -------
        numpy.ndarray of shape (n_samples, n_features)
            The standardized data: float32 for float32 input, float16 for float16, else
            float64 (a DataFrame with ``set_output(transform="pandas")``).

        Raises
        ------
        sklearn.exceptions.NotFittedError
            Called before fit.
        ValueError
            ``X`` has another number of features than in fit, holds infinite values, or is
            not 2-D.
        TypeError
            ``X`` is sparse, complex or not numeric.
        """
        X, out = self._validated(X, copy, "transform")
        return _standardize(X, out, *self._center_scale(), _block_rows(X.shape[1]))

    def inverse_transform(self, X, copy=None):
        """Undo :meth:`transform`: ``X * scale_ + mean_`` per feature.

        Computed in float64 and rounded once to ``X``'s dtype.

        Parameters
        ----------
        X : array_like of shape (n_samples, n_features)
            Standardized data.
        copy : bool, optional
            Overrides the ``copy`` parameter for this call.

        Returns
        -------
        numpy.ndarray of shape (n_samples, n_features)
            In ``X``'s float dtype (float64 for other input).

        Raises
        ------
        sklearn.exceptions.NotFittedError
            Called before fit.
        ValueError
            ``X`` has another number of features than in fit, holds infinite values, or is
            not 2-D.
        TypeError
            ``X`` is sparse, complex or not numeric.
        """
        X, out = self._validated(X, copy, "inverse_transform")
        return _unstandardize(X, out, *self._center_scale(), _block_rows(X.shape[1]))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.input_tags.sparse = False
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


def _output(X, original, copy):
    """Where the result goes: ``X`` itself (in place) when allowed and writeable, and also when
    ``X`` is a new array made from the input by the validation; else a new array."""
    fresh = isinstance(original, np.ndarray) and not np.may_share_memory(X, original)
    if (copy and not fresh) or not X.flags.writeable:
        return np.empty_like(X, order="C")
    return X


def _check_inverse_input(X, n_features):
    from sklearn.utils import check_array

    X = check_array(X, accept_sparse=False, dtype=_DTYPES,
                    ensure_all_finite="allow-nan")
    if X.shape[1] != n_features:
        raise ValueError(
            f"X has {X.shape[1]} features, but Standardizer is expecting {n_features} features "
            "as input."
        )
    return X
