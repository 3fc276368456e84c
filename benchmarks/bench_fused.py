"""Fused residual add + LayerNorm / RMSNorm against PyTorch's eager pair (x + r, then the norm)
and the plain NumPy reference, in one process, interleaved (A B C A B C ...), medians.

    python benchmarks/bench_fused.py [--threads 1,2] [--reps 15]

Outputs are preallocated for every contender (out=, h_out= / torch's out=), so page faults of
fresh arrays are not timed. Byte model of the fused forward: read x and residual, write h and
y = 4 * n * sizeof(dtype); the percentage is of a same-run copy (np.copyto) of 256 MiB.
Never asserts on time; checks each contender's y and h against the float64 reference first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import normkit as nk

SHAPES = [((8192, 1024), 1024), ((4096, 4096), 4096), ((512, 768), 768)]


def numpy_add_norm(x, r, w, b, center, eps):
    h = x + r
    hf = h.astype(np.float64)
    if center:
        hf = hf - hf.mean(axis=-1, keepdims=True)
    y = hf / np.sqrt((hf * hf).mean(axis=-1, keepdims=True) + eps) * w
    if center:
        y = y + b
    return y.astype(x.dtype), h


def copy_gbps(reps=7):
    a = np.ones(256 << 18, np.float32)  # 256 MiB
    b = np.empty_like(a)
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(b, a)
        t.append(time.perf_counter() - t0)
    return 2 * a.nbytes / min(t) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    print(f"normkit {nk.build_info()['version']} ({nk.build_info()['simd']}), "
          f"torch {torch.__version__ if torch else 'not installed'}")
    for nt in [int(t) for t in args.threads.split(",")]:
        nk.set_num_threads(nt)
        if torch:
            torch.set_num_threads(nt)
        bw = copy_gbps()
        print(f"\nthreads={nt}  same-run copy {bw:.1f} GB/s")
        print(f"{'op':16s} {'shape':>12s} {'normkit ms':>10s} {'torch ms':>9s} {'numpy ms':>9s}"
              f" {'vs torch':>8s} {'vs numpy':>8s} {'% copy':>6s}")
        for center in (True, False):
            name = "add_layer_norm" if center else "add_rms_norm"
            for shape, n in SHAPES:
                x = rng.standard_normal(shape).astype(np.float32)
                r = rng.standard_normal(shape).astype(np.float32)
                w = (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)
                b = (0.1 * rng.standard_normal(n)).astype(np.float32)
                y, h = np.empty_like(x), np.empty_like(x)
                wb = (w, b) if center else (w,)
                fused = getattr(nk, name)

                def run_nk():
                    fused(x, r, n, *wb, eps=1e-5, out=y, h_out=h)

                want_y, want_h = numpy_add_norm(x, r, w, b, center, 1e-5)
                run_nk()
                assert np.array_equal(h, want_h)
                assert np.abs(y - want_y).max() < 1e-4
                fns = {"normkit": run_nk, "numpy": lambda: numpy_add_norm(x, r, w, b, center, 1e-5)}
                if torch:
                    tx, tr = torch.from_numpy(x), torch.from_numpy(r)
                    th, tw, tb = torch.empty_like(tx), torch.from_numpy(w), torch.from_numpy(b)

                    def run_torch():
                        torch.add(tx, tr, out=th)
                        if center:
                            return torch.nn.functional.layer_norm(th, (n,), tw, tb, 1e-5)
                        return torch.nn.functional.rms_norm(th, (n,), tw, 1e-5)

                    ty = run_torch()
                    assert np.abs(ty.numpy() - want_y).max() < 1e-4
                    fns["torch"] = run_torch
                times = {k: [] for k in fns}
                for _ in range(args.reps):
                    for k, f in fns.items():
                        t0 = time.perf_counter()
                        f()
                        times[k].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) for k, v in times.items()}
                nbytes = 4 * x.nbytes
                pct = 100 * nbytes / med["normkit"] / 1e9 / bw
                vt = f"{med['torch'] / med['normkit']:.2f}x" if "torch" in med else "-"
                tm = f"{med['torch'] * 1e3:9.3f}" if "torch" in med else f"{'-':>9s}"
                print(f"{name:16s} {str(shape):>12s} {med['normkit'] * 1e3:10.3f} {tm}"
                      f" {med['numpy'] * 1e3:9.3f} {vt:>8s}"
                      f" {med['numpy'] / med['normkit']:7.1f}x {pct:5.0f}%")


if __name__ == "__main__":
    main()
