"""Resuming mid-schedule under ModelParallelStrategy (FSDP2 ``fully_shard``) on two CPU processes.

Usage: ``python fsdp2_resume.py OUT_DIR [KIND ...]``. For each checkpoint kind, ``sharded``
(``save_distributed_checkpoint=True``: a DCP directory, the callback states in its ``meta.pt``) and
``full`` (``False``: one file), two fits of the same four-``Linear`` MLP on the same data (5 steps an
epoch, 3 epochs, momentum SGD) with two PruningCallbacks (channel on ``body.0``, global magnitude on
``body.4`` and ``head``; window epochs 0-1, an update every 2 steps):

* ``whole``: uninterrupted; a ``ModelCheckpoint`` saves every epoch. ``epoch=0`` is mid-schedule
  (step 5, the last update at step 4).
* ``resumed``: a model built from another seed, new callbacks, ``fit(ckpt_path=<epoch=0>)`` to the end.

``OUT_DIR/<kind>_rank<r>.pt`` holds ``{"is_dir", "saved": the callback states in the checkpoint, by
callback, "restored": {"masks": the callbacks' masks, "installed": their MaskKeepers' masks,
"last_update", "scheduled_sparsity", "weight_nonzero", "momentum_nonzero"} at the resumed run's train
start, "whole"/"resumed": {"masks", "state": full weights, "momentum": full momentum buffers,
"weight_nonzero", "momentum_nonzero", "sparsity", "scheduled_sparsity"} at the end of each fit}``.
``*_nonzero`` count the pruned entries (by the callback's masks) that are not zero, by parameter name.

Kind ``others``: SparseRegularizer and QuantizeOnFitEnd("static", qat_epochs=2) instead, resumed from
the sharded checkpoint of epoch 1 (in QAT). ``OUT_DIR/others_rank<r>.pt`` holds ``{"saved": their
states in the checkpoint, "restored": their ``state_dict()`` at train start, "whole"/"resumed":
{"states": at fit end, "output": the int8 model's output on a fixed batch}}``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fixtures and helpers

from fixtures import TinyNet, classification_loader, sgd
from helpers import quiet_trainer

from lightning_compress import PruningCallback, QuantizeOnFitEnd, SparseRegularizer
from lightning_compress.core.files import atomic_torch_save
from lightning_compress.core.sharding import full_tensor

KINDS = ("sharded", "full", "others")


class ShardedNet(TinyNet):
    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in [*self.body, self.head]:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


def Net(seed: int) -> ShardedNet:
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(8, 33), nn.ReLU(), nn.Linear(33, 31), nn.ReLU(), nn.Linear(31, 24), nn.ReLU())
    return ShardedNet(body, nn.Linear(24, 3), optimizer=sgd(0.05, momentum=0.9))


def _callbacks() -> dict[str, PruningCallback]:
    common: dict[str, Any] = {"end_epoch": 1, "update_every_n_steps": 2, "verbose": 0}
    return {
        "channel": PruningCallback(0.5, method="channel", exclude=["body.2", "body.4", "head"], **common),
        "magnitude": PruningCallback(0.8, exclude=["body.0", "body.2"], **common),
    }


def _pruned_nonzero(trainer: pl.Trainer, pl_module: pl.LightningModule, masks: dict[str, Tensor]) -> tuple:
    """Pruned entries that are not zero, in the weights and in their momentum (collective: every rank)."""
    params = dict(pl_module.named_parameters())
    state = trainer.optimizers[0].state
    weights, momentum = {}, {}
    for name, mask in masks.items():
        weights[name] = int((full_tensor(params[name].detach())[~mask] != 0).sum())
        buffer = state[params[name]].get("momentum_buffer")
        momentum[name] = None if buffer is None else int((full_tensor(buffer)[~mask] != 0).sum())
    return weights, momentum


def _all_masks(pruning: dict[str, PruningCallback]) -> dict[str, Tensor]:
    return {n: m.clone() for cb in pruning.values() for n, m in cb.masks.items()}


def _installed(pruning: dict[str, PruningCallback]) -> dict[str, Tensor]:
    """The masks the callbacks' MaskKeepers enforce on the weights, gradients and optimizer state."""
    keepers = [cb._keeper for cb in pruning.values() if cb._keeper is not None]
    return {n: m.clone() for keeper in keepers for n, m in keeper.masks.items()}


class Restored(pl.Callback):
    """After the PruningCallbacks, at train start (after Lightning restored the checkpoint): what they hold."""

    def __init__(self, pruning: dict[str, PruningCallback]) -> None:
        self.pruning = pruning
        self.seen: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        masks = _all_masks(self.pruning)
        weights, momentum = _pruned_nonzero(trainer, pl_module, masks)
        self.seen = {
            "masks": masks,  # what the callbacks report (and would save)
            "installed": _installed(self.pruning),
            "last_update": {k: cb._last_update for k, cb in self.pruning.items()},
            "scheduled_sparsity": {k: cb.scheduled_sparsity for k, cb in self.pruning.items()},
            "weight_nonzero": weights,
            "momentum_nonzero": momentum,
        }


