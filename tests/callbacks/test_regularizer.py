"""SparseRegularizer: arguments, proximal steps, ramp, logging, what is penalized, reuse.

Checkpoints, resume and the command line's saved config: ``test_regularizer_checkpoints.py``.
"""

from __future__ import annotations

import copy
import csv
import logging

import lightning.pytorch as pl
import pytest
import torch
from fixtures import TinyNet, adam, classification_data, mlp
from helpers import quiet_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import CompressionConfigError, SparseRegularizer, sparse_penalty
from lightning_compress.core.penalties import proximal_step_, strength_at

BATCHES = 10


def _two_rates(module: nn.Module):
    """Two groups with different learning rates, halved every epoch: the proximal threshold must use
    each group's current rate."""
    optimizer = torch.optim.SGD(
        [{"params": module.body.parameters(), "lr": 0.2}, {"params": module.head.parameters()}], lr=0.05
    )
    return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


class Net(TinyNet):
    """``hand``: ``(strength, penalty, exclude)`` terms added to the loss by hand."""

    def __init__(self, optimizer: str = "sgd", hand: list[tuple[float, str, list[str]]] | None = None) -> None:
        chosen = adam(1e-2) if optimizer == "adam" else _two_rates
        super().__init__(mlp(6, 16, 16), nn.Linear(16, 3), optimizer=chosen, penalties=hand or [])


def _data() -> TensorDataset:
    return classification_data(8 * BATCHES, 6, 3)


def _trainer(tmp_path, callbacks, max_epochs=2, **kwargs) -> pl.Trainer:
    options = {
        "max_epochs": max_epochs,
        "accelerator": "cpu",
        "callbacks": callbacks,
        "num_sanity_val_steps": 2,
        **kwargs,
    }
    return quiet_trainer(tmp_path, **options)


def _fit(model, callbacks, tmp_path, max_epochs=2, **kwargs):
    trainer = _trainer(tmp_path, callbacks, max_epochs, **kwargs)
    trainer.fit(model, DataLoader(_data(), batch_size=8))
    return trainer


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strength": -0.1}, r"Expected argument `strength` to be a number in \[0, inf\), but got -0.1\."),
        ({"penalty": "l2"}, r"Expected argument `penalty` to be one of 'l1' or 'group_lasso', but got 'l2'\."),
        ({"proximal": "yes"}, r"Expected argument `proximal` to be a bool, but got 'yes'\."),
        ({"start_epoch": -1}, r"Expected argument `start_epoch` to be an integer in \[0, inf\), but got -1\."),
        ({"start_epoch": 1.5}, r"Expected argument `start_epoch` to be an integer, but got 1.5\."),
        ({"warmup_epochs": -2}, r"Expected argument `warmup_epochs` to be a number in \[0, inf\), but got -2\."),
        (
            {"strength": float("inf")},
            r"`strength` to be a number in \[0, inf\), but got inf\. Infinity and NaN are not",
        ),
        ({"warmup_epochs": float("inf")}, r"`warmup_epochs` to be a number in \[0, inf\), but got inf\. Infinity"),
        ({"verbose": 1.0}, r"Expected argument `verbose` to be an integer in \[0, 1\], but got 1\.0\."),
        ({"verbose": 2}, r"Expected argument `verbose` to be an integer in \[0, 1\], but got 2\."),
        ({"verbose": True}, r"Expected argument `verbose` to be an integer in \[0, 1\], but got True\."),
        ({"include": "Linear"}, r"Expected argument `include` to be a list of strings, but got 'Linear'\."),
        ({"exclude": [1]}, r"Expected argument `exclude` to be a list of strings, but got \[1\]\."),
    ],
)
def test_bad_arguments_fail_in_the_constructor(kwargs, message):
    with pytest.raises(CompressionConfigError, match=message):
        SparseRegularizer(**kwargs)


def test_a_selection_of_nothing_fails_before_training(tmp_path):
    model = Net()
    with pytest.raises(CompressionConfigError, match=r"select at least one weight.*\['Linear'\]"):
        _fit(model, [SparseRegularizer(include=["Conv2d"])], tmp_path)
    assert model.steps_run == 0


class NoLearningRate(torch.optim.Optimizer):
    """Sign descent with a fixed step and no `lr` in its parameter groups."""

    def __init__(self, params, step_size: float = 0.01) -> None:
        super().__init__(params, {"step_size": step_size})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["step_size"] * p.grad.sign())
        return loss


