"""Peak memory per rank of PruningCallback's mask updates under FSDP2, against training steps without pruning.

Usage: ``python benchmarks/fsdp2_memory.py [--width 2048] [--layers 4]`` (two CPU processes, gloo).
Epoch 0 trains without pruning (``start_epoch=1``); epoch 1 updates the global magnitude masks at every
step. Each rank reports its peak RSS (``ru_maxrss``, monotone) after epoch 0 (training only) and at the
end (training + mask updates), and the tracked tensor bytes the process allocated; the ratio
``peak_after_updates / peak_training`` is the claim of the "Large models" page (<= 1.5).
"""

# ruff: noqa: E402  (the imports follow the sys.path fix below)

from __future__ import annotations

import argparse
import platform
import resource
import sys
from pathlib import Path
from typing import Any

# Python puts this folder first on sys.path, where transformers.py would shadow the package Lightning imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import PruningCallback


class Wide(pl.LightningModule):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


class Peaks(pl.Callback):
    def __init__(self) -> None:
        self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.training = 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 0:
            self.training = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = TensorDataset(torch.randn(64, args.width))
    peaks = Peaks()
    pruning = PruningCallback(0.8, start_epoch=1, end_epoch=1, update_every_n_steps=1, verbose=0)
    trainer = pl.Trainer(
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        limit_train_batches=4,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[peaks, pruning],
    )
    trainer.fit(Wide(args.width, args.layers), DataLoader(data, batch_size=8))
    end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    weights_mb = args.layers * args.width * args.width * 4 / 2**20
    if trainer.global_rank == 0:
        print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, shared machine", flush=True)
        print(
            f"# {args.layers} x Linear({args.width}, {args.width}): {weights_mb:.0f} MiB of float32 weights, "
            f"{weights_mb / 2:.0f} MiB per rank; sparsity reached {pruning.sparsity:.3f}"
        )
    line = (
        f"rank {trainer.global_rank}: peak RSS before fit {peaks.start / 1024:.0f} MiB, after the training-only epoch"
        f" {peaks.training / 1024:.0f} MiB, after the mask-update epoch {end / 1024:.0f} MiB;"
        f" ratio {end / peaks.training:.3f}; growth {(end - peaks.training) / 1024:.0f} MiB"
        f" over {(peaks.training - peaks.start) / 1024:.0f} MiB of training growth"
    )
    print(line, file=sys.stdout, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
