"""The pruning benchmarks run end to end (``--smoke``), so they never rot. No timing is asserted."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from benchmark_run import load_benchmark


def _run(script: str, *args: str) -> None:
    """Run a benchmark's ``main()`` with ``--smoke`` in this process (a subprocess would spend most of
    its time importing torch and Lightning again)."""
    module = load_benchmark(script)
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = [script, "--smoke", *args]
    try:
        module.main()
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_step_time_smoke(tmp_path) -> None:
    _run("pruning_step_time.py", "--out", str(tmp_path), "--threads", "1")
    data = json.loads((tmp_path / "pruning_step_time_smoke.json").read_text())
    rows = {row["config"]: row for row in data["rows"]}
    assert set(rows) == {
        "none",
        "empty callback",
        "PruningCallback",
        "PruningCallback, wanda",
        "ModelPruning",
        "PruningCallback, gradual",
        "PruningCallback, gradual, wanda",
    }
    assert rows["none"]["ratio"] == 1.0 and rows["none"]["final_sparsity"] == 0.0
    assert rows["empty callback"]["final_sparsity"] == 0.0
    for config in set(rows) - {"none", "empty callback"}:
        assert rows[config]["final_sparsity"] == pytest.approx(0.9, abs=1e-3)  # same sparsity for all
        assert rows[config]["steps"] == rows["none"]["steps"] == 5
    mechanisms = [m["mechanism"] for m in data["mechanisms"]]
    assert mechanisms == ["no masks", "PruningCallback (fast path)", "PruningCallback (guarded)", "torch prune hooks"]
    markdown = (tmp_path / "pruning_step_time_smoke.md").read_text()
    assert "| ModelPruning |" in markdown and "--smoke" in markdown and "| torch prune hooks |" in markdown


@pytest.mark.slow
def test_step_time_accepts_resnet18(tmp_path) -> None:
    pytest.importorskip("torchvision")
    args = [
        "--model",
        "resnet18",
        "--configs",
        "PruningCallback",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--no-mechanisms",
    ]
    _run("pruning_step_time.py", *args, "--out", str(tmp_path), "--threads", "1")
    data = json.loads((tmp_path / "pruning_step_time_resnet18_cpu_smoke.json").read_text())
    assert data["model"] == "resnet18" and [r["config"] for r in data["rows"]] == ["none", "PruningCallback"]
    assert data["rows"][1]["final_sparsity"] == pytest.approx(0.9, abs=1e-3)


@pytest.mark.slow
def test_accuracy_smoke(tmp_path) -> None:
    _run("pruning_accuracy.py", "--out", str(tmp_path), "--sparsities", "0", "0.9")
    data = json.loads((tmp_path / "pruning_accuracy_smoke.json").read_text())
    assert [s["sparsity"] for s in data["summary"]] == [0.0, 0.9]
    assert data["summary"][1]["zeros"] == pytest.approx(0.9, abs=1e-3)
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in data["rows"])
    assert "| 90% |" in (tmp_path / "pruning_accuracy_smoke.md").read_text()
