"""SparseRegularizer checkpoints: a resumed run ends like an uninterrupted one, the state round trip,
and the command line's checkpoint and saved config."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from fixtures import TinyNet, classification_loader, mlp
from helpers import quiet_trainer
from torch import nn

from lightning_compress import CompressionConfigError, SparseRegularizer

BATCHES = 10


def _net() -> TinyNet:
    """Two hidden Linear layers and a head, trained with Adam (lr 1e-2)."""
    return TinyNet(mlp(6, 16, 16), nn.Linear(16, 3))


def _fit(model: TinyNet, callback: SparseRegularizer, tmp_path, max_epochs: int, ckpt_path=None) -> pl.Trainer:
    """``BATCHES`` batches of 8 per epoch, always the same, in order."""
    trainer = quiet_trainer(
        tmp_path, max_epochs=max_epochs, accelerator="cpu", callbacks=[callback], num_sanity_val_steps=2
    )
    trainer.fit(model, classification_loader(8 * BATCHES, 6, 3), ckpt_path=ckpt_path)
    return trainer


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("proximal", [False, True])
def test_resumed_run_ends_like_the_uninterrupted_one(tmp_path, proximal):
    def regularizer():
        return SparseRegularizer(0.02, proximal=proximal, start_epoch=1, warmup_epochs=2, verbose=0)

    uninterrupted, interrupted = _net(), _net()
    interrupted.load_state_dict(uninterrupted.state_dict())
    whole = regularizer()
    _fit(uninterrupted, whole, tmp_path, max_epochs=4)

    first_half = regularizer()
    trainer = _fit(interrupted, first_half, tmp_path, max_epochs=2)  # stops in the middle of the ramp
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"][first_half.state_key]
    assert saved["version"] == 1
    assert saved["current_strength"] == pytest.approx(0.01)  # halfway up the 2-epoch ramp
    assert saved["steps"] == BATCHES

    resumed_model, second_half = _net(), regularizer()
    _fit(resumed_model, second_half, tmp_path, max_epochs=4, ckpt_path=path)
    for p, q in zip(resumed_model.parameters(), uninterrupted.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert second_half.state_dict() == whole.state_dict()


def test_state_dict_round_trip_and_version_check():
    source = SparseRegularizer(0.3, warmup_epochs=2)
    source._current_strength, source._steps, source._epochs_done = 0.15, 7, 1.0
    target = SparseRegularizer(0.3, warmup_epochs=2)
    target.load_state_dict(source.state_dict())
    assert target.state_dict() == source.state_dict()
    assert target.current_strength == 0.15

    with pytest.raises(
        CompressionConfigError, match="Expected a SparseRegularizer state of version 1, but got version 99"
    ):
        SparseRegularizer().load_state_dict({"version": 99})
    with pytest.warns(UserWarning, match=r"resuming with different arguments: strength=0.1 \(checkpoint: 0.3\)"):
        SparseRegularizer(0.1, warmup_epochs=2).load_state_dict(source.state_dict())


# ---------------------------------------------------------------- command line


@pytest.mark.slow
def test_command_line_takes_the_callback_and_its_saved_config_reloads(tmp_path, monkeypatch):
    from lightning_compress.cli import main

    monkeypatch.setattr("sys.argv", ["lightning-compress"])
    common = [
        "--model.backbone=lightning_compress.demo.MLP",
        "--model.backbone.hidden=[16]",
        "--model.lr=0.05",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    main(
        [
            "fit",
            *common,
            "--trainer.callbacks+=lightning_compress.SparseRegularizer",
            "--trainer.callbacks.strength=5.0",
            "--trainer.callbacks.penalty=group_lasso",
            "--trainer.callbacks.proximal=true",
            "--trainer.callbacks.exclude=[backbone.net.3]",
            f"--trainer.default_root_dir={tmp_path / 'first'}",
        ]
    )
    (config,) = (tmp_path / "first").rglob("config.yaml")
    (checkpoint,) = (tmp_path / "first").rglob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("SparseRegularizer")]
    assert state["strength"] == 5.0 and state["penalty"] == "group_lasso" and state["proximal"] is True
    first = saved["state_dict"]["backbone.net.1.weight"]
    zero_units = (first == 0).all(dim=1)
    assert 0 < int(zero_units.sum()) < len(first)  # proximal group shrinkage zeroed some hidden units
    assert not (saved["state_dict"]["backbone.net.3.weight"] == 0).all(dim=1).any()  # excluded

    main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'again'}"])
    (checkpoint,) = (tmp_path / "again").rglob("*.ckpt")
    again = torch.load(checkpoint, weights_only=True)["state_dict"]["backbone.net.1.weight"]
    torch.testing.assert_close(again, first, rtol=0, atol=0)  # same config, same seed, same result
