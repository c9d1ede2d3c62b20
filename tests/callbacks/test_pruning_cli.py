"""PruningCallback from LightningCLI: class path on the command line, YAML, and the saved config reloading."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_compress.cli import main

FAST = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=true",
    "--trainer.logger=false",
]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])


def _saved_callback(root: Path) -> dict:
    config = yaml.safe_load((root / "config.yaml").read_text())
    (callback,) = [c for c in config["trainer"]["callbacks"] if "PruningCallback" in c["class_path"]]
    return callback


def _final_sparsity(root: Path) -> float:
    (ckpt,) = (root / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@pytest.mark.slow
def test_command_line_class_path_and_saved_config_reloads(tmp_path) -> None:
    first = tmp_path / "first"
    main(
        [
            "fit",
            "--trainer.callbacks+=lightning_compress.PruningCallback",
            "--trainer.callbacks.target_sparsity=0.8",
            "--trainer.callbacks.update_every_n_steps=2",
            "--trainer.callbacks.exclude=[backbone.net.5]",
            f"--trainer.default_root_dir={first}",
            *FAST,
        ]
    )
    callback = _saved_callback(first)
    assert callback["init_args"]["target_sparsity"] == 0.8
    assert callback["init_args"]["exclude"] == ["backbone.net.5"]
    assert callback["init_args"]["method"] == "magnitude" and callback["init_args"]["end_epoch"] is None
    first_sparsity = _final_sparsity(first)
    assert first_sparsity > 0.7  # 80% of the two selected layers; the excluded head stays dense

    # The saved config.yaml reloads as it is (ModelPruning's does not).
    second = tmp_path / "second"
    main(["fit", "--config", str(first / "config.yaml"), f"--trainer.default_root_dir={second}"])
    assert _saved_callback(second) == callback
    assert _final_sparsity(second) == pytest.approx(first_sparsity)


@pytest.mark.slow
def test_yaml_config_with_nm_pattern(tmp_path) -> None:
    config = tmp_path / "prune.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [
                        {
                            "class_path": "lightning_compress.PruningCallback",
                            "init_args": {"target_sparsity": 0.5, "method": "2:4", "schedule": "linear"},
                        }
                    ]
                }
            }
        )
    )
    main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}", *FAST])
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    hidden = state["backbone.net.3.weight"]  # 100 x 300
    assert ((hidden != 0).view(100, -1, 4).sum(-1) == 2).all()
