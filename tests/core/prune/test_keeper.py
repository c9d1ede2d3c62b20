"""The mask keeper: which optimizers keep pruned weights at zero on their own, and the guard for the rest."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from fixtures import TinyNet, adam, classification_loader, mlp
from helpers import quiet_trainer
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_compress import PruningCallback
from lightning_compress.core.prune.keeper import _ZERO_PRESERVING, MaskKeeper, preserves_zeros
from lightning_compress.core.prune.masks import magnitude_masks

OPTIMIZERS = {
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "sgd-dampening-maximize": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.3, maximize=True),
    "adam-amsgrad-wd": lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True, weight_decay=0.1),
    "adam-decoupled": lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.1, decoupled_weight_decay=True),
    "adam-foreach-off": lambda p: torch.optim.Adam(p, lr=0.1, foreach=False),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.5),
    "adamax-wd": lambda p: torch.optim.Adamax(p, lr=0.1, weight_decay=0.1),
    "nadam-decoupled": lambda p: torch.optim.NAdam(p, lr=0.1, weight_decay=0.1, decoupled_weight_decay=True),
    "radam-wd": lambda p: torch.optim.RAdam(p, lr=0.1, weight_decay=0.1),
    "rmsprop-centered-momentum": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, centered=True),
    "adagrad-initial": lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.5, weight_decay=0.1),
    "adadelta-wd": lambda p: torch.optim.Adadelta(p, lr=1.0, weight_decay=0.1),
    "asgd": lambda p: torch.optim.ASGD(p, lr=0.1, t0=1, weight_decay=0.1),
    "rprop": lambda p: torch.optim.Rprop(p, lr=0.1),
}


def _train(make, guard_all: bool, steps: int = 6) -> tuple[nn.Module, dict[str, Tensor], torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    optimizer = make(model.parameters())
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    for _ in range(2):  # build optimizer state before pruning
        optimizer.zero_grad()
        model(torch.randn(8, 6)).square().mean().backward()
        optimizer.step()
    keeper = MaskKeeper(params, [optimizer], guard_all=guard_all)
    keeper.set_masks(magnitude_masks({n: p.detach() for n, p in params.items()}, 0.6))
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 6)).square().mean().backward()
        keeper.mask_gradients(optimizer)
        optimizer.step()
    masks = dict(keeper.masks)
    keeper.close()
    return model, masks, optimizer


def test_every_listed_optimizer_is_covered() -> None:
    covered = {type(make([nn.Parameter(torch.zeros(1))])) for make in OPTIMIZERS.values()}
    assert covered == set(_ZERO_PRESERVING)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_preserving_optimizers_need_no_reapplication(name: str) -> None:
    model, masks, optimizer = _train(OPTIMIZERS[name], guard_all=False)
    assert preserves_zeros(optimizer)
    params = dict(model.named_parameters())
    for pname, mask in masks.items():
        weight = params[pname].detach()
        assert (weight[~mask] == 0).all(), f"{name}: a pruned weight moved without the post-step hook"
        assert (weight[mask] != 0).all()
        for key, value in optimizer.state[params[pname]].items():
            if isinstance(value, Tensor) and value.shape == weight.shape and key not in ("step_size", "exp_inf"):
                assert (value[~mask] == 0).all(), f"{name}: state {key} of a pruned weight is not zero"


class NoisySGD(torch.optim.SGD):
    """An optimizer that moves every entry, gradient or not (as weight noise or a custom rule would)."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.full_like(p, 0.01))
        return out


def test_other_optimizers_are_guarded_after_every_step() -> None:
    model, masks, optimizer = _train(lambda p: NoisySGD(p, lr=0.1), guard_all=False)
    assert not preserves_zeros(optimizer)  # a subclass is not trusted
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all()
    assert (model[0].bias != 0).all()  # the noise did apply where nothing is pruned


def test_guard_all_registers_the_hook_and_close_removes_it() -> None:
    model = nn.Linear(4, 4)
    sgd, noisy = torch.optim.SGD(model.parameters(), lr=0.1), NoisySGD(model.parameters(), lr=0.1)
    keeper = MaskKeeper({"weight": model.weight}, [sgd, noisy], guard_all=False)
    assert keeper.guarded == [noisy] and not sgd._optimizer_step_post_hooks and noisy._optimizer_step_post_hooks
    keeper.close()
    assert not noisy._optimizer_step_post_hooks
    keeper = MaskKeeper({"weight": model.weight}, [sgd], guard_all=True)
    assert keeper.guarded == [sgd] and sgd._optimizer_step_post_hooks
    keeper.close()


# ------------------------------------------------------------------ in a Trainer


class Net(TinyNet):
    def __init__(self) -> None:
        super().__init__(mlp(8, 16), nn.Linear(16, 2), optimizer=adam(0.05))


class NoisyGradients(Net):
    """Adds gradient noise after the callbacks have run, as a user's hook may (DP-style noise)."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for p in self.parameters():
            if p.grad is not None:
                p.grad.add_(torch.randn_like(p.grad))


class Guarded(Callback):
    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning = pruning
        self.guarded: bool | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.guarded = bool(trainer.optimizers[0]._optimizer_step_post_hooks)
        params = dict(pl_module.named_parameters())
        for name, mask in self.pruning.masks.items():
            assert (params[name].detach()[~mask] == 0).all(), name


def _fit(model: pl.LightningModule, callbacks: list[Callback], tmp_path) -> None:
    quiet_trainer(tmp_path, max_epochs=2, callbacks=callbacks).fit(model, classification_loader(48, 8, 2, seed=None))


@pytest.mark.parametrize(
    ("model_cls", "extra_after", "expected"),
    [(Net, False, False), (NoisyGradients, False, True), (Net, True, True)],
    ids=["plain-adam-fast-path", "module-touches-gradients", "later-callback-touches-gradients"],
)
def test_the_guard_is_installed_exactly_when_needed(tmp_path, model_cls, extra_after, expected) -> None:
    class Later(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            pass

    pruning = PruningCallback(0.5, schedule="constant", verbose=0)
    check = Guarded(pruning)
    _fit(model_cls(), [pruning, *([Later()] if extra_after else []), check], tmp_path)
    assert check.guarded is expected
    assert pruning.sparsity == pytest.approx(0.5, abs=1e-2)
