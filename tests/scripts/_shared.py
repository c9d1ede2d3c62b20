"""What the DDP and FSDP2 scripts of this folder share: the trainer, a callback, and how a script ends.

A script imports it from its own folder (``sys.path[0]`` when it runs); importing it also puts
``tests/`` on ``sys.path``, for the shared fixtures and helpers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fixtures and helpers

from helpers import quiet_trainer


def fsdp2_trainer(out: Path, **kwargs: Any) -> pl.Trainer:
    """A quiet Trainer on two CPU processes under ModelParallelStrategy (FSDP2, data parallel only)."""
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return quiet_trainer(out, strategy=strategy, devices=2, accelerator="cpu", **kwargs)


def close_process_group() -> None:
    """Destroy the process group, or the gloo group may keep the interpreter alive at exit."""
    if dist.is_initialized():
        dist.destroy_process_group()


def run_fits(fit: Callable[[str, Path], None], names: Iterable[str], out: Path) -> None:
    """``fit(name, out)`` for each name in turn on one torch thread, then :func:`close_process_group`."""
    torch.set_num_threads(1)
    for name in names:
        fit(name, out)
    close_process_group()


class Diverge(pl.Callback):
    """Makes the replicas differ: each rank adds its own noise to the weights at the start of training."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        g = torch.Generator().manual_seed(100 + trainer.global_rank)
        with torch.no_grad():
            for p in pl_module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
