"""Command line: ``python -m normkit demo``, ``python -m normkit info`` and ``python -m normkit bench``.

``demo`` runs the BatchNorm paper's Figure 1 experiment (``normkit._demo``, needs the ``demo``
extra); ``info`` prints how normkit was built and the CPU it runs on; ``bench`` times normkit
against a plain NumPy reference and, when ``import torch`` works, PyTorch's CPU kernels (see
``normkit._bench``), with ``--isa`` for every instruction-set level side by side.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence


def _threads(text: str) -> List[int]:
    out: List[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            t = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated thread counts like 1,2; got {text!r}"
            ) from None
        if t < 1:
            raise argparse.ArgumentTypeError(f"thread counts must be >= 1; got {t}")
        if t not in out:
            out.append(t)
    return out


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= minimum, described as ``what`` in errors."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    return parse


_positive = _int_at_least(1, "a positive integer")
_non_negative = _int_at_least(0, "a non-negative integer")


def _learning_rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return v


def _parser() -> argparse.ArgumentParser:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "normkit"
    if prog in ("__main__.py", "-c", ""):
        prog = "python -m normkit"
    p = argparse.ArgumentParser(prog=prog, description="normkit command line tools")
    sub = p.add_subparsers(dest="command", metavar="{demo,info,bench}")
    sub.required = True
    from normkit._demo import DEFAULT_LR, DEFAULT_OUT, DEFAULT_STEPS

    d = sub.add_parser(
        "demo",
        help="the BatchNorm paper's Figure 1 experiment on scikit-learn's digits (the main job)",
        description="Train a 3x100 sigmoid network with and without normkit.BatchNorm (same "
        "seed, same learning rate) on scikit-learn's bundled digits; print test accuracy over "
        "training, save a figure, then compare inference with running averages, recomputed "
        "statistics and BatchNorm folded into the dense layers. Needs the 'demo' extra: "
        'pip install "normkit[demo]".',
    )
    d.add_argument("--steps", type=_non_negative, default=DEFAULT_STEPS, metavar="N",
                   help=f"SGD steps per network (default: {DEFAULT_STEPS})")
    d.add_argument("--lr", type=_learning_rate, default=DEFAULT_LR, metavar="LR",
                   help=f"SGD learning rate, the same for both networks (default: {DEFAULT_LR})")
    d.add_argument("--seed", type=_non_negative, default=0, metavar="S",
                   help="seed for the data split, the initial weights and the batches (default: 0)")
    d.add_argument("--out", default=DEFAULT_OUT, metavar="PATH",
                   help=f"where to write the PNG figure (default: {DEFAULT_OUT})")
    sub.add_parser("info", help="print build information, the CPU model and vendor, numpy "
                   "version and thread count")
    b = sub.add_parser(
        "bench",
        help="time normkit against plain NumPy and PyTorch (if installed)",
        description="Time normkit's forward and backward kernels against a plain NumPy "
        "reference and, when torch imports, PyTorch's CPU kernels; each result is checked "
        "before it is timed. Prints a table; never asserts on timings.",
    )
    from normkit._bench import WORKLOADS

    quick = ", ".join(w.name for w in WORKLOADS if w.quick)
    b.add_argument("--quick", action="store_true",
                   help=f"only the {sum(w.quick for w in WORKLOADS)} workloads {quick} "
                   "(a few minutes)")
    b.add_argument("--threads", type=_threads, default=[1, 2], metavar="LIST",
                   help="comma-separated thread counts (default: 1,2)")
    b.add_argument("--json", metavar="PATH", help="also write every row to PATH as JSON")
    b.add_argument("--repeats", type=_positive, metavar="N",
                   help="at most N timed repeats per contender (default: 15 quick, 20 full)")
    b.add_argument("--only", metavar="NAMES",
                   help="comma-separated workload names (see --list); overrides --quick")
    b.add_argument("--list", action="store_true", help="list the workloads and exit")
    b.add_argument("--no-torch", action="store_true", help="do not import torch")
    b.add_argument("--isa", metavar="LEVELS",
                   help="time each instruction-set level of the kernels side by side: 'all' "
                   "(every level this CPU and build support) or a comma-separated list of "
                   "baseline, avx2, avx512. Each level runs in its own process with NORMKIT_ISA "
                   "set, one after another; a combined table follows their own tables")
    return p


def _info() -> int:
    import numpy as np

    import normkit

    from normkit._bench import cpu_info

    info = dict(normkit.build_info())
    if not info.get("cuda_available"):
        info["cuda_unavailable_because"] = normkit.cuda.unavailable_reason()
    info.update(cpu_info())
    info["numpy"] = np.__version__
    info["num_threads"] = normkit.get_num_threads()
    width = max(len(str(k)) for k in info) + 1
    for key, value in info.items():
        print(f"{str(key) + ':':<{width}} {value}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m normkit`` and of the ``normkit`` script."""
    args = _parser().parse_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "demo":
        from normkit import _demo

        return _demo.run(steps=args.steps, lr=args.lr, seed=args.seed, out=args.out)
    from normkit import _bench

    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    if args.isa and not args.list:
        try:
            isas = _bench.parse_isas(args.isa)
        except ValueError as e:
            print(f"--isa: {e}", file=sys.stderr)
            return 2
        child = ["--threads", ",".join(str(t) for t in args.threads)]
        child += ["--quick"] if args.quick else []
        child += ["--repeats", str(args.repeats)] if args.repeats else []
        child += ["--only", args.only] if args.only else []
        child += ["--no-torch"] if args.no_torch else []
        return _bench.run_isas(isas, child, json_path=args.json)
    return _bench.run(
        quick=args.quick,
        threads=args.threads,
        json_path=args.json,
        repeats=args.repeats,
        only=only,
        no_torch=args.no_torch,
        list_only=args.list,
    )


if __name__ == "__main__":
    sys.exit(main())
