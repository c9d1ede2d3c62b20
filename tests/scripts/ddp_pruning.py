"""Train with PruningCallback under DDP on two CPU processes; each rank saves its masks and weights.

Usage: ``python ddp_pruning.py OUT_DIR``. Two fits, with gradient accumulation, where each rank sees
its half of the data (so only the DDP-averaged gradients keep the replicas equal):

* ``methods``: three callbacks on disjoint layers, one per method: channel pruning of the
  ``Conv1d``, 2:4 on the hidden ``Linear`` and global magnitude on the head;
* ``diverged``: global magnitude on every layer after each rank added its own noise to the weights
  at the start of training, so masks computed on each rank would differ: only rank 0's decision,
  broadcast to all, keeps them equal.

The files ``OUT_DIR/<fit>_rank<r>.pt`` hold ``{"masks": name -> bool, "state": model state_dict,
"sparsity": method -> float, "window": [start, end]}`` and are written atomically.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import PruningCallback
from lightning_compress.core.files import atomic_torch_save


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same initial weights in every fit and on every rank
        self.body = nn.Sequential(nn.Conv1d(4, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8, 32))
        self.head = nn.Linear(32, 3)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.head(torch.relu(self.body(x))), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Diverge(pl.Callback):
    """Makes the replicas differ: each rank adds its own noise to the weights at the start of training."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        g = torch.Generator().manual_seed(100 + trainer.global_rank)
        with torch.no_grad():
            for p in pl_module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _callbacks(name: str) -> dict[str, PruningCallback]:
    if name == "diverged":
        return {"magnitude": PruningCallback(0.8, update_every_n_steps=2, verbose=0)}
    return {
        "channel": PruningCallback(0.5, method="channel", include=["Conv1d"], update_every_n_steps=2, verbose=0),
        "2:4": PruningCallback(0.5, method="2:4", exclude=["body.0", "head"], update_every_n_steps=2, verbose=0),
        "magnitude": PruningCallback(0.8, exclude=["body.*"], update_every_n_steps=2, verbose=0),
    }


def _fit(name: str, out: Path) -> None:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(160, 4, 8, generator=g), torch.randint(0, 3, (160,), generator=g))
    model = Net()
    pruning = _callbacks(name)
    trainer = pl.Trainer(
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        max_epochs=3,
        accumulate_grad_batches=2,
        callbacks=[Diverge(), *pruning.values()] if name == "diverged" else list(pruning.values()),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    windows = {(cb.window.start, cb.window.end) for cb in pruning.values() if cb.window is not None}
    result = {
        "masks": {k: v for cb in pruning.values() for k, v in cb.masks.items()},
        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "sparsity": {method: cb.sparsity for method, cb in pruning.items()},
        "window": [list(w) for w in sorted(windows)],
    }
    atomic_torch_save(result, out / f"{name}_rank{trainer.global_rank}.pt")


def main(out: Path) -> None:
    torch.set_num_threads(1)
    for name in ("methods", "diverged"):
        _fit(name, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
