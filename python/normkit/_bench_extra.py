"""Benchmarks beyond the kernel table of ``normkit._bench``: the fused residual add + norm and
the fused norm + activation (BatchNorm + ReLU, GroupNorm + SiLU) against PyTorch's eager pairs,
and the scikit-learn ``Standardizer`` against ``StandardScaler``.

Run by ``python -m normkit bench`` (full run, or
``--only add_layer_norm,add_rms_norm,bn_relu,gn_silu,standardize``)
after the kernel table. Same method as the table: every contender is checked against a plain
reference first, then timed interleaved (A B C A B C ...), medians reported; outputs are
preallocated where the API allows it. Never asserts on time.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Sequence

import numpy as np

EXTRA_NAMES = ("add_layer_norm", "add_rms_norm", "bn_relu", "gn_silu", "masked_bn", "standardize")
# masked BatchNorm against the unmasked call on the same data (training forward + backward):
# (shape, channel_axis); 80 % of the positions kept, a padding-like random mask
MASKED_SHAPES = (((32, 64, 56, 56), 1), ((32, 56, 56, 64), -1), ((64, 256, 512), 1),
                 ((4096, 1024), 1))
# name: (functional, shape, num_groups or None, activation); BENCH.md's BatchNorm and GroupNorm
# shapes, float32, training-mode forward.
ACT_CASES = {"bn_relu": ("batch_norm", (32, 64, 56, 56), None, "relu"),
             "gn_silu": ("group_norm", (32, 256, 28, 28), 32, "silu")}
FUSED_SHAPES = (((8192, 1024), 1024), ((4096, 4096), 4096), ((512, 768), 768))
STANDARDIZE_SHAPE = (1_000_000, 100)


def _interleaved(fns: Dict[str, Callable[[], object]], reps: int) -> Dict[str, float]:
    for f in fns.values():  # warm-up
        f()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _numpy_add_norm(x, r, w, b, center: bool, eps: float):
    h = x + r
    hf = h.astype(np.float64)
    if center:
        hf = hf - hf.mean(axis=-1, keepdims=True)
    y = hf / np.sqrt((hf * hf).mean(axis=-1, keepdims=True) + eps) * w
    if center:
        y = y + b
    return y.astype(x.dtype), h


def fused_rows(nk, torch, name: str, threads: Sequence[int], reps: int,
               copy_bw: Dict[int, float]) -> List[dict]:
    """``nk.add_layer_norm``/``add_rms_norm`` (out=, h_out=) against torch.add(out=) then the
    norm, and NumPy. Byte model: read x and residual, write h and y (4 n sizeof)."""
    rng = np.random.default_rng(1234)
    center = name == "add_layer_norm"
    rows = []
    for shape, n in FUSED_SHAPES:
        x = rng.standard_normal(shape).astype(np.float32)
        r = rng.standard_normal(shape).astype(np.float32)
        w = (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)
        b = (0.1 * rng.standard_normal(n)).astype(np.float32)
        y, h = np.empty_like(x), np.empty_like(x)
        wb = (w, b) if center else (w,)
        fused = getattr(nk, name)
        want_y, want_h = _numpy_add_norm(x, r, w, b, center, 1e-5)
        fused(x, r, n, *wb, eps=1e-5, out=y, h_out=h)
        if not np.array_equal(h, want_h) or np.abs(y - want_y).max() > 1e-4:
            raise AssertionError(f"{name} {shape}: wrong result, not timed")
        for nt in threads:
            nk.set_num_threads(nt)
            fns = {"normkit": lambda: fused(x, r, n, *wb, eps=1e-5, out=y, h_out=h),
                   "numpy": lambda: _numpy_add_norm(x, r, w, b, center, 1e-5)}
            if torch is not None:
                torch.set_num_threads(nt)
                tx, tr, th = torch.from_numpy(x), torch.from_numpy(r), torch.empty(shape)
                tw, tb = torch.from_numpy(w), torch.from_numpy(b)

                def run_torch():
                    torch.add(tx, tr, out=th)
                    if center:
                        return torch.nn.functional.layer_norm(th, (n,), tw, tb, 1e-5)
                    return torch.nn.functional.rms_norm(th, (n,), tw, 1e-5)

                if np.abs(run_torch().numpy() - want_y).max() > 1e-4:
                    raise AssertionError(f"torch {name} {shape}: unexpected result")
                fns["torch"] = run_torch
            rows.append(_pair_row(name, shape, nt, _interleaved(fns, reps), 4 * x.nbytes, copy_bw))
    return rows


def _pair_row(name, shape, nt, med, nbytes, copy_bw) -> dict:
    """A table row against PyTorch's eager pair; ``nbytes`` is the byte model's traffic."""
    gbps = nbytes / med["normkit"] / 1e9
    return {"name": name, "shape": shape, "threads": nt, "normkit_ms": med["normkit"] * 1e3,
            "other": "torch eager pair", "other_ms": med.get("torch", float("nan")) * 1e3,
            "numpy_ms": med["numpy"] * 1e3, "gbps": gbps,
            "pct_copy": 100 * gbps / copy_bw[nt] if nt in copy_bw else None}


def _numpy_norm_act(x, groups, act: str, w, b, eps=1e-5):
    """Training-mode BatchNorm (groups None) or GroupNorm, then the activation, in float64."""
    xf = x.astype(np.float64)
    N, C = x.shape[:2]
    v = xf.reshape(N, groups, -1) if groups else xf.transpose(1, 0, 2, 3).reshape(C, -1)
    z = (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + eps)
    z = z.reshape(x.shape) if groups else z.reshape(C, N, *x.shape[2:]).transpose(1, 0, 2, 3)
    z = z * w.reshape(1, C, 1, 1) + b.reshape(1, C, 1, 1)
    y = np.maximum(z, 0.0) if act == "relu" else z / (1.0 + np.exp(-z))
    return y.astype(x.dtype)


def fused_act_rows(nk, torch, name: str, threads: Sequence[int], reps: int,
                   copy_bw: Dict[int, float]) -> List[dict]:
    """``nk.batch_norm``/``group_norm`` with ``activation=`` (out=) against PyTorch's eager
    norm followed by its in-place activation (``relu_``/``silu`` with inplace=True), and NumPy.
    Byte model: read x once, write y (2 n sizeof), the least any implementation must move."""
    fn, shape, groups, act = ACT_CASES[name]
    rng = np.random.default_rng(1234)
    x = rng.standard_normal(shape).astype(np.float32)
    C = shape[1]
    w = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
    b = (0.1 * rng.standard_normal(C)).astype(np.float32)
    y = np.empty_like(x)
    norm = getattr(nk, fn)
    gargs = (groups,) if groups else ()
    want = _numpy_norm_act(x, groups, act, w, b)
    norm(x, *gargs, w, b, out=y, activation=act)
    if np.abs(y - want).max() > 1e-4:
        raise AssertionError(f"{name}: wrong result, not timed")
    rows = []
    for nt in threads:
        nk.set_num_threads(nt)
        fns = {"normkit": lambda: norm(x, *gargs, w, b, out=y, activation=act),
               "numpy": lambda: _numpy_norm_act(x, groups, act, w, b)}
        if torch is not None:
            torch.set_num_threads(nt)
            F = torch.nn.functional
            tx, tw, tb = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)

            def run_torch():
                with torch.no_grad():
                    if groups:
                        z = F.group_norm(tx, groups, tw, tb, 1e-5)
                    else:
                        z = F.batch_norm(tx, None, None, tw, tb, True, 0.1, 1e-5)
                    return torch.relu_(z) if act == "relu" else F.silu(z, inplace=True)

            if np.abs(run_torch().numpy() - want).max() > 1e-4:
                raise AssertionError(f"torch {name}: unexpected result")
            fns["torch"] = run_torch
        rows.append(_pair_row(name, shape, nt, _interleaved(fns, reps), 2 * x.nbytes, copy_bw))
    return rows


def masked_rows(nk, threads: Sequence[int], reps: int) -> List[dict]:
    """``batch_norm(mask=)`` and its backward against the same calls without a mask, float32,
    interleaved in one process ("other" is the unmasked call). The mask is checked first:
    the masked statistics must match NumPy's over the kept positions."""
    rng = np.random.default_rng(1234)
    rows = []
    for shape, ca in MASKED_SHAPES:
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        spatial = shape[2:] if ca == 1 else shape[1:-1]
        mask = rng.random((shape[0], *spatial)) < 0.8
        y = np.empty_like(x)
        o = nk.batch_norm(x, channel_axis=ca, mask=mask)
        kept = np.moveaxis(x, ca, -1)[mask].astype(np.float64)
        if np.abs(o.mean - kept.mean(axis=0)).max() > 1e-5:
            raise AssertionError(f"masked_bn {shape}: wrong statistics, not timed")
        op = nk.batch_norm(x, channel_axis=ca)
        for nt in threads:
            nk.set_num_threads(nt)
            for d in ("fwd", "bwd"):
                if d == "fwd":
                    fns = {"normkit": lambda: nk.batch_norm(x, channel_axis=ca, out=y, mask=mask),
                           "plain": lambda: nk.batch_norm(x, channel_axis=ca, out=y)}
                else:
                    fns = {"normkit": lambda: nk.batch_norm_backward(
                               dy, x, o.mean, o.rstd, channel_axis=ca, mask=mask),
                           "plain": lambda: nk.batch_norm_backward(dy, x, op.mean, op.rstd,
                                                                   channel_axis=ca)}
                med = _interleaved(fns, reps)
                rows.append({"name": f"masked_bn {d}", "shape": shape, "threads": nt,
                             "normkit_ms": med["normkit"] * 1e3, "other": "unmasked batch_norm",
                             "other_ms": med["plain"] * 1e3, "numpy_ms": None, "gbps": None,
                             "pct_copy": None})
    return rows