def _trainer(kind: str, root: Path, callbacks: list[pl.Callback], checkpoints: bool = False) -> pl.Trainer:
    strategy = ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=kind == "sharded"
    )
    return quiet_trainer(
        root,
        strategy=strategy,
        devices=2,
        accelerator="cpu",
        max_epochs=3,
        callbacks=callbacks,
        enable_checkpointing=checkpoints,
    )


def _end(trainer: pl.Trainer, model: pl.LightningModule, pruning: dict[str, PruningCallback]) -> dict[str, Any]:
    masks = _all_masks(pruning)
    weights, momentum = _pruned_nonzero(trainer, model, masks)
    params = dict(model.named_parameters())
    state = trainer.optimizers[0].state
    return {
        "masks": masks,
        "state": {n: full_tensor(p.detach()).clone() for n, p in params.items()},
        "momentum": {n: full_tensor(state[p]["momentum_buffer"]).clone() for n, p in params.items()},
        "weight_nonzero": weights,
        "momentum_nonzero": momentum,
        "sparsity": {k: cb.sparsity for k, cb in pruning.items()},
        "scheduled_sparsity": {k: cb.scheduled_sparsity for k, cb in pruning.items()},
    }


def _saved_states(path: Path, pruning: dict[str, PruningCallback]) -> dict[str, Any]:
    """The PruningCallback states as the checkpoint holds them (a DCP directory keeps them in meta.pt)."""
    file = path / "meta.pt" if path.is_dir() else path
    callbacks = torch.load(file, weights_only=True)["callbacks"]
    return {k: callbacks[cb.state_key] for k, cb in pruning.items()}


def _run(kind: str, out: Path) -> None:
    data = classification_loader(80, 8, 3)  # 80 samples / 2 ranks / batch 8: 5 steps an epoch
    root = out / kind
    whole = _callbacks()
    saver = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = _trainer(kind, root, [*whole.values(), saver], checkpoints=True)
    model = Net(0)
    trainer.fit(model, data)
    result: dict[str, Any] = {"whole": _end(trainer, model, whole)}
    checkpoint = root / "ckpt" / "epoch=0.ckpt"
    result["is_dir"] = checkpoint.is_dir()
    result["saved"] = _saved_states(checkpoint, whole)

    resumed = _callbacks()
    restored = Restored(resumed)
    trainer = _trainer(kind, root / "resumed", [*resumed.values(), restored])
    model = Net(123)  # the weights must come from the checkpoint
    trainer.fit(model, data, ckpt_path=checkpoint)
    result["restored"] = restored.seen
    result["resumed"] = _end(trainer, model, resumed)
    atomic_torch_save(result, out / f"{kind}_rank{trainer.global_rank}.pt")


class States(pl.Callback):
    """At train start (after the restore): the state_dict of each callback given."""

    def __init__(self, callbacks: dict[str, pl.Callback]) -> None:
        self.callbacks = callbacks
        self.seen: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen = {k: cb.state_dict() for k, cb in self.callbacks.items()}


def _others() -> dict[str, pl.Callback]:
    return {
        "regularizer": SparseRegularizer(1e-3, verbose=0),
        "quantize": QuantizeOnFitEnd("static", qat_epochs=2, verbose=0),
    }


def _run_others(out: Path) -> None:
    """SparseRegularizer and QuantizeOnFitEnd(qat_epochs=2) resumed from the sharded checkpoint of epoch 1 (in QAT)."""
    data = classification_loader(80, 8, 3)
    probe = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
    root = out / "others"
    whole = _others()
    saver = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = _trainer("sharded", root, [*whole.values(), saver], checkpoints=True)
    model = Net(0)
    trainer.fit(model, data)
    checkpoint = root / "ckpt" / "epoch=1.ckpt"
    saved = torch.load(checkpoint / "meta.pt", weights_only=True)["callbacks"]
    result: dict[str, Any] = {"saved": {k: saved[cb.state_key] for k, cb in whole.items()}}
    with torch.no_grad():
        result["whole"] = {"states": {k: cb.state_dict() for k, cb in whole.items()}, "output": model(probe)}
    resumed = _others()
    states = States(resumed)
    trainer = _trainer("sharded", root / "resumed", [*resumed.values(), states])
    model = Net(123)
    trainer.fit(model, data, ckpt_path=checkpoint)
    result["restored"] = states.seen
    with torch.no_grad():
        result["resumed"] = {"states": {k: cb.state_dict() for k, cb in resumed.items()}, "output": model(probe)}
    atomic_torch_save(result, out / f"others_rank{trainer.global_rank}.pt")


def main(out: Path, kinds: list[str]) -> None:
    torch.set_num_threads(1)
    for kind in kinds:
        _run_others(out) if kind == "others" else _run(kind, out)
    if dist.is_initialized():
        dist.destroy_process_group()  # or the gloo process group may keep the interpreter alive at exit


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or list(KINDS))
