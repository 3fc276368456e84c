"""The package's structure: the type stubs agree with the native modules, and the Python
modules import each other without a circle (issue 14)."""

import ast
import importlib
import os
import re

import pytest

PKG = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python", "normkit")


def _stub_entries(path):
    """{name: number of parameters, or None for a plain attribute} of a .pyi file."""
    with open(path) as f:
        tree = ast.parse(f.read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            a = node.args
            out[node.name] = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = None
    return out


def _module_entries(mod):
    """{name: number of parameters (from pybind11's signature line), or None} of a module."""
    out = {}
    for name in dir(mod):
        if name.startswith("__"):
            continue
        obj = getattr(mod, name)
        doc = getattr(obj, "__doc__", None) or ""
        m = re.match(rf"{re.escape(name)}\((.*?)\) ->", doc)
        if callable(obj) and m:
            params = [p for p in re.split(r",\s*(?![^\[]*\])", m.group(1)) if p.strip()]
            out[name] = len(params)
        elif not callable(obj):
            out[name] = None
    return out


@pytest.mark.parametrize("name", ["_core", "_cuda"])
def test_stubs_match_native_module(name):
    try:
        mod = importlib.import_module(f"normkit.{name}")
    except ImportError:
        pytest.skip(f"normkit.{name} is not built here (it needs nvcc at build time)")
    stub = _stub_entries(os.path.join(PKG, f"{name}.pyi"))
    real = _module_entries(mod)
    assert sorted(set(real) - set(stub)) == [], f"{name}.pyi lacks these module entries"
    assert sorted(set(stub) - set(real)) == [], f"{name}.pyi lists entries the module lacks"
    for key, n in real.items():
        assert stub[key] == n, f"{name}.{key}: {n} parameters in the module, {stub[key]} in the stub"


def _imports(path, package="normkit"):
    """normkit modules a file imports at module level (function-level imports excluded)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package + "."):
            found.add(node.module.split(".")[1])
    return found


def test_no_import_circle():
    names = [f[:-3] for f in os.listdir(PKG) if f.endswith(".py") and f != "__init__.py"]
    graph = {n: _imports(os.path.join(PKG, n + ".py")) & set(names) for n in names}
    state = {}

    def visit(n, path):
        if state.get(n) == "done":
            return
        assert state.get(n) != "open", "import circle: " + " -> ".join(path + [n])
        state[n] = "open"
        for m in sorted(graph[n]):
            visit(m, path + [n])
        state[n] = "done"

    for n in sorted(names):
        visit(n, [])
    assert "functional" not in graph["_cuda_dispatch"]
    assert "_cuda_dispatch" in graph["functional"]
