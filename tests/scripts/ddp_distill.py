"""Distil under DDP on two CPU processes (gloo); each rank saves what it holds.

Usage: ``python ddp_distill.py OUT_DIR``. Each rank builds its teacher from a different seed (as
if each had loaded a different file): DistillationModule broadcasts rank zero's teacher at fit
start, so every rank distils from the same one. Each rank trains on its half of the data; DDP
averages the gradients of the student and of the feature projection.

``OUT_DIR/result_rank<r>.pt`` (written atomically) holds the rank's student and projection
``state_dict``, its teacher's ``state_dict``, rank zero's teacher as it was built, and facts
checked during training: the parameters DDP wraps, the teacher's mode and its gradients.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers

from helpers import quiet_trainer

from lightning_compress import DistillationModule
from lightning_compress.core.files import atomic_torch_save
from lightning_compress.demo import MLP


class Facts(pl.Callback):
    """What the strategy wrapped, and whether the teacher stayed frozen, seen on every step."""

    def __init__(self) -> None:
        self.facts: dict[str, Any] = {"teacher_training": [], "teacher_grads": []}

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        wrapped = trainer.strategy.model
        assert isinstance(wrapped, DistributedDataParallel)
        self.facts["wrapped_params"] = sum(p.numel() for p in wrapped.parameters())
        self.facts["teacher_ids_wrapped"] = any(
            id(p) in {id(q) for q in wrapped.parameters()} for p in pl_module.teacher.parameters()
        )
        self.facts["teacher_at_start"] = {k: v.clone() for k, v in pl_module.teacher.state_dict().items()}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.facts["teacher_training"].append(pl_module.teacher.training)
        self.facts["teacher_grads"].append(any(p.grad is not None for p in pl_module.teacher.parameters()))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.manual_seed(100 + rank)
    teacher = MLP(hidden=[48])  # a different teacher on each rank until the broadcast
    built_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(0)
    student = MLP(hidden=[12])
    module = DistillationModule(
        student, teacher, temperature=3.0, alpha=0.8, feature_pairs={"student.net.2": "teacher.net.2"}
    )
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.rand(192, 1, 8, 8, generator=g), torch.randint(0, 10, (192,), generator=g))
    facts = Facts()
    trainer = quiet_trainer(
        out, strategy="ddp", devices=2, accelerator="cpu", max_epochs=2, callbacks=[facts], num_sanity_val_steps=2
    )
    trainer.fit(module, DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=32))
    atomic_torch_save(
        {
            "state": {k: v.clone() for k, v in module.state_dict().items()},
            "teacher": {k: v.clone() for k, v in module.teacher.state_dict().items()},
            "built_teacher": built_teacher,
            "student_params": sum(p.numel() for p in module.parameters()),
            "global_step": trainer.global_step,
            "val_teacher_acc": float(trainer.callback_metrics["val/teacher_acc"]),
            **facts.facts,
        },
        out / f"result_rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
