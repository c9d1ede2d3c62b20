"""A ``PruningCallback`` state read from a checkpoint, waiting for fit start to be restored.

``load_state_dict`` runs before the weights of ``configure_model`` exist and before the optimizers
do, so the state waits as a :class:`Resumed` until ``on_fit_start``, which checks its masks against
the weights the callback selects and installs them (:meth:`Resumed.install`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_compress.callbacks._pruning_checks import check_resumed_masks
from lightning_compress.core.prune.keeper import MaskKeeper

__all__ = ["Resumed"]


@dataclass(frozen=True)
class Resumed:
    """The saved schedule position, masks and statistics of one ``PruningCallback``."""

    masks: dict[str, Tensor]  # CPU bool, by parameter name; empty before pruning started
    last_update: int | None  # global step of the last mask update
    scheduled_sparsity: float | None
    achieved_sparsity: float | None
    statistics: dict[str, Any] | None  # the sums gathered so far (score="wanda")

    @classmethod
    def read(cls, state: Mapping[str, Any]) -> Resumed:
        """Read a version-1 state (0.1 states have no ``achieved_sparsity`` or ``statistics``)."""
        return cls(
            masks={name: torch.as_tensor(m, dtype=torch.bool).cpu() for name, m in state["masks"].items()},
            last_update=state["last_update"],
            scheduled_sparsity=state["scheduled_sparsity"],
            achieved_sparsity=state.get("achieved_sparsity"),
            statistics=state.get("statistics"),
        )

    def install(self, keeper: MaskKeeper) -> bool:
        """Install the masks on the selected weights (checked first); ``False``: the state holds none."""
        check_resumed_masks(self.masks, keeper.params)
        if self.masks:
            keeper.set_masks(self.masks)
        return bool(self.masks)
