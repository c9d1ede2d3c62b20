"""PruningCallback in a Trainer: targets, schedule, exact zeros, optimizer state, logging, checkpoints."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from fixtures import TinyNet, adamw, classification_loader, mlp, sgd
from helpers import quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import PruningCallback
from lightning_compress.core.prune.schedules import PruningWindow, sparsity_at

BATCHES = 10


class Net(TinyNet):
    """A small MLP whose optimizer is chosen by name (``"adamw"`` or ``"sgd"``)."""

    def __init__(self, optimizer: str = "adamw") -> None:
        chosen = sgd(0.1, momentum=0.9, weight_decay=1e-2) if optimizer == "sgd" else adamw(1e-2, weight_decay=0.1)
        super().__init__(mlp(8, 32, 24), nn.Linear(24, 4), optimizer=chosen)


def _loader(batches: int = BATCHES) -> DataLoader:
    return classification_loader(8 * batches, 8, 4)


def _trainer(tmp_path, callbacks, max_epochs: int = 3, **kwargs: Any) -> pl.Trainer:
    return quiet_trainer(tmp_path, max_epochs=max_epochs, callbacks=callbacks, **kwargs)


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}


class ZeroChecker(Callback):
    """Asserts after every optimizer step that pruned weights, their gradients and optimizer state are zero."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning = pruning
        self.checked_steps = 0
        self.grad_checks = 0
        # (global step, scheduled sparsity) at the start and the end of each batch
        self.history: list[tuple[int, float | None]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.history.append((trainer.global_step, self.pruning.scheduled_sparsity))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = dict(pl_module.named_parameters())
        for name, mask in self.pruning.masks.items():
            grad = params[name].grad
            if grad is not None:
                assert (grad[~mask] == 0).all(), f"gradient of pruned {name} is not zero"
                self.grad_checks += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        params = dict(pl_module.named_parameters())
        optimizer = trainer.optimizers[0]
        for name, mask in self.pruning.masks.items():
            assert (params[name].detach()[~mask] == 0).all(), f"pruned {name} regrew at step {trainer.global_step}"
            for key, value in optimizer.state[params[name]].items():
                if isinstance(value, Tensor) and value.shape == mask.shape:
                    assert (value[~mask] == 0).all(), f"optimizer state {key} of pruned {name} is not zero"
        self.checked_steps += 1
        self.history.append((trainer.global_step, self.pruning.scheduled_sparsity))


@pytest.mark.parametrize(
    ("method", "scope", "target", "optimizer"),
    [
        ("magnitude", "global", 0.8, "adamw"),
        ("magnitude", "layer", 0.7, "sgd"),
        ("channel", "global", 0.5, "sgd"),
        ("channel", "layer", 0.5, "adamw"),
    ],
)
def test_reaches_target_and_pruned_weights_stay_exactly_zero(tmp_path, method, scope, target, optimizer) -> None:
    model = Net(optimizer)
    pruning = PruningCallback(target, method=method, scope=scope, update_every_n_steps=3, verbose=0)
    checker = ZeroChecker(pruning)
    _trainer(tmp_path, [pruning, checker], max_epochs=3).fit(model, _loader())
    assert checker.checked_steps == 3 * BATCHES and checker.grad_checks > 0
    weights = _weights(model)
    assert set(pruning.masks) == set(weights)
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    for name, w in weights.items():
        assert torch.equal(w == 0, ~pruning.masks[name]), name  # zeros are exactly the pruned entries
    if method == "magnitude" and scope == "global":
        assert zeros == round(target * total)
    elif method == "magnitude":
        assert all(int((w == 0).sum()) == round(target * w.numel()) for w in weights.values())
    elif scope == "layer":
        for w in weights.values():
            dead = int((w == 0).all(dim=1).sum())
            assert dead == min(round(target * w.shape[0]), w.shape[0] - 1)
            assert zeros == sum(int((w == 0).all(dim=1).sum()) * w.shape[1] for w in weights.values())
    else:
        assert abs(zeros - target * total) <= max(w.shape[1] for w in weights.values()) / 2
    assert pruning.sparsity == pytest.approx(zeros / total)


def test_nm_pattern_holds_after_training(tmp_path) -> None:
    model = Net()
    pruning = PruningCallback(0.5, method="2:4", verbose=0, update_every_n_steps=2)
    checker = ZeroChecker(pruning)
    _trainer(tmp_path, [pruning, checker], max_epochs=3).fit(model, _loader())
    for w in _weights(model).values():
        groups = (w != 0).view(w.shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all() and (groups == 2).float().mean() > 0.99
    # the staircase went 4 -> 3 -> 2 kept per group: the scheduled sparsity crossed 1/8 and 3/8
    scheduled = [s for _, s in checker.history if s is not None]
    assert scheduled[0] == 0.0 and scheduled[-1] == 0.5
    assert any(0.125 <= s < 0.375 for s in scheduled)


@pytest.mark.parametrize("schedule", ["cubic", "linear", "constant"])
def test_schedule_counts_optimizer_steps_and_respects_start_and_end(tmp_path, schedule) -> None:
    # 10 batches, accumulate 4 -> 3 optimizer steps per epoch (the partial last window steps too).
    model = Net()
    pruning = PruningCallback(
        0.6, schedule=schedule, initial_sparsity=0.1, start_epoch=1, end_epoch=3, update_every_n_steps=2, verbose=0
    )
    checker = ZeroChecker(pruning)
    _trainer(tmp_path, [pruning, checker], max_epochs=5, accumulate_grad_batches=4).fit(model, _loader())
    assert pruning.window == PruningWindow(start=3, end=12, update_every=2)
    updates = {}
    for step, scheduled in checker.history:
        if scheduled is None:
            assert step <= 3  # nothing pruned before the first batch of start_epoch
        else:
            updates.setdefault(scheduled, step)
    expected_steps = [3, 5, 7, 9, 11, 12] if schedule != "constant" else [3]
    expected = {sparsity_at((t - 3) / 9, 0.6, 0.1, schedule): t for t in expected_steps}
    assert list(updates) == list(expected)
    assert max(updates) == 0.6
    assert pruning.scheduled_sparsity == 0.6 and pruning.sparsity == pytest.approx(0.6, abs=1e-3)


def test_nothing_is_pruned_before_start_epoch(tmp_path) -> None:
    model = Net()
    seen: list[float] = []

    class Watch(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            ws = _weights(pl_module)
            seen.append(sum(int((w == 0).sum()) for w in ws.values()) / sum(w.numel() for w in ws.values()))

    pruning = PruningCallback(0.5, schedule="constant", start_epoch=2, verbose=0)
    _trainer(tmp_path, [pruning, Watch()], max_epochs=3).fit(model, _loader())
    assert seen[0] == seen[1] == 0.0 and seen[2] == pytest.approx(0.5, abs=1e-3)


def test_default_end_epoch_leaves_half_the_epochs_for_fine_tuning(tmp_path) -> None:
    pruning = PruningCallback(0.5, verbose=0)
    _trainer(tmp_path, [pruning], max_epochs=4).fit(Net(), _loader())
    assert pruning.window == PruningWindow(start=0, end=2 * BATCHES, update_every=10)


def test_max_steps_bounded_run_places_the_window_in_steps(tmp_path) -> None:
    pruning = PruningCallback(0.5, update_every_n_steps=4, verbose=0)
    trainer = _trainer(tmp_path, [pruning], max_epochs=None, max_steps=25)
    trainer.fit(Net(), _loader())
    assert trainer.global_step == 25
    assert pruning.window == PruningWindow(start=0, end=13, update_every=4)
    assert pruning.scheduled_sparsity == 0.5


def test_end_of_window_update_happens_even_without_a_next_batch(tmp_path) -> None:
    model = Net()
    pruning = PruningCallback(0.75, end_epoch=1, update_every_n_steps=7, verbose=0)
    _trainer(tmp_path, [pruning], max_epochs=2).fit(model, _loader())
    total = sum(w.numel() for w in _weights(model).values())
    assert sum(int((w == 0).sum()) for w in _weights(model).values()) == round(0.75 * total)


def test_exclude_and_compression_submodule(tmp_path) -> None:
    class Pair(Net):
        compression_submodule = "body"

    model = Pair()
    head_before = model.head.weight.detach().clone()
    pruning = PruningCallback(0.5, schedule="constant", exclude=["body.2"], verbose=0)
    _trainer(tmp_path, [pruning], max_epochs=1).fit(model, _loader())
    assert list(pruning.masks) == ["body.0.weight"]
    assert (model.body[0].weight == 0).float().mean() == 0.5
    assert (model.body[2].weight != 0).all() and (model.head.weight != 0).all()
    assert not torch.equal(model.head.weight, head_before)  # trained, just not pruned


def test_masks_are_read_only_cpu_bool(tmp_path) -> None:
    pruning = PruningCallback(0.5, schedule="constant", verbose=0)
    _trainer(tmp_path, [pruning], max_epochs=1).fit(Net(), _loader())
    assert all(m.dtype == torch.bool and m.device.type == "cpu" for m in pruning.masks.values())
    with pytest.raises(TypeError):
        pruning.masks["head.weight"] = torch.ones(4, 24, dtype=torch.bool)  # type: ignore[index]


def test_checkpoint_keys_unchanged_and_strict_load_into_a_plain_model(tmp_path) -> None:
    model = Net()
    dense_keys = list(Net().state_dict())
    pruning = PruningCallback(0.8, schedule="constant", verbose=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1)
    _trainer(tmp_path, [pruning, ckpt], max_epochs=1, enable_checkpointing=True).fit(model, _loader())
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert list(checkpoint["state_dict"]) == dense_keys
    plain = Net()
    plain.load_state_dict(checkpoint["state_dict"], strict=True)
    for name, mask in pruning.masks.items():
        assert (plain.get_parameter(name)[~mask] == 0).all()
    assert not model.body[0]._forward_pre_hooks
    assert not model.body[0]._forward_hooks
    state = checkpoint["callbacks"][pruning.state_key]
    assert state["version"] == 1 and set(state["masks"]) == set(pruning.masks)
    assert all(torch.equal(state["masks"][k], v) for k, v in pruning.masks.items())


class RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step or 0, dict(metrics)))


def test_logs_achieved_sparsity_and_target_to_the_loggers(tmp_path) -> None:
    logger = RecordingLogger()
    pruning = PruningCallback(0.6, update_every_n_steps=5, end_epoch=1, verbose=0)
    _trainer(tmp_path, [pruning], max_epochs=3, logger=logger, log_every_n_steps=1).fit(Net(), _loader())
    sparsity = [m["pruning/sparsity"] for _, m in logger.metrics if "pruning/sparsity" in m]
    target = [m["pruning/target"] for _, m in logger.metrics if "pruning/target" in m]
    assert len(sparsity) >= 5 and len(target) == len(sparsity)
    assert sparsity == sorted(sparsity) and target == sorted(target)
    assert sparsity[-1] == pytest.approx(0.6, abs=1e-3) and target[-1] == pytest.approx(0.6)
    for s, t in zip(sparsity, target, strict=True):  # achieved matches the schedule at each update
        assert s == pytest.approx(t, abs=1e-3)


def test_verbose_prints_the_per_layer_table(tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, [PruningCallback(0.5, schedule="constant", verbose=1)], max_epochs=1).fit(Net(), _loader())
    text = caplog.text
    assert "PruningCallback: 50.00% of the weights of 3 selected layers are zero" in text
    for name in ("body.0", "body.2", "head", "total", "sparsity", "zeros", "32x8"):
        assert name in text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, [PruningCallback(0.5, verbose=0)], max_epochs=1).fit(Net(), _loader())
    assert "PruningCallback" not in caplog.text


