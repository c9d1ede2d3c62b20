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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fixtures and helpers

from fixtures import TinyNet, adam, classification_loader, mlp
from helpers import quiet_trainer

from lightning_compress import SparseRegularizer
from lightning_compress.core.files import atomic_torch_save

TERMS = [(0.01, "l1", ["head"]), (0.05, "group_lasso", ["body.*"])]


def Net(by_hand: bool = False) -> TinyNet:
    """``by_hand``: the TERMS added to the loss in ``training_step``."""
    torch.manual_seed(0)  # the same initial weights in every fit and on every rank
    return TinyNet(mlp(6, 32, 16), nn.Linear(16, 3), optimizer=adam(1e-2), penalties=TERMS if by_hand else ())


def _fit(model: TinyNet, callbacks: list) -> pl.Trainer:
    data = classification_loader(128, 6, 3)
    trainer = quiet_trainer(
        Path.cwd(),
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        max_epochs=2,
        accumulate_grad_batches=2,
        callbacks=callbacks,
    )
    trainer.fit(model, data)
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
