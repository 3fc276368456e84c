"""Synchronized BatchNorm over MPI (SPEC section 7), through mpi4py (the optional extra ``mpi``).

    from normkit.distributed import SyncBatchNorm, sync_batch_norm, sync_batch_norm_backward

Each rank holds one shard of the batch (any size, zero included). The results are those of
:func:`normkit.batch_norm` / :func:`normkit.batch_norm_backward` on the concatenation of every
rank's batch: statistics, running statistics, ``dweight`` and ``dbias`` are global and equal on
every rank; ``y`` and ``dx`` are each rank's own part.

Protocol: one ``allgather`` per call. Every rank validates its arguments and computes float64
partials of its shard (forward: count, mean and sum of squared deviations per channel, two
passes; backward: ``sum(dy)`` and ``sum(dy * xhat)`` per channel), then all ranks exchange
``(error, settings, partials)``. If any rank's arguments were bad, every rank raises the error of
the lowest such rank (same type, same message naming that rank), so no rank is left waiting in a
collective. Otherwise every rank combines the partials in rank order (Chan's formula for the
moments, plain sums for the gradients): the same float64 operations in the same order, hence the
same bits on every rank and in every run. The shard is then normalized by the C++ kernels
(see ``normkit._sharded``).

``training=False`` forwards are local (``batch_norm`` with the running statistics, no
communication). Backwards always communicate, since ``dweight``/``dbias`` are global sums.
Every rank must make the same sequence of calls with the same ``training`` flag, as with any
MPI collective.
"""

from __future__ import annotations

import builtins
import functools
from typing import Optional

import numpy as np

try:
    from mpi4py import MPI
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "normkit.distributed needs mpi4py and an MPI library, which are not installed: "
        "pip install 'normkit[mpi]' (with an MPI library such as OpenMPI present)"
    ) from e

from . import _sharded
from . import _plan as P
from . import functional as F
from ._plan import NormGrads, NormOutput
from .layers import BatchNorm
from .stats import Moments

__all__ = ["SyncBatchNorm", "sync_batch_norm", "sync_batch_norm_backward"]

_F64 = np.dtype(np.float64)


def _communicator(comm, fn: str):
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"{fn}: comm must be an mpi4py intracommunicator, got {type(comm).__name__}")
    return comm


def _exception_type(name: str) -> type:
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls
    return RuntimeError


def _exchange(comm, fn: str, local):
    """Run ``local()`` -> (settings dict, partials, private) on this rank, allgather
    (error, settings, partials) and raise on every rank if any rank failed or the ranks' settings
    differ. Returns (list of every rank's partials in rank order, this rank's private)."""
    failure = None
    try:
        settings, partials, private = local()
        mine = (None, settings, partials)
    except Exception as e:  # any local failure must still reach the collective
        failure = e
        mine = ((type(e).__name__, str(e)), None, None)
    gathered = comm.allgather(mine)
    size = len(gathered)
    for r, (err, _, _) in enumerate(gathered):
        if err is not None:
            raise _exception_type(err[0])(f"{err[1]} (raised on rank {r} of {size})") from failure
    first = gathered[0][1]
    for r, (_, settings, _) in enumerate(gathered):
        for key, value in settings.items():
            if value != first[key]:
                raise ValueError(
                    f"{fn}: every rank must pass the same {key}: rank {r} has {value} "
                    f"but rank 0 has {first[key]}"
                )
    return [p for _, _, p in gathered], private


def _settings(x: np.ndarray, ca: int, **more):
    return {"dtype": x.dtype.name, "number of dimensions": x.ndim, "number of channels": x.shape[ca],
            "channel_axis": ca, **more}


@F.hide_varargs
def sync_batch_norm(
    x,
    weight=None,
    bias=None,
    *args,
    running_mean=None,
    running_var=None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    channel_axis: int = 1,
    out: Optional[np.ndarray] = None,
    comm=None,
    mask=None,
    sample_weight=None,
) -> NormOutput:
    """:func:`normkit.batch_norm` of the concatenation of every rank's ``x`` (along axis 0);
    returns this rank's ``NormOutput(y, mean, rstd)``, with the global mean and rstd.
    ``mask``/``sample_weight``: this rank's part of the global batch's (as for
    :func:`normkit.batch_norm`); the statistics are those of the weighted global batch.

    Collective over ``comm`` (an mpi4py intracommunicator; None: ``MPI.COMM_WORLD``) when
    ``training``. Ranks may hold any number of samples, zero included; dtype, rank, number of
    channels, channel_axis, eps, momentum and which optional arrays are given must agree.
    Running statistics, when given, are updated identically on every rank (unbiased variance of
    the global batch). ``training=False`` is a local :func:`normkit.batch_norm`.
    """
    if args:
        P.positional_running("sync_batch_norm", args)
    if not P.training_flag(training, "sync_batch_norm"):
        return F.batch_norm(x, weight, bias, running_mean=running_mean, running_var=running_var,
                            training=False, momentum=momentum, eps=eps, channel_axis=channel_axis,
                            out=out, mask=mask, sample_weight=sample_weight)
    fn = "sync_batch_norm"
    comm = _communicator(comm, fn)

    def local():
        a = {k: (None if v is None else F.host_array(v, fn, k))
             for k, v in (("x", x), ("weight", weight), ("bias", bias), ("out", out))}
        P.same_kind(fn, a["x"], running_mean=running_mean, running_var=running_var)
        # the per-channel count is global: the plan's count rule is applied after the exchange
        plan = P.batch_norm(fn, a["x"], a["weight"], a["bias"], running_mean, running_var, True,
                            momentum, eps, channel_axis, a["out"], local_count=False)
        xa = F.data_array(a["x"], fn)
        ca, C, sd, m, e, o = plan.ca, plan.C, plan.sd, plan.momentum, plan.eps, a["out"]
        w, b = F.param(a["weight"], sd), F.param(a["bias"], sd)
        rm, rv = running_mean, running_var
        F.check_running(plan, xa, w, b, rm, rv)
        omega = _sharded.position_weights(fn, plan, xa, mask, sample_weight)
        settings = _settings(xa, ca, eps=e, momentum=m, weight=w is not None,
                             bias=b is not None, running_stats=rm is not None,
                             weighted=omega is not None)
        partials = _sharded.channel_moments(xa, ca, omega).state_dict()
        return settings, partials, (xa, ca, C, sd, w, b, rm, rv, m, e, o)

    parts, (xa, ca, C, sd, w, b, rm, rv, m, e, o) = _exchange(comm, fn, local)
    total = _sharded.merge_in_order([Moments.from_state_dict(p) for p in parts])
    n = total.count
    P.per_channel_count(fn, n if C else 0, C, None, over_ranks=True)
    mean = total.mean
    rstd = _sharded.rstd_of(total.var(), e)
    y = _sharded.normalize(xa, mean, rstd, w, b, ca, o)
    if rm is not None:
        _sharded.update_running(rm, rv, total, m)
    return NormOutput(y, mean.astype(sd), rstd.astype(sd))