class NoLearningRateNet(Net):
    def configure_optimizers(self):
        return NoLearningRate(self.parameters())


def test_proximal_needs_an_optimizer_with_a_learning_rate(tmp_path):
    model = NoLearningRateNet()
    with pytest.raises(
        CompressionConfigError,
        match=r"Expected argument `proximal` to be False for an optimizer without a learning rate, but got True\."
        r" NoLearningRate has a parameter group without `lr`",
    ):
        _fit(model, [SparseRegularizer(proximal=True)], tmp_path)
    assert model.steps_run == 0
    # The subgradient form works with it.
    before = _params(model)
    _fit(model, [SparseRegularizer(0.01, verbose=0)], tmp_path, max_epochs=1)
    assert model.steps_run == BATCHES
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


class LazyNet(Net):
    """Layers made in configure_model: nothing to select at setup, selected at fit start."""

    def __init__(self) -> None:
        super().__init__()
        del self.body, self.head

    def configure_model(self):
        if not hasattr(self, "body"):
            self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
            self.head = nn.Linear(16, 3)


def test_layers_made_in_configure_model_are_selected(tmp_path):
    model = LazyNet()
    _fit(model, [SparseRegularizer(1.0, proximal=True, verbose=0)], tmp_path, max_epochs=1)
    assert (model.body[0].weight == 0).float().mean() > 0.5


# ---------------------------------------------------------------- proximal


def _reference_proximal_sgd(model: Net, penalty: str, strength: float, epochs: int) -> None:
    """Plain torch: SGD step, then the proximal step with each group's current lr, StepLR per epoch."""
    (optimizer,), (scheduler,) = model.configure_optimizers()
    weights = {id(m.weight) for m in (model.body[0], model.body[2], model.head)}
    for _ in range(epochs):
        for x, y in DataLoader(_data(), batch_size=8):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in weights:
                        proximal_step_(p.detach(), penalty, group["lr"] * strength)
        scheduler.step()


@pytest.mark.parametrize(("penalty", "strength"), [("l1", 0.1), ("group_lasso", 0.5)])
def test_proximal_step_equals_a_hand_written_proximal_sgd_loop(tmp_path, penalty, strength):
    model = Net()
    reference = copy.deepcopy(model)
    _fit(model, [SparseRegularizer(strength, penalty=penalty, proximal=True, verbose=0)], tmp_path)
    _reference_proximal_sgd(reference, penalty, strength, epochs=2)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    w = model.body[0].weight
    if penalty == "l1":
        assert (w == 0).float().mean() > 0.2  # exact zeros, not merely small weights
    else:
        zero_rows = (w == 0).all(dim=1)
        assert zero_rows.any()
        assert ((w == 0).any(dim=1) == zero_rows).all()  # channels are zeroed whole
    assert (model.body[0].bias != 0).all()  # biases are not penalized


