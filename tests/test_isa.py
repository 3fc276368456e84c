"""Run-time instruction-set dispatch: every compiled version (baseline, AVX2, AVX-512, as far as
this CPU supports them) gives bitwise the same results, so the versions that the default run does
not select are exercised too. Each version runs in its own process (NORMKIT_ISA is read once)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

nk = pytest.importorskip("normkit")

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import normkit as nk
    try:
        import ml_dtypes
        dtypes = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
    except ImportError:
        dtypes = [np.float32, np.float64, np.float16]
    rng = np.random.default_rng(5)
    out = {}
    for dt in dtypes:
        name = np.dtype(dt).name
        x4 = (rng.standard_normal((5, 12, 9, 13)) * 3 + 7).astype(dt)   # planes of 117 (> 64)
        x3 = (rng.standard_normal((33, 10, 7)) - 2).astype(dt)          # planes of 7 (rows)
        xl = np.ascontiguousarray(x4.transpose(0, 2, 3, 1))              # channels-last
        xr = (rng.standard_normal((37, 301)) + 100).astype(dt)           # rows with a tail
        for tag, x, ca in (("p", x4, 1), ("r", x3, 1), ("l", xl, -1)):
            C = x.shape[ca]
            w = np.linspace(0.5, 1.5, C)
            b = np.linspace(-1, 1, C)
            dy = np.cos(x.astype(np.float64)).astype(dt)
            o = nk.batch_norm(x, w, b, channel_axis=ca)
            g = nk.batch_norm_backward(dy, x, o.mean, o.rstd, w, channel_axis=ca)
            out.update({f"bn_{tag}_{name}_{i}": a for i, a in enumerate((*o, *g))})
            o = nk.group_norm(x, 2, w, b, channel_axis=ca)
            g = nk.group_norm_backward(dy, x, o.mean, o.rstd, w, channel_axis=ca)
            out.update({f"gn_{tag}_{name}_{i}": a for i, a in enumerate((*o, *g))})
            for act in ("relu", "silu"):  # fused activations (exp's polynomial on blocks)
                o = nk.batch_norm(x * 8, w, b, channel_axis=ca, activation=act)
                g = nk.batch_norm_backward(dy, x * 8, o.mean, o.rstd, w, channel_axis=ca,
                                           bias=b, activation=act)
                out.update({f"bn_{act}_{tag}_{name}_{i}": a for i, a in enumerate((*o, *g))})
                o = nk.group_norm(x, 2, w, b, channel_axis=ca, activation=act)
                g = nk.group_norm_backward(dy, x, o.mean, o.rstd, w, channel_axis=ca, bias=b,
                                           activation=act)
                out.update({f"gn_{act}_{tag}_{name}_{i}": a for i, a in enumerate((*o, *g))})
        w = np.linspace(0.5, 1.5, xr.shape[1])
        dy = np.sin(xr.astype(np.float64)).astype(dt)
        o = nk.layer_norm(xr, xr.shape[1], w, w)
        g = nk.layer_norm_backward(dy, xr, o.mean, o.rstd, w)
        out.update({f"ln_{name}_{i}": a for i, a in enumerate((*o, *g))})
        o = nk.rms_norm(xr, xr.shape[1], w)
        g = nk.rms_norm_backward(dy, xr, o.rstd, w)
        out.update({f"rms_{name}_{i}": a for i, a in enumerate((o.y, o.rstd, g.dx, g.dweight))})
    arrays = {k: np.ascontiguousarray(v).view(np.uint8) for k, v in out.items()}
    np.savez(sys.argv[1], simd=np.array(nk.build_info()["simd"]), **arrays)
    """
)


def _run(isa, path):
    env = dict(os.environ)
    if isa is None:
        env.pop("NORMKIT_ISA", None)
    else:
        env["NORMKIT_ISA"] = isa
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True, timeout=120)
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_every_instruction_set_gives_the_same_bits(tmp_path):
    ref = _run(None, tmp_path / "best.npz")
    best = str(ref.pop("simd"))
    assert best == nk.build_info()["simd"]
    ran = [best]
    for isa in ("baseline", "avx2", "avx512"):
        if isa == best:
            continue
        got = _run(isa, tmp_path / f"{isa}.npz")
        simd = str(got.pop("simd"))
        if simd != isa:  # not supported here (or not compiled): the best supported one ran
            continue
        ran.append(isa)
        assert got.keys() == ref.keys()
        for k in ref:
            assert np.array_equal(got[k], ref[k]), f"{isa} differs from {best} in {k}"
    compiled = nk.build_info()["simd_compiled"].split(",")
    assert "baseline" in ran or compiled == [best]
