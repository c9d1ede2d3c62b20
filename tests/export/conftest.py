"""Fixtures of the ONNX export tests: a quantizer, an ONNX Runtime runner and a faster exporter."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="session", autouse=True)
def _cached_torchlib() -> Iterator[None]:
    """Build onnxscript's table of ATen translations once per session instead of once per export.

    It is the same table every time (about 4 of the 5 seconds of a small export); caching it here
    only makes the tests faster, the exporter itself is unchanged.
    """
    try:
        from onnxscript._framework_apis import torch_2_5
    except ImportError:
        yield
        return
    original = torch_2_5.get_torchlib_ops
    torch_2_5.get_torchlib_ops = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        torch_2_5.get_torchlib_ops = original


@pytest.fixture
def check_export(tmp_path: Any) -> Callable[..., tuple[Any, Any, Any]]:
    """Export ``model`` with ``example`` and run it on ``inputs`` in ONNX Runtime: ``(onnx out, torch out, path)``."""
    from onnx_helpers import call, first_output, run_onnx

    from lightning_compress import export_onnx

    def check(model: nn.Module, example: Any, inputs: Any, name: str = "model.onnx", **kwargs: Any) -> Any:
        path = tmp_path / name
        export_onnx(model, path, example, **kwargs)
        got = run_onnx(path, inputs)[0]
        with torch.no_grad():
            want = first_output(call(model, inputs))
        return got, want, path

    return check
