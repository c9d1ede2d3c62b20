"""Train with SparseRegularizer under DDP on two CPU processes; each rank saves its parameters.

Usage: ``python ddp_regularizer.py OUT_DIR``. Three fits from the same initial weights, each rank on
its half of the data:

* ``callback``: l1 on the body and group lasso on the head, both as callbacks (subgradient);
* ``hand``: the same two penalties added to the loss in ``training_step``;
* ``proximal``: group lasso with ``proximal=True`` on every layer.

Files: ``OUT_DIR/<fit>_rank<r>.pt`` (``name -> tensor``), written atomically.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import SparseRegularizer, sparse_penalty
from lightning_compress.core.files import atomic_torch_save

TERMS = [(0.01, "l1", ["head"]), (0.05, "group_lasso", ["body.*"])]


class Net(pl.LightningModule):
    def __init__(self, by_hand: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same initial weights in every fit and on every rank
        self.body = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)
        self.by_hand = by_hand

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.head(self.body(x)), y)
        if self.by_hand:
            for strength, penalty, exclude in TERMS:
                loss = loss + strength * sparse_penalty(self, penalty, exclude=exclude)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _fit(model: Net, callbacks: list) -> pl.Trainer:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(128, 6, generator=g), torch.randint(0, 3, (128,), generator=g))
    trainer = pl.Trainer(
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        max_epochs=2,
        accumulate_grad_batches=2,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    return trainer


def _save(out: Path, name: str, trainer: pl.Trainer, model: nn.Module) -> None:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_torch_save(state, out / f"{name}_rank{trainer.global_rank}.pt")


def main(out: Path) -> None:
    torch.set_num_threads(1)
    model = Net()
    callbacks = [SparseRegularizer(s, penalty=p, exclude=e, verbose=0) for s, p, e in TERMS]
    _save(out, "callback", _fit(model, callbacks), model)

    model = Net(by_hand=True)
    _save(out, "hand", _fit(model, []), model)

    model = Net()
    _save(
        out, "proximal", _fit(model, [SparseRegularizer(6.0, penalty="group_lasso", proximal=True, verbose=0)]), model
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
