"""MPI side of tests/test_distributed.py: run under ``mpirun -n K python tests/mpi_worker.py``.

Every rank builds the same global batch from a fixed seed, keeps its own shard (sizes differ per
rank, zero included), and checks normkit.distributed against

* single-process ``normkit.batch_norm`` / ``batch_norm_backward`` / ``BatchNorm`` on the whole
  (concatenated) batch, itself tested against the float64 reference elsewhere, and
* the float64 reference (``tests/reference.py``) directly, for float32 and float64.

Rank 0 prints one line per scenario, ``SCENARIO <name> OK <checks>`` or ``SCENARIO <name> FAIL``
followed by the failures of every rank, and ``DIGEST <hex>``: a hash of every rank's outputs of
a fixed case, which must not change from run to run or with the thread count. The exit status
is 1 if any check failed on any rank. An unexpected exception aborts every rank at once
(``MPI.COMM_WORLD.Abort``) rather than leaving the others waiting in a collective.

    mpirun -n 4 python tests/mpi_worker.py [--threads N] [scenario ...]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import traceback

import numpy as np
from mpi4py import MPI

import normkit as nk
from normkit.distributed import SyncBatchNorm, sync_batch_norm, sync_batch_norm_backward

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402  (tests/reference.py: float64 NumPy, no normkit)

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - depends on the environment
    ml_dtypes = None

WORLD = MPI.COMM_WORLD
DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16)]
if ml_dtypes is not None:
    DTYPES.append(np.dtype(ml_dtypes.bfloat16))


class Checks:
    """Failures of this rank, and how many checks ran."""

    def __init__(self):
        self.failures = []
        self.count = 0

    def true(self, ok, what):
        self.count += 1
        if not ok:
            self.failures.append(f"rank {WORLD.rank}: {what}")

    def close(self, actual, expected, tol, what):
        """|actual - expected| <= tol * (1 + |expected|), NaN where expected is NaN."""
        a = np.asarray(actual).astype(np.float64)
        e = np.asarray(expected).astype(np.float64)
        if a.shape != e.shape:
            self.true(False, f"{what}: shape {a.shape} != {e.shape}")
            return
        with np.errstate(invalid="ignore"):
            err = np.abs(a - e) - tol * (1.0 + np.abs(e))
        bad = ~((err <= 0) | (np.isnan(a) & np.isnan(e)))
        detail = ""
        if bad.any():
            i = np.unravel_index(np.argmax(np.where(bad, np.abs(a - e), -1)), a.shape)
            detail = f"{what}: {int(bad.sum())} values off, worst at {i}: {a[i]!r} vs {e[i]!r} (tol {tol:g})"
        self.true(not bad.any(), detail)

    def same_bits(self, a, b, what):
        a, b = np.asarray(a), np.asarray(b)
        self.true(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(),
                  f"{what}: not bitwise identical")

    def same_on_all_ranks(self, a, what, comm=WORLD):
        """a is bitwise identical on every rank of comm."""
        blobs = comm.allgather(np.ascontiguousarray(a).tobytes())
        self.true(all(b == blobs[0] for b in blobs), f"{what}: differs between ranks")


def tolerance(dt, cond=1.0):
    """Per-dtype relative tolerance. cond = |mean| / spread of the data: float64 statistics
    that differ by round-off (~1e-16 relative) move xhat by ~1e-16 * cond."""
    dt = np.dtype(dt)
    if dt == np.float64:
        return 1e-12 + 1e-15 * cond
    if dt == np.float32:
        return 1e-5 + 1e-15 * cond
    eps = float(ml_dtypes.finfo(dt).eps) if dt.name == "bfloat16" else float(np.finfo(dt).eps)
    return 2 * eps * cond


def layout(ncs, ca):
    return ncs if ca == 1 else (ncs[0], *ncs[2:], ncs[1])


def shard_bounds(sizes, rank):
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def size_patterns(k):
    """Per-rank batch sizes: even; uneven with an empty rank; everything on one rank."""
    uneven = [(2 * r + 1) % 5 for r in range(k)]
    uneven[k // 2] = 0
    if sum(uneven) < 2:
        uneven[0] += 2
    lone = [0] * k
    lone[k - 1] = 5
    return {"even": [3] * k, "uneven": uneven, "one_rank": lone}


def make_case(seed, sizes, ncs_rest, dt, ca, loc, spread, affine, rank=None):
    """The global batch (x, dy), the parameters, and this rank's shard bounds."""
    rng = np.random.default_rng(seed)
    shape = layout((sum(sizes), *ncs_rest), ca)
    x = (loc + spread * rng.standard_normal(shape)).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    C = ncs_rest[0]
    sd = np.float64 if dt == np.float64 else np.float32
    w = (1 + 0.3 * rng.standard_normal(C)).astype(sd) if "w" in affine else None
    b = rng.standard_normal(C).astype(sd) if "b" in affine else None
    rm = rng.standard_normal(C).astype(sd)
    rv = (0.5 + rng.random(C)).astype(sd)
    return x, dy, w, b, rm, rv, shard_bounds(sizes, WORLD.rank if rank is None else rank)


