"""What the comparison measures: accuracy, parameters, bytes, artifact size and CPU latency.

Every number is read from the real model or the real file: parameters and bytes from the tensors the
model holds (:func:`~lightning_compress.compression_report`), the artifact size from the file on
disk, the latency from timed forward passes on the CPU.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_compress.core.batches import batch_to, model_call
from lightning_compress.core.report import CompressionReport, compression_report

__all__ = ["Measurement", "measure", "measure_latencies"]


@dataclass(frozen=True)
class Measurement:
    """The numbers of one model in the comparison.

    Attributes:
        accuracy: the evaluation metric (``test/acc`` by default), a fraction in ``[0, 1]``; ``None``
            when the model logs no metric in the evaluation stage and none was named.
        params: parameters, counting quantized weights (entries, not bytes).
        nonzero_params: those of ``params`` that are not exactly zero.
        weight_bytes: bytes the layers hold in memory (weights, biases, int8 scales).
        artifact_bytes: size of the model's file on disk.
        latency_ms: median CPU time of one forward pass over one batch, in milliseconds.
        report: the per-layer :class:`~lightning_compress.CompressionReport`.
    """

    accuracy: float | None
    params: int
    nonzero_params: int
    weight_bytes: int
    artifact_bytes: int
    latency_ms: float
    report: CompressionReport
    latency_ms_onnxruntime: float | None = None
    """Median time of one ONNX Runtime run of the model's ONNX export on the same batch (``None``: not measured)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view, with the per-layer report under ``"layers"``."""
        return {
            "accuracy": self.accuracy,
            "params": self.params,
            "nonzero_params": self.nonzero_params,
            "sparsity": self.report.sparsity,
            "weight_bytes": self.weight_bytes,
            "model_bytes": self.report.bytes,
            "artifact_bytes": self.artifact_bytes,
            "latency_ms": self.latency_ms,
            "latency_ms_onnxruntime": self.latency_ms_onnxruntime,
            "layers": self.report.to_dict()["layers"],
        }


def measure(
    module: nn.Module,
    accuracy: float | None,
    artifact: str | os.PathLike[str],
    latency_ms: float,
    latency_ms_onnxruntime: float | None = None,
) -> Measurement:
    """Gather the numbers of ``module`` whose artifact was written to ``artifact``.

    Example:
        >>> import tempfile, os
        >>> model = nn.Linear(4, 2)
        >>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
        >>> torch.save(model.state_dict(), path)
        >>> m = measure(model, accuracy=0.5, artifact=path, latency_ms=0.1)
        >>> m.params, m.nonzero_params == m.params, m.artifact_bytes == os.path.getsize(path)
        (10, True, True)
    """
    report = compression_report(module)
    return Measurement(
        accuracy=None if accuracy is None else float(accuracy),
        params=report.params,
        nonzero_params=report.nonzero_params,
        weight_bytes=report.weight_bytes,
        artifact_bytes=os.path.getsize(artifact),
        latency_ms=float(latency_ms),
        report=report,
        latency_ms_onnxruntime=None if latency_ms_onnxruntime is None else float(latency_ms_onnxruntime),
    )


@torch.inference_mode()
def measure_latencies(
    modules: Sequence[nn.Module],
    inputs: Any,
    *,
    repeats: int = 50,
    warmup: int = 5,
    clock: Callable[[], float] = time.perf_counter,
    runners: Sequence[Callable[[], Any]] = (),
) -> list[float]:
    """Median milliseconds of one forward pass of each module on ``inputs``, on the CPU.

    Only the forward pass is timed: how the batch becomes each model's arguments (a signature read of
    about 10 microseconds, a tenth of the digits MLP's whole pass at batch 64) is worked out once,
    before the clock runs. The modules are timed in turns (one call each, ``repeats`` rounds, every
    other round in reverse order) so that a change of machine load during the measurement, and the
    state one model's call leaves for the next, affect all of them alike. Each module runs in eval
    mode; its training flag is restored afterwards.

    Args:
        modules: the models to time, already on the CPU.
        inputs: one batch, as the dataloader yields it: each model is called on it the way a training
            step calls it (:func:`~lightning_compress.core.batches.call_model`: a tensor, a tuple whose
            first item is the input, a dict of keyword arguments).
        repeats: timed calls per module.
        warmup: untimed calls per module first.
        clock: the timer (seconds).
        runners: other calls timed in the same turns (the ONNX Runtime sessions of the models, timed
            with each other).

    Returns:
        One median latency in milliseconds per module, in order, then one per runner.

    Example:
        >>> a, b = nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        >>> times = measure_latencies([a, b], torch.randn(4, 8), repeats=3, warmup=1)
        >>> len(times), all(t > 0 for t in times)
        (2, True)
    """
    inputs = batch_to(inputs, "cpu")
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        calls: list[Callable[[], Any]] = [functools.partial(model_call(m, inputs), m) for m in modules]
        calls += list(runners)
        for _ in range(warmup):
            for call in calls:
                call()
        samples: list[list[float]] = [[] for _ in calls]
        turns = list(zip(calls, samples, strict=True))
        for r in range(repeats):
            # Every other round in reverse order: the model timed right after another one was
            # measured 3-5 % slower than in another order (benchmarks/_timing.py), so neither
            # model always takes that place.
            for call, times in turns if r % 2 == 0 else turns[::-1]:
                start = clock()
                call()
                times.append((clock() - start) * 1000.0)
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    return [statistics.median(times) for times in samples]
