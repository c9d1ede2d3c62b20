"""Helpers of the ONNX export tests (``from onnx_helpers import int8, run_onnx``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
from torch import Tensor, nn


def int8(
    model: nn.Module, mode: str = "dynamic", per_channel: bool = True, calib: Any = None, **select: Any
) -> nn.Module:
    """``model`` with its default-selected layers made int8 in place (static: calibrated on ``calib``)."""
    from lightning_compress.core.quant.convert import quantize

    quantize(model, mode, per_channel, calibration=[calib] if mode == "static" else (), **select)
    return model.eval()


def call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Tensor):
        return model(inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs)


def run_onnx(path: Any, inputs: Any) -> list[np.ndarray]:
    """Run the file in ONNX Runtime (CPU, one thread) on ``inputs`` (a tensor, a tuple or a dict)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, dict):
        feed = {name: inputs[name].numpy() for name in names}
    else:
        tensors = (inputs,) if isinstance(inputs, Tensor) else inputs
        feed = {name: t.numpy() for name, t in zip(names, tensors, strict=True)}
    return list(session.run(None, feed))


def first_output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):
        return next(iter(out.values()))
    return out[0]


def rel_err(got: np.ndarray, want: Tensor) -> float:
    ref = want.detach().numpy()
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))


def top1(got: np.ndarray, want: Tensor) -> float:
    return float(
        (got.reshape(-1, got.shape[-1]).argmax(-1) == want.reshape(-1, want.shape[-1]).argmax(-1).numpy()).mean()
    )