# --------------------------------------------------------------------------------------------
# scenarios


def scenario_results(ck: Checks, comm=WORLD, seed0=0):
    """sync_batch_norm / _backward against the whole-batch computation, many configurations."""
    case = 0
    for pattern, base_sizes in size_patterns(comm.size).items():
        for dt in DTYPES:
            for ca in (1, -1):
                for ncs_rest, loc, spread in (((3, 4, 5), 0.5, 2.0), ((4,), 1000.0, 0.01)):
                    case += 1
                    affine = ("wb", "w", "b", "")[case % 4]
                    check_case(ck, comm, f"{pattern} {dt.name} ca={ca} {ncs_rest} {affine or 'none'}",
                               seed0 + case, base_sizes, ncs_rest, dt, ca, loc, spread, affine)


def check_case(ck, comm, name, seed, sizes, ncs_rest, dt, ca, loc, spread, affine):
    x, dy, w, b, rm, rv, (lo, hi) = make_case(seed, sizes, ncs_rest, dt, ca, loc, spread, affine,
                                              comm.rank)
    cond = abs(loc) / spread
    tol = tolerance(dt, cond)
    sd = np.dtype(np.float64 if dt == np.float64 else np.float32)
    stat_tol = tolerance(sd, cond)
    # dx = rstd * w * (dy - c2 - xhat * c1): means that differ by round-off (1e-16 |loc|) move
    # xhat by that times rstd, so dx by about rstd**2 times it (rstd ~ 1 / spread)
    dx_tol = tol + 1e-15 * abs(loc) / spread**2
    # the whole batch in one process
    rm1, rv1 = rm.copy(), rv.copy()
    whole = nk.batch_norm(x, w, b, running_mean=rm1, running_var=rv1, channel_axis=ca)
    whole_g = nk.batch_norm_backward(dy, x, whole.mean, whole.rstd, w, channel_axis=ca)
    # this rank's shard
    xs, dys = x[lo:hi], dy[lo:hi]
    rm2, rv2 = rm.copy(), rv.copy()
    got = sync_batch_norm(xs, w, b, running_mean=rm2, running_var=rv2, channel_axis=ca, comm=comm)
    g = sync_batch_norm_backward(dys, xs, got.mean, got.rstd, w, channel_axis=ca, comm=comm)

    ck.true(got.y.dtype == dt and g.dx.dtype == dt, f"{name}: y/dx dtype {got.y.dtype}/{g.dx.dtype}")
    ck.true(got.mean.dtype == sd and g.dweight.dtype == sd and g.dbias.dtype == sd,
            f"{name}: statistics dtypes {got.mean.dtype}, {g.dweight.dtype}, {g.dbias.dtype}")
    for what, a, e, t in (
        ("y", got.y, whole.y[lo:hi], tol), ("mean", got.mean, whole.mean, stat_tol),
        ("rstd", got.rstd, whole.rstd, stat_tol), ("running_mean", rm2, rm1, stat_tol),
        ("running_var", rv2, rv1, stat_tol), ("dx", g.dx, whole_g.dx[lo:hi], dx_tol),
        ("dweight", g.dweight, whole_g.dweight, stat_tol * np.sqrt(x.size)),
        ("dbias", g.dbias, whole_g.dbias, stat_tol * np.sqrt(x.size)),
    ):
        ck.close(a, e, t, f"{name}: {what} vs single-process batch_norm")
    if dt in (np.float32, np.float64):  # the float64 reference, directly
        r = ref.batch_norm(x, w, b, rm, rv, channel_axis=ca)
        rg = ref.batch_norm_backward(dy, x, got.mean, got.rstd, w, channel_axis=ca)
        for what, a, e, t in (
            ("y", got.y, r.y[lo:hi], tol), ("mean", got.mean, r.mean, stat_tol),
            ("rstd", got.rstd, r.rstd, stat_tol), ("running_mean", rm2, r.running_mean, stat_tol),
            ("running_var", rv2, r.running_var, stat_tol), ("dx", g.dx, rg.dx[lo:hi], tol),
            ("dweight", g.dweight, rg.dweight, stat_tol * np.sqrt(x.size)),
            ("dbias", g.dbias, rg.dbias, stat_tol * np.sqrt(x.size)),
        ):
            ck.close(a, e, t, f"{name}: {what} vs float64 reference")
    for what, a in (("mean", got.mean), ("rstd", got.rstd), ("running_mean", rm2),
                    ("running_var", rv2), ("dweight", g.dweight), ("dbias", g.dbias)):
        ck.same_on_all_ranks(a, f"{name}: {what}", comm)
    # a second call gives the same bits
    rm3, rv3 = rm.copy(), rv.copy()
    again = sync_batch_norm(xs, w, b, running_mean=rm3, running_var=rv3, channel_axis=ca, comm=comm)
    g2 = sync_batch_norm_backward(dys, xs, again.mean, again.rstd, w, channel_axis=ca, comm=comm)
    for what, a, e in (("y", again.y, got.y), ("mean", again.mean, got.mean),
                       ("rstd", again.rstd, got.rstd), ("running_var", rv3, rv2),
                       ("dx", g2.dx, g.dx), ("dweight", g2.dweight, g.dweight)):
        ck.same_bits(a, e, f"{name}: repeated {what}")


