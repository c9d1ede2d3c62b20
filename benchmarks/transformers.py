"""The Hugging Face transformers benchmark under the name issue #11 gives it: runs ``hf_transformers.py``.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/transformers.py
    python benchmarks/transformers.py --smoke   # tiny models, seconds

The arguments are ``hf_transformers.py``'s (``--smoke``, ``--rounds``, ``--out``). This file bears the
name of the package it measures, and Python puts a script's folder first on ``sys.path``, where
``import transformers`` would find this file instead of the package. So, run as a script, it takes
its folder (and ``''`` where that is its folder) off the front of ``sys.path`` before anything imports
transformers; and imported under the name ``transformers`` (by a script of this folder, which has the
folder first on its path), it imports the package from the rest of the path and hands it over.
"""

from __future__ import annotations

import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _elsewhere() -> list[str]:
    """``sys.path`` without this folder (``''`` and ``'.'`` stand for the working directory)."""
    return [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]


if __name__ == "__main__":
    sys.path[:] = [*_elsewhere(), HERE]  # hf_transformers and its helpers, after the installed packages
    importlib.import_module("hf_transformers").main()
elif __name__ == "transformers":
    del sys.modules[__name__]
    _path = list(sys.path)
    sys.path[:] = _elsewhere()
    try:
        _package = importlib.import_module("transformers")
    finally:
        sys.path[:] = _path
    sys.modules[__name__] = _package  # what `import transformers` returns
