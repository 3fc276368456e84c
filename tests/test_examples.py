"""The examples say what to install when an optional dependency is missing, and exit with
status 1, instead of ending in a bare ModuleNotFoundError. Each runs in a subprocess in which
the dependency cannot be imported (``sys.modules[name] = None`` makes ``import name`` fail
whether or not it is installed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

HIDE_AND_RUN = """
import runpy, sys
for name in sys.argv[2:]:
    sys.modules[name] = None
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_without(example: str, *hidden: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", HIDE_AND_RUN, str(EXAMPLES / example), *hidden],
        check=False, capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )


@pytest.mark.parametrize(
    "example, hidden, install",
    [
        ("dask_norm.py", ("dask",), 'pip install "normkit[dask]"'),
        ("sync_bn.py", ("mpi4py",), 'pip install "normkit[mpi]"'),
        ("standardize.py", ("sklearn",), 'pip install "normkit[sklearn]"'),
    ],
)
def test_example_names_what_to_install(example, hidden, install):
    r = run_without(example, *hidden)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert install in r.stderr
    assert "Traceback" not in r.stderr and "ModuleNotFoundError" not in r.stderr
    if example == "sync_bn.py":
        assert "Open MPI" in r.stderr and "mpirun -n 2" in r.stderr
    # the module docstring says it too, for someone reading the file first
    assert install in (EXAMPLES / example).read_text()


def test_standardize_example_runs_small():
    pytest.importorskip("sklearn")
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / "standardize.py"), "--rows", "3000", "--features", "4",
         "--repeat", "1"],
        check=False, capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )
    assert r.returncode == 0, r.stderr
    assert "Standardizer" in r.stdout and "StandardScaler" in r.stdout


def test_prenorm_block_example_checks_fused_against_unfused():
    """examples/prenorm_block.py: two pre-norm transformer blocks, fused add_layer_norm against
    the unfused composition and central differences."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(EXAMPLES / "prenorm_block.py")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "max difference 0" in proc.stdout and proc.stdout.rstrip().endswith("ok")
