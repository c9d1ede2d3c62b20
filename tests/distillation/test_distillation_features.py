"""DistillationModule: feature (hint) distillation through learnable projections (FitNets)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_compress import CompressionConfigError, DistillationModule
from lightning_compress.core.distill import distillation_loss, hint_loss
from lightning_compress.demo import MLP, DigitsDataModule, SmallCNN


def _trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    return quiet_trainer(tmp_path, **{"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 0, **kwargs})


def test_both_name_forms_resolve_to_the_same_submodules() -> None:
    with_prefix = DistillationModule(MLP(hidden=[8]), MLP(), feature_pairs={"student.net.1": "teacher.net.3"})
    without = DistillationModule(MLP(hidden=[8]), MLP(), feature_pairs={"net.1": "net.3"})
    assert with_prefix.feature_pairs == without.feature_pairs
    assert list(with_prefix.feature_projections) == ["net__1"]


@pytest.mark.parametrize(
    ("pairs", "match"),
    [
        ({"student.nte.1": "teacher.net.3"}, r"names of submodules of the student.*Close matches: \[.*'student.net.1'"),
        ({"student.net.1": "teacher.nett.3"}, r"submodule 'teacher.nett.3'. Close matches: \['teacher.net.3'"),
        ({"student.features": "teacher.net.3"}, r"no submodule 'student.features'. The student has e.g."),
    ],
)
def test_unknown_feature_names_list_close_matches(pairs: dict[str, str], match: str) -> None:
    with pytest.raises(CompressionConfigError, match=match):
        DistillationModule(MLP(hidden=[8]), MLP(), feature_pairs=pairs)


def test_a_student_module_appears_once() -> None:
    with pytest.raises(CompressionConfigError, match=r"one entry per student submodule.*'net.1' repeats"):
        DistillationModule(MLP(hidden=[8]), MLP(), feature_pairs={"student.net.1": "net.1", "net.1": "net.3"})


def test_feature_loss_is_added_and_matches_a_hand_computation(tmp_path: Path) -> None:
    teacher = MLP(hidden=[32, 24])
    module = DistillationModule(
        MLP(hidden=[12]), teacher, feature_pairs={"student.net.2": "teacher.net.4"}, feature_weight=0.3
    )
    seen: dict[str, Any] = {}

    class Capture(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            seen["x"], seen["y"] = batch
            seen["student"] = copy.deepcopy(pl_module.student)
            seen["projection"] = copy.deepcopy(pl_module.feature_projections["net__2"])

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
            seen["loss"] = outputs["loss"].detach()
            seen["logged"] = trainer.callback_metrics["distill/feature_loss"].clone()

    _trainer(tmp_path, max_steps=1, callbacks=[Capture()]).fit(module, DigitsDataModule(batch_size=16))
    x, y = seen["x"], seen["y"]
    student, projection = seen["student"], seen["projection"]
    with torch.no_grad():
        s_hidden = student.net[:3](x)  # Flatten, Linear, ReLU
        t_hidden = teacher.net[:5](x)  # Flatten, Linear, ReLU, Linear, ReLU
        hint = hint_loss(projection(s_hidden), t_hidden)
        kd = distillation_loss(student(x), teacher(x), y)
    assert tuple(projection.weight.shape) == (24, 12)
    torch.testing.assert_close(seen["logged"], hint)
    torch.testing.assert_close(seen["loss"], kd.loss + 0.3 * hint)


def test_projections_are_trained_and_hooks_removed(tmp_path: Path) -> None:
    student, teacher = SmallCNN(channels=(4, 8)), SmallCNN(channels=(16, 32))
    module = DistillationModule(student, teacher, feature_pairs={"student.features.2": "teacher.features.2"})
    projection = module.feature_projections["features__2"]
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    assert tuple(projection.weight.shape) == (32, 8)  # a 1x1 convolution from 8 to 32 channels
    # Trained: no longer the initial values, and the optimizer holds it.
    optimizer = trainer.optimizers[0]
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(projection.weight) in params and id(projection.bias) in params
    assert optimizer.state[projection.weight]["step"].item() == 6
    assert "distill/feature_loss" in trainer.callback_metrics
    for model in (module.student, module.teacher):
        assert all(not m._forward_hooks for m in model.modules())


def test_projection_weights_move_under_training(tmp_path: Path) -> None:
    module = DistillationModule(MLP(hidden=[12]), MLP(), feature_pairs={"student.net.2": "teacher.net.2"})
    module.trainer = _trainer(tmp_path)
    module.example_input_array = torch.rand(4, 1, 8, 8)
    module.setup("fit")
    before = module.feature_projections["net__2"].weight.detach().clone()
    _trainer(tmp_path).fit(module, DigitsDataModule(batch_size=16))
    assert not torch.equal(before, module.feature_projections["net__2"].weight.detach())


def test_feature_modules_must_return_tensors(tmp_path: Path) -> None:
    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = DictOut()
            self.inner.register_forward_hook(lambda m, a, out: Box(out))  # an output holding no tensor

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x).value

    class Box:
        def __init__(self, value: torch.Tensor) -> None:
            self.value = value

    module = DistillationModule(Wrapped(), MLP(), feature_pairs={"student.inner": "teacher.net.5"})
    with pytest.raises(TypeError, match=r"feature module `inner` \(DictOut\) to return a tensor"):
        _trainer(tmp_path).fit(module, DigitsDataModule(batch_size=16))


def test_incompatible_feature_shapes_fail_at_setup(tmp_path: Path) -> None:
    module = DistillationModule(SmallCNN(channels=(4, 8)), MLP(), feature_pairs={"student.features.0": "teacher.net.1"})
    with pytest.raises(CompressionConfigError, match=r"student \(16, 4, 8, 8\) and teacher \(16, 300\)"):
        _trainer(tmp_path).fit(module, DigitsDataModule(batch_size=16))


def test_a_second_fit_reuses_the_module_and_its_projection(tmp_path: Path) -> None:
    module = DistillationModule(MLP(hidden=[12]), MLP(), feature_pairs={"student.net.2": "teacher.net.4"})
    _trainer(tmp_path).fit(module, DigitsDataModule(batch_size=16))
    projection = module.feature_projections["net__2"]
    after_first = projection.weight.detach().clone()
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    assert module.feature_projections["net__2"] is projection  # kept, not re-created
    assert not torch.equal(after_first, projection.weight.detach())  # and trained further
    assert trainer.global_step == 6
