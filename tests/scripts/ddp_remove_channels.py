"""Train with PruningCallback(method="channel", remove_channels=True) under DDP on two CPU processes.

Usage: ``python ddp_remove_channels.py OUT_DIR``. Two fits where each rank sees its half of the data:

* ``plain``: the replicas stay equal (DDP averages the gradients);
* ``diverged``: each rank adds its own noise to the weights at the start of training, so channel
  scores computed on each rank would differ: only rank 0's decision, broadcast to all, makes every
  rank zero and remove the same channels.

``OUT_DIR/<fit>_rank<r>.pt`` holds ``{"zero_rows": layer -> indices of the zero weight rows just before
removal, "removed": layer -> new weight shape, "state": the slim model's state_dict}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _shared import Diverge, run_fits  # this folder is sys.path[0] when the script runs
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fixtures and helpers

from fixtures import TinyNet, classification_loader, mlp, sgd
from helpers import quiet_trainer

from lightning_compress import PruningCallback
from lightning_compress.core.files import atomic_torch_save


class ZeroRows(pl.Callback):
    """Records, just before PruningCallback removes them (it comes later in the list), the zero rows."""

    def __init__(self) -> None:
        self.rows: dict[str, list[int]] = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, m in pl_module.named_modules():
            if isinstance(m, nn.Linear):
                self.rows[name] = [i for i in range(m.out_features) if not m.weight[i].any()]


def _fit(name: str, out: Path) -> None:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = TinyNet(nn.Sequential(nn.Flatten(), *mlp(32, 24, 16)), nn.Linear(16, 3), optimizer=sgd(0.05, momentum=0.9))
    zero_rows = ZeroRows()
    prune = PruningCallback(
        0.5, method="channel", scope="global", remove_channels=True, update_every_n_steps=2, verbose=0
    )
    callbacks: list[pl.Callback] = [zero_rows, prune]
    if name == "diverged":
        callbacks.insert(0, Diverge())
    trainer = quiet_trainer(out, strategy="ddp", devices=2, accelerator="cpu", max_epochs=3, callbacks=callbacks)
    trainer.fit(model, classification_loader(160, (4, 8), 3))
    result = {
        "zero_rows": zero_rows.rows,
        "removed": {k: list(v) for k, v in prune.removed_channels.items()},
        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    atomic_torch_save(result, out / f"{name}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    run_fits(_fit, ["plain", "diverged"], Path(sys.argv[1]))
