"""lightning-compress: compress PyTorch Lightning models while they train.

Public names are imported lazily, so ``import lightning_compress`` is cheap and
:mod:`lightning_compress.core` can be used without Lightning installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_compress.__about__ import __version__
from lightning_compress.errors import CompressionConfigError

if TYPE_CHECKING:
    from lightning_compress.callbacks.pruning import PruningCallback
    from lightning_compress.callbacks.quantize import QuantizeOnFitEnd
    from lightning_compress.callbacks.regularizer import SparseRegularizer
    from lightning_compress.core.penalties import sparse_penalty
    from lightning_compress.core.prune.surgery import remove_channels
    from lightning_compress.core.report import CompressionReport, compression_report
    from lightning_compress.core.serialize import load_compressed, save_compressed
    from lightning_compress.distillation import DistillationModule
    from lightning_compress.export.onnx import export_onnx

__all__ = [
    "CompressionConfigError",
    "CompressionReport",
    "DistillationModule",
    "PruningCallback",
    "QuantizeOnFitEnd",
    "SparseRegularizer",
    "__version__",
    "compression_report",
    "export_onnx",
    "load_compressed",
    "remove_channels",
    "save_compressed",
    "sparse_penalty",
]

_LAZY: dict[str, str] = {
    "CompressionReport": "lightning_compress.core.report",
    "DistillationModule": "lightning_compress.distillation",
    "PruningCallback": "lightning_compress.callbacks.pruning",
    "QuantizeOnFitEnd": "lightning_compress.callbacks.quantize",
    "SparseRegularizer": "lightning_compress.callbacks.regularizer",
    "compression_report": "lightning_compress.core.report",
    "export_onnx": "lightning_compress.export.onnx",
    "load_compressed": "lightning_compress.core.serialize",
    "remove_channels": "lightning_compress.core.prune.surgery",
    "save_compressed": "lightning_compress.core.serialize",
    "sparse_penalty": "lightning_compress.core.penalties",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_compress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
