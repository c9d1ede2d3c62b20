"""QAT (static, per tensor) under DDP on two CPU processes; each rank saves what it holds.

Usage: ``python ddp_quantize_qat.py OUT_DIR`` (``LC_QAT_MODEL=cnn`` for ``SmallCNN``, whose convolutions
also observe their outputs; the MLP by default). Each rank trains on its half of the data, so the input
ranges its observers see differ; QuantizeOnFitEnd all-gathers them after every QAT step, so both ranks
must end with the same observer state and the same int8 weights and static input scales.

Files (written atomically): ``OUT_DIR/state_rank<r>.pt`` (the int8 ``state_dict``) and
``OUT_DIR/qat_rank<r>.pt`` (the callback's ``qat`` state).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import QuantizeOnFitEnd
from lightning_compress.core.files import atomic_torch_save
from lightning_compress.demo import MLP, Classifier, SmallCNN


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = Classifier(SmallCNN() if os.environ.get("LC_QAT_MODEL") == "cnn" else MLP(hidden=(32, 16)))
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.rand(256, 1, 8, 8, generator=g) * 2, torch.randint(0, 10, (256,), generator=g))
    quantize = QuantizeOnFitEnd("static", per_channel=False, qat_epochs=1, calibration_batches=2, verbose=0)
    trainer = pl.Trainer(
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        max_epochs=2,
        callbacks=[quantize],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=True))
    rank = trainer.global_rank
    atomic_torch_save(
        {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, out / f"state_rank{rank}.pt"
    )
    atomic_torch_save(quantize.state_dict()["qat"], out / f"qat_rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
