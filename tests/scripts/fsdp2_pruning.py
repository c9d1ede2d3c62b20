"""PruningCallback under ModelParallelStrategy (FSDP2 ``fully_shard``, DTensor weights) on two CPU processes.

Usage: ``python fsdp2_pruning.py OUT_DIR [FIT ...]``. Each fit trains a five-layer MLP whose ``Linear``
layers have odd row counts (so the two shards are uneven) with momentum SGD, three PruningCallbacks
on disjoint layers, and a ``Reference`` pair of callbacks around them: before each mask update it
gathers the full weights (``full_tensor``, for the test only) and the previous masks, after it
checks that every callback's new masks equal ``compute_masks`` of those full weights on one process.

Fits: ``global`` (channel global on l1+l2, 2:4 on l3, magnitude global on l4+head) and ``layer``
(channel and magnitude with ``scope="layer"``). ``OUT_DIR/<fit>_rank<r>.pt`` holds ``{"masks",
"checked": updates compared, "mismatch": names that differed, "state": full weights, "momentum_nonzero":
pruned entries with nonzero momentum, "weight_nonzero": pruned entries with nonzero weight, "sparsity",
"dtensor": whether the weights were DTensors, "local_rows": rows held per weight, "state_masks":
the callback state's masks, "maxrss": peak RSS deltas}``.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _shared import fsdp2_trainer, run_fits  # this folder is sys.path[0] when the script runs
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fixtures and helpers

from fixtures import TinyNet, classification_loader, sgd

from lightning_compress import PruningCallback
from lightning_compress.core.files import atomic_torch_save
from lightning_compress.core.prune.masks import compute_masks
from lightning_compress.core.sharding import full_tensor, is_dtensor, local_tensor


class ShardedNet(TinyNet):
    def configure_model(self) -> None:
        if self.device_mesh is None:  # strategy="ddp": the unsharded reference
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in [*self.body, self.head]:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


def Net() -> ShardedNet:
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Linear(8, 33), nn.ReLU(), nn.Linear(33, 31), nn.ReLU(), nn.Linear(31, 24), nn.ReLU(), nn.Linear(24, 20)
    )
    return ShardedNet(body, nn.Linear(20, 3), optimizer=sgd(0.05, momentum=0.9))


LAYERS = {"l1": "body.0", "l2": "body.2", "l3": "body.4", "l4": "body.6", "head": "head"}


def _only(*names: str) -> list[str]:
    return [f"{LAYERS[n]}" for n in LAYERS if n not in names]


def _callbacks(fit: str) -> dict[str, PruningCallback]:
    common: dict[str, Any] = {"update_every_n_steps": 2, "verbose": 0}
    if fit == "global":
        return {
            "channel": PruningCallback(0.5, method="channel", exclude=_only("l1", "l2"), **common),
            "2:4": PruningCallback(0.5, method="2:4", exclude=_only("l3"), **common),
            "magnitude": PruningCallback(0.8, exclude=_only("l4", "head"), **common),
        }
    return {
        "channel": PruningCallback(0.5, method="channel", scope="layer", exclude=_only("l1", "l2"), **common),
        "magnitude": PruningCallback(0.7, scope="layer", exclude=_only("l3", "l4", "head"), **common),
    }


class Before(pl.Callback):
    """Before the PruningCallbacks: the full weights and masks an update will start from."""

    def __init__(self, pruning: dict[str, PruningCallback]) -> None:
        self.pruning = pruning
        self.snapshot: dict[str, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}

    def _take(self, pl_module: pl.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        for key, cb in self.pruning.items():
            names = list(cb._select(pl_module))
            self.snapshot[key] = ({n: full_tensor(params[n]).clone() for n in names}, dict(cb.masks))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._take(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._take(pl_module)


class After(pl.Callback):
    """After the PruningCallbacks: new masks must equal compute_masks of the full weights on one process."""

    def __init__(self, before: Before) -> None:
        self.before = before
        self.checked = 0
        self.mismatch: list[str] = []
        self.seen: dict[str, float] = {}

    def _check(self) -> None:
        for key, cb in self.before.pruning.items():
            if cb.scheduled_sparsity is None or cb.scheduled_sparsity == self.seen.get(key):
                continue  # no update yet, or none since the last check
            self.seen[key] = cb.scheduled_sparsity
            weights, previous = self.before.snapshot[key]
            expected = compute_masks(weights, cb.scheduled_sparsity, cb.method, cb.scope, previous=previous or None)
            self.checked += 1
            self.mismatch += [f"{key}:{n}" for n in expected if not torch.equal(expected[n], cb.masks[n])]

    def on_train_batch_start(self, *args: Any) -> None:
        self._check()

    def on_train_batch_end(self, *args: Any) -> None:
        self._check()


def _fit(fit: str, out: Path) -> None:
    data = classification_loader(160, 8, 3)
    model = Net()
    pruning = _callbacks(fit)
    before = Before(pruning)
    after = After(before)
    trainer = fsdp2_trainer(out, max_epochs=3, callbacks=[before, *pruning.values(), after])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.fit(model, data)
    params = dict(model.named_parameters())
    masks = {n: m for cb in pruning.values() for n, m in cb.masks.items()}
    optimizer = trainer.optimizers[0]
    momentum_nonzero = {}
    weight_nonzero = {}
    for n, m in masks.items():
        buffer = optimizer.state[params[n]]["momentum_buffer"]
        momentum_nonzero[n] = int((full_tensor(buffer)[~m] != 0).sum())
        weight_nonzero[n] = int((full_tensor(params[n])[~m] != 0).sum())
    result = {
        "masks": masks,
        "checked": after.checked,
        "mismatch": after.mismatch,
        "state": {n: full_tensor(p).cpu().clone() for n, p in params.items()},
        "momentum_nonzero": momentum_nonzero,
        "weight_nonzero": weight_nonzero,
        "sparsity": {k: cb.sparsity for k, cb in pruning.items()},
        "dtensor": {n: is_dtensor(p) for n, p in params.items()},
        "local_rows": {n: local_tensor(p).shape[0] for n, p in params.items()},
        "state_masks": {k: cb.state_dict()["masks"] for k, cb in pruning.items()},
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0,
    }
    atomic_torch_save(result, out / f"{fit}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    run_fits(_fit, sys.argv[2:] or ["global", "layer"], Path(sys.argv[1]))
