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

import torch
from _shared import Diverge, run_fits  # this folder is sys.path[0] when the script runs
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fixtures and helpers

from fixtures import TinyNet, classification_loader, sgd
from helpers import quiet_trainer

from lightning_compress import PruningCallback
from lightning_compress.core.files import atomic_torch_save


def Net() -> TinyNet:
    torch.manual_seed(0)  # the same initial weights in every fit and on every rank
    body = nn.Sequential(nn.Conv1d(4, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8, 32), nn.ReLU())
    return TinyNet(body, nn.Linear(32, 3), optimizer=sgd(0.05, momentum=0.9))


def _callbacks(name: str) -> dict[str, PruningCallback]:
    if name == "diverged":
        return {"magnitude": PruningCallback(0.8, update_every_n_steps=2, verbose=0)}
    return {
        "channel": PruningCallback(0.5, method="channel", include=["Conv1d"], update_every_n_steps=2, verbose=0),
        "2:4": PruningCallback(0.5, method="2:4", exclude=["body.0", "head"], update_every_n_steps=2, verbose=0),
        "magnitude": PruningCallback(0.8, exclude=["body.*"], update_every_n_steps=2, verbose=0),
    }


def _fit(name: str, out: Path) -> None:
    data = classification_loader(160, (4, 8), 3)
    model = Net()
    pruning = _callbacks(name)
    trainer = quiet_trainer(
        out,
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        max_epochs=3,
        accumulate_grad_batches=2,
        callbacks=[Diverge(), *pruning.values()] if name == "diverged" else list(pruning.values()),
    )
    trainer.fit(model, data)
    windows = {(cb.window.start, cb.window.end) for cb in pruning.values() if cb.window is not None}
    result = {
        "masks": {k: v for cb in pruning.values() for k, v in cb.masks.items()},
        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "sparsity": {method: cb.sparsity for method, cb in pruning.items()},
        "window": [list(w) for w in sorted(windows)],
    }
    atomic_torch_save(result, out / f"{name}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    run_fits(_fit, ["methods", "diverged"], Path(sys.argv[1]))
