"""The regularizer accuracy benchmark runs end to end (``--smoke``), so it never rots."""

from __future__ import annotations

import json

import pytest
from benchmark_run import run_benchmark


@pytest.mark.slow
def test_regularizer_accuracy_smoke(tmp_path):
    run_benchmark("regularizer_accuracy.py", "--smoke", "--out", str(tmp_path))
    data = json.loads((tmp_path / "regularizer_accuracy_smoke.json").read_text())
    families = {row["family"] for row in data["rows"]}
    assert families == {"dense", "magnitude", "l1+magnitude", "channel", "group_lasso+channel", "proximal l1"}
    for row in data["rows"]:
        assert 0.0 <= row["test_acc"] <= 1.0
        if row["family"] in ("magnitude", "l1+magnitude"):
            assert row["zeros"] == pytest.approx(row["sparsity"], abs=0.01)  # pruning reached its target
    assert {c["method"] for c in data["comparisons"]} == {"magnitude + L1", "channel + group lasso"}
    markdown = (tmp_path / "regularizer_accuracy_smoke.md").read_text()
    assert "## Proximal L1" in markdown
    assert [r["strength"] for r in data["proximal"]["grid"]] == [0.3]
    assert all(c["better"] + c["worse"] <= 1 for c in data["comparisons"])  # one seed, paired
    assert "python benchmarks/regularizer_accuracy.py --smoke" in markdown
