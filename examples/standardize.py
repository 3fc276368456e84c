"""Standardize float32 data with normkit.sklearn.Standardizer and with scikit-learn's
StandardScaler: accuracy against a float64 reference, and the time of fit + transform.

    pip install "normkit[sklearn]"     # from a checkout: pip install ".[sklearn]"
    python examples/standardize.py                       # (1,000,000, 100) float32, 1 thread
    python examples/standardize.py --rows 100000 --features 20 --repeat 5

The data have mean 1e4 and spread 1 per feature. StandardScaler subtracts the float32-rounded
mean, which is off by up to half a float32 ulp of 1e4 (4.9e-4); Standardizer keeps the mean's
low-order bits. Both run on one thread (normkit's kernels are set to one; NumPy's element-wise
operations use one anyway). Prints the best of --repeat runs.
"""

import argparse
import sys
import time

try:
    from sklearn.preprocessing import StandardScaler
except ImportError as e:
    sys.exit(
        f"examples/standardize.py needs scikit-learn, which is not installed ({e}).\n"
        'Install it with:  pip install "normkit[sklearn]"\n'
        '(from a checkout: pip install ".[sklearn]")'
    )

import numpy as np

import normkit as nk
from normkit.sklearn import Standardizer


def best_time(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def reference_stats(X, chunk=100_000):
    """Mean and population standard deviation in float64 by two plain passes."""
    mean = X.sum(axis=0, dtype=np.float64) / len(X)
    m2 = sum(((X[i:i + chunk].astype(np.float64) - mean) ** 2).sum(axis=0)
             for i in range(0, len(X), chunk))
    return mean, np.sqrt(m2 / len(X))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--features", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3, help="runs per method; the best is shown")
    args = p.parse_args(argv)
    nk.set_num_threads(1)

    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.rows, args.features), dtype=np.float32)
    X += np.float32(1e4)  # mean 1e4, spread 1, float32

    # accuracy on the first rows, against float64 two-pass statistics of all of X
    mean, std = reference_stats(X)
    rows = X[:1000].astype(np.float64)
    ref = (rows - mean) / std
    ours = Standardizer().fit(X).transform(X[:1000])
    theirs = StandardScaler().fit(X).transform(X[:1000])
    print(f"data: {X.shape} float32, mean 1e4, spread 1")
    print("max error in standardized units vs float64: "
          f"Standardizer {np.abs(ours - ref).max():.1e}, "
          f"StandardScaler {np.abs(theirs - ref).max():.1e}")

    t_ours = best_time(lambda: Standardizer().fit(X).transform(X), args.repeat)
    t_theirs = best_time(lambda: StandardScaler().fit(X).transform(X), args.repeat)
    print(f"fit + transform, 1 thread, best of {args.repeat}: Standardizer {t_ours:.3f} s, "
          f"StandardScaler {t_theirs:.3f} s: {t_theirs / t_ours:.1f}x")


if __name__ == "__main__":
    main()
