"""PruningCallback(method="channel", remove_channels=True): groups in training, removal at fit end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer

from lightning_compress import CompressionConfigError, PruningCallback, QuantizeOnFitEnd
from lightning_compress.core.quant.modules import Int8Module
from lightning_compress.demo import MLP, Classifier, SmallCNN


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
