"""SparseRegularizer under ModelParallelStrategy (FSDP2) on two CPU processes.

Usage: ``python fsdp2_regularizer.py OUT_DIR``. Two fits of the five-layer MLP of ``fsdp2_pruning.py``:

* ``gradient``: ``l1`` added to the gradient. ``Probe`` callbacks just before and after the regularizer's
  ``on_before_optimizer_step`` gather the full gradients and weights; the difference must be
  ``strength * d penalty / d w`` of the full weights computed on one process, and the logged penalty
  ``penalty_of`` of the full weights.
* ``proximal``: ``group_lasso`` with ``proximal=True`` (plain SGD): whole rows reach exact zeros.

``OUT_DIR/<fit>_rank<r>.pt``: ``{"grad_error": max abs difference, "value_error": relative difference,
"steps": steps compared, "zero_rows": rows exactly zero per weight, "state": full weights}``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _shared import fsdp2_trainer, run_fits  # this folder is sys.path[0] when the script runs
from fsdp2_pruning import ShardedNet
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fixtures and helpers

from fixtures import classification_loader, sgd

from lightning_compress import SparseRegularizer
from lightning_compress.core.files import atomic_torch_save
from lightning_compress.core.penalties import penalty_of
from lightning_compress.core.sharding import full_tensor

STRENGTH = 1e-2


def Net() -> ShardedNet:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(8, 33), nn.ReLU(), nn.Linear(33, 31), nn.ReLU())
    return ShardedNet(body, nn.Linear(31, 3), optimizer=sgd(0.1))


class Probe(pl.Callback):
    def __init__(self, regularizer: SparseRegularizer | None = None, before: Probe | None = None) -> None:
        self.regularizer, self.before = regularizer, before
        self.grads: dict[str, torch.Tensor] = {}
        self.grad_error = self.value_error = 0.0
        self.steps = 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        params = {n: p for n, p in pl_module.named_parameters() if n.endswith("weight")}
        grads = {n: full_tensor(p.grad) for n, p in params.items()}
        if self.before is None:
            self.grads = grads
            return
        weights = {n: full_tensor(p).requires_grad_(True) for n, p in params.items()}
        value = penalty_of(list(weights.values()), "l1")
        expected = torch.autograd.grad(value * STRENGTH, list(weights.values()))
        for (n, g), e in zip(grads.items(), expected, strict=True):
            self.grad_error = max(self.grad_error, float((g - self.before.grads[n] - e).abs().max()))
        logged = float(trainer.callback_metrics["sparse_reg/penalty_step"])
        self.value_error = max(self.value_error, abs(logged - float(value.detach())) / float(value.detach()))
        self.steps += 1


def _fit(fit: str, out: Path) -> None:
    model = Net()
    if fit == "gradient":
        regularizer = SparseRegularizer(STRENGTH, penalty="l1", verbose=0)
        before = Probe()
        after = Probe(regularizer, before)
        callbacks: list[pl.Callback] = [before, regularizer, after]
    else:
        regularizer = SparseRegularizer(0.25, penalty="group_lasso", proximal=True, verbose=0)
        callbacks = [regularizer]
    trainer = fsdp2_trainer(out, max_epochs=2, callbacks=callbacks)
    trainer.fit(model, classification_loader(160, 8, 3))
    state = {n: full_tensor(p).detach().clone() for n, p in model.named_parameters()}
    result: dict[str, Any] = {
        "state": state,
        "zero_rows": {n: int((w == 0).all(dim=1).sum()) for n, w in state.items() if n.endswith("weight")},
    }
    if fit == "gradient":
        result.update(grad_error=after.grad_error, value_error=after.value_error, steps=after.steps)
    atomic_torch_save(result, out / f"{fit}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    run_fits(_fit, ["gradient", "proximal"], Path(sys.argv[1]))
