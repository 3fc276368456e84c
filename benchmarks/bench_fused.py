"""Fused residual add + LayerNorm / RMSNorm against PyTorch's eager pair (x + r, then the norm)
and the plain NumPy reference, in one process, interleaved, medians; outputs preallocated.
Byte model: read x and residual, write h and y = 4 n sizeof; % of a same-run copy.

    python benchmarks/bench_fused.py [--threads 1,2] [--reps 7]

The same rows as ``python -m normkit bench --only add_layer_norm,add_rms_norm`` (they live in
normkit._bench_extra); this script skips the kernel table. Never asserts on time.
"""

import argparse
import sys

import normkit as nk
from normkit._bench import _import_torch, measure_copy_bandwidth
from normkit._bench_extra import run_extra


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    torch, torch_info = _import_torch(False)
    print(f"normkit {nk.build_info()['version']} ({nk.build_info()['simd']}), torch {torch_info}")
    copy_bw = measure_copy_bandwidth(threads)
    run_extra(nk, torch, ("add_layer_norm", "add_rms_norm"), threads, copy_bw, sys.stdout,
              reps=args.reps)


if __name__ == "__main__":
    main()
