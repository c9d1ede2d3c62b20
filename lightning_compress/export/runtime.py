"""Running an exported file in ONNX Runtime: one session, and its latency on a batch."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from lightning_compress.export import _deps
from lightning_compress.export._inputs import ort_feed, split_inputs

__all__ = ["onnxruntime_latency_ms", "onnxruntime_runner", "runtime_available"]


def runtime_available() -> bool:
    """Whether ``onnx``, ``onnxscript`` and ``onnxruntime`` all import (export and measure can run)."""
    return all(_deps.available(name) for name in ("onnx", "onnxscript", "onnxruntime"))


def onnxruntime_runner(
    path: str | os.PathLike[str], example_inputs: Any, threads: int | None = None
) -> Callable[[], Any]:
    """A call that runs the file once in ONNX Runtime on ``example_inputs`` (one session, its inputs fed ready).

    Args:
        path: the ``.onnx`` file.
        example_inputs: a tensor, a tuple or a dict of inputs, as for :func:`~lightning_compress.export_onnx`.
        threads: ONNX Runtime's ``intra_op_num_threads`` (``None``: torch's current thread count).
    """
    import onnxruntime as ort  # type: ignore[import-untyped]
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    args, kwargs = split_inputs(example_inputs)
    feed = ort_feed([i.name for i in session.get_inputs()], args, kwargs)
    return lambda: session.run(None, feed)


def onnxruntime_latency_ms(
    path: str | os.PathLike[str], example_inputs: Any, repeats: int = 50, threads: int | None = None
) -> float:
    """Median milliseconds of one ``session.run`` on ``example_inputs`` (CPUExecutionProvider).

    Args:
        path: the ``.onnx`` file.
        example_inputs: a tensor, a tuple or a dict of inputs, as for :func:`~lightning_compress.export_onnx`.
        repeats: timed runs after three warm-up runs.
        threads: ONNX Runtime's ``intra_op_num_threads`` (``None``: torch's current thread count).
    """
    run = onnxruntime_runner(path, example_inputs, threads)
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(times))
