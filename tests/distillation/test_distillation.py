"""DistillationModule: the objective, the frozen teacher, metrics, optimizer and argument checks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import CompressionConfigError, DistillationModule
from lightning_compress.core.distill import distillation_loss
from lightning_compress.core.selection import select_targets
from lightning_compress.demo import MLP, DigitsDataModule


def _trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    return quiet_trainer(tmp_path, **{"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 2, **kwargs})


def _teacher_with_state() -> nn.Module:
    """A teacher whose train mode would show: BatchNorm statistics and dropout."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Dropout(0.5), nn.Linear(48, 10)
    )


def _student() -> nn.Module:
    return MLP(hidden=[16])


# ---------------------------------------------------------------------------------------------- the objective


def test_training_loss_is_the_hinton_objective(tmp_path: Path) -> None:
    teacher = _teacher_with_state()
    module = DistillationModule(_student(), teacher, temperature=3.0, alpha=0.7)
    student_before = copy.deepcopy(module.student)
    seen: dict[str, Any] = {}

    class Capture(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            seen["batch"] = [t.clone() for t in batch]

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
            seen["loss"] = outputs["loss"].detach().clone()
            seen["metrics"] = {k: v.clone() for k, v in trainer.callback_metrics.items()}

    _trainer(tmp_path, max_steps=1, callbacks=[Capture()]).fit(module, DigitsDataModule(batch_size=16))
    x, y = seen["batch"]
    with torch.no_grad():
        expected = distillation_loss(student_before(x), teacher.eval()(x), y, temperature=3.0, alpha=0.7)
    torch.testing.assert_close(seen["loss"], expected.loss)
    torch.testing.assert_close(seen["metrics"]["train/loss"], expected.loss)
    torch.testing.assert_close(seen["metrics"]["distill/kd_loss"], expected.kd)
    torch.testing.assert_close(seen["metrics"]["distill/ce_loss"], expected.ce)


def test_distillation_moves_the_student_toward_the_teacher(tmp_path: Path) -> None:
    teacher = MLP(hidden=[64])
    module = DistillationModule(_student(), teacher, alpha=1.0, lr=1e-2)
    x = torch.rand(128, 1, 8, 8)

    def gap() -> float:
        with torch.no_grad():
            return distillation_loss(module.student(x), teacher(x), None, alpha=1.0).kd.item()

    before = gap()
    _trainer(tmp_path, max_epochs=2, limit_train_batches=8, limit_val_batches=0).fit(
        module, DigitsDataModule(batch_size=32)
    )
    assert gap() < 0.5 * before


# ---------------------------------------------------------------------------------------------- the frozen teacher


def test_teacher_is_frozen_in_eval_mode_without_autograd_and_unchanged(tmp_path: Path) -> None:
    teacher = _teacher_with_state().train()
    original = copy.deepcopy(teacher.state_dict())
    module = DistillationModule(_student(), teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    grad_enabled: list[bool] = []
    teacher.register_forward_pre_hook(lambda m, args: grad_enabled.append(torch.is_grad_enabled()))
    teacher_ids = {id(p) for p in teacher.parameters()}
    checks: dict[str, list[Any]] = {"training": [], "in_optimizer": [], "grads": []}

    class Spy(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            checks["training"].append(pl_module.training and not pl_module.teacher.training)

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            checks["in_optimizer"].append(any(id(p) in teacher_ids for p in params))
            checks["grads"].append(all(p.grad is None for p in pl_module.teacher.parameters()))

    _trainer(tmp_path, max_epochs=2, callbacks=[Spy()]).fit(module, DigitsDataModule(batch_size=16))
    assert checks["training"] == [True] * 6
    assert checks["in_optimizer"] == [False] * 6 and checks["grads"] == [True] * 6
    assert grad_enabled and not any(grad_enabled)
    for key, value in teacher.state_dict().items():  # BatchNorm statistics too: bit for bit
        assert torch.equal(value, original[key]), key


def test_train_keeps_the_teacher_in_eval_mode() -> None:
    module = DistillationModule(_student(), _teacher_with_state())
    module.train()
    assert module.training and module.student.training and not module.teacher.training
    module.teacher.train()  # a user flips it: the next teacher forward puts it back
    module._teacher_forward(torch.rand(4, 1, 8, 8))
    assert not module.teacher.training


def test_teacher_is_outside_the_module_tree_but_moves_with_it() -> None:
    module = DistillationModule(_student(), _teacher_with_state())
    assert "teacher" not in dict(module.named_children())
    assert all(key.startswith("student.") for key in module.state_dict())
    teacher_params = {id(p) for p in module.teacher.parameters()}
    assert not teacher_params & {id(p) for p in module.parameters()}
    module.double()
    assert all(p.dtype == torch.float64 for p in module.teacher.parameters())
    assert all(b.dtype == torch.float64 for b in module.teacher.buffers() if b.is_floating_point())
    assert module.to(torch.float32).teacher[1].weight.dtype == torch.float32
    assert "(teacher): Sequential (frozen" in repr(module)


def test_assigning_a_new_teacher_freezes_it() -> None:
    module = DistillationModule(_student(), _teacher_with_state())
    new = _teacher_with_state().train()
    module.teacher = new
    assert module.teacher is new and not new.training
    assert not any(p.requires_grad for p in new.parameters())
    assert "teacher" not in module._modules and all(k.startswith("student.") for k in module.state_dict())


def test_compression_callbacks_see_only_the_student() -> None:
    module = DistillationModule(_student(), _teacher_with_state())
    assert DistillationModule.compression_submodule == "student"
    names = [t.name for t in select_targets(module)]
    assert names == ["student.net.1", "student.net.3"]


def test_hyperparameters_hold_no_modules() -> None:
    module = DistillationModule(_student(), _teacher_with_state(), temperature=2.0, feature_weight=0.5)
    assert "student" not in module.hparams and "teacher" not in module.hparams
    assert module.hparams["temperature"] == 2.0 and module.hparams["feature_weight"] == 0.5


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_and_teacher_accuracy_computed_once(tmp_path: Path) -> None:
    teacher = _teacher_with_state()
    calls: list[int] = []
    teacher.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    module = DistillationModule(_student(), teacher)
    assert module.num_classes is None
    data = DigitsDataModule(batch_size=16)
    trainer = _trainer(tmp_path, max_epochs=3, num_sanity_val_steps=2)
    trainer.fit(module, data)
    # 1 probe batch at setup + 3 epochs x 3 training batches + the first real validation (2 batches).
    assert len(calls) == 1 + 9 + 2
    assert module.num_classes == 10
    metrics = trainer.callback_metrics
    for key in ("train/loss", "distill/kd_loss", "distill/ce_loss", "val/acc", "val/loss", "val/teacher_acc"):
        assert key in metrics, key
    x, y = next(iter(DataLoader(data.val_set, batch_size=32)))  # type: ignore[arg-type]
    with torch.no_grad():
        teacher_acc = (teacher(x).argmax(1) == y).float().mean()
        student_acc = (module.student(x).argmax(1) == y).float().mean()
    torch.testing.assert_close(metrics["val/teacher_acc"], teacher_acc)
    torch.testing.assert_close(metrics["val/acc"], student_acc)
    test = trainer.test(module, data, verbose=False)[0]
    assert {"test/acc", "test/teacher_acc", "test/loss"} <= set(test)


def test_default_optimizer_is_adamw_over_the_student() -> None:
    module = DistillationModule(_student(), _teacher_with_state(), lr=0.02, weight_decay=0.1)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 0.02 and optimizer.defaults["weight_decay"] == 0.1
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in module.student.parameters()}


def test_predict_returns_the_students_classes(tmp_path: Path) -> None:
    module = DistillationModule(_student(), _teacher_with_state(), num_classes=10)
    loader = DataLoader(TensorDataset(torch.rand(6, 1, 8, 8), torch.zeros(6, dtype=torch.long)), batch_size=3)
    preds = _trainer(tmp_path).predict(module, loader)
    assert preds is not None
    x = torch.cat([b[0] for b in loader])
    torch.testing.assert_close(torch.cat(preds), module.student(x).argmax(1))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- other batch layouts


class _DictBatches(DistillationModule):
    def unpack_batch(self, batch: Any) -> tuple[Any, Tensor | None]:
        return batch["image"], batch.get("label")


def _dict_loader(labels: bool) -> DataLoader[Any]:
    x, y = torch.rand(24, 1, 8, 8), torch.randint(0, 10, (24,))
    items = [{"image": x[i], **({"label": y[i]} if labels else {})} for i in range(24)]
    return DataLoader(items, batch_size=8)  # type: ignore[arg-type]


def test_a_subclass_reads_other_batch_layouts(tmp_path: Path) -> None:
    module = _DictBatches(_student(), _teacher_with_state())
    trainer = _trainer(tmp_path)
    trainer.fit(module, _dict_loader(labels=True), _dict_loader(labels=True))
    assert {"train/loss", "distill/ce_loss", "val/acc"} <= set(trainer.callback_metrics)


def test_unlabelled_data_trains_on_the_soft_term_alone(tmp_path: Path) -> None:
    module = _DictBatches(_student(), _teacher_with_state(), alpha=1.0)
    trainer = _trainer(tmp_path)
    trainer.fit(module, _dict_loader(labels=False), _dict_loader(labels=False))  # validation skips unlabelled
    assert "distill/kd_loss" in trainer.callback_metrics and "distill/ce_loss" not in trainer.callback_metrics
    with pytest.raises(CompressionConfigError, match=r"Expected argument `alpha` to be 1\.0 when batches carry no"):
        _trainer(tmp_path).fit(
            _DictBatches(_student(), _teacher_with_state(), alpha=0.5), _dict_loader(False), _dict_loader(False)
        )


def test_default_unpack_rejects_other_layouts(tmp_path: Path) -> None:
    module = DistillationModule(_student(), _teacher_with_state())
    triples = DataLoader(TensorDataset(torch.rand(8, 1, 8, 8), torch.zeros(8).long(), torch.zeros(8)), batch_size=4)
    with pytest.raises(TypeError, match=r"Expected a batch `\(x, y\)`, but got list of length 3\. Override"):
        _trainer(tmp_path).fit(module, triples, triples)


# ---------------------------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("temperature", [0.0, -2.0])
def test_temperature_must_be_positive(temperature: float) -> None:
    with pytest.raises(CompressionConfigError, match=r"Expected argument `temperature` to be a number in \(0, inf\)"):
        DistillationModule(_student(), _teacher_with_state(), temperature=temperature)


@pytest.mark.parametrize("alpha", [-0.5, 1.01])
def test_alpha_must_be_in_unit_interval(alpha: float) -> None:
    with pytest.raises(CompressionConfigError, match=r"Expected argument `alpha` to be a number in \[0, 1\]"):
        DistillationModule(_student(), _teacher_with_state(), alpha=alpha)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1e-3}, r"`lr` to be a number in \[0, inf\)"),
        ({"lr": float("inf")}, r"`lr` to be a number in \[0, inf\), but got inf\. Infinity and NaN are not allowed"),
        ({"temperature": float("inf")}, r"`temperature` to be a number in \(0, inf\), but got inf\. Infinity"),
        ({"weight_decay": float("inf")}, r"`weight_decay` to be a number in \[0, inf\), but got inf\. Infinity"),
        ({"feature_weight": float("inf")}, r"`feature_weight` to be a number in \[0, inf\), but got inf\. Infinity"),
        ({"weight_decay": -1.0}, r"`weight_decay` to be a number in \[0, inf\)"),
        ({"feature_weight": -1.0}, r"`feature_weight` to be a number in \[0, inf\)"),
        ({"num_classes": 0}, r"`num_classes` to be an integer in \[1, inf\)"),
        ({"teacher_checkpoint": 3}, r"`teacher_checkpoint` to be a path or None"),
        ({"feature_pairs": ["a"]}, r"`feature_pairs` to be a dict from student to teacher submodule names"),
    ],
)
def test_other_arguments_are_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(CompressionConfigError, match=match):
        DistillationModule(_student(), _teacher_with_state(), **kwargs)