def standardize_rows(nk, threads: Sequence[int], reps: int) -> List[dict]:
    """``normkit.sklearn.Standardizer`` fit + transform against scikit-learn's StandardScaler
    on (1,000,000, 100) float32 (scikit-learn's own threads follow the thread count too)."""
    try:
        from sklearn.preprocessing import StandardScaler

        from normkit.sklearn import Standardizer
    except ImportError:
        return []
    rng = np.random.default_rng(1234)
    X = (1e4 + rng.standard_normal(STANDARDIZE_SHAPE)).astype(np.float32)
    want = (X.astype(np.float64) - X.astype(np.float64).mean(0)) / X.astype(np.float64).std(0)
    rows = []
    for nt in threads:
        nk.set_num_threads(nt)
        ours = Standardizer().fit(X).transform(X)
        theirs = StandardScaler().fit(X).transform(X)
        err_ours = float(np.abs(ours - want).max())
        err_theirs = float(np.abs(theirs - want).max())
        med = _interleaved({"normkit": lambda: Standardizer().fit(X).transform(X),
                            "sklearn": lambda: StandardScaler().fit(X).transform(X)}, reps)
        rows.append({"name": "standardize", "shape": STANDARDIZE_SHAPE, "threads": nt,
                     "normkit_ms": med["normkit"] * 1e3, "other": "sklearn StandardScaler",
                     "other_ms": med["sklearn"] * 1e3, "numpy_ms": None, "gbps": None,
                     "pct_copy": None, "max_error": err_ours, "other_max_error": err_theirs})
    return rows


