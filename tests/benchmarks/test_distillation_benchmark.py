"""The distillation benchmark runs end to end (``--smoke``), so it never rots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "distillation.py"


def _run(tmp_path: Path, *flags: str) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", *flags, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_distillation_benchmark_smoke(tmp_path: Path) -> None:
    _run(tmp_path)
    data = json.loads((tmp_path / "distillation_smoke.json").read_text())
    (row,) = data["rows"]
    for key in ("teacher_test_acc", "scratch_test_acc", "distilled_test_acc"):
        assert 0.0 <= row[key] <= 1.0
    # The teacher's accuracy measured by DistillationModule (test/teacher_acc) is the Classifier's.
    assert row["teacher_test_acc_from_module"] == pytest.approx(row["teacher_test_acc"])
    assert data["reference"]["recovered"] == pytest.approx((146 - 74) / (146 - 67))
    assert "4810 parameters, 9.5% of the teacher" in data["recipe"]["student"]
    assert 0.0 <= row["scratch_same_lr_test_acc"] <= 1.0
    markdown = (tmp_path / "distillation_smoke.md").read_text()
    assert (
        "| seed | teacher | from scratch | from scratch, distilled arm's lr | distilled | gap recovered |" in markdown
    )
    assert "python benchmarks/distillation.py --smoke" in markdown


@pytest.mark.slow
def test_distillation_sweep_smoke(tmp_path: Path) -> None:
    _run(tmp_path, "--sweep")
    data = json.loads((tmp_path / "distillation_sweep_smoke.json").read_text())
    assert set(data["val_acc"]) == {"teacher", "scratch lr=0.01", "distilled lr=0.01 T=4 alpha=0.9"}
    assert "| distilled lr=0.01 T=4 alpha=0.9 |" in (tmp_path / "distillation_sweep_smoke.md").read_text()
