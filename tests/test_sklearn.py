"""normkit.sklearn.Standardizer: scikit-learn's estimator checks, agreement with StandardScaler
on float64 data, exact partial_fit merges, better float32 accuracy with a large offset, NaN
policy, sample weights, dtypes, copies, pandas output. (Import isolation, which needs no
scikit-learn, is in test_sklearn_import.py.)"""

from __future__ import annotations

import doctest

import numpy as np
import pytest

pytest.importorskip("sklearn")
import normkit.sklearn as nks
from normkit.sklearn import Standardizer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator, parametrize_with_checks

FLAGS = [dict(), dict(with_mean=False), dict(with_std=False), dict(with_mean=False, with_std=False)]
FLAG_IDS = ["default", "no_mean", "no_std", "neither"]


# -- scikit-learn's own checks ----------------------------------------------------------------

@parametrize_with_checks(
    [Standardizer(), Standardizer(with_mean=False), Standardizer(with_std=False),
     Standardizer(copy=False)],
    # copy=False transforms the check's own data in place, so a second transform of it
    # differs; StandardScaler(copy=False) fails this check in the same way.
    expected_failed_checks=lambda est: (
        {"check_methods_sample_order_invariance": "copy=False transforms the input in place"}
        if est.copy is False else {}
    ),
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_check_estimator_passes():
    """The call the issue names: every check passes; the one skipped (array API input) needs
    the SCIPY_ARRAY_API environment variable, as for StandardScaler."""
    results = check_estimator(Standardizer(), on_skip=None, on_fail=None)
    failed = [(r["check_name"], r["exception"]) for r in results if r["status"] == "failed"]
    assert not failed
    assert sum(r["status"] == "passed" for r in results) >= 50


# -- agreement with StandardScaler on float64 data --------------------------------------------

def _data(rng, n=200, F=7, dtype=np.float64):
    scales = np.logspace(-3, 3, F)
    return (rng.standard_normal((n, F)) * scales + np.linspace(-50, 50, F)).astype(dtype)


def _assert_fitted_like(ours, theirs, rtol=1e-12):
    for name in ("mean_", "var_", "scale_"):
        a, b = getattr(ours, name), getattr(theirs, name)
        if b is None:
            assert a is None, name
        else:
            assert a.dtype == np.float64
            np.testing.assert_allclose(a, b, rtol=rtol, atol=0, err_msg=name)
    # equal counts; sums of weights to round-off (they are added in another order)
    np.testing.assert_allclose(ours.n_samples_seen_, theirs.n_samples_seen_, rtol=1e-14, atol=0)
    assert np.ndim(ours.n_samples_seen_) == np.ndim(theirs.n_samples_seen_)
    assert ours.n_features_in_ == theirs.n_features_in_


@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
def test_agrees_with_standard_scaler_float64(flags, rng):
    X = _data(rng)
    ours = Standardizer(**flags).fit(X)
    theirs = StandardScaler(**flags).fit(X)
    _assert_fitted_like(ours, theirs)
    Z = _data(rng, n=50)
    np.testing.assert_allclose(ours.transform(Z), theirs.transform(Z), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ours.inverse_transform(Z), theirs.inverse_transform(Z),
                               rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(ours.inverse_transform(ours.transform(Z)), Z, rtol=1e-12,
                               atol=1e-12)


def test_agrees_with_standard_scaler_with_nan_and_weights(rng):
    X = _data(rng)
    X[rng.random(X.shape) < 0.1] = np.nan
    X[:, 3] = np.nan  # a feature with no values at all
    w = rng.uniform(0.1, 3.0, X.shape[0])
    for sw in (None, w):
        ours = Standardizer().fit(X, sample_weight=sw)  # warns about nothing
        with np.errstate(invalid="ignore", divide="ignore"):  # StandardScaler warns on 0/0
            theirs = StandardScaler().fit(X, sample_weight=sw)
        _assert_fitted_like(ours, theirs, rtol=1e-11)
        out = ours.transform(X)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(X))  # NaN kept, nothing else NaN
        # means that differ by an ulp move z by ulp(mean)/scale: allow a few of those
        ratio = np.nanmax(np.abs(theirs.mean_) / theirs.scale_)
        np.testing.assert_allclose(out, theirs.transform(X), rtol=1e-11,
                                   atol=64 * np.finfo(np.float64).eps * ratio)


def test_constant_features_are_only_centred(rng):
    X = np.column_stack([np.full(10, 0.1), np.full(10, 7.0), rng.standard_normal(10)])
    ours, theirs = Standardizer().fit(X), StandardScaler().fit(X)
    np.testing.assert_array_equal(ours.scale_[:2], [1.0, 1.0])
    np.testing.assert_allclose(ours.transform(X), theirs.transform(X), atol=1e-15)


# -- partial_fit: exact merges ----------------------------------------------------------------

def test_partial_fit_equals_fit_on_the_concatenation(rng):
    X = _data(rng, n=1001) + 1e6  # a large offset: a naive merge would lose digits here
    ref = Standardizer().fit(X)
    st = Standardizer()
    for batch in np.split(X, [1, 2, 10, 400, 401, 777]):  # uneven, with one-row batches
        st.partial_fit(batch)
    assert st.n_samples_seen_ == 1001
    np.testing.assert_allclose(st.mean_, ref.mean_, rtol=1e-14)
    np.testing.assert_allclose(st.var_, ref.var_, rtol=1e-7)  # see the ratio note below
    # the float64 two-pass reference of the whole; the first feature has |mean|/std ~ 1e9,
    # and means merged in float64 (rounded to 1e-10 here) bound the relative error of its
    # variance to about that ratio times float64's epsilon
    np.testing.assert_allclose(st.var_, X.var(axis=0), rtol=1e-7)
    np.testing.assert_allclose(st.var_[3:], X.var(axis=0)[3:], rtol=1e-9)  # ratio <= 1e6


def test_partial_fit_with_nan_and_weights_accumulates_counts(rng):
    X = _data(rng, n=60)
    X[5:9, 1] = np.nan
    w = rng.uniform(0.5, 2.0, 60)
    st = Standardizer()
    st.partial_fit(X[:30], sample_weight=w[:30]).partial_fit(X[30:], sample_weight=w[30:])
    ref = StandardScaler().fit(X, sample_weight=w)
    _assert_fitted_like(st, ref, rtol=1e-11)
    st2 = Standardizer().partial_fit(X[:30]).partial_fit(X[30:], sample_weight=w[30:])
    assert st2.n_samples_seen_.dtype == np.float64  # sums of weights once weights appear


def test_fit_resets_partial_fit(rng):
    st = Standardizer().partial_fit(_data(rng) + 100)
    X = _data(rng)
    st.fit(X)
    _assert_fitted_like(st, StandardScaler().fit(X))


# -- float32: accuracy with a large offset ----------------------------------------------------

def test_float32_large_offset_more_accurate_than_standard_scaler():
    """Mean 1e4, spread 1, float32: StandardScaler subtracts the float32-rounded mean (off by up
    to half an ulp of 1e4, 4.9e-4); Standardizer keeps the mean's low bits."""
    rng = np.random.default_rng(0)
    X = (1e4 + rng.standard_normal((20000, 16))).astype(np.float32)
    X64 = X.astype(np.float64)
    ref = (X64 - X64.mean(axis=0)) / X64.std(axis=0)  # float64 two-pass reference
    ours = Standardizer().fit_transform(X)
    theirs = StandardScaler().fit_transform(X)
    assert ours.dtype == theirs.dtype == np.float32
    err_ours = np.abs(ours - ref).max()
    err_theirs = np.abs(theirs - ref).max()
    print(f"max error in standardized units: Standardizer {err_ours:.2e}, "
          f"StandardScaler {err_theirs:.2e}")
    assert err_ours < 1e-5
    assert err_theirs > 1e-4 > 10 * err_ours
    # the statistics themselves are float64-accurate
    np.testing.assert_allclose(Standardizer().fit(X).mean_, X64.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(Standardizer().fit(X).var_, X64.var(axis=0), rtol=1e-10)


@pytest.mark.parametrize("flags", FLAGS[:3], ids=FLAG_IDS[:3])
def test_float32_transform_matches_float64_rounded(flags, rng):
    X = (_data(rng, n=300) * 3 + 5e3).astype(np.float32)
    st = Standardizer(**flags).fit(X)
    exact = st.transform(X.astype(np.float64))
    out = st.transform(X)
    assert out.dtype == np.float32
    # a few float32 ulps of the result (plus a tiny absolute term near zero)
    np.testing.assert_allclose(out, exact, rtol=4e-7, atol=1e-6)


# -- dtypes, copies ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_dtypes_are_preserved(dtype, rng):
    X = _data(rng, n=40, F=3).astype(dtype)
    st = Standardizer().fit(X)
    assert st.transform(X).dtype == dtype
    assert st.inverse_transform(st.transform(X)).dtype == dtype
    assert st.fit_transform(X).dtype == dtype
    assert st.mean_.dtype == st.var_.dtype == st.scale_.dtype == np.float64


def test_other_input_becomes_float64():
    X = [[1, 2], [3, 5], [4, 9]]
    out = Standardizer().fit_transform(X)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, StandardScaler().fit_transform(X), rtol=1e-15)


def test_copy_true_leaves_input_and_copy_false_works_in_place(rng):
    X = _data(rng, n=30, F=4)
    X0 = X.copy()
    st = Standardizer().fit(X)
    out = st.transform(X)
    np.testing.assert_array_equal(X, X0)
    assert not np.shares_memory(out, X)
    inplace = st.transform(X, copy=False)
    assert inplace is X
    np.testing.assert_array_equal(inplace, out)
    back = st.inverse_transform(X, copy=False)
    assert back is X
    np.testing.assert_allclose(X, X0, rtol=1e-13)
    ro = X0.copy()
    ro.flags.writeable = False
    assert Standardizer(copy=False).fit(ro).transform(ro) is not ro  # read-only: a new array


# -- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_infinite_values_raise_and_change_nothing(weighted, dtype, rng):
    X = _data(rng, n=10, F=3).astype(dtype)
    X[2, 1] = -np.inf
    X[4, 0] = np.nan  # NaN elsewhere is fine
    w = np.ones(10) if weighted else None
    with pytest.raises(ValueError, match="Input X contains infinity"):
        Standardizer().fit(X, sample_weight=w)
    with pytest.raises(ValueError, match="Input X contains infinity"):
        Standardizer().fit_transform(X, sample_weight=w)
    good = _data(rng, n=10, F=3).astype(dtype)
    st = Standardizer().fit(good)
    before = (st.mean_.copy(), st.var_.copy(), st.n_samples_seen_)
    with pytest.raises(ValueError, match="Input X contains infinity"):
        st.partial_fit(X, sample_weight=w)
    np.testing.assert_array_equal(st.mean_, before[0])
    np.testing.assert_array_equal(st.var_, before[1])
    assert st.n_samples_seen_ == before[2]
    with pytest.raises(ValueError, match="infinity"):
        st.transform(X)


@pytest.mark.parametrize(
    "weight, exc, match",
    [
        (np.ones(9), ValueError, r"sample_weight has shape \(9,\) but X has 10 samples"),
        (np.ones((10, 1)), ValueError, r"sample_weight has shape \(10, 1\)"),
        (-np.ones(10), ValueError, "negative"),
        (np.full(10, np.nan), ValueError, "non-finite"),
        (np.zeros(10), ValueError, "all zero"),
        (["a"] * 10, TypeError, "numeric"),
    ],
)
def test_bad_sample_weight(weight, exc, match, rng):
    st = Standardizer()
    with pytest.raises(exc, match=match):
        st.fit(_data(rng, n=10, F=3), sample_weight=weight)
    assert not hasattr(st, "mean_")


def test_scalar_sample_weight_is_every_sample(rng):
    X = _data(rng, n=10, F=3)
    a = Standardizer().fit(X, sample_weight=2.0)
    b = Standardizer().fit(X)
    np.testing.assert_allclose(a.mean_, b.mean_, rtol=1e-15)
    assert a.n_samples_seen_ == 20.0


@pytest.mark.parametrize("param", ["copy", "with_mean", "with_std"])
def test_parameters_must_be_bools(param, rng):
    with pytest.raises(TypeError, match=rf"Standardizer: {param} must be a bool"):
        Standardizer(**{param: "yes"}).fit(_data(rng, n=5, F=2))


def test_feature_count_must_match(rng):
    st = Standardizer().fit(_data(rng, n=10, F=3))
    with pytest.raises(ValueError, match="3 features"):
        st.transform(_data(rng, n=10, F=4))
    with pytest.raises(ValueError, match="3 features"):
        st.inverse_transform(_data(rng, n=10, F=4))
    with pytest.raises(ValueError, match="3 features"):
        st.partial_fit(_data(rng, n=10, F=4))


def test_sparse_input_is_refused_with_a_hint():
    sparse = pytest.importorskip("scipy.sparse")
    with pytest.raises(TypeError, match="dense data is required"):
        Standardizer().fit(sparse.csr_array(np.eye(3)))


# -- pandas, pipelines -----------------------------------------------------------------------

def test_pandas_output_and_feature_names(rng):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(_data(rng, n=20, F=3), columns=["a", "b", "c"])
    st = Standardizer().set_output(transform="pandas")
    out = st.fit_transform(df)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == ["a", "b", "c"]
    assert list(st.feature_names_in_) == ["a", "b", "c"]
    assert list(st.get_feature_names_out()) == ["a", "b", "c"]
    theirs = StandardScaler().fit(df)
    # to float64 round-off: a mean off by a few ulps moves a standardized value by about
    # eps * |mean| / scale (feature 0 here: mean -50, scale 1e-3, so about 1e-11)
    atol = 16 * np.finfo(np.float64).eps * (np.abs(theirs.mean_) / theirs.scale_ + 1)
    ref = theirs.transform(df)
    err = np.abs(out.to_numpy() - ref)
    assert (err <= 1e-12 * np.abs(ref) + atol).all(), (err / atol).max()
    assert isinstance(st.transform(df), pd.DataFrame)
    assert list(Standardizer().fit(df.to_numpy()).get_feature_names_out()) == ["x0", "x1", "x2"]


def test_in_a_pipeline(rng):
    from sklearn.linear_model import LogisticRegression

    X = _data(rng, n=200, F=5) + 1e4
    y = (X[:, 0] > np.median(X[:, 0])).astype(int)
    pipe = make_pipeline(Standardizer(), LogisticRegression()).fit(X, y)
    assert pipe.score(X, y) > 0.9


def test_docstring_example_runs():
    result = doctest.testmod(nks, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_docstrings_have_sections():
    import inspect

    assert "Parameters\n----------" in inspect.getdoc(Standardizer)
    for name in ("fit", "partial_fit", "transform", "inverse_transform", "fit_transform"):
        doc = inspect.getdoc(getattr(Standardizer, name))
        for section in ("Parameters", "Returns", "Raises"):
            assert f"{section}\n{'-' * len(section)}" in doc, (name, section)
        assert "SPEC" not in doc
