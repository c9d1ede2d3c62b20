"""Writing compressed models for a runtime (ONNX Runtime first).

:func:`~lightning_compress.export.onnx.export_onnx` is the entry; this package imports without
``onnx`` installed (the exporter says which extra to install when it is missing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_compress.export.onnx import export_onnx

__all__ = ["export_onnx"]


def __getattr__(name: str) -> Any:
    if name == "export_onnx":
        from lightning_compress.export.onnx import export_onnx

        return export_onnx
    raise AttributeError(f"module 'lightning_compress.export' has no attribute {name!r}")