def scenario_options(ck: Checks):
    """out= (in place), strided input, eval mode, backward with statistics held constant,
    spatial sizes that differ between ranks."""
    k, rank = WORLD.size, WORLD.rank
    sizes = size_patterns(k)["uneven"]
    x, dy, w, b, rm, rv, (lo, hi) = make_case(100, sizes, (3, 6, 4), np.float64, 1, 0.3, 1.5, "wb")
    whole = nk.batch_norm(x, w, b)
    # out=x, in place, on a copy of the shard
    xs = x[lo:hi].copy()
    got = sync_batch_norm(xs, w, b, out=xs)
    ck.true(got.y is xs, "out=x: y is not out")
    ck.close(xs, whole.y[lo:hi], 1e-12, "out=x: y")
    # a strided view of a larger array (every other spatial column)
    big = np.repeat(x, 2, axis=3)
    view = big[lo:hi, :, :, ::2]
    ck.close(sync_batch_norm(view, w, b).y, whole.y[lo:hi], 1e-12, "strided x: y")
    # eval mode: local, running statistics used
    ev = sync_batch_norm(x[lo:hi], w, b, running_mean=rm, running_var=rv, training=False)
    ck.close(ev.y, nk.batch_norm(x, w, b, running_mean=rm, running_var=rv, training=False).y[lo:hi], 0.0, "eval: y")
    # backward with the statistics held constant: dx local, dweight/dbias global
    whole_g = nk.batch_norm_backward(dy, x, rm, 1 / np.sqrt(rv + 1e-5), w, training=False)
    g = sync_batch_norm_backward(dy[lo:hi], x[lo:hi], rm, 1 / np.sqrt(rv + 1e-5), w, training=False)
    ck.close(g.dx, whole_g.dx[lo:hi], 1e-12, "training=False backward: dx")
    ck.close(g.dweight, whole_g.dweight, 1e-12, "training=False backward: dweight")
    ck.close(g.dbias, whole_g.dbias, 1e-12, "training=False backward: dbias")
    # ranks with different spatial sizes: the statistics of every value seen
    rng = np.random.default_rng(7)
    parts = [rng.standard_normal((2, 3, 2 + r)) for r in range(k)]
    flat = np.concatenate([p.transpose(1, 0, 2).reshape(3, -1) for p in parts], axis=1)
    got = sync_batch_norm(parts[rank])
    ck.close(got.mean, flat.mean(axis=1), 1e-12, "differing spatial sizes: mean")
    ck.close(got.rstd, 1 / np.sqrt(flat.var(axis=1) + 1e-5), 1e-12, "differing spatial sizes: rstd")


