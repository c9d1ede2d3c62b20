"""The optional ONNX Runtime column of the comparison: export both models and time them on the same batch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_compress.core.batches import batch_size

__all__ = ["export_example", "onnxruntime_runners"]


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


def onnxruntime_runners(
    folder: Path, models: dict[str, torch.nn.Module], inputs: Any, files: dict[str, str]
) -> list[Callable[[], Any]]:
    """Write ``<role>.onnx`` beside each artifact and return one ONNX Runtime run of each on ``inputs``.

    The two runs are timed by :func:`~lightning_compress.pipeline.measure.measure_latencies` in turns
    with each other, after the PyTorch models (ONNX Runtime's worker threads spin for a while after a
    run, which slows a PyTorch call timed right after it). Empty when the export extra is not
    installed, and when an export fails (reported with a warning): the comparison itself never fails
    for the optional ONNX part.
    """
    from lightning_compress.export.runtime import onnxruntime_runner, runtime_available

    if not runtime_available():
        return []
    from lightning_compress.core.batches import model_call
    from lightning_compress.export.onnx import export_onnx

    runners: list[Callable[[], Any]] = []
    try:
        for role, model in models.items():
            example = model_call(model, inputs).example_inputs()
            path = str(folder / f"{role}.onnx")
            export_onnx(model, path, export_example(example))
            files[f"{role}_onnx"] = path
            runners.append(onnxruntime_runner(path, example))
    except Exception as err:  # optional: the PyTorch comparison stands without it
        rank_zero_warn(f"lightning-compress: no ONNX Runtime latency ({type(err).__name__}: {err})")
        return []
    return runners
