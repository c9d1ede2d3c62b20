"""Sphinx configuration; `sphinx-build -W` treats every warning as an error."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from lightning_compress.__about__ import __version__

project = "lightning-compress"
author = "The lightning-compress developers"
copyright = "2026, The lightning-compress developers"
release = __version__
version = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
]
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
templates_path: list[str] = []
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
