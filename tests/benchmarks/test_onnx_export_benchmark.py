"""Smoke test of benchmarks/onnx_export.py: it runs with the smallest sizes and prints every variant."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "onnx_export.py"


@pytest.mark.slow
def test_onnx_export_benchmark_smoke() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--models", "digits,mlp4096"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("torch_fp32", "ort_fp32", "ours_dynamic", "ort_qdynamic", "ours_static", "ort_qstatic"):
        assert f"| {name} |" in out.stdout
    assert "SIMD flags" in out.stdout
