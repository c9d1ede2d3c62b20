"""DistillationModule under ``strategy="ddp"`` on two CPU processes (see tests/scripts/ddp_distill.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import load_ranks, run_ddp_script


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_ranks_end_with_the_same_student_and_teacher(tmp_path: Path) -> None:
    run_ddp_script("ddp_distill.py", tmp_path)
    rank0, rank1 = load_ranks(tmp_path, "result")

    # Identical student and projection parameters on both ranks after fit.
    assert rank0["state"].keys() == rank1["state"].keys()
    assert {k.split(".")[0] for k in rank0["state"]} == {"student", "feature_projections"}
    for key in rank0["state"]:
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key
    assert rank0["global_step"] == rank1["global_step"] == 12  # 192 samples / 2 ranks / 16 x 2 epochs

    # The ranks built different teachers; both distilled from rank zero's, unchanged.
    built0, built1 = rank0["built_teacher"], rank1["built_teacher"]
    assert any(not torch.equal(built0[k], built1[k]) for k in built0)
    for rank in (rank0, rank1):
        for key in built0:
            assert torch.equal(rank["teacher_at_start"][key], built0[key]), key
            assert torch.equal(rank["teacher"][key], built0[key]), key
    assert rank0["val_teacher_acc"] == rank1["val_teacher_acc"]

    # DDP wraps the student and the projection only; the teacher stays frozen, in eval mode.
    for rank in (rank0, rank1):
        assert rank["wrapped_params"] == rank["student_params"]
        assert not rank["teacher_ids_wrapped"]
        assert rank["teacher_training"] == [False] * 12 and rank["teacher_grads"] == [False] * 12
