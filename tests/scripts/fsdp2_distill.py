"""DistillationModule under ModelParallelStrategy (FSDP2) with the teacher sharded too, on two CPU processes.

Usage: ``python fsdp2_distill.py OUT_DIR``. A subclass shards every ``Linear`` of the student and of the
teacher in ``configure_model``. Each rank saves ``OUT_DIR/distill_rank<r>.pt``: ``{"teacher_dtensor",
"student_dtensor", "teacher_before", "teacher_after" (full weights), "student_before", "student_after",
"teacher_grads" (a teacher parameter had a gradient at any step), "teacher_training", "val_teacher_acc"}``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _shared import close_process_group, fsdp2_trainer  # this folder is sys.path[0] when the script runs
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import DistillationModule
from lightning_compress.core.files import atomic_torch_save
from lightning_compress.core.sharding import full_tensor, is_dtensor
from lightning_compress.demo import MLP


class ShardedDistillation(DistillationModule):
    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for net in (self.student, self.teacher):
            for layer in net.modules():
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(net, mesh=mesh)


def _full(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: full_tensor(p).clone() for n, p in module.named_parameters()}


class Facts(pl.Callback):
    def __init__(self) -> None:
        self.facts: dict[str, Any] = {"teacher_training": [], "teacher_grads": []}

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.facts["teacher_dtensor"] = all(is_dtensor(p) for p in pl_module.teacher.parameters())
        self.facts["student_dtensor"] = all(is_dtensor(p) for p in pl_module.student.parameters())
        self.facts["teacher_before"] = _full(pl_module.teacher)
        self.facts["student_before"] = _full(pl_module.student)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.facts["teacher_training"].append(pl_module.teacher.training)
        self.facts["teacher_grads"].append(any(p.grad is not None for p in pl_module.teacher.parameters()))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(100)
    teacher = MLP(hidden=[48])
    torch.manual_seed(0)
    student = MLP(hidden=[12])
    module = ShardedDistillation(student, teacher, temperature=3.0, alpha=0.8)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.rand(192, 1, 8, 8, generator=g), torch.randint(0, 10, (192,), generator=g))
    facts = Facts()
    trainer = fsdp2_trainer(out, max_epochs=2, callbacks=[facts])
    trainer.fit(module, DataLoader(data, batch_size=16), DataLoader(data, batch_size=32))
    result = {
        **facts.facts,
        "teacher_after": _full(module.teacher),
        "student_after": _full(module.student),
        "val_teacher_acc": float(trainer.callback_metrics["val/teacher_acc"]),
    }
    atomic_torch_save(result, out / f"distill_rank{trainer.global_rank}.pt")
    close_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
