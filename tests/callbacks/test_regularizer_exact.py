"""SparseRegularizer optimizes exactly ``loss + strength * sparse_penalty(...)``.

Each test trains two copies of one model from the same initial weights on the same batches: one
with the callback, one whose ``training_step`` adds ``strength * sparse_penalty(self, ...)`` to its
loss by hand; the parameters must agree to float rounding.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from fixtures import TinyNet, adam, classification_loader, mlp, sgd
from helpers import quiet_trainer
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress import SparseRegularizer, sparse_penalty

STRENGTH = 0.01


def _frozen() -> nn.Linear:
    layer = nn.Linear(16, 16)
    return layer.requires_grad_(False)


class Net(TinyNet):
    """Two trained layers, a frozen one in the path, and a layer the loss never reaches.

    Setting ``hand_strength`` adds ``hand_strength * sparse_penalty(self, penalty)`` to the loss by hand.
    """

    def __init__(self, optimizer: str = "sgd", penalty: str = "l1", hand_strength: float | None = None) -> None:
        super().__init__(
            body=mlp(6, 16, 16),
            frozen=_frozen(),
            unused=nn.Linear(4, 4),  # trainable, but no data gradient: grad is None before the penalty
            head=nn.Linear(16, 3),
            optimizer=sgd(0.1, momentum=0.9) if optimizer == "sgd" else adam(1e-2),
        )
        self.penalty = penalty
        self.hand_strength = hand_strength

    @property
    def hand_strength(self) -> float | None:
        return self.penalties[0][0] if self.penalties else None

    @hand_strength.setter
    def hand_strength(self, strength: float | None) -> None:
        self.penalties = [] if strength is None else [(strength, self.penalty, [])]

    def forward(self, x):
        return self.head(torch.relu(self.frozen(self.body(x))))


def _loader() -> DataLoader:
    # 10 batches: with accumulate_grad_batches=4 the last window of each epoch holds only 2.
    return classification_loader(80, 6, 3)


def _fit(model: pl.LightningModule, callbacks: list, tmp_path, **trainer_kwargs) -> pl.LightningModule:
    trainer_kwargs.setdefault("max_epochs", 2)
    trainer = quiet_trainer(tmp_path, accelerator="cpu", callbacks=callbacks, **trainer_kwargs)
    trainer.fit(model, _loader())
    return model


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


SETTINGS = {
    "plain": {},
    "accumulate4": {"accumulate_grad_batches": 4},
    "bf16-mixed": {"precision": "bf16-mixed"},
    "clip": {"gradient_clip_val": 0.05},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("penalty", ["l1", "group_lasso"])
def test_callback_equals_penalty_added_by_hand(tmp_path, penalty, optimizer, setting):
    kwargs = SETTINGS[setting]
    with_callback = Net(optimizer, penalty)
    by_hand = copy.deepcopy(with_callback)
    by_hand.hand_strength = STRENGTH
    initial = copy.deepcopy(with_callback)

    _fit(with_callback, [SparseRegularizer(STRENGTH, penalty=penalty, verbose=0)], tmp_path, **kwargs)
    _fit(by_hand, [], tmp_path, **kwargs)

    # Bit-identical without accumulation (data + penalty gradient, added in either order, is the same
    # float); with it the hand version sums k rounded quarters of the penalty gradient.
    atol = 1e-7 if "accumulate_grad_batches" in kwargs else 0.0
    for (name, p), q in zip(with_callback.named_parameters(), by_hand.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=name)
    # The frozen layer is untouched; the layer the loss never reaches moved under the penalty alone
    # (so the penalty was applied, and the comparison above could fail).
    torch.testing.assert_close(with_callback.frozen.weight, initial.frozen.weight, rtol=0, atol=0)
    assert (with_callback.unused.weight - initial.unused.weight).abs().max() > 1e-3
    torch.testing.assert_close(with_callback.unused.bias, initial.unused.bias, rtol=0, atol=0)


def test_adding_the_penalty_once_per_window_regardless_of_its_length_would_differ(tmp_path):
    """The short last window (2 of 4 micro-batches) gets 2/4 of the penalty gradient, as by hand.

    Control: a run whose windows are all full (8 batches) agrees with the same callback, so the
    difference seen with 10 batches is the short window's, and the callback scales it correctly.
    """
    kwargs = {"accumulate_grad_batches": 4, "max_epochs": 1}
    with_callback = Net("sgd")
    by_hand = copy.deepcopy(with_callback)
    by_hand.hand_strength = STRENGTH
    one_step_strength = copy.deepcopy(with_callback)
    for model, callbacks in ((with_callback, [SparseRegularizer(STRENGTH, verbose=0)]), (by_hand, [])):
        _fit(model, callbacks, tmp_path, **kwargs)
    torch.testing.assert_close(
        list(with_callback.parameters()), list(by_hand.parameters()), rtol=0, atol=1e-7, check_dtype=True
    )

    # What a naive "add strength * grad once per step" would do: the last step gets twice as much.
    class Naive(SparseRegularizer):
        def on_after_backward(self, trainer, pl_module):
            self._backwards = trainer.accumulate_grad_batches

    _fit(one_step_strength, [Naive(STRENGTH, verbose=0)], tmp_path, **kwargs)
    assert _max_diff(one_step_strength, by_hand) > 1e-5


class SkippingNet(Net):
    def training_step(self, batch, batch_idx):
        if batch_idx % 2:
            return None  # Lightning skips backward and the optimizer step does nothing
        return super().training_step(batch, batch_idx)


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`:UserWarning")
def test_skipped_training_steps_add_no_penalty(tmp_path):
    with_callback = SkippingNet("sgd")
    by_hand = copy.deepcopy(with_callback)
    by_hand.hand_strength = STRENGTH
    _fit(with_callback, [SparseRegularizer(STRENGTH, verbose=0)], tmp_path)
    _fit(by_hand, [], tmp_path)
    assert _max_diff(with_callback, by_hand) == 0


class ManualNet(Net):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        optimizer.step()


def test_manual_optimization_equals_penalty_added_by_hand(tmp_path):
    with_callback = ManualNet("adam", "group_lasso")
    by_hand = copy.deepcopy(with_callback)
    by_hand.hand_strength = STRENGTH
    _fit(with_callback, [SparseRegularizer(STRENGTH, penalty="group_lasso", verbose=0)], tmp_path)
    _fit(by_hand, [], tmp_path)
    assert _max_diff(with_callback, by_hand) == 0


class TiedNet(Net):
    """``head2`` shares its weight with ``head``: the shared weight is penalized once."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.head2 = nn.Linear(16, 3, bias=False)
        self.head2.weight = self.head.weight

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 0.1 * self.head2(batch[0].new_ones(1, 16)).sum()


