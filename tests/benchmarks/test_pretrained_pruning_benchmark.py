"""benchmarks/pretrained_pruning.py runs end to end on a tiny BERT (no timing or quality is asserted)."""

from __future__ import annotations

import json

import pytest
from benchmark_run import load_benchmark


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_pretrained_pruning_smoke(tmp_path) -> None:
    pytest.importorskip("transformers")
    module = load_benchmark("pretrained_pruning.py")
    out = tmp_path / "pretrained"
    module.main(
        [
            "--model", "tiny", "--held-out", "16", "--train-sentences", "32", "--batch-size", "16",
            "--calibration-batches", "1", "--epochs", "2", "--prune-epochs", "1", "--update-every", "1",
            "--out", str(out),
        ]
    )  # fmt: skip
    data = json.loads(out.with_suffix(".json").read_text())
    methods = [(r["pattern"], r["method"]) for r in data["rows"]]
    assert methods == [("dense", "dense")] + [
        (p, m) for p in ("unstructured", "2:4") for m in ("one-shot magnitude", "one-shot wanda", "wanda + distill")
    ]
    for row in data["rows"]:
        assert -1.0 <= row["cos_min"] <= row["cos_mean"] <= 1.0 + 1e-6
        assert 0.0 <= row["retrieval_top1"] <= 1.0
    assert all(r["sparsity"] == pytest.approx(0.5) for r in data["rows"] if r["method"] == "wanda + distill")
    assert "| 2:4 | wanda + distill |" in out.with_suffix(".md").read_text()
