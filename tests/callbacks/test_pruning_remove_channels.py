"""PruningCallback(method="channel", remove_channels=True): groups in training, removal at fit end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import load_ranks, quiet_trainer, run_ddp_script

from lightning_compress import (
    CompressionConfigError,
    PruningCallback,
    QuantizeOnFitEnd,
    load_compressed,
    save_compressed,
)
from lightning_compress.core.quant.modules import Int8Module
from lightning_compress.demo import MLP, Classifier, DigitsDataModule, SmallCNN


def test_remove_channels_needs_the_channel_method() -> None:
    with pytest.raises(CompressionConfigError, match=r"remove_channels.*method='channel'"):
        PruningCallback(0.5, method="magnitude", remove_channels=True)
    with pytest.raises(CompressionConfigError, match="remove_channels"):
        PruningCallback(0.5, method="channel", remove_channels="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("backbone", [MLP, SmallCNN], ids=["mlp", "cnn"])
def test_fit_removes_channels_and_validate_runs_the_slim_model(tmp_path: Path, digits, backbone) -> None:  # type: ignore[no-untyped-def]
    model = Classifier(backbone())
    callback = PruningCallback(0.5, method="channel", scope="layer", remove_channels=True, update_every_n_steps=2)
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=6, limit_val_batches=2, callbacks=[callback])
    trainer.fit(model, digits)
    removed = dict(callback.removed_channels)
    assert removed
    first = next(iter(removed))
    assert tuple(model.get_submodule(first).weight.shape) == removed[first]
    total = sum(p.numel() for p in model.backbone.parameters())
    assert total < sum(p.numel() for p in backbone().parameters())
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    dense_rows = model.backbone(x)  # the slim model runs
    assert dense_rows.shape == (4, 10)
    result = trainer.validate(model, digits, verbose=False)
    assert "val/acc" in result[0]


def test_masked_and_slim_outputs_agree(tmp_path: Path, digits) -> None:  # type: ignore[no-untyped-def]
    model = Classifier(SmallCNN())
    callback = PruningCallback(0.5, method="channel", scope="layer", remove_channels=True, update_every_n_steps=2)

    outputs: dict[str, torch.Tensor] = {}
    x = torch.randn(5, 1, 8, 8)

    from lightning.pytorch.callbacks import Callback

    class Before(Callback):
        def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            pl_module.eval()
            with torch.no_grad():
                outputs.setdefault("masked", pl_module(x))

    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=6, limit_val_batches=0,
                            callbacks=[Before(), callback])  # fmt: skip
    trainer.fit(model, digits)
    model.eval()
    with torch.no_grad():
        slim = model(x)
    assert callback.removed_channels
    assert float((slim - outputs["masked"]).norm() / outputs["masked"].norm()) <= 1e-5


def test_quantize_after_removal_whatever_the_order(tmp_path: Path, digits) -> None:  # type: ignore[no-untyped-def]
    model = Classifier(MLP())
    prune = PruningCallback(0.5, method="channel", scope="layer", remove_channels=True, update_every_n_steps=2)
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=6, limit_val_batches=1,
                            callbacks=[QuantizeOnFitEnd(calibration_batches=2), prune])  # fmt: skip
    trainer.fit(model, digits)
    first = model.backbone.net[1]
    assert isinstance(first, Int8Module)
    assert first.out_features == prune.removed_channels["backbone.net.1"][0] < 300


def test_int8_slim_model_saves_and_loads_into_a_fresh_full_model(tmp_path: Path, digits) -> None:  # type: ignore[no-untyped-def]
    # QuantizeOnFitEnd converts the slim model; only the backbone (a part of the pruned module) is saved
    model = Classifier(MLP())
    prune = PruningCallback(0.5, method="channel", scope="layer", remove_channels=True, update_every_n_steps=2)
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=6, limit_val_batches=1,
                            callbacks=[prune, QuantizeOnFitEnd(calibration_batches=2)])  # fmt: skip
    trainer.fit(model, digits)
    assert isinstance(model.backbone.net[3], Int8Module)
    path = tmp_path / "slim_int8.pt"
    save_compressed(model.backbone, path)
    artifact = torch.load(path, weights_only=True)
    assert artifact["shapes"] == {"net.1": [150, 64], "net.3": [50, 150], "net.5": [10, 50]}
    fresh = load_compressed(path, MLP())
    assert isinstance(fresh.net[1], Int8Module) and fresh.net[1].out_features == 150
    x = torch.randn(16, 1, 8, 8)
    model.backbone.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model.backbone(x))


def _resume_fit(root: Path, ckpt: Path | None, saver: bool) -> tuple[Classifier, PruningCallback]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    model = Classifier(MLP(hidden=(48, 24)))
    prune = PruningCallback(0.5, method="channel", end_epoch=1, remove_channels=True, update_every_n_steps=3, verbose=0)
    callbacks: list[Any] = [prune]
    if saver:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
    trainer = quiet_trainer(root, max_epochs=3, limit_train_batches=8, limit_val_batches=0, callbacks=callbacks,
                            enable_checkpointing=saver)  # fmt: skip
    trainer.fit(model, DigitsDataModule(), ckpt_path=ckpt)
    return model, prune


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_resume_mid_pruning_gives_the_same_slim_model(tmp_path: Path) -> None:
    full, full_cb = _resume_fit(tmp_path / "full", None, saver=True)
    checkpoint = tmp_path / "full" / "ckpt" / "epoch=0.ckpt"
    state = torch.load(checkpoint, weights_only=True)
    assert state["state_dict"]["backbone.net.1.weight"].shape == (48, 64)  # saved mid-pruning, before removal
    assert 0.0 < state["callbacks"][full_cb.state_key]["scheduled_sparsity"] < 0.5
    torch.manual_seed(123)  # the resumed run must not depend on the global random state
    resumed, resumed_cb = _resume_fit(tmp_path / "resumed", checkpoint, saver=False)
    assert full_cb.removed_channels and dict(resumed_cb.removed_channels) == dict(full_cb.removed_channels)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["backbone.net.1.weight"].shape[0] < 48


@pytest.mark.slow
def test_ddp_ranks_remove_the_same_channels(tmp_path: Path) -> None:
    run_ddp_script("ddp_remove_channels.py", tmp_path, timeout=400)
    for fit in ("plain", "diverged"):
        r0, r1 = load_ranks(tmp_path, fit)
        assert r0["removed"] and r0["removed"] == r1["removed"], fit
        assert r0["zero_rows"] == r1["zero_rows"], fit
        assert any(r0["zero_rows"].values()), fit
        assert r0["state"].keys() == r1["state"].keys()
        for key in r0["state"]:
            assert r0["state"][key].shape == r1["state"][key].shape, (fit, key)
        if fit == "plain":  # the replicas stay equal: the slim models are identical
            assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"]), fit