def test_a_tied_weight_is_penalized_once(tmp_path):
    model = TiedNet("sgd")
    once = sparse_penalty(model).item()
    model.head2 = nn.Linear(16, 3, bias=False)  # untie: the same layers, the head weight counted twice
    assert sparse_penalty(model).item() > once
    with_callback = TiedNet("sgd")
    by_hand = copy.deepcopy(with_callback)
    by_hand.hand_strength = STRENGTH
    _fit(with_callback, [SparseRegularizer(STRENGTH, verbose=0)], tmp_path)
    _fit(by_hand, [], tmp_path)
    assert with_callback.head2.weight is with_callback.head.weight
    # Three gradient terms reach the tied weight, summed in another order by hand: rounding only.
    # (Penalizing it twice would move it by about strength * lr * steps = 2e-2.)
    assert _max_diff(with_callback, by_hand) < 1e-6


class AdamNet(Net):
    def __init__(self, fused: bool) -> None:
        super().__init__("adam")
        self.fused = fused

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2, fused=self.fused)


def _scaled_fp16(init_scale: float = 2.0**10) -> list:
    # Lightning gives CPU "16-mixed" no GradScaler; an explicit one exercises the unscaling path on CPU.
    return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))]


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_with_a_grad_scaler_equals_penalty_added_by_hand(tmp_path, fused):
    """Lightning unscales before the hook; a fused optimizer unscales inside step(), so its gradients
    are still scaled there and the penalty gradient must be scaled alike."""
    with_callback = AdamNet(fused)
    by_hand = copy.deepcopy(with_callback)
    by_hand.hand_strength = STRENGTH
    initial = copy.deepcopy(with_callback)
    _fit(with_callback, [SparseRegularizer(STRENGTH, verbose=0)], tmp_path, plugins=_scaled_fp16())
    _fit(by_hand, [], tmp_path, plugins=_scaled_fp16())
    assert _max_diff(with_callback, by_hand) == 0
    assert (with_callback.unused.weight - initial.unused.weight).abs().max() > 1e-3


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_skipped_by_the_grad_scaler_gets_no_proximal_step(tmp_path, fused):
    model = AdamNet(fused)
    initial = copy.deepcopy(model)
    regularizer = SparseRegularizer(10.0, proximal=True, verbose=0)
    # A loss scale of 2**40 overflows the float16 gradients: the scaler skips the first step.
    _fit(model, [regularizer], tmp_path, max_steps=1, plugins=_scaled_fp16(2.0**40))
    assert regularizer.current_strength == 10.0
    assert _max_diff(model, initial) == 0