def run_extra(nk, torch, names: Sequence[str], threads: Sequence[int], copy_bw, out,
              reps: int = 7) -> List[dict]:
    threads0 = nk.get_num_threads()
    rows: List[dict] = []
    try:
        for name in names:
            if name == "standardize":
                rows += standardize_rows(nk, threads, max(3, reps // 2))
            elif name == "masked_bn":
                rows += masked_rows(nk, threads, reps)
            elif name in ACT_CASES:
                rows += fused_act_rows(nk, torch, name, threads, reps, copy_bw)
            else:
                rows += fused_rows(nk, torch, name, threads, reps, copy_bw)
    finally:
        nk.set_num_threads(threads0)
        if torch is not None:
            torch.set_num_threads(threads0)
    if rows:
        print("\nfused residual add + norm (byte model: read x and residual, write h and y), "
              "fused norm + activation (read x, write y) and the scikit-learn Standardizer "
              "(fit + transform):", file=out)
        print(f"{'workload':<16} {'shape':>16} {'thr':>3} {'normkit ms':>10} {'other ms':>9} "
              f"{'vs other':>8} {'numpy ms':>9} {'vs numpy':>8} {'% copy':>6}  other", file=out)
        for r in rows:
            vo = r["other_ms"] / r["normkit_ms"] if r["other_ms"] == r["other_ms"] else None
            vn = r["numpy_ms"] / r["normkit_ms"] if r["numpy_ms"] else None
            vs_other = f"{vo:.2f}x" if vo else "-"
            numpy_ms = f"{r['numpy_ms']:.2f}" if vn else "-"
            vs_numpy = f"{vn:.1f}x" if vn else "-"
            pct = f"{r['pct_copy']:.0f}%" if r["pct_copy"] else "-"
            print(f"{r['name']:<16} {str(r['shape']):>16} {r['threads']:>3} "
                  f"{r['normkit_ms']:10.2f} {r['other_ms']:9.2f} {vs_other:>8} {numpy_ms:>9} "
                  f"{vs_numpy:>8} {pct:>6}  {r['other']}", file=out)
            if "max_error" in r:
                print(f"{'':<16} float32 data at mean 1e4: max error vs float64 two-pass "
                      f"{r['max_error']:.2g} (StandardScaler {r['other_max_error']:.2g})", file=out)
    return rows