def scenario_layer(ck: Checks):
    """SyncBatchNorm against BatchNorm on the whole batch, over a few steps and both modes."""
    k, rank = WORLD.size, WORLD.rank
    for momentum, ca in ((0.1, 1), (None, -1)):
        sizes = size_patterns(k)["uneven"]
        single = nk.BatchNorm(3, momentum=momentum, channel_axis=ca, dtype=np.float64)
        sync = SyncBatchNorm(3, momentum=momentum, channel_axis=ca, dtype=np.float64)
        ck.true(sync.comm is WORLD, "SyncBatchNorm: comm=None is not COMM_WORLD")
        rng = np.random.default_rng(11)
        for step in range(3):
            w = 1 + 0.1 * rng.standard_normal(3)
            single.weight[...] = w
            sync.weight[...] = w
            x, dy, *_, (lo, hi) = make_case(200 + step, sizes, (3, 4), np.float64, ca, 2.0, 3.0, "")
            y1, y2 = single(x), sync(x[lo:hi])
            dx1, dx2 = single.backward(dy), sync.backward(dy[lo:hi])
            name = f"layer momentum={momentum} step {step}"
            ck.close(y2, y1[lo:hi], 1e-12, f"{name}: y")
            ck.close(dx2, dx1[lo:hi], 1e-12, f"{name}: dx")
            ck.close(sync.grad_weight, single.grad_weight, 1e-12, f"{name}: grad_weight")
            ck.close(sync.grad_bias, single.grad_bias, 1e-12, f"{name}: grad_bias")
            ck.close(sync.running_var, single.running_var, 1e-12, f"{name}: running_var")
            ck.true(sync.num_batches_tracked == single.num_batches_tracked == step + 1,
                    f"{name}: num_batches_tracked {sync.num_batches_tracked}")
            for key, value in sync.state_dict().items():
                ck.same_on_all_ranks(value, f"{name}: state_dict[{key!r}]")
        sync.eval()
        single.eval()
        x, dy, *_, (lo, hi) = make_case(300, sizes, (3, 4), np.float64, ca, 2.0, 3.0, "")
        ck.close(sync(x[lo:hi]), single(x)[lo:hi], 1e-12, f"eval layer momentum={momentum}: y")
        ck.close(sync.backward(dy[lo:hi]), single.backward(dy)[lo:hi], 1e-12, "eval layer: dx")
        ck.close(sync.grad_weight, single.grad_weight, 1e-12, "eval layer: grad_weight (global)")


def scenario_subcomm(ck: Checks):
    """comm= a sub-communicator: ranks split in two groups, each normalizing its own batch."""
    sub = WORLD.Split(WORLD.rank % 2, WORLD.rank)
    try:
        scenario_results(ck, comm=sub, seed0=1000 * (1 + WORLD.rank % 2))
    finally:
        sub.Free()


def expect_error(ck, name, call, exc_type, *fragments, check_after=None):
    """call() must raise exc_type on every rank, with the same message containing fragments."""
    message = None
    try:
        call()
        ck.true(False, f"{name}: no exception")
    except exc_type as e:
        message = str(e)
        for f in fragments:
            ck.true(f in message, f"{name}: {f!r} not in message {message!r}")
    except Exception as e:  # the wrong type
        ck.true(False, f"{name}: raised {type(e).__name__}({e}) instead of {exc_type.__name__}")
    messages = WORLD.allgather(message)
    ck.true(all(m == messages[0] for m in messages), f"{name}: messages differ between ranks: {messages}")
    if check_after is not None:
        check_after()
    # the ranks are still in step: a valid collective call works afterwards
    x = np.arange(6.0).reshape(3, 2) + WORLD.rank
    ck.true(np.isfinite(sync_batch_norm(x).y).all(), f"{name}: the next call failed")


