"""Data-parallel BatchNorm over MPI: every rank holds part of each batch.

    pip install "normkit[mpi]"           # mpi4py; from a checkout: pip install ".[mpi]"
    mpirun -n 2 python examples/sync_bn.py        # (as root, Open MPI also wants --allow-run-as-root)

mpi4py needs an MPI library, e.g. Open MPI: ``apt-get install openmpi-bin libopenmpi-dev``
(Debian/Ubuntu), ``brew install open-mpi`` (macOS) or ``conda install -c conda-forge openmpi``.

Each rank draws its own shard of a batch (the ranks hold different numbers of samples), and a
SyncBatchNorm layer normalizes it with the statistics of the whole batch. Rank 0 then checks the
result against an ordinary BatchNorm applied to the concatenated batch.
"""

import sys

try:
    from mpi4py import MPI
except (ImportError, RuntimeError) as e:  # mpi4py missing, or without an MPI library it can load
    sys.exit(
        f"examples/sync_bn.py needs mpi4py and an MPI library ({e}).\n"
        'Install mpi4py with:  pip install "normkit[mpi]"   (from a checkout: pip install ".[mpi]")\n'
        "and an MPI library, e.g. Open MPI: apt-get install openmpi-bin libopenmpi-dev (Debian/Ubuntu),\n"
        "brew install open-mpi (macOS) or conda install -c conda-forge openmpi; then run\n"
        "  mpirun -n 2 python examples/sync_bn.py"
    )

import numpy as np

import normkit as nk
from normkit.distributed import SyncBatchNorm

comm = MPI.COMM_WORLD
rank, size = comm.rank, comm.size

C = 8
bn = SyncBatchNorm(C, dtype=np.float64)  # comm=None: MPI.COMM_WORLD
rng = np.random.default_rng(rank)
for step in range(3):
    x = rng.normal(loc=2.0, scale=3.0, size=(4 + rank, C, 6, 6))  # uneven shards
    y = bn(x)
    dy = y / y.size  # gradient of a toy loss
    dx = bn.backward(dy)
    weight, bias = bn.weight.copy(), bn.bias.copy()  # this step's, for the check below
    bn.weight -= 0.1 * bn.grad_weight  # identical on every rank: the gradients are global
    bn.bias -= 0.1 * bn.grad_bias

# The check: gather everything on rank 0 and redo the last step in one process.
shards = comm.gather((x, y, dy, dx), root=0)
stats = comm.gather(bn.running_var, root=0)
if rank == 0:
    x_all = np.concatenate([s[0] for s in shards])
    ref = nk.BatchNorm(C, dtype=np.float64)
    ref.weight[...], ref.bias[...] = weight, bias
    y_ref = ref(x_all)
    dx_ref = ref.backward(np.concatenate([s[2] for s in shards]))
    y_err = np.abs(np.concatenate([s[1] for s in shards]) - y_ref).max()
    dx_err = np.abs(np.concatenate([s[3] for s in shards]) - dx_ref).max()
    same = all(np.array_equal(v, stats[0]) for v in stats)
    print(f"{size} ranks, batch of {x_all.shape[0]} samples split as {[s[0].shape[0] for s in shards]}")
    print(f"max |y - y_single_process|   = {y_err:.2e}")
    print(f"max |dx - dx_single_process| = {dx_err:.2e}")
    print(f"running_var identical on every rank: {same}; num_batches_tracked = {bn.num_batches_tracked}")
    assert y_err < 1e-10 and dx_err < 1e-10 and same
