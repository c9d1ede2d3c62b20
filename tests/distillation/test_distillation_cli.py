"""DistillationModule from LightningCLI: class_path models in YAML, teacher_checkpoint, --optimizer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_compress import DistillationModule
from lightning_compress.cli import main
from lightning_compress.demo import MLP

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "configs" / "distill_resnet18_mobilenet.yaml"
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on the command line: no pytest arguments in sys.argv beside the CLI's own."""
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])


def _only_checkpoint(root: Path) -> Path:
    (path,) = sorted(root.rglob("*.ckpt"))
    return path


@pytest.mark.slow
def test_example_config_resnet18_teaches_mobilenet(tmp_path: Path) -> None:
    main(
        [
            "fit",
            "--config",
            str(EXAMPLE),
            "--data.batch_size=8",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    path = _only_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    prefixes = {key.split(".")[0] for key in checkpoint["state_dict"]}
    assert prefixes == {"student", "feature_projections"}
    assert checkpoint["state_dict"]["feature_projections.features__3.weight"].shape == (128, 24)
    hparams = checkpoint["hyper_parameters"]
    assert hparams["student"]["class_path"] == "torchvision.models.mobilenet_v3_small"
    assert hparams["teacher"]["class_path"] == "torchvision.models.resnet18"
    # The config in the checkpoint rebuilds both models: no arguments needed.
    loaded = DistillationModule.load_from_checkpoint(path, weights_only=True)
    assert type(loaded.teacher).__name__ == "ResNet" and type(loaded.student).__name__ == "MobileNetV3"
    student_state = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}
    for key, value in loaded.student.state_dict().items():
        assert torch.equal(value, student_state[f"student.{key}"]), key


def _write(path: Path, config: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.filterwarnings("ignore:`DistillationModule.configure_optimizers` will be overridden:UserWarning")
def test_teacher_checkpoint_and_cli_optimizer(tmp_path: Path) -> None:
    # Step 1: train the teacher with the demo Classifier (its checkpoint keys start with "backbone.").
    teacher_root = tmp_path / "teacher"
    main(
        [
            "fit",
            "--model=lightning_compress.demo.Classifier",
            "--model.backbone=lightning_compress.demo.MLP",
            "--model.backbone.hidden=[32]",
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={teacher_root}",
            *QUIET,
        ]
    )
    teacher_ckpt = _only_checkpoint(teacher_root)

    # Step 2: distil into a smaller MLP, with hints, SGD and a scheduler from the command line.
    config = _write(
        tmp_path / "distill.yaml",
        {
            "model": {
                "class_path": "lightning_compress.DistillationModule",
                "init_args": {
                    "student": {"class_path": "lightning_compress.demo.MLP", "init_args": {"hidden": [8]}},
                    "teacher": {"class_path": "lightning_compress.demo.MLP", "init_args": {"hidden": [32]}},
                    "teacher_checkpoint": str(teacher_ckpt),
                    "temperature": 2.0,
                    "feature_pairs": {"student.net.2": "teacher.net.2"},
                },
            }
        },
    )
    root = tmp_path / "student"
    main(
        [
            "fit",
            "--config",
            str(config),
            "--optimizer=SGD",
            "--optimizer.lr=0.05",
            "--optimizer.momentum=0.9",
            "--lr_scheduler=StepLR",
            "--lr_scheduler.step_size=1",
            "--trainer.max_steps=4",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={root}",
            *QUIET,
        ]
    )
    checkpoint = torch.load(_only_checkpoint(root), weights_only=True)
    (group,) = checkpoint["optimizer_states"][0]["param_groups"]
    assert group["momentum"] == 0.9  # the CLI's SGD, not the default AdamW
    # 4 student tensors + the projection's weight and bias (created before their shapes were known).
    assert len(group["params"]) == 6
    assert all("momentum_buffer" in s for s in checkpoint["optimizer_states"][0]["state"].values())
    assert len(checkpoint["optimizer_states"][0]["state"]) == 6
    assert checkpoint["lr_schedulers"][0]["step_size"] == 1
    assert checkpoint["state_dict"]["feature_projections.net__2.weight"].shape == (32, 8)

    loaded = DistillationModule.load_from_checkpoint(_only_checkpoint(root), weights_only=True)
    teacher_state = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    for key, value in loaded.teacher.state_dict().items():
        assert torch.equal(value, teacher_state[f"backbone.{key}"]), key
    assert isinstance(loaded.student, MLP)
