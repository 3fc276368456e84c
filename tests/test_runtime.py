"""SPEC section 5: nk.build_info(), nk.set_num_threads / nk.get_num_threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import os
import subprocess
import sys

import numpy as np
import pytest

nk = pytest.importorskip("normkit")


def test_build_info_keys_and_types():
    info = nk.build_info()
    assert isinstance(info, dict)
    for key in ("version", "compiler", "simd", "threading", "cuda_compiled", "cuda_available"):
        assert key in info, f"build_info() lacks {key!r}"
    for key in ("version", "compiler", "simd", "threading"):
        assert isinstance(info[key], str) and info[key], f"build_info()[{key!r}] = {info[key]!r}"
    assert isinstance(info["cuda_compiled"], bool)
    assert isinstance(info["cuda_available"], bool)
    assert info["cuda_compiled"] or not info["cuda_available"], "CUDA usable but not compiled in"


def test_build_info_version_matches_package():
    info = nk.build_info()
    if hasattr(nk, "__version__"):
        assert info["version"] == nk.__version__
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return
    try:
        assert info["version"] == version("normkit")
    except PackageNotFoundError:
        pass


def test_build_info_returns_a_fresh_dict():
    a = nk.build_info()
    a["version"] = "changed"
    assert nk.build_info()["version"] != "changed"


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16])
def test_set_get_round_trip(n, restore_num_threads):
    nk.set_num_threads(n)
    assert nk.get_num_threads() == n


def test_set_num_threads_accepts_numpy_integers(restore_num_threads):
    nk.set_num_threads(np.int64(3))
    assert nk.get_num_threads() == 3
    assert isinstance(nk.get_num_threads(), int)


@pytest.mark.parametrize("bad", [0, -1, -64])
def test_set_num_threads_rejects_non_positive(bad, restore_num_threads):
    nk.set_num_threads(2)
    with pytest.raises(ValueError, match=r"set_num_threads"):
        nk.set_num_threads(bad)
    assert nk.get_num_threads() == 2, "a rejected value must not change the thread count"


def test_thread_count_does_not_change_results(restore_num_threads):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 70)).astype(np.float32)
    nk.set_num_threads(1)
    a = nk.layer_norm(x, (70,)).y
    nk.set_num_threads(4)
    b = nk.layer_norm(x, (70,)).y
    assert a.tobytes() == b.tobytes()


def test_default_uses_every_core():
    """A fresh interpreter starts with one thread per available core."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
    code = "import normkit as nk; print(nk.get_num_threads())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    n = int(res.stdout.strip())
    allowed = {os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        allowed.add(len(os.sched_getaffinity(0)))
    assert n in allowed, f"default thread count {n}, cores {allowed}"


def _mixed_jobs():
    """One job per (op, layout, seed): every SPEC function, forward and backward."""
    rng = np.random.default_rng(7)
    jobs = []
    for seed in range(3):
        x4 = rng.standard_normal((6, 16, 9, 11)).astype(np.float32) + seed
        xr = rng.standard_normal((37, 300)).astype(np.float32) - seed
        jobs += [("group_norm", x4, 1), ("group_norm", np.ascontiguousarray(x4.transpose(0, 2, 3, 1)), -1),
                 ("instance_norm", x4, 1), ("rms_norm", xr, None), ("batch_norm", x4, -1),
                 ("layer_norm", xr, None)]
    return jobs


def _run_job(job):
    op, x, ca = job
    dy = np.cos(x).astype(x.dtype)
    if op in ("layer_norm", "rms_norm"):
        w = np.linspace(0.5, 1.5, x.shape[-1]).astype(np.float32)
        if op == "layer_norm":
            o = nk.layer_norm(x, x.shape[-1], w)
            g = nk.layer_norm_backward(dy, x, o.mean, o.rstd, w)
        else:
            o = nk.rms_norm(x, x.shape[-1], w)
            g = nk.rms_norm_backward(dy, x, o.rstd, w)
        return [a for a in (*o, *g) if a is not None]
    w = np.linspace(0.5, 1.5, x.shape[ca]).astype(np.float32)
    if op == "group_norm":
        o = nk.group_norm(x, 4, w, channel_axis=ca)
        g = nk.group_norm_backward(dy, x, o.mean, o.rstd, w, channel_axis=ca)
    elif op == "instance_norm":
        o = nk.instance_norm(x, w, channel_axis=ca)
        g = nk.instance_norm_backward(dy, x, o.mean, o.rstd, w, channel_axis=ca)
    else:
        o = nk.batch_norm(x, w, channel_axis=ca)
        g = nk.batch_norm_backward(dy, x, o.mean, o.rstd, w, channel_axis=ca)
    return [*o, *g]


def test_every_function_concurrently_from_8_python_threads():
    jobs = _mixed_jobs()
    serial = [_run_job(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(2):
            for s, c in zip(serial, pool.map(_run_job, jobs)):
                for a, b in zip(s, c):
                    assert a.dtype == b.dtype and a.shape == b.shape
                    assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