def sync_batch_norm_backward(
    dy, x, mean, rstd, weight=None, *, training: bool = True, channel_axis: int = 1, comm=None,
    mask=None, sample_weight=None,
) -> NormGrads:
    """:func:`normkit.batch_norm_backward` of the concatenated batch; returns this rank's
    ``NormGrads(dx, dweight, dbias)``: dx for this rank's x, dweight = sum(dy * xhat) and
    dbias = sum(dy) over every rank (equal on all ranks). Always collective over ``comm``;
    ``mean``/``rstd`` are :func:`sync_batch_norm`'s (the same on every rank).
    """
    fn = "sync_batch_norm_backward"
    training = P.training_flag(training, fn)
    comm = _communicator(comm, fn)

    def local():
        a = {k: (None if v is None else F.host_array(v, fn, k))
             for k, v in (("dy", dy), ("x", x), ("mean", mean), ("rstd", rstd), ("weight", weight))}
        plan = P.channel_backward(fn, "batch", a["dy"], a["x"], a["mean"], a["rstd"],
                                  a["weight"], False, channel_axis)
        xa = F.data_array(a["x"], fn)
        dya = F.data_array(a["dy"], fn, "dy").astype(xa.dtype, copy=False)
        ca, C, sd = plan.ca, plan.C, plan.sd
        mean_s, rstd_s, w = (F.param(a[k], sd) for k in ("mean", "rstd", "weight"))
        wd = _sharded.work_dtype(xa)
        xw = xa.astype(wd, copy=False)
        # dy * w * rstd and this rank's sums of dy * xhat and dy, from the eval-mode kernel
        g = F.batch_norm_backward(dya.astype(wd, copy=False), xw, mean_s, rstd_s, w,
                                  training=False, channel_axis=ca)
        omega = _sharded.position_weights(fn, plan._replace(training=training), xa, mask,
                                          sample_weight)
        n = (P.prod(xa.shape[i] for i in _sharded.channel_axes(xa.ndim, ca)) if omega is None
             else float(omega.sum()))
        partials = (n, g.dweight.astype(_F64), g.dbias.astype(_F64))
        settings = _settings(xa, ca, training=bool(training), weight=w is not None,
                             weighted=omega is not None)
        return settings, partials, (xa, xw, ca, C, sd, mean_s, rstd_s, w, g.dx, omega)

    parts, (xa, xw, ca, C, sd, mean_s, rstd_s, w, dx, omega) = _exchange(comm, fn, local)
    n = sum(p[0] for p in parts)  # the global count, or total weight
    sum_dy_xhat, sum_dy = np.zeros(C), np.zeros(C)
    for _, p_dy_xhat, p_dy in parts:  # rank order
        sum_dy_xhat += p_dy_xhat
        sum_dy += p_dy
    if training:
        if C and n == 0:
            raise ValueError(f"{fn}: empty reduction: x is empty on every rank")
        dx = _sharded.input_grad(dx, xw, mean_s.astype(_F64), rstd_s.astype(_F64), w, sum_dy,
                                 sum_dy_xhat, n, ca, omega)
    return NormGrads(dx.astype(xa.dtype, copy=False), sum_dy_xhat.astype(sd), sum_dy.astype(sd))


class SyncBatchNorm(BatchNorm):
    """:class:`normkit.BatchNorm` whose training-mode statistics, running statistics and
    parameter gradients are those of the batch concatenated over the ranks of ``comm`` (an mpi4py
    intracommunicator; None: ``MPI.COMM_WORLD``). Other options as for ``BatchNorm``. Every rank
    calls ``forward``/``backward`` in step, as with any collective.
    """

    def __init__(self, num_features, *, comm=None, **batch_norm_options):
        super().__init__(num_features, **batch_norm_options)
        if self.activation is not None:
            raise ValueError("SyncBatchNorm: a fused activation is not supported (apply it "
                             "after the layer)")
        self.comm = _communicator(comm, "SyncBatchNorm")
        self._functional = functools.partial(sync_batch_norm, comm=self.comm)
        self._functional_backward = functools.partial(sync_batch_norm_backward, comm=self.comm)
