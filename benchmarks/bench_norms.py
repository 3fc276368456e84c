"""normkit's benchmark as a script: the same as `python -m normkit bench` (see its --help).

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_norms.py [--quick] [--threads 1,2] [--json PATH]

Every BENCH.md workload, forward and backward, normkit against the plain NumPy reference and
PyTorch's CPU kernels (when importable) in one process; prints times, speed-ups and bandwidth.
"""

import sys

from normkit.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
