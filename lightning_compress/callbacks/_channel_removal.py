"""The ``remove_channels=True`` part of ``PruningCallback``: coupled groups, exact zeros, removal at fit end.

The callback says when; this helper holds the groups traced on the first training batch, the second
mask keeper that keeps the pruned channels' bias and norm entries exactly zero, and the removal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_compress.core.batches import model_call
from lightning_compress.core.prune.group_masks import (
    eligible_groups,
    extra_masks,
    extra_targets,
    group_channel_masks,
)
from lightning_compress.core.prune.groups import ChannelGroup, Unit, find_groups
from lightning_compress.core.prune.keeper import MaskKeeper
from lightning_compress.core.prune.surgery import remove_channels
from lightning_compress.core.selection import compression_root
from lightning_compress.core.sharding import has_dtensors
from lightning_compress.errors import config_error

__all__ = ["ChannelRemoval", "example_inputs_of"]

_EXAMPLE_ROWS = 8  # samples of the first batch kept to trace and to measure constants


def example_inputs_of(batch: Any, model: nn.Module | None = None) -> Any:
    """What ``model`` is called with for ``batch`` (the rule of :mod:`lightning_compress.core.batches`).

    A tensor, the first item of a tuple (the first items when ``forward`` requires several), or a dict
    of keyword arguments without ``labels``.
    """
    try:
        return model_call(model if model is not None else nn.Identity(), batch).example_inputs()
    except TypeError:
        return batch


def _head(inputs: Any) -> Any:
    if isinstance(inputs, Tensor):
        return inputs[:_EXAMPLE_ROWS].detach().clone()
    if isinstance(inputs, Mapping):
        return {k: _head(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_head(v) for v in inputs)
    return inputs


class ChannelRemoval:
    """Groups, extra masks and the final removal for one ``PruningCallback`` run."""

    def __init__(self) -> None:
        self.groups: list[ChannelGroup] = []
        self.fallback: list[str] = []  # parameter names pruned per layer (outside every traced graph)
        self.prefix = ""
        self.example: Any = None
        self.keeper: MaskKeeper | None = None
        self.removed: dict[str, tuple[int, ...]] = {}
        self.ready = False

    @staticmethod
    def check_unsharded(weights: Iterable[Tensor]) -> None:
        """Refuse ``remove_channels=True`` for sharded (FSDP2 ``DTensor``) weights, at fit start."""
        if has_dtensors(weights):
            raise config_error(
                "remove_channels",
                "False when the weights are sharded (FSDP2 DTensors)",
                True,
                "Removing channels reshapes the layers, which fully_shard holds as flat shards; prune with"
                " method='channel' and remove them after training on an unsharded model (`remove_channels`).",
            )

    def prepare(
        self, pl_module: pl.LightningModule, batch: Any, main: MaskKeeper, guard_all: bool, masks: Mapping[str, Tensor]
    ) -> None:
        """Trace the compressed model on ``batch`` (once) and set up the keeper of bias / norm entries."""
        self.ready = True
        prefix, root = compression_root(pl_module)
        self.prefix = f"{prefix}." if prefix else ""
        self.example = _head(example_inputs_of(batch, root))
        selected = [n[len(self.prefix) :] for n in main.params if n.startswith(self.prefix)]
        layers = {n.rpartition(".")[0] for n in selected}
        training = root.training
        try:
            found = find_groups(root, self.example, layers)
        finally:
            root.train(training)
        weights = {n[len(self.prefix) :]: p for n, p in main.params.items() if n.startswith(self.prefix)}
        self.groups = eligible_groups(found.groups, weights)
        grouped = {c.param for g in self.groups for u in g.units for c in u.score_cuts}
        self.fallback = sorted(
            self.prefix + n for n in weights if n.rpartition(".")[0] in set(found.untraced) and n not in grouped
        )
        if self.fallback:
            why = "; ".join(f"{k}: {v}" for k, v in list(found.errors.items())[:3])
            rank_zero_warn(
                f"PruningCallback(remove_channels=True): {len(self.fallback)} layer(s) could not be traced and get"
                f" per-layer channel masks instead; their channels will not be removed: {self.fallback[:10]}"
                f"{' ...' if len(self.fallback) > 10 else ''} ({why})."
            )
        dense = sorted(
            self.prefix + n for n in weights if n not in grouped and self.prefix + n not in set(self.fallback)
        )
        if dense:
            rank_zero_info(
                f"PruningCallback(remove_channels=True): {len(dense)} selected layer(s) feed outputs, norms or"
                f" operations across channels and stay dense: {dense[:10]}{' ...' if len(dense) > 10 else ''}."
            )
        params = dict(root.named_parameters())
        extras = extra_targets(self.groups, params)
        self.keeper = MaskKeeper({self.prefix + n: t for n, t in extras.items()}, main.optimizers, guard_all)
        if masks:
            self.set_masks(masks)

    def compute(
        self, weights: Mapping[str, Tensor], target: float, scope: str, previous: Mapping[str, Tensor] | None
    ) -> dict[str, Tensor]:
        """Group-coupled masks over the selected ``weights`` (full parameter names)."""
        local = {n[len(self.prefix) :]: w for n, w in weights.items() if n.startswith(self.prefix)}
        prev = {n[len(self.prefix) :]: m for n, m in (previous or {}).items() if n.startswith(self.prefix)}
        fallback = [n[len(self.prefix) :] for n in self.fallback]
        masks, _ = group_channel_masks(local, self.groups, target, scope, prev or None, fallback)
        out = {self.prefix + n: m for n, m in masks.items()}
        for n, w in weights.items():  # names outside the compressed root stay dense
            out.setdefault(n, torch.ones(w.shape, dtype=torch.bool, device=w.device))
        return out

    def _pruned(self, masks: Mapping[str, Tensor]) -> list[Unit]:
        pruned = []
        for g in self.groups:
            for u in g.units:
                cuts = u.score_cuts
                if cuts and all(
                    not bool(masks[self.prefix + c.param].index_select(c.axis, torch.tensor(c.indices)).any())
                    for c in cuts
                    if self.prefix + c.param in masks
                ):
                    pruned.append(u)
        return pruned

    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Zero the bias and norm entries of every unit that ``masks`` prune (the same on every rank)."""
        if self.keeper is None:
            return
        local_targets = {n[len(self.prefix) :]: t for n, t in self.keeper.params.items()}
        extra = extra_masks(local_targets, self._pruned({k: v.cpu() for k, v in masks.items()}))
        self.keeper.set_masks({self.prefix + n: m for n, m in extra.items()})

    def mask_gradients(self, optimizer: Optimizer) -> None:
        if self.keeper is not None:
            self.keeper.mask_gradients(optimizer)

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.close()
            self.keeper = None

    @torch.no_grad()
    def remove(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove the dead channels from the compressed model, on every rank the same, and say what went."""
        self.close()
        if not self.ready:
            return
        _, root = compression_root(pl_module)
        example = self.example
        if trainer.world_size > 1:
            example = trainer.strategy.broadcast(example, src=0)
        before = sum(p.numel() for p in root.parameters())
        self.removed = remove_channels(root, example, groups=self.groups)
        after = sum(p.numel() for p in root.parameters())
        self.example = None
        if self.removed:
            shapes = ", ".join(f"{self.prefix}{n} {tuple(s)}" for n, s in list(self.removed.items())[:12])
            more = " ..." if len(self.removed) > 12 else ""
            rank_zero_info(
                f"PruningCallback: removed the pruned channels from {len(self.removed)} layers;"
                f" parameters {before:,} -> {after:,} ({after / max(before, 1):.1%}). New shapes: {shapes}{more}"
            )
        else:
            rank_zero_info("PruningCallback: no channel could be removed (none of them is entirely zero).")
