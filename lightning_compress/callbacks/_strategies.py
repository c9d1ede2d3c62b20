"""Which Lightning strategies the callbacks support: everything but FSDP1 and DeepSpeed.

Supported and tested on two CPU processes with gloo: single device, ``"ddp"`` (and its spawn /
fork variants), and ``ModelParallelStrategy`` with FSDP2 ``fully_shard`` (``DTensor`` weights split
by rows; see the *Large models* page). ``FSDPStrategy`` (FSDP1: flat parameters, CUDA only in
Lightning) and ``DeepSpeedStrategy`` (ZeRO partitions) hide the weights the callbacks prune and
convert, and could not be tested here (no GPU): they are refused at ``setup``, before training.
"""

from __future__ import annotations

from typing import Any

from lightning_compress.errors import CompressionConfigError

__all__ = ["UNSUPPORTED_STRATEGIES", "check_strategy"]

UNSUPPORTED_STRATEGIES: tuple[str, ...] = ("FSDPStrategy", "DeepSpeedStrategy")
"""Class names (a subclass counts) of the Lightning strategies the callbacks refuse."""


def check_strategy(trainer: Any, who: str) -> None:
    """Raise a :class:`~lightning_compress.CompressionConfigError` when ``trainer`` runs a refused strategy.

    The check reads the names in the strategy's class hierarchy, so it needs neither a GPU nor DeepSpeed.
    """
    strategy = getattr(trainer, "strategy", None)
    names = [cls.__name__ for cls in type(strategy).__mro__]
    refused = next((name for name in UNSUPPORTED_STRATEGIES if name in names), None)
    if refused is None:
        return
    raise CompressionConfigError(
        f"Expected a strategy that {who} supports (single device, 'ddp', or ModelParallelStrategy with FSDP2"
        f" `fully_shard`), but the Trainer runs {type(strategy).__name__} ({refused}), whose flat or partitioned"
        " parameters hide the weights it prunes and converts. Use"
        " `Trainer(strategy=ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1))` with"
        " `fully_shard` in `configure_model` (see the 'Large models' page of the docs), or 'ddp'."
    )
