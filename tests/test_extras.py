"""The optional extras of SPEC section 7: ``import normkit`` needs neither mpi4py nor dask, and
the modules that do need them say which extra to install when the package is missing.

Each check runs in a fresh interpreter, so that what this test process has imported does not
matter; ``sys.modules[name] = None`` makes any import of ``name`` fail as if it were absent.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

EXTRAS = [("normkit.distributed", "mpi4py", "normkit[mpi]"), ("normkit.dask", "dask", "normkit[dask]")]


def _python(code: str):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_normkit_imports_no_extra():
    r = _python("import sys, normkit; print(sorted(m for m in sys.modules if m.split('.')[0] in "
                "('mpi4py', 'dask', 'distributed') or m in ('normkit.distributed', 'normkit.dask')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("module, dependency, extra", EXTRAS)
def test_missing_dependency_names_the_extra(module, dependency, extra):
    r = _python(f"import sys; sys.modules[{dependency!r}] = None\nimport {module}")
    assert r.returncode != 0
    assert "ImportError" in r.stderr and extra in r.stderr, r.stderr