def test_a_learning_rate_of_zero_is_accepted_as_torch_does() -> None:
    module = DistillationModule(_student(), _teacher_with_state(), lr=0.0)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert optimizer.defaults["lr"] == 0.0


def test_student_and_teacher_must_be_modules_that_share_nothing() -> None:
    with pytest.raises(CompressionConfigError, match=r"Expected argument `student` to be an nn.Module, but got 'str'"):
        DistillationModule("mlp", _teacher_with_state())  # type: ignore[arg-type]
    student = _student()
    with pytest.raises(CompressionConfigError, match="shares no parameters with the student"):
        DistillationModule(student, student)
    shared = nn.Sequential(student.net[1], nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(CompressionConfigError, match=r"copy.deepcopy\(model\)"):
        DistillationModule(student, shared)


def test_output_shapes_must_agree_at_setup(tmp_path: Path) -> None:
    module = DistillationModule(MLP(hidden=[16], num_classes=5), _teacher_with_state())
    trainer = _trainer(tmp_path)
    with pytest.raises(CompressionConfigError, match=r"same shape, but got teacher \(16, 10\) and student \(16, 5\)"):
        trainer.fit(module, DigitsDataModule(batch_size=16))
    assert trainer.global_step == 0


def test_num_classes_must_match_the_teacher(tmp_path: Path) -> None:
    module = DistillationModule(_student(), _teacher_with_state(), num_classes=7)
    with pytest.raises(CompressionConfigError, match=r"`num_classes` to be the teacher's number of outputs \(10\)"):
        _trainer(tmp_path).fit(module, DigitsDataModule(batch_size=16))


def test_models_must_return_logits(tmp_path: Path) -> None:
    module = DistillationModule(nn.Sequential(nn.Flatten(), nn.Linear(64, 1), nn.Flatten(0)), _teacher_with_state())
    with pytest.raises(CompressionConfigError, match=r"Expected the student to return logits of shape .* got \(16,\)"):
        _trainer(tmp_path).fit(module, DigitsDataModule(batch_size=16))


def test_example_input_array_replaces_the_probe_batch(tmp_path: Path) -> None:
    module = DistillationModule(_student(), _teacher_with_state())
    module.example_input_array = torch.rand(2, 1, 8, 8)
    module.trainer = _trainer(tmp_path)  # setup without any dataloader
    module.setup("validate")
    assert module.num_classes == 10
    bare = DistillationModule(_student(), _teacher_with_state())
    bare.trainer = _trainer(tmp_path)
    with pytest.raises(CompressionConfigError, match="Expected a validate dataloader to take one batch from"):
        bare.setup("validate")


def test_deepcopy_and_pickle_keep_the_teacher_frozen_and_outside() -> None:
    import pickle

    module = DistillationModule(_student(), _teacher_with_state())
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert clone.teacher is not module.teacher
        assert "teacher" not in clone._modules and all(k.startswith("student.") for k in clone.state_dict())
        assert not clone.teacher.training and not any(p.requires_grad for p in clone.teacher.parameters())
        x = torch.rand(3, 1, 8, 8)
        torch.testing.assert_close(clone._teacher_forward(x), module._teacher_forward(x))


def test_true_half_precision_casts_the_teacher_with_the_student(tmp_path: Path) -> None:
    module = DistillationModule(_student(), MLP(), feature_pairs={"student.net.2": "teacher.net.2"})
    trainer = _trainer(tmp_path, precision="bf16-true", limit_val_batches=0)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    assert {p.dtype for p in module.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
