"""The optional packages the exporter needs, imported only when an export is asked for."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRA_HINT", "require"]

EXTRA_HINT = 'pip install "lightning-compress[export]"'


def require(name: str) -> ModuleType:
    """Import ``name`` (``onnx``, ``onnxscript``, ``onnxruntime``), or raise an ``ImportError`` naming the extra."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"Exporting to ONNX needs the `{name}` package, which is not installed. Install it with: {EXTRA_HINT}"
        ) from err


def available(name: str) -> bool:
    """Whether ``name`` imports."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True
