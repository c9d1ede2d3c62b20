"""The optional ONNX Runtime column of the comparison: export both models and time them on the same batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_compress.core.batches import batch_size

__all__ = ["export_example", "onnxruntime_latencies"]


def export_example(example: Any) -> Any:
    """``example`` with a batch of 1 repeated to 2 (export needs 2 to keep the batch dimension dynamic).

    The file is then timed on ``example`` itself, so a model evaluated one sample at a time
    (Lightning's ``BoringModel``) is measured on the batch it runs.

    Example:
        >>> export_example({"x": torch.ones(1, 3), "n": 4})["x"].shape, export_example(torch.ones(5, 3)).shape
        (torch.Size([2, 3]), torch.Size([5, 3]))
    """
    if batch_size(example) != 1:
        return example
    return apply_to_collection(example, torch.Tensor, lambda t: torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t)


def onnxruntime_latencies(
    folder: Path, models: dict[str, torch.nn.Module], inputs: Any, files: dict[str, str], repeats: int
) -> list[float | None]:
    """Write ``<role>.onnx`` beside each artifact and time it in ONNX Runtime, when the export extra is installed.

    An export that fails is reported with a warning and leaves both latencies out (``None``): the
    comparison itself never fails for the optional ONNX part.
    """
    from lightning_compress.export.runtime import onnxruntime_latency_ms, runtime_available

    if not runtime_available():
        return [None, None]
    from lightning_compress.core.batches import model_call
    from lightning_compress.export.onnx import export_onnx

    latencies: list[float | None] = []
    try:
        for role, model in models.items():
            example = model_call(model, inputs).example_inputs()
            path = str(folder / f"{role}.onnx")
            export_onnx(model, path, export_example(example))
            files[f"{role}_onnx"] = path
            latencies.append(onnxruntime_latency_ms(path, example, repeats=repeats))
    except Exception as err:  # optional: the PyTorch comparison stands without it
        rank_zero_warn(f"lightning-compress: no ONNX Runtime latency ({type(err).__name__}: {err})")
        return [None, None]
    return latencies