def test_proximal_hooks_are_removed_and_a_reused_callback_starts_clean(tmp_path):
    callback = SparseRegularizer(0.05, proximal=True, verbose=0)
    first = Net()
    trainer = _fit(first, [callback], tmp_path, max_epochs=1)
    assert callback.state_dict()["steps"] == BATCHES
    assert not trainer.optimizers[0]._optimizer_step_post_hooks
    assert callback._targets == []  # no reference kept to the model

    # Stepping the old optimizer by hand after fit does not shrink anything any more.
    first.body[0].weight.grad = torch.zeros_like(first.body[0].weight)
    before = first.body[0].weight.detach().clone()
    trainer.optimizers[0].step()
    torch.testing.assert_close(first.body[0].weight, before, rtol=0, atol=0)

    second = Net()
    reference = copy.deepcopy(second)
    _fit(second, [callback], tmp_path, max_epochs=1)
    _fit(reference, [SparseRegularizer(0.05, proximal=True, verbose=0)], tmp_path, max_epochs=1)
    assert callback.state_dict()["steps"] == BATCHES
    for p, q in zip(second.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ---------------------------------------------------------------- ramp


class StrengthProbe(Callback):
    def __init__(self, regularizer: SparseRegularizer) -> None:
        self.regularizer = regularizer
        self.seen: list[float] = []
        self.penalties: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen.append(self.regularizer.current_strength)
        self.penalties.append(sparse_penalty(pl_module, self.regularizer.penalty).item())


def test_start_epoch_and_warmup_ramp_the_strength_step_by_step(tmp_path):
    regularizer = SparseRegularizer(0.1, start_epoch=1, warmup_epochs=2, verbose=0)
    probe = StrengthProbe(regularizer)
    _fit(Net(), [regularizer, probe], tmp_path, max_epochs=4)
    expected = [strength_at(0.1, epoch + (i + 1) / BATCHES, 1, 2) for epoch in range(4) for i in range(BATCHES)]
    assert probe.seen == pytest.approx(expected)
    assert probe.seen[:BATCHES] == [0.0] * BATCHES
    assert probe.seen[BATCHES] == pytest.approx(0.1 / 20)
    assert probe.seen[-BATCHES:] == [0.1] * BATCHES


def test_before_start_epoch_training_is_unregularized(tmp_path):
    model = Net("adam")
    plain = copy.deepcopy(model)
    _fit(model, [SparseRegularizer(0.1, start_epoch=1, verbose=0)], tmp_path, max_epochs=1)
    _fit(plain, [], tmp_path, max_epochs=1)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ---------------------------------------------------------------- logging


def test_logs_penalty_and_weighted_per_step_and_per_epoch(tmp_path):
    strength = 0.01
    regularizer = SparseRegularizer(strength, verbose=0)
    probe = StrengthProbe(regularizer)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    _fit(Net(), [regularizer, probe], tmp_path, logger=logger, log_every_n_steps=1)
    with open(logger.experiment.metrics_file_path) as handle:
        rows = list(csv.DictReader(handle))
    steps = [float(r["sparse_reg/penalty_step"]) for r in rows if r.get("sparse_reg/penalty_step")]
    weighted = [float(r["sparse_reg/weighted_step"]) for r in rows if r.get("sparse_reg/weighted_step")]
    epochs = [float(r["sparse_reg/penalty_epoch"]) for r in rows if r.get("sparse_reg/penalty_epoch")]
    assert steps == pytest.approx(probe.penalties, rel=1e-6)  # the penalty of the weights each step sees
    assert weighted == pytest.approx([strength * v for v in probe.penalties], rel=1e-6)
    assert epochs == pytest.approx(
        [sum(probe.penalties[:BATCHES]) / BATCHES, sum(probe.penalties[BATCHES:]) / BATCHES], rel=1e-6
    )
    assert probe.penalties[-1] < probe.penalties[0]


def test_verbose_reports_exact_zeros_at_fit_end(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        _fit(Net(), [SparseRegularizer(0.05, proximal=True)], tmp_path, max_epochs=1)
    message = next(r.getMessage() for r in caplog.records if "SparseRegularizer" in r.getMessage())
    assert "SparseRegularizer(l1, proximal): penalty" in message
    assert "of 400 selected weights" in message  # 6*16 + 16*16 + 16*3, biases left out


# ---------------------------------------------------------------- what is penalized


class Pair(Net):
    compression_submodule = "student"

    def __init__(self, hand_strength: float | None = None) -> None:
        super().__init__("adam")
        self.student = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        self.teacher = nn.Linear(6, 3)  # trained on its own loss, never regularized
        self.hand_strength = hand_strength

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.student(x), y) + F.cross_entropy(self.teacher(x), y)
        if self.hand_strength is not None:
            loss = loss + self.hand_strength * sparse_penalty(self)
        return loss


def test_only_the_compression_submodule_is_regularized(tmp_path):
    model = Pair()
    by_hand = copy.deepcopy(model)
    by_hand.hand_strength = 0.05
    plain = copy.deepcopy(model)
    _fit(model, [SparseRegularizer(0.05, verbose=0)], tmp_path, max_epochs=1)
    _fit(by_hand, [], tmp_path, max_epochs=1)
    _fit(plain, [], tmp_path, max_epochs=1)
    for p, q in zip(model.parameters(), by_hand.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    torch.testing.assert_close(model.teacher.weight, plain.teacher.weight, rtol=0, atol=0)
    assert not torch.equal(model.student[0].weight, plain.student[0].weight)


def test_two_regularizers_on_different_layers_add_up(tmp_path):
    body = SparseRegularizer(0.02, penalty="l1", exclude=["head"], verbose=0)
    head = SparseRegularizer(0.05, penalty="group_lasso", exclude=["body.*"], verbose=0)
    assert body.state_key != head.state_key
    model = Net("adam")
    by_hand = copy.deepcopy(model)
    by_hand.penalties = [(0.02, "l1", ["head"]), (0.05, "group_lasso", ["body.*"])]
    _fit(model, [body, head], tmp_path)
    _fit(by_hand, [], tmp_path)
    for p, q in zip(model.parameters(), by_hand.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
