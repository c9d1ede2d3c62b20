"""The QAT benchmark runs end to end at its smallest size (``--smoke``), so it never rots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_qat_benchmark_smoke(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "qat.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "qat_smoke.md").read_text().startswith("# QAT vs PTQ")
    data = json.loads((tmp_path / "qat_smoke.json").read_text())
    (row,) = data["rows"]
    keys = {
        "float32",
        *(
            f"{k} {c}"
            for k in ("ptq", "qat")
            for c in ("static/per-channel", "static/per-tensor", "weight_only/per-channel")
        ),
    }
    assert set(row) == {"model", "seed", *keys}
    assert all(0.0 <= row[k] <= 1.0 for k in keys)
    summary = data["summary"]["digits-mlp"]
    assert summary["qat_step_ms"] > 0 and summary["float_step_ms"] > 0