def scenario_errors(ck: Checks):
    k, rank = WORLD.size, WORLD.rank
    last = k - 1
    x = np.random.default_rng(5).standard_normal((2, 3, 4))
    rm, rv = np.zeros(3), np.ones(3)

    def untouched():
        ck.true(np.array_equal(rm, np.zeros(3)) and np.array_equal(rv, np.ones(3)),
                "running statistics written despite the error")

    w_bad = np.ones(4 if rank == last else 3)
    expect_error(ck, "bad weight on the last rank",
                 lambda: sync_batch_norm(x, w_bad, None, running_mean=rm, running_var=rv), ValueError,
                 "sync_batch_norm: weight has shape (4,)", f"(raised on rank {last} of {k})",
                 check_after=untouched)
    xi = x.astype(np.int32) if rank == 0 else x
    expect_error(ck, "integer x on rank 0", lambda: sync_batch_norm(xi, None, None, running_mean=rm, running_var=rv),
                 TypeError, "unsupported dtype int32", f"(raised on rank 0 of {k})",
                 check_after=untouched)
    x1 = x[0, 0] if rank == last else x
    expect_error(ck, "1-D x on the last rank", lambda: sync_batch_norm(x1), ValueError,
                 "at least 2 dimensions", f"rank {last} of {k}")
    expect_error(ck, "every rank empty", lambda: sync_batch_norm(x[:0], None, None, running_mean=rm, running_var=rv),
                 ValueError, "empty reduction", check_after=untouched)
    one = x[:1, :, 0] if rank == 0 else x[:0, :, 0]
    expect_error(ck, "one value per channel over all ranks",
                 lambda: sync_batch_norm(one, None, None, running_mean=rm, running_var=rv), ValueError,
                 "expected more than 1 value per channel when training", check_after=untouched)
    dy_bad = x[:, :, :3] if rank == last else x
    expect_error(ck, "backward: bad dy on the last rank",
                 lambda: sync_batch_norm_backward(dy_bad, x, np.zeros(3), np.ones(3)),
                 ValueError, "dy has shape", f"rank {last} of {k}")
    expect_error(ck, "backward: every rank empty",
                 lambda: sync_batch_norm_backward(x[:0], x[:0], np.zeros(3), np.ones(3)),
                 ValueError, "empty reduction")
    layer = SyncBatchNorm(3, dtype=np.float64)
    xl = x[:, :2] if rank == last else x
    expect_error(ck, "layer: wrong channels on the last rank", lambda: layer(xl), ValueError,
                 f"rank {last} of {k}",
                 check_after=lambda: ck.true(layer.num_batches_tracked == 0
                                             and np.array_equal(layer.running_var, np.ones(3)),
                                             "layer state changed despite the error"))
    if k >= 2:
        xf = x.astype(np.float32) if rank == 1 else x
        expect_error(ck, "dtype differs between ranks", lambda: sync_batch_norm(xf), ValueError,
                     "every rank must pass the same dtype: rank 1 has float32 but rank 0 has float64")
        xc = x[:, :2] if rank == 1 else x
        expect_error(ck, "channels differ between ranks", lambda: sync_batch_norm(xc), ValueError,
                     "same number of channels: rank 1 has 2 but rank 0 has 3")
        eps = 1e-3 if rank == last else 1e-5
        expect_error(ck, "eps differs between ranks", lambda: sync_batch_norm(x, eps=eps),
                     ValueError, "every rank must pass the same eps")
        xr = x.astype(np.int64) if rank in (1, last) else x
        expect_error(ck, "two bad ranks: the lowest one's error", lambda: sync_batch_norm(xr),
                     TypeError, "unsupported dtype int64", f"(raised on rank 1 of {k})")
    expect_error(ck, "comm of the wrong type", lambda: sync_batch_norm(x, comm="world"),
                 TypeError, "comm must be an mpi4py intracommunicator")


