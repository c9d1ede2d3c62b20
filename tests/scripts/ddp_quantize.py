"""Train and quantize (static mode) under DDP on two CPU processes; each rank saves what it holds.

Usage: ``python ddp_quantize.py OUT_DIR``. Each rank trains on its half of the data, so the
activation ranges it observes on its own calibration batches differ; QuantizeOnFitEnd reduces them
across the ranks, so both must end with the same int8 weights and the same static input scales.

Files (written atomically):

* ``OUT_DIR/state_rank<r>.pt``: the rank's int8 ``state_dict``;
* ``OUT_DIR/local_rank<r>.pt``: ``{layer: tensor([min, max])}`` this rank observed on its own
  calibration batches (before the reduction), and ``OUT_DIR/report_rank<r>.pt``: the callback's report
  numbers;
* ``OUT_DIR/model.int8.pt``: the artifact, written by rank zero only.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers

from helpers import quiet_trainer

from lightning_compress import QuantizeOnFitEnd
from lightning_compress.core.files import atomic_torch_save
from lightning_compress.core.quant.convert import record_input_ranges
from lightning_compress.demo import MLP, Classifier

CALIBRATION_BATCHES = 3


class LocalRanges(pl.Callback):
    """Before QuantizeOnFitEnd converts the model, record the ranges this rank sees on its own batches."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = copy.deepcopy(pl_module.backbone).cpu().eval()
        linears = {f"backbone.{n}": m for n, m in net.named_modules() if isinstance(m, nn.Linear)}
        with torch.no_grad(), record_input_ranges(linears) as obs:
            for i, (x, _) in enumerate(trainer.train_dataloader):
                if i == CALIBRATION_BATCHES:
                    break
                net(x)
        ranges = {n: torch.stack([o.min_val, o.max_val]) for n, o in obs.items()}
        atomic_torch_save(ranges, self.out / f"local_rank{trainer.global_rank}.pt")


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = Classifier(MLP())
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.rand(256, 1, 8, 8, generator=g) * 2, torch.randint(0, 10, (256,), generator=g))
    quantize = QuantizeOnFitEnd(
        "static", calibration_batches=CALIBRATION_BATCHES, save_path=str(out / "model.int8.pt"), verbose=0
    )
    trainer = quiet_trainer(
        out, strategy="ddp", devices=2, accelerator="cpu", max_epochs=2, callbacks=[LocalRanges(out), quantize]
    )
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=True))
    rank = trainer.global_rank
    atomic_torch_save(
        {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, out / f"state_rank{rank}.pt"
    )
    report = {k: v for k, v in quantize.report.items() if isinstance(v, (int, float)) and v is not None}
    atomic_torch_save(report, out / f"report_rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
