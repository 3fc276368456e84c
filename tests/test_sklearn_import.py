"""``import normkit`` never imports scikit-learn; ``import normkit.sklearn`` without it (or with
one too old) raises ImportError that says what to install. Subprocesses, so that this process's
modules do not matter; runs whether or not scikit-learn is installed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("normkit")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ))


def test_import_normkit_does_not_import_sklearn():
    r = run("import sys, normkit\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_missing_sklearn_names_the_extra():
    r = run(
        "import sys\n"
        "sys.modules['sklearn'] = None\n"
        "try:\n"
        "    import normkit.sklearn\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    assert r.returncode == 0, r.stderr
    assert 'pip install "normkit[sklearn]"' in r.stdout
    assert "scikit-learn >= 1.6" in r.stdout


def test_too_old_sklearn_names_the_version():
    pytest.importorskip("sklearn")
    r = run(
        "import sys, sklearn\n"
        "sys.modules['sklearn.utils.validation'] = None  # as if validate_data did not exist\n"
        "try:\n"
        "    import normkit.sklearn\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    assert r.returncode == 0, r.stderr
    assert "found scikit-learn" in r.stdout and 'pip install "normkit[sklearn]"' in r.stdout
