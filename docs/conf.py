"""Sphinx configuration: the API reference of normkit, generated from its docstrings.

Build (normkit must be installed, the compiled extension included; CI does this after the
install step):

    pip install ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html

Docstrings are in the NumPy style and rendered by numpydoc. README.md remains the guide and
front page of the project; the site's index includes it.
"""

from __future__ import annotations

import importlib.util

import normkit

project = "normkit"
author = "normkit developers"
copyright = "normkit developers"
release = normkit.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# normkit.sklearn (the scikit-learn transformer) gets its page, after "api/stats" in the
# index's toctree, where the module exists (setup() below); elsewhere the page is left out.
HAVE_SKLEARN_MODULE = importlib.util.find_spec("normkit.sklearn") is not None
if not HAVE_SKLEARN_MODULE:
    exclude_patterns.append("api/sklearn.rst")

# The optional integrations import their engines at import time; where an engine is not
# installed, autodoc documents the module against a stand-in (the docstrings are normkit's).
autodoc_mock_imports = [
    name for name in ("mpi4py", "dask", "distributed", "sklearn", "pandas")
    if importlib.util.find_spec(name) is None
]

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False}
# Signatures show the parameters; their types are in each docstring's Parameters section.
autodoc_typehints = "none"

# numpydoc: Parameters / Returns / Raises sections; class members are listed by autodoc.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False  # no intersphinx (the build has no network)

# README.md as the front page: its "[x](#section)" links need heading anchors.
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"normkit {release}"
html_static_path: list[str] = []


def _skip_foreign_members(app, what, name, obj, skip, options):
    """Document normkit's own members only: not the methods a base class from another library
    adds (scikit-learn's set_{fit,transform,...}_request, whose docstrings refer to its own
    glossary)."""
    module = getattr(obj, "__module__", None) or ""
    if module.split(".")[0] == "sklearn":
        return True
    return None


def _optional_pages(app, docname, source):
    if docname == "index" and HAVE_SKLEARN_MODULE:
        source[0] = source[0].replace("api/stats\n", "api/stats\napi/sklearn\n", 1)


def _check_public_api_documented(app, env):
    """Every name in normkit.__all__ must be on some page: a warning (an error under -W) names
    each one that is not, so a new public function cannot be left out of the reference."""
    from sphinx.util import logging

    documented = set(env.get_domain("py").objects)
    for name in normkit.__all__:
        if f"normkit.{name}" not in documented:
            logging.getLogger(__name__).warning(
                "normkit.%s is in normkit.__all__ but not in the API reference (docs/api/*.rst)",
                name,
            )


def setup(app):
    app.connect("source-read", _optional_pages)
    app.connect("env-check-consistency", _check_public_api_documented)
    app.connect("autodoc-skip-member", _skip_foreign_members)