def scenario_masked(ck: Checks):
    """mask= and sample_weight=: the weighted statistics of the global batch (uneven shards,
    an empty rank), against normkit.batch_norm on the whole batch with the whole mask."""
    k = WORLD.size
    sizes = size_patterns(k)["uneven"]
    for ca in (1, -1):
        x, dy, w, b, rm, rv, (lo, hi) = make_case(300, sizes, (3, 4, 5), np.float64, ca, 0.4, 1.3, "wb")
        rng = np.random.default_rng(301)
        spatial = (4, 5)
        mask = rng.random((x.shape[0], *spatial)) < 0.7
        mask[:, 0, 0] = True
        sw = rng.random(x.shape[0]) + 0.1
        for kw_all, kw_mine in (({"mask": mask}, {"mask": mask[lo:hi]}),
                                ({"mask": mask, "sample_weight": sw},
                                 {"mask": mask[lo:hi], "sample_weight": sw[lo:hi]})):
            rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
            whole = nk.batch_norm(x, w, b, running_mean=rm1, running_var=rv1, channel_axis=ca,
                                  **kw_all)
            got = sync_batch_norm(x[lo:hi], w, b, running_mean=rm2, running_var=rv2,
                                  channel_axis=ca, **kw_mine)
            what = f"masked ca={ca} {sorted(kw_all)}"
            ck.close(got.y, whole.y[lo:hi], 1e-11, f"{what}: y")
            ck.close(got.mean, whole.mean, 1e-12, f"{what}: mean")
            ck.close(got.rstd, whole.rstd, 1e-12, f"{what}: rstd")
            ck.close(rm2, rm1, 1e-12, f"{what}: running_mean")
            ck.close(rv2, rv1, 1e-12, f"{what}: running_var")
            wg = nk.batch_norm_backward(dy, x, whole.mean, whole.rstd, w, channel_axis=ca, **kw_all)
            g = sync_batch_norm_backward(dy[lo:hi], x[lo:hi], got.mean, got.rstd, w,
                                         channel_axis=ca, **kw_mine)
            ck.close(g.dx, wg.dx[lo:hi], 1e-10, f"{what}: dx")
            ck.close(g.dweight, wg.dweight, 1e-10, f"{what}: dweight")
            ck.close(g.dbias, wg.dbias, 1e-10, f"{what}: dbias")


def digest() -> str:
    """Hash of every rank's outputs of a fixed float32 case with uneven shards."""
    sizes = size_patterns(WORLD.size)["uneven"]
    x, dy, w, b, rm, rv, (lo, hi) = make_case(42, sizes, (5, 3, 7), np.float32, 1, 0.5, 1.0, "wb")
    out = sync_batch_norm(x[lo:hi], w, b, running_mean=rm, running_var=rv)
    g = sync_batch_norm_backward(dy[lo:hi], x[lo:hi], out.mean, out.rstd, w)
    mine = b"".join(np.ascontiguousarray(a).tobytes()
                    for a in (out.y, out.mean, out.rstd, rm, rv, g.dx, g.dweight, g.dbias))
    return hashlib.sha256(b"".join(WORLD.allgather(mine))).hexdigest()


SCENARIOS = {
    "results": scenario_results,
    "options": scenario_options,
    "layer": scenario_layer,
    "subcomm": scenario_subcomm,
    "errors": scenario_errors,
    "masked": scenario_masked,
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("scenarios", nargs="*", default=list(SCENARIOS))
    args = parser.parse_args()
    nk.set_num_threads(args.threads)
    failed = False
    for name in args.scenarios:
        ck = Checks()
        try:
            SCENARIOS[name](ck)
        except Exception:  # unexpected: the other ranks may be stuck in a collective
            sys.stdout.write(f"rank {WORLD.rank}: scenario {name} raised\n{traceback.format_exc()}")
            sys.stdout.flush()
            WORLD.Abort(2)
        failures = WORLD.gather(ck.failures)
        counts = WORLD.gather(ck.count)
        if WORLD.rank == 0:
            flat = [f for per_rank in failures for f in per_rank]
            status = "OK" if not flat else "FAIL"
            print(f"SCENARIO {name} {status} {sum(counts)} checks on {WORLD.size} ranks")
            for f in flat[:40]:
                print("  " + f)
            failed |= bool(flat)
    d = digest()
    if WORLD.rank == 0:
        print(f"DIGEST {d}", flush=True)
    return int(WORLD.bcast(failed))


if __name__ == "__main__":
    sys.exit(main())
