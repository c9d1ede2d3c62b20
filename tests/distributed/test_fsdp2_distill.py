"""DistillationModule under ModelParallelStrategy (FSDP2) with a sharded teacher, on two CPU processes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import load_ranks, run_ddp_script


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    out = tmp_path_factory.mktemp("fsdp2_distill")
    run_ddp_script("fsdp2_distill.py", out, timeout=300)
    return load_ranks(out, "distill")


@pytest.mark.ddp
def test_the_sharded_teacher_is_never_trained(ranks) -> None:
    for rank in ranks:
        assert rank["teacher_dtensor"] and rank["student_dtensor"]
        assert len(rank["teacher_grads"]) == 12  # 192 samples / 2 ranks / batch 16 = 6 steps, 2 epochs
        assert not any(rank["teacher_grads"]) and not any(rank["teacher_training"])
        for name, before in rank["teacher_before"].items():
            assert torch.equal(before, rank["teacher_after"][name]), name
        assert any(not torch.equal(v, rank["student_after"][k]) for k, v in rank["student_before"].items())


@pytest.mark.ddp
def test_ranks_end_with_the_same_student(ranks) -> None:
    a, b = ranks
    for name in a["student_after"]:
        assert torch.equal(a["student_after"][name], b["student_after"][name]), name
    assert a["val_teacher_acc"] == b["val_teacher_acc"]
