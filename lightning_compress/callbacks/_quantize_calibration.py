"""The passes of ``QuantizeOnFitEnd`` over its calibration batches: float reference, ranges, agreement.

Each batch goes through the Trainer's strategy and precision plugin as in a training step, and the
model is called on it by the rule of :mod:`lightning_compress.core.batches`. What all processes
must agree on (the static input ranges, the agreement sums) is gathered over them.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_compress.core.batches import call_model, check_model_call, first_batch, first_loader, first_tensor
from lightning_compress.core.quant.calibration import record_input_ranges, record_output_ranges
from lightning_compress.core.selection import compression_root

__all__ = ["agreement", "calibration_batches", "check_call", "float_pass", "predict"]


def calibration_batches(trainer: pl.Trainer, count: int, mode: str) -> list[Any]:
    """The first ``count`` training batches, kept where the loader made them (the CPU, usually)."""
    loader = first_loader(trainer.train_dataloader)
    if loader is None:
        if mode == "static":
            rank_zero_warn("QuantizeOnFitEnd: no training batches to calibrate on; every Linear falls back to dynamic.")
        return []
    batches: list[Any] = []
    for batch in loader:
        if len(batches) >= count:
            break
        batches.append(batch)
    return batches


def predict(trainer: pl.Trainer, root: nn.Module, batch: Any) -> Tensor | None:
    """The prediction of ``root`` on ``batch``, called as a training step calls it (see ``core.batches``).

    The batch goes through the precision plugin as in a training step (``"64-true"`` /
    ``"bf16-true"``: inputs in the model's own dtype), so calibration and comparison run in it.
    """
    plugin = trainer.precision_plugin
    batch = plugin.convert_input(trainer.strategy.batch_to_device(batch))
    with plugin.forward_context():
        return first_tensor(call_model(root, batch))


def check_call(pl_module: pl.LightningModule, loaders: Any) -> bool:
    """Check that the model can be called on a training batch as fit end will call it; ``False``: no batch.

    The check binds the batch to ``forward``'s signature (no forward pass, the global random state
    is restored), so a model that cannot be driven fails with a ``CompressionConfigError`` before
    training instead of after the whole fit.
    """
    loader = first_loader(loaders)
    if loader is None:
        return False
    with torch.random.fork_rng(devices=[]):  # the sampler's shuffle must not move the fit's random state
        found, batch = first_batch(loader)
    if not found:
        return False
    check_model_call(compression_root(pl_module)[1], batch, "QuantizeOnFitEnd")
    return True


@torch.no_grad()
def float_pass(
    trainer: pl.Trainer,
    root: nn.Module,
    modules: dict[str, nn.Module],
    batches: list[Any],
    output_modules: dict[str, nn.Module] | None = None,
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, tuple[Tensor, Tensor]], list[Tensor | None]]:
    """The input ranges of ``modules``, the output ranges of ``output_modules`` and the float outputs on ``batches``.

    The ranges are the widest any process saw (gathered over them).
    """
    outputs: list[Tensor | None] = []
    with ExitStack() as stack:
        observers = stack.enter_context(record_input_ranges(modules))
        out_observers = stack.enter_context(record_output_ranges(output_modules or {}))
        for batch in batches:
            out = predict(trainer, root, batch)
            outputs.append(None if out is None else out.detach().float().cpu())
    ranges = _widest(trainer, observers)
    return ranges, _widest(trainer, out_observers), outputs


def _widest(trainer: pl.Trainer, observers: dict[str, Any]) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (min, max)}`` over every process, for the observers that saw something on any of them."""
    if not observers:
        return {}
    names = list(observers)
    device = trainer.strategy.root_device
    stats = torch.tensor(
        [[observers[n].min_val.item(), observers[n].max_val.item(), float(observers[n].count > 0)] for n in names],
        device=device,
    )
    gathered = trainer.strategy.all_gather(stats)
    if gathered.dim() == 3:  # [world, layers, 3]: the widest range seen by any process
        stats = torch.stack([gathered[..., 0].amin(0), gathered[..., 1].amax(0), gathered[..., 2].amax(0)], -1)
    stats = stats.cpu()
    return {n: (stats[i, 0], stats[i, 1]) for i, n in enumerate(names) if stats[i, 2] > 0}


@torch.no_grad()
def agreement(
    trainer: pl.Trainer, root: nn.Module, batches: list[Any], float_outputs: list[Tensor | None]
) -> dict[str, Any]:
    """``calibration_batches``, ``relative_error`` and ``top1_agreement`` of ``root`` against the float outputs."""
    sums = torch.zeros(5, dtype=torch.float64)  # squared error, squared norm, top-1 agreeing, rows, batches
    for batch, ref in zip(batches, float_outputs, strict=True):
        out = predict(trainer, root, batch)
        if out is None or ref is None:
            continue
        out = out.detach().float().cpu()
        sums[0] += float((out - ref).pow(2).sum())
        sums[1] += float(ref.pow(2).sum())
        if ref.dim() >= 2 and ref.shape[-1] > 1:
            sums[2] += float((out.argmax(-1) == ref.argmax(-1)).sum())
            sums[3] += ref.argmax(-1).numel()
        sums[4] += 1
    gathered = trainer.strategy.all_gather(sums.to(trainer.strategy.root_device))
    total = (gathered.sum(0) if gathered.dim() == 2 else gathered).cpu()
    rel = math.sqrt(total[0] / total[1]) if total[1] > 0 else None
    top1 = float(total[2] / total[3]) if total[3] > 0 else None
    return {"calibration_batches": int(total[4]), "relative_error": rel, "top1_agreement": top1}
