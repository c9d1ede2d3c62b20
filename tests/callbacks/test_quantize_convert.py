"""QuantizeOnFitEnd and the core's ``quantize`` make the same conversion (benchmarks use the latter)."""

from __future__ import annotations

import copy

import torch
from fixtures import TinyNet, classification_loader, mlp
from helpers import quiet_trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_compress import QuantizeOnFitEnd
from lightning_compress.callbacks._quantize_report import summary
from lightning_compress.core.quant.convert import quantize


class Snapshot(Callback):
    """The float model as training left it (``on_train_end`` runs before the callback's ``on_fit_end``)."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.model = copy.deepcopy(pl_module).cpu()


def test_the_callback_and_quantize_agree_on_a_never_called_linear(tmp_path):
    model = TinyNet(body=mlp(6, 8), unused=nn.Linear(4, 4), head=nn.Linear(8, 3))
    loader = classification_loader(32, 6, 3)
    snapshot, callback = Snapshot(), QuantizeOnFitEnd("static", calibration_batches=4, verbose=0)
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[snapshot, callback]).fit(model, loader)
    result = quantize(snapshot.model, "static", calibration=list(loader)[:4])
    assert result.converted == callback.report["layers"] == {"body.0": "static", "unused": "dynamic", "head": "static"}
    assert result.fallbacks == callback.report["fallbacks"]
    assert result.fallbacks == {"unused": "dynamic (input never observed during calibration)"}
    for (name, mine), theirs in zip(snapshot.model.state_dict().items(), model.state_dict().values(), strict=True):
        assert mine.equal(theirs), name  # the same int8 weights and scales


def _bn_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(),
    )  # fmt: skip


def test_the_callback_folds_batch_norms_as_quantize_does(tmp_path):
    model = TinyNet(body=_bn_cnn(), head=nn.Linear(4 * 6 * 6, 3))
    loader = classification_loader(32, (1, 6, 6), 3)
    snapshot, callback = Snapshot(), QuantizeOnFitEnd("static", calibration_batches=4, verbose=0)
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[snapshot, callback]).fit(model, loader)
    result = quantize(snapshot.model, "static", calibration=list(loader)[:4])
    assert result.folded == callback.report["folded"] == {"body.1": "body.0", "body.4": "body.3"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.body[0].output_scale.item() == model.body[3].input_scale.item()  # one grid (core/quant/grids.py)
    assert "2 batch norm(s) folded into their convolutions: body.1 -> body.0, body.4 -> body.3\n" in (
        summary(callback.report) + "\n"
    )
    many = summary({**callback.report, "folded": {f"bn{i}": f"conv{i}" for i in range(5)}})
    assert "5 batch norm(s) folded into their convolutions: bn0 -> conv0, bn1 -> conv1, bn2 -> conv2, and 2 more" in (
        many
    )
    for (name, mine), theirs in zip(snapshot.model.state_dict().items(), model.state_dict().values(), strict=True):
        assert mine.equal(theirs), name  # the same folded int8 weights, biases and scales


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


def _residual_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), _Residual(), _Residual(), nn.Flatten())


def test_the_callback_rounds_residual_inputs_as_quantize_does(tmp_path):
    from lightning_compress.core.quant.residual import input_grids

    model = TinyNet(body=_residual_cnn(), head=nn.Linear(4 * 6 * 6, 3))
    loader = classification_loader(32, (1, 6, 6), 3)
    snapshot, callback = Snapshot(), QuantizeOnFitEnd("static", calibration_batches=4, verbose=0)
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[snapshot, callback]).fit(model, loader)
    result = quantize(snapshot.model, "static", calibration=list(loader)[:4])
    assert result.input_grids == callback.report["input_grids"] == {"body.2": "conv", "body.3": "conv"}
    assert input_grids(model) == result.input_grids
    assert "2 residual block input(s) on their convolution's int8 grid: body.2, body.3\n" in (
        summary(callback.report) + "\n"
    )
    x = next(iter(loader))[0]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), snapshot.model.eval()(x))


def test_after_qat_residual_inputs_stay_as_qat_trained_them(tmp_path):
    from lightning_compress.core.quant.residual import input_grids

    model = TinyNet(body=_residual_cnn(), head=nn.Linear(4 * 6 * 6, 3))
    callback = QuantizeOnFitEnd("static", calibration_batches=2, qat_epochs=1, verbose=0)
    loader = classification_loader(16, (1, 6, 6), 3)
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[callback]).fit(model, loader)
    assert callback.report["input_grids"] == {} and input_grids(model) == {}
    assert "residual block" not in summary(callback.report)


def test_per_tensor_and_qat_keep_the_batch_norms(tmp_path):
    for kwargs in ({"per_channel": False}, {"qat_epochs": 1}):
        model = TinyNet(body=_bn_cnn(), head=nn.Linear(4 * 6 * 6, 3))
        callback = QuantizeOnFitEnd("static", calibration_batches=2, verbose=0, **kwargs)
        loader = classification_loader(16, (1, 6, 6), 3)
        quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[callback]).fit(model, loader)
        assert callback.report["folded"] == {}, kwargs
        assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2


def test_a_channel_removed_folded_model_reloads_into_a_fresh_one(tmp_path):
    from lightning_compress import PruningCallback, load_compressed

    def body() -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )  # fmt: skip

    model = TinyNet(body=body(), head=nn.Linear(32, 3))
    path = tmp_path / "slim.pt"
    callbacks = [
        PruningCallback(target_sparsity=0.5, method="channel", remove_channels=True, verbose=0),
        QuantizeOnFitEnd("static", save_path=str(path), verbose=0),
    ]
    loader = classification_loader(64, (1, 6, 6), 3)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=callbacks).fit(model, loader)
    assert callbacks[1].report["folded"] == {"body.1": "body.0", "body.4": "body.3"}
    assert model.body[3].out_channels < 8  # channels were removed, then the batch norms folded
    fresh = TinyNet(body=body(), head=nn.Linear(32, 3))
    load_compressed(path, fresh)
    x = next(iter(loader))[0]
    assert torch.equal(fresh.eval()(x), model.eval()(x))