def test_verbose_2_reports_each_update(tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, [PruningCallback(0.5, update_every_n_steps=5, verbose=2)], max_epochs=2).fit(
            Net(), _loader()
        )
    lines = [line for line in caplog.text.splitlines() if "scheduled sparsity" in line]
    assert len(lines) == 3 and "step 10, scheduled sparsity 50.00%, achieved 50.00%" in lines[-1]


def test_state_key_tells_instances_apart() -> None:
    a = PruningCallback(0.5, include=["Linear"])
    b = PruningCallback(0.5, include=["Conv2d"])
    assert a.state_key != b.state_key and a.state_key.startswith("PruningCallback{")
    assert PruningCallback(0.5).state_key == PruningCallback(0.5, schedule="linear").state_key


def test_two_callbacks_on_disjoint_layers(tmp_path) -> None:
    model = Net()
    body = PruningCallback(0.5, schedule="constant", exclude=["head"], verbose=0)
    head = PruningCallback(0.5, method="2:4", schedule="constant", include=["Linear"], exclude=["body.*"], verbose=0)
    _trainer(tmp_path, [body, head], max_epochs=1).fit(model, _loader())
    assert set(body.masks) == {"body.0.weight", "body.2.weight"} and set(head.masks) == {"head.weight"}
    assert ((model.head.weight != 0).view(4, -1, 4).sum(-1) == 2).all()


