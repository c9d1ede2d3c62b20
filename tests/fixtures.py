"""Tiny models and data shared by the tests: ``from fixtures import TinyNet, mlp, classification_loader``.

pytest puts this folder on ``sys.path`` (as for ``helpers.py``); the DDP scripts in ``scripts/`` add it
themselves. Every builder draws its random numbers in the order the hand-written versions it replaced
did, so a test keeps its exact initial weights and batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import sparse_penalty

OptimizerFactory = Callable[[nn.Module], Any]
"""``module -> what configure_optimizers returns``."""


def mlp(*sizes: int) -> nn.Sequential:
    """``Linear`` + ``ReLU`` for each consecutive pair of sizes: ``mlp(8, 32, 24)`` has two of each."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers)


def sgd(lr: float, **kwargs: Any) -> OptimizerFactory:
    """``torch.optim.SGD`` over all parameters."""
    return lambda module: torch.optim.SGD(module.parameters(), lr=lr, **kwargs)


def adam(lr: float, **kwargs: Any) -> OptimizerFactory:
    """``torch.optim.Adam`` over all parameters."""
    return lambda module: torch.optim.Adam(module.parameters(), lr=lr, **kwargs)


def adamw(lr: float, **kwargs: Any) -> OptimizerFactory:
    """``torch.optim.AdamW`` over all parameters."""
    return lambda module: torch.optim.AdamW(module.parameters(), lr=lr, **kwargs)


class TinyNet(pl.LightningModule):
    """``head(body(x))`` trained with cross-entropy on ``(x, y)`` batches: the tests' one LightningModule.

    Args:
        body: the layers before the head (often :func:`mlp`).
        head: the last layer. Passed by keyword after ``modules`` when the modules must be built first.
        optimizer: what ``configure_optimizers`` builds (:func:`sgd`, :func:`adam`, :func:`adamw` or
            any ``module -> optimizer(s)``); Adam with ``lr=1e-2`` by default.
        penalties: ``(strength, penalty, exclude)`` terms added to the loss through ``sparse_penalty``,
            the hand-written reference that ``SparseRegularizer`` must match.
        modules: more submodules, registered between ``body`` and ``head`` in the order given (a
            subclass's ``forward`` uses them).

    ``steps_run`` counts training steps (a test of an early error checks it stayed 0).
    """

    def __init__(
        self,
        body: nn.Module,
        head: nn.Module,
        optimizer: OptimizerFactory | None = None,
        penalties: Sequence[tuple[float, str, list[str]]] = (),
        **modules: nn.Module,
    ) -> None:
        super().__init__()
        self.body = body
        for name, module in modules.items():
            setattr(self, name, module)
        self.head = head
        self.make_optimizer = optimizer or adam(1e-2)
        self.penalties = list(penalties)
        self.steps_run = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.steps_run += 1
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        for strength, penalty, exclude in self.penalties:
            loss = loss + strength * sparse_penalty(self, penalty, exclude=exclude)
        return loss

    def configure_optimizers(self) -> Any:
        return self.make_optimizer(self)


def classification_data(
    n: int, shape: Sequence[int] | int, classes: int, *, seed: int | None = 1, uniform: bool = False
) -> TensorDataset:
    """``n`` random inputs of ``shape`` (normal, or uniform in [0, 1)) and labels in ``[0, classes)``.

    ``seed`` seeds a generator of their own (inputs drawn first, then labels); ``None`` draws from the
    global random state.
    """
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    x = (torch.rand if uniform else torch.randn)(n, *dims, generator=g)
    return TensorDataset(x, torch.randint(0, classes, (n,), generator=g))


def classification_loader(
    n: int,
    shape: Sequence[int] | int,
    classes: int,
    *,
    seed: int | None = 1,
    uniform: bool = False,
    batch_size: int = 8,
) -> DataLoader[Any]:
    """A ``DataLoader`` (in order) over :func:`classification_data`."""
    return DataLoader(classification_data(n, shape, classes, seed=seed, uniform=uniform), batch_size=batch_size)
