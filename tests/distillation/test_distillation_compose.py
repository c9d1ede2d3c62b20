"""DistillationModule with the compression callbacks in one fit: they act on the student only."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_compress import (
    DistillationModule,
    PruningCallback,
    QuantizeOnFitEnd,
    SparseRegularizer,
    load_compressed,
    sparse_penalty,
)
from lightning_compress.core.quant.modules import Int8Linear
from lightning_compress.demo import MLP, DigitsDataModule


def _trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    return quiet_trainer(
        tmp_path, callbacks=callbacks, **{"max_epochs": 3, "limit_train_batches": 6, "limit_val_batches": 2, **kwargs}
    )


def _teacher_state(module: DistillationModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.teacher.state_dict().items()}


def test_prune_while_distilling_then_quantize_leaves_the_teacher_untouched(tmp_path: Path) -> None:
    teacher = MLP(hidden=[64, 32])
    module = DistillationModule(MLP(hidden=[24]), teacher, feature_pairs={"student.net.2": "teacher.net.4"})
    before = _teacher_state(module)
    sparsities: list[float] = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
            weights = [pl_module.student.net[1].weight, pl_module.student.net[3].weight]
            sparsities.append(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))

    artifact = tmp_path / "student.int8.pt"
    pruning = PruningCallback(0.75, end_epoch=1, update_every_n_steps=2, verbose=0)
    quantize = QuantizeOnFitEnd("dynamic", save_path=str(artifact), verbose=0)
    trainer = _trainer(tmp_path, [pruning, Watch(), quantize])
    trainer.fit(module, DigitsDataModule(batch_size=16))

    # The student was pruned while it learned (sparsity rose over the steps, to the target) ...
    assert sparsities[0] < sparsities[-1]
    assert abs(sparsities[-1] - 0.75) < 0.01
    assert abs(float(trainer.callback_metrics["pruning/sparsity"]) - 0.75) < 0.01
    # ... and quantized at the end, its zeros kept in int8.
    layers = [module.student.net[1], module.student.net[3]]
    assert all(isinstance(layer, Int8Linear) for layer in layers)
    assert all(layer.int8_weight.dtype == torch.int8 for layer in layers)
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
    assert zeros / sum(layer.weight.numel() for layer in layers) >= 0.75 - 0.01
    # The feature projection is not part of the student: neither pruned nor quantized.
    projection = module.feature_projections["net__2"]
    assert projection.weight.shape == (32, 24)
    assert projection.weight.dtype == torch.float32 and int((projection.weight == 0).sum()) == 0

    # The teacher: the same float weights, bit for bit; still float nn.Linear layers, without zeros.
    assert teacher.state_dict().keys() == before.keys()
    for key, value in teacher.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key
    assert all(type(m) is nn.Linear for m in teacher.modules() if isinstance(m, nn.Linear))

    # The artifact is the student alone, and it runs like the student does.
    x = torch.rand(5, 1, 8, 8)
    restored = load_compressed(artifact, copy.deepcopy(MLP(hidden=[24])))
    with torch.no_grad():
        torch.testing.assert_close(restored(x), module.student(x))
    # The int8 student validates next to the teacher.
    metrics = trainer.validate(module, DigitsDataModule(batch_size=16), verbose=False)[0]
    assert {"val/acc", "val/teacher_acc"} <= set(metrics)


def test_sparse_regularizer_penalizes_the_student_only(tmp_path: Path) -> None:
    teacher = MLP(hidden=[64])
    module = DistillationModule(MLP(hidden=[16]), teacher)
    before = _teacher_state(module)
    seen: dict[str, torch.Tensor] = {}

    class Watch(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            seen["student_penalty"] = sparse_penalty(pl_module.student).detach()

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
            seen["logged"] = trainer.callback_metrics["sparse_reg/penalty_step"].clone()

    trainer = _trainer(tmp_path, [Watch(), SparseRegularizer(1e-3)], max_epochs=1)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    torch.testing.assert_close(seen["logged"], seen["student_penalty"])
    assert sparse_penalty(module).item() == sparse_penalty(module.student).item()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
