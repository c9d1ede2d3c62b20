"""PruningCallback on models no one here wrote: torchvision, lightning.pytorch.demos; bf16 and accumulation."""

from __future__ import annotations

import contextlib
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel, ManualOptimBoringModel
from lightning.pytorch.demos.transformer import LightningTransformer
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import PruningCallback
from lightning_compress.demo import MLP, Classifier, DigitsDataModule

torchvision = pytest.importorskip("torchvision")


class Vision(pl.LightningModule):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.backbone(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def _images(n: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,))), batch_size=2)


def _fit(model: pl.LightningModule, callback: Callback, tmp_path, loader: Any = None, **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 1)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], **kwargs)
    trainer.fit(model, loader)
    return trainer


def _check_exact(model: nn.Module, pruning: PruningCallback) -> None:
    params = dict(model.named_parameters())
    assert pruning.masks
    for name, mask in pruning.masks.items():
        assert (params[name].detach()[~mask] == 0).all(), name


def _nm_groups(weight: Tensor, m: int = 4) -> Tensor:
    """Nonzeros per group of m along the reduction axis (out, *kernel, in), trailing partial group padded."""
    flat = weight.permute(0, *range(2, weight.dim()), 1).reshape(weight.shape[0], -1) if weight.dim() > 2 else weight
    flat = F.pad((flat != 0).float(), (0, (-flat.shape[1]) % m))
    return flat.view(flat.shape[0], -1, m).sum(-1)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("method", ["magnitude", "channel", "2:4"])
def test_torchvision_models(tmp_path, arch: str, method: str) -> None:
    torch.manual_seed(0)
    backbone = getattr(torchvision.models, arch)(num_classes=10)
    model = Vision(backbone)
    keys = list(model.state_dict())
    target = 0.5 if method == "2:4" else 0.7
    pruning = PruningCallback(target, method=method, schedule="constant", verbose=0)
    # One global threshold on an untrained MobileNet removes whole layers whose initial weights are all
    # small (its classifier among them): the callback says so.
    cuts = arch == "mobilenet_v3_small" and method == "magnitude"
    with pytest.warns(UserWarning, match="removed every weight of") if cuts else contextlib.nullcontext():
        _fit(model, pruning, tmp_path, _images())
    _check_exact(model, pruning)
    convs = {n: m for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d)}
    depthwise = [m for m in convs.values() if m.groups > 1]
    assert (arch == "mobilenet_v3_small") == bool(depthwise)
    if method == "magnitude":
        assert pruning.sparsity == pytest.approx(target, abs=1e-6)
    elif method == "channel":
        for m in convs.values():  # whole filters, depthwise ones included, never a whole layer
            dead = (m.weight == 0).flatten(1).all(dim=1)
            assert ((m.weight == 0).flatten(1).any(dim=1) == dead).all() and not dead.all()
        assert pruning.sparsity == pytest.approx(target, abs=0.01)
    else:
        for name, mask in pruning.masks.items():
            assert (_nm_groups(mask.float()) <= 2).all(), name
        for m in depthwise:  # 3x3 depthwise: groups of 4, 4, 1 along the kernel -> 5 of 9 kept
            if m.kernel_size == (3, 3):
                assert ((m.weight != 0).flatten(1).sum(dim=1) <= 5).all()
        assert 0.45 < (pruning.sparsity or 0.0) <= 0.5
    plain = getattr(torchvision.models, arch)(num_classes=10)
    assert list(model.state_dict()) == keys
    plain.load_state_dict(backbone.state_dict(), strict=True)


class Transformer(LightningTransformer):
    def prepare_data(self) -> None:
        pass  # the demo downloads WikiText-2 here; random tokens need nothing


class TokenData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(i)
        tokens = torch.randint(0, 50, (9,), generator=g)
        return tokens[:-1], tokens[1:]


@pytest.mark.parametrize("method", ["magnitude", "2:4"])
def test_lightning_demo_transformer(tmp_path, method: str) -> None:
    torch.manual_seed(0)
    model = Transformer(vocab_size=50)
    pruning = PruningCallback(0.5, method=method, schedule="constant", verbose=0)
    _fit(model, pruning, tmp_path, DataLoader(TokenData(), batch_size=2))
    _check_exact(model, pruning)
    # MultiheadAttention reads out_proj.weight without calling out_proj: a forward hook would miss it,
    # real zeros do not.
    out_proj = "model.transformer.encoder.layers.0.self_attn.out_proj.weight"
    assert out_proj in pruning.masks and (model.get_parameter(out_proj) == 0).any()
    if method == "2:4":
        assert all((_nm_groups(m.float()) == 2).all() for m in pruning.masks.values())
    assert pruning.sparsity == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("model_cls", [BoringModel, ManualOptimBoringModel])
def test_lightning_boring_models(tmp_path, model_cls: type[BoringModel]) -> None:
    model = model_cls()
    pruning = PruningCallback(0.5, update_every_n_steps=4, verbose=0)
    _fit(model, pruning, tmp_path, max_epochs=2, limit_train_batches=16)
    _check_exact(model, pruning)
    assert (model.layer.weight == 0).sum() == 32


def test_bf16_mixed_and_accumulation(tmp_path) -> None:
    model = Classifier(MLP(hidden=(32,)))
    pruning = PruningCallback(0.9, update_every_n_steps=2, verbose=0)

    class Check(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            _check_exact(pl_module, pruning) if pruning.masks else None

    trainer = quiet_trainer(
        tmp_path,
        max_epochs=2,
        precision="bf16-mixed",
        accumulate_grad_batches=3,
        limit_train_batches=10,
        limit_val_batches=0,
        callbacks=[pruning, Check()],
    )
    trainer.fit(model, DigitsDataModule())
    assert trainer.global_step == 8  # 10 batches, accumulate 3: 4 steps per epoch
    assert pruning.window is not None and (pruning.window.start, pruning.window.end) == (0, 4)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _check_exact(model, pruning)
    assert pruning.sparsity == pytest.approx(0.9, abs=1e-4)