def test_tied_weights_are_pruned_once(tmp_path) -> None:
    model = Net()
    model.extra = nn.Linear(8, 32)
    model.extra.weight = model.body[0].weight  # tied, never called
    pruning = PruningCallback(0.5, schedule="constant", verbose=0)
    _trainer(tmp_path, [pruning], max_epochs=1).fit(model, _loader())
    assert "extra.weight" not in pruning.masks and "body.0.weight" in pruning.masks
    assert math.isclose(pruning.sparsity or 0.0, 0.5, abs_tol=1e-3)


class _TwoScales(pl.LightningModule):
    """A wide layer whose weights are all far smaller than its neighbour's, as at initialization."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(4, 8)
        self.small = nn.Linear(8, 2)
        with torch.no_grad():
            self.big.weight.mul_(100.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.small(torch.relu(self.big(x)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)


def test_warns_when_global_pruning_cuts_a_layer_off(tmp_path) -> None:
    model = _TwoScales()
    pruning = PruningCallback(0.5, schedule="constant", verbose=0)
    with pytest.warns(UserWarning, match=r"removed every weight of \['small.weight'\], which cuts the network there"):
        _trainer(tmp_path, [pruning], max_epochs=1).fit(model)
    # One threshold over both layers: the 16 small weights are the 16 smallest of the 48, and the
    # other 8 of the 24 to prune come from the big layer.
    assert not pruning.masks["small.weight"].any()
    assert int((~pruning.masks["big.weight"]).sum()) == 8


class _QuietSmall(_TwoScales):
    """The small layer also reads tiny inputs, so that its Wanda scores (|w| times input norm) are the smallest."""

    def forward(self, x: Tensor) -> Tensor:
        return self.small(torch.relu(self.big(x)) * 1e-4)


def test_the_cut_off_warning_names_the_score_that_ranked_the_weights(tmp_path) -> None:
    model = _QuietSmall()
    pruning = PruningCallback(0.5, schedule="constant", score="wanda", verbose=0)
    with pytest.warns(UserWarning, match=r'the global masks ranked by score="wanda" removed every weight of'):
        _trainer(tmp_path, [pruning], max_epochs=1).fit(model)
