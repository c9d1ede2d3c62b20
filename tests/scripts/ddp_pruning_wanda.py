"""PruningCallback(score="wanda") under DDP on two CPU processes: statistics summed over ranks.

Usage: ``python ddp_pruning_wanda.py OUT_DIR``. Each rank sees its half of the data (DistributedSampler,
no shuffling), so the input norms each rank gathers differ. At every mask update the file
``OUT_DIR/wanda_rank<r>.pt`` records the local squared sums of the first layer and the norms used
(after the all-reduce), and at the end the masks and weights: ``{"updates": [(step, local, used)],
"masks": ..., "state": ..., "inputs": the first layer's local inputs per global step}``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fixtures import TinyNet, classification_loader, mlp, sgd
from helpers import quiet_trainer

from lightning_compress import PruningCallback
from lightning_compress.callbacks import _statistics
from lightning_compress.core.files import atomic_torch_save

UPDATES: list[tuple[int, Tensor, Tensor]] = []
_norms = _statistics.ScoreStatistics.norms


def _spy(self: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, who: str) -> dict[str, Tensor]:
    local = self.collector.sums["body.0.weight"].clone() if "body.0.weight" in self.collector.sums else None
    used = _norms(self, trainer, pl_module, who)
    if local is None:  # the calibration pass ran inside
        local = torch.full_like(used["body.0.weight"], float("nan"))
    UPDATES.append((trainer.global_step, local, used["body.0.weight"].clone()))
    return used


def main(out: Path) -> None:
    torch.set_num_threads(1)
    _statistics.ScoreStatistics.norms = _spy  # type: ignore[method-assign]
    torch.manual_seed(0)
    model = TinyNet(mlp(6, 16), nn.Linear(16, 3), optimizer=sgd(0.05, momentum=0.9))
    cb = PruningCallback(
        0.5, scope="row", score="wanda", score_batches=2, end_epoch=1, update_every_n_steps=3, verbose=0
    )
    trainer = quiet_trainer(out, strategy="ddp", devices=2, accelerator="cpu", max_epochs=3, callbacks=[cb])
    trainer.fit(model, classification_loader(64, 6, 3, batch_size=8))  # 4 batches per rank and epoch
    result = {
        "updates": UPDATES,
        "masks": dict(cb.masks),
        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "window": [cb.window.start, cb.window.end] if cb.window is not None else None,
    }
    atomic_torch_save(result, out / f"wanda_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
