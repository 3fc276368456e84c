"""Where does the time of a normkit kernel go?  A diagnosis for the benchmark's slow rows.

For each workload (float32, one thread unless --threads) this prints, from one process:

  api ms      the public call as users make it (forward into ``out=``, backward allocating dx)
  kernel ms   the same kernel through ``normkit._core`` with every output preallocated and
              reused, so the difference to ``api`` is allocation (page faults) and Python
  alloc ms    api - kernel
  compute ms  the kernel's cost when memory is not the limit: the same op on a cache-resident
              problem of the same row / plane structure (~1 MiB), per element, times n
  copy ms     the byte model's bytes (forward 2n, backward 3n itemsize) at the bandwidth of a
              same-run 256 MiB copy (``np.copyto``, read + write counted)
  kernel/copy and compute/copy as percentages of the copy's bandwidth

Reading it: a kernel whose ``compute`` is close to or above ``copy`` is limited by the
instructions it executes, not by memory; one whose ``kernel`` is far above both is limited by
its access pattern (or by overlapping the two badly).  Run on a quiet machine:

    OPENBLAS_NUM_THREADS=1 python benchmarks/diagnose.py [--threads 1] [--only ln_1k,bn_train_7]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import normkit as nk
from normkit import _core

F32 = np.float32
EPS = 1e-5


def median_ms(fn, reps=9, min_time=0.003):
    fn()
    inner = 1
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    if one < min_time:
        inner = max(1, int(min_time / max(one, 1e-7)))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        ts.append((time.perf_counter() - t0) / inner)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def copy_bandwidth(nbytes=256 << 20):
    """Bytes per ms of a large copy (read + write counted), far larger than any cache."""
    src = np.ones(nbytes // 4, F32)
    dst = np.empty_like(src)
    return 2 * nbytes / median_ms(lambda: np.copyto(dst, src), reps=5)


# ---- problems: (api, kernel) callables for one shape --------------------------------------------


def rows_problem(shape, rms, direction, rng):
    M, N = shape
    x = rng.standard_normal(shape).astype(F32) + 1
    dy = rng.standard_normal(shape).astype(F32)
    w = np.ones(N, F32)
    b = None if rms else np.zeros(N, F32)
    y = np.empty_like(x)
    mean = None if rms else np.empty(M, F32)
    rstd = np.empty(M, F32)
    _core.row_norm_forward(x, w, b, EPS, y, mean, rstd)
    if direction == "fwd":
        if rms:
            api = lambda: nk.rms_norm(x, N, w, eps=EPS, out=y)  # noqa: E731
        else:
            api = lambda: nk.layer_norm(x, N, w, b, out=y)  # noqa: E731
        kern = lambda: _core.row_norm_forward(x, w, b, EPS, y, mean, rstd)  # noqa: E731
        return api, kern
    dx = np.empty_like(x)
    dw = np.empty(N, F32)
    db = None if rms else np.empty(N, F32)
    if rms:
        api = lambda: nk.rms_norm_backward(dy, x, rstd, w)  # noqa: E731
    else:
        api = lambda: nk.layer_norm_backward(dy, x, mean, rstd, w)  # noqa: E731
    kern = lambda: _core.row_norm_backward(dy, x, mean, rstd, w, dx, dw, db)  # noqa: E731
    return api, kern


def channel_problem(shape, groups, direction, rng):
    """shape (B, C, S) channels-first; groups 0 = BatchNorm (training), G = GroupNorm."""
    B, C, S = shape
    x = rng.standard_normal(shape).astype(F32) + 1
    dy = rng.standard_normal(shape).astype(F32)
    w = np.ones(C, F32)
    b = np.zeros(C, F32)
    y = np.empty_like(x)
    nstat = C if groups == 0 else B * groups
    mean = np.empty(nstat, F32)
    rstd = np.empty(nstat, F32)

    def kfwd():
        _core.channel_norm_forward(x, False, w, b, None, None, True, 0.1, EPS, y, mean, rstd,
                                   groups)

    kfwd()
    if direction == "fwd":
        if groups == 0:
            api = lambda: nk.batch_norm(x, w, b, out=y)  # noqa: E731
        else:
            api = lambda: nk.group_norm(x, groups, w, b, out=y)  # noqa: E731
        return api, kfwd
    dx = np.empty_like(x)
    dw = np.empty(C, F32)
    db = np.empty(C, F32)
    if groups == 0:
        api = lambda: nk.batch_norm_backward(dy, x, mean, rstd, w)  # noqa: E731
    else:
        api = lambda: nk.group_norm_backward(dy, x, mean.reshape(B, groups),  # noqa: E731
                                             rstd.reshape(B, groups), w)
    kern = lambda: _core.channel_norm_backward(dy, x, False, mean, rstd, w, True, dx, dw,  # noqa
                                               db, groups)
    return api, kern


# name -> (kind, full shape, cache-resident shape, groups)
WORKLOADS = {
    "ln_1k": ("ln", (8192, 1024), (64, 1024), 0),
    "ln_4k": ("ln", (4096, 4096), (16, 4096), 0),
    "rms_1k": ("rms", (8192, 1024), (64, 1024), 0),
    "bn_train_56": ("bn", (32, 64, 3136), (2, 16, 3136), 0),
    "bn_train_14": ("bn", (256, 256, 196), (16, 32, 196), 0),
    "bn_train_7": ("bn", (64, 512, 49), (16, 128, 49), 0),
    "bn1d": ("bn", (4096, 1024, 1), (64, 1024, 1), 0),
    "gn_28": ("gn", (32, 256, 784), (2, 64, 784), 32),
    "gn_64": ("gn", (8, 512, 4096), (1, 32, 4096), 32),
}


def make(kind, shape, groups, direction, rng):
    if kind in ("ln", "rms"):
        return rows_problem(shape, kind == "rms", direction, rng)
    return channel_problem(shape, groups if kind == "gn" else 0, direction, rng)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated workload names")
    args = ap.parse_args(argv)
    nk.set_num_threads(args.threads)
    names = [n for n in WORKLOADS if not args.only or n in args.only.split(",")]
    rng = np.random.default_rng(0)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e6:.1f} GB/s")
    print(f"normkit {nk.__version__}, simd {nk.build_info()['simd']}, threads {args.threads}")
    hdr = (f"{'workload':12} {'dir':3} {'api ms':>8} {'kernel':>8} {'alloc':>7} {'compute':>8} "
           f"{'copy':>7} {'kern/copy':>9} {'comp/copy':>9}")
    print(hdr)
    print("-" * len(hdr))
    for name in names:
        kind, shape, small, groups = WORKLOADS[name]
        n = int(np.prod(shape))
        for direction in ("fwd", "bwd"):
            api, kern = make(kind, shape, groups, direction, rng)
            _, kern_small = make(kind, small, groups, direction, rng)
            t_copy = n * 4 * (2 if direction == "fwd" else 3) / bw
            t_api, t_kern = median_ms(api), median_ms(kern)
            t_comp = median_ms(kern_small, reps=15) * n / int(np.prod(small))
            print(f"{name:12} {direction:3} {t_api:8.2f} {t_kern:8.2f} {t_api - t_kern:7.2f} "
                  f"{t_comp:8.2f} {t_copy:7.2f} {100 * t_copy / t_kern:8.0f}% "
                  f"{100 * t_copy / t_comp:8.0f}%")
            del api, kern, kern_small


if __name__ == "__main__":
    main()
