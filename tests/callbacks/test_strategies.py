"""The callbacks refuse FSDP1 (FSDPStrategy) and DeepSpeed at setup, before training (no GPU needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch import nn

from lightning_compress import CompressionConfigError, PruningCallback, QuantizeOnFitEnd, SparseRegularizer
from lightning_compress.callbacks._strategies import check_strategy


class DeepSpeedStrategy(DDPStrategy):
    """Duck-typed stand-in: Lightning's class needs the deepspeed package; the check reads class names."""


class MyFSDP(FSDPStrategy):
    """A user's subclass counts too."""


CALLBACKS = [
    lambda: PruningCallback(0.5, verbose=0),
    lambda: QuantizeOnFitEnd("dynamic", verbose=0),
    lambda: SparseRegularizer(1e-4, verbose=0),
]


@pytest.mark.parametrize("make", CALLBACKS)
@pytest.mark.parametrize(
    ("strategy", "refused"),
    [(FSDPStrategy, "FSDPStrategy"), (MyFSDP, "FSDPStrategy"), (DeepSpeedStrategy, "DeepSpeedStrategy")],
)
def test_setup_refuses_flat_or_partitioned_parameters(make, strategy: type, refused: str) -> None:
    callback = make()
    trainer = SimpleNamespace(strategy=object.__new__(strategy))  # nothing else is read before the refusal
    with pytest.raises(
        CompressionConfigError,
        match=rf"{type(callback).__name__} supports .*runs {strategy.__name__} \({refused}\).*ModelParallelStrategy",
    ):
        callback.setup(trainer, nn.Linear(2, 2), "fit")  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", [DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy])
def test_supported_strategies_pass(strategy: type) -> None:
    check_strategy(SimpleNamespace(strategy=object.__new__(strategy)), "PruningCallback")
