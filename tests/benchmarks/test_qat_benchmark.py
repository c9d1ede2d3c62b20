"""The QAT benchmark runs end to end at its smallest size (``--smoke``), so it never rots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_run import run_benchmark


@pytest.mark.slow
def test_qat_benchmark_smoke(tmp_path: Path) -> None:
    run_benchmark("qat.py", "--smoke", "--out", str(tmp_path))
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
    val_keys = {f"val {k}" for k in keys}
    assert set(row) == {"model", "seed", *keys, *val_keys}
    assert all(0.0 <= row[k] <= 1.0 for k in keys | val_keys)
    summary = data["summary"]["digits-mlp"]
    assert summary["qat_step_ms"] > 0 and summary["float_step_ms"] > 0
    for c in ("static/per-channel", "static/per-tensor", "weight_only/per-channel"):
        worse, better = summary[f"{c} qat_worse_seeds"], summary[f"{c} qat_better_seeds"]
        assert worse == int(row[f"qat {c}"] < row[f"ptq {c}"]) and better == int(row[f"qat {c}"] > row[f"ptq {c}"])
        drop = 100 * (row["val float32"] - row[f"val qat {c}"])
        assert summary[f"val qat {c} drop_pt"] == pytest.approx(drop)
