"""Command line: ``python -m normkit info`` and ``python -m normkit bench``.

``info`` prints how normkit was built; ``bench`` times normkit against a plain
NumPy reference and, when ``import torch`` works, PyTorch's CPU kernels (see
``normkit._bench``, imported only for that command).
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


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _parser() -> argparse.ArgumentParser:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "normkit"
    if prog in ("__main__.py", "-c", ""):
        prog = "python -m normkit"
    p = argparse.ArgumentParser(prog=prog, description="normkit command line tools")
    sub = p.add_subparsers(dest="command", metavar="{info,bench}")
    sub.required = True
    sub.add_parser("info", help="print build information, numpy version and thread count")
    b = sub.add_parser(
        "bench",
        help="time normkit against plain NumPy and PyTorch (if installed)",
        description="Time normkit's forward and backward kernels against a plain NumPy "
        "reference and, when torch imports, PyTorch's CPU kernels; each result is checked "
        "before it is timed. Prints a table; never asserts on timings.",
    )
    b.add_argument("--quick", action="store_true",
                   help="only bn_train_56 and ln_1k (about a minute)")
    b.add_argument("--threads", type=_threads, default=[1, 2], metavar="LIST",
                   help="comma-separated thread counts (default: 1,2)")
    b.add_argument("--json", metavar="PATH", help="also write every row to PATH as JSON")
    b.add_argument("--repeats", type=_positive, metavar="N",
                   help="at most N timed repeats per contender (default: 15 quick, 20 full)")
    b.add_argument("--only", metavar="NAMES",
                   help="comma-separated workload names (see --list); overrides --quick")
    b.add_argument("--list", action="store_true", help="list the workloads and exit")
    b.add_argument("--no-torch", action="store_true", help="do not import torch")
    return p


def _info() -> int:
    import numpy as np

    import normkit

    info = dict(normkit.build_info())
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
    from normkit import _bench

    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
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
