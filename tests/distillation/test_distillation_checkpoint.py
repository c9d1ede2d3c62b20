"""DistillationModule: teacher weights from checkpoints, student-only checkpoints, exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_compress import CompressionConfigError, DistillationModule
from lightning_compress.demo import MLP, Classifier, DigitsDataModule


def _trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    return quiet_trainer(tmp_path, **{"max_epochs": 1, "limit_train_batches": 4, "limit_val_batches": 1, **kwargs})


def _teacher() -> nn.Module:
    return MLP(hidden=[40, 20])


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------- teacher_checkpoint


def test_teacher_from_a_plain_state_dict(tmp_path: Path) -> None:
    trained = _teacher()
    path = tmp_path / "teacher.pt"
    torch.save(trained.state_dict(), path)
    module = DistillationModule(MLP(hidden=[8]), _teacher(), teacher_checkpoint=str(path))
    assert _same_weights(module.teacher, trained)
    as_path = DistillationModule(MLP(hidden=[8]), _teacher(), teacher_checkpoint=path)  # type: ignore[arg-type]
    assert _same_weights(as_path.teacher, trained)
    assert as_path.hparams["teacher_checkpoint"] == str(path)  # a str: checkpoints stay weights_only-loadable


def test_teacher_from_a_lightning_checkpoint_with_a_prefix(tmp_path: Path) -> None:
    classifier = Classifier(backbone=_teacher())
    trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=True)
    trainer.fit(classifier, DigitsDataModule(batch_size=16))
    path = trainer.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    assert next(iter(torch.load(path, weights_only=True)["state_dict"])).startswith("backbone.")
    module = DistillationModule(MLP(hidden=[8]), _teacher(), teacher_checkpoint=path)
    assert _same_weights(module.teacher, classifier.backbone)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model": sd, "epoch": 3},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {f"model._orig_mod.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {**{f"student.{k}": v for k, v in sd.items()}, "other.weight": torch.zeros(1)}},
    ],
    ids=["model-key", "ddp-prefix", "compile-prefix", "student-of-a-distillation"],
)
def test_teacher_prefixes_are_found(tmp_path: Path, wrap: Any) -> None:
    trained = _teacher()
    path = tmp_path / "teacher.ckpt"
    torch.save(wrap(trained.state_dict()), path)
    module = DistillationModule(MLP(hidden=[8]), _teacher(), teacher_checkpoint=str(path))
    assert _same_weights(module.teacher, trained)


def test_teacher_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(
        CompressionConfigError, match=r"`teacher_checkpoint` to be the path of a checkpoint file.*No such"
    ):
        DistillationModule(MLP(), _teacher(), teacher_checkpoint=str(tmp_path / "missing.ckpt"))

    pickled = tmp_path / "module.pt"
    torch.save(_teacher(), pickled)  # a whole pickled module: not loadable with weights_only=True
    with pytest.raises(
        CompressionConfigError, match=r"torch.load\(weights_only=True\) can read.*teacher.state_dict\(\)"
    ):
        DistillationModule(MLP(), _teacher(), teacher_checkpoint=str(pickled))

    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 1}, empty)
    with pytest.raises(CompressionConfigError, match=r"a Lightning checkpoint or a state dict of tensors.*\['epoch'\]"):
        DistillationModule(MLP(), _teacher(), teacher_checkpoint=str(empty))

    other = tmp_path / "other.pt"
    torch.save({f"model.{k}": v for k, v in MLP(hidden=[40]).state_dict().items()}, other)
    with pytest.raises(
        CompressionConfigError, match=r"every weight of the teacher \(MLP, 6 tensors\), but 2 are missing"
    ):
        DistillationModule(MLP(), _teacher(), teacher_checkpoint=str(other))

    twice = tmp_path / "twice.pt"
    sd = _teacher().state_dict()
    torch.save({**{f"a.{k}": v for k, v in sd.items()}, **{f"b.{k}": v for k, v in sd.items()}}, twice)
    with pytest.raises(CompressionConfigError, match=r"complete under each of \['a.', 'b.'\]"):
        DistillationModule(MLP(), _teacher(), teacher_checkpoint=str(twice))

    extra = tmp_path / "extra.pt"
    torch.save({**sd, "head.weight": torch.zeros(2)}, extra)
    with pytest.raises(CompressionConfigError, match=r"strict=True after removing the prefix ''.*head.weight"):
        DistillationModule(MLP(), _teacher(), teacher_checkpoint=str(extra))


# ---------------------------------------------------------------------------------------------- module checkpoints


def _module(teacher_path: Path, **kwargs: Any) -> DistillationModule:
    torch.manual_seed(1)
    return DistillationModule(
        MLP(hidden=[16]),
        _teacher(),
        teacher_checkpoint=str(teacher_path),
        feature_pairs={"student.net.2": "teacher.net.4"},  # ReLU(16) -> ReLU(20): a projection
        **kwargs,
    )


@pytest.fixture
def teacher_path(tmp_path: Path) -> Path:
    path = tmp_path / "teacher.pt"
    torch.save(_teacher().state_dict(), path)
    return path


def test_checkpoint_holds_the_student_and_projections_only(tmp_path: Path, teacher_path: Path) -> None:
    module = _module(teacher_path)
    trainer = _trainer(tmp_path, enable_checkpointing=True)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    path = trainer.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    checkpoint = torch.load(path, weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert keys == {f"student.{k}" for k in module.student.state_dict()} | {
        "feature_projections.net__2.weight",
        "feature_projections.net__2.bias",
    }
    assert checkpoint["state_dict"]["feature_projections.net__2.weight"].shape == (20, 16)
    hparams = checkpoint["hyper_parameters"]
    assert "teacher" not in hparams and "student" not in hparams
    assert hparams["teacher_checkpoint"] == str(teacher_path)

    # Strict loading: into a fresh module (projections are created from the checkpoint) ...
    fresh = _module(teacher_path)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    assert _same_weights(fresh.student, module.student)
    # ... into the plain student ...
    plain = MLP(hidden=[16])
    plain.load_state_dict({k[len("student.") :]: v for k, v in checkpoint["state_dict"].items() if "student." in k})
    assert _same_weights(plain, module.student)
    # ... and through load_from_checkpoint, which rebuilds the teacher from teacher_checkpoint.
    loaded = DistillationModule.load_from_checkpoint(
        path, student=MLP(hidden=[16]), teacher=_teacher(), weights_only=True
    )
    assert _same_weights(loaded.student, module.student) and _same_weights(loaded.teacher, module.teacher)
    torch.testing.assert_close(loaded.feature_projections["net__2"].weight, module.feature_projections["net__2"].weight)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty:UserWarning")  # resuming in place
def test_resumed_run_matches_the_uninterrupted_one(tmp_path: Path, teacher_path: Path) -> None:
    def run(ckpt_path: str | None = None) -> DistillationModule:
        module = _module(teacher_path)
        every_epoch = ModelCheckpoint(dirpath=tmp_path / "full", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        trainer = _trainer(tmp_path, max_epochs=4, enable_checkpointing=True, callbacks=[every_epoch])
        trainer.fit(module, DigitsDataModule(batch_size=16, seed=3), ckpt_path=ckpt_path)
        assert trainer.global_step == 16
        return module

    full = run()
    resumed = run(ckpt_path=str(tmp_path / "full" / "epoch=1.ckpt"))
    assert _same_weights(resumed.student, full.student)
    assert _same_weights(resumed.feature_projections, full.feature_projections)
    interrupted = DistillationModule(MLP(hidden=[16]), _teacher(), feature_pairs={"student.net.2": "teacher.net.4"})
    interrupted.load_state_dict(torch.load(tmp_path / "full" / "epoch=1.ckpt", weights_only=True)["state_dict"])
    assert not _same_weights(interrupted.student, full.student)  # training went on after the checkpoint
