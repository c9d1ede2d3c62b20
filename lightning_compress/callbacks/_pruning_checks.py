"""The checks and warnings of ``PruningCallback`` that read the Trainer or the masks, as plain functions.

* :func:`check_no_overlap`: two PruningCallbacks of one Trainer select disjoint weights;
* :func:`may_touch_gradients`: whether the masks must be re-applied after every optimizer step;
* :func:`check_finite`: a NaN / infinite weight at a mask update is an error naming it;
* :func:`check_resumed_masks`: the masks of a checkpoint fit the weights this callback selects;
* :func:`warn_cut_off` (:func:`newly_cut_off`, :func:`cut_off_message`): a layer that lost every weight
  is reported once;
* :func:`summary`: what is printed at fit end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_compress.core.report import compression_report
from lightning_compress.core.selection import compression_root
from lightning_compress.core.sharding import nonfinite
from lightning_compress.errors import CompressionConfigError

__all__ = [
    "check_finite",
    "check_no_overlap",
    "check_resumed_masks",
    "cut_off_message",
    "may_touch_gradients",
    "newly_cut_off",
    "summary",
    "warn_cut_off",
]


def check_no_overlap(callback: Any, callbacks: Iterable[Callback], pl_module: pl.LightningModule) -> None:
    """Raise when another callback of the same class selects a weight ``callback`` selects."""
    mine = set(callback._select(pl_module))
    for other in callbacks:
        if other is callback or not isinstance(other, type(callback)):
            continue
        shared = sorted(mine & set(other._select(pl_module)))
        if shared:
            raise CompressionConfigError(
                f"Expected the PruningCallbacks of a Trainer to select disjoint weights, but two of them both"
                f" select {shared[:5]}{' ...' if len(shared) > 5 else ''}. Use `include`/`exclude` to split them."
            )


def warn_cut_off(
    masks: Mapping[str, Tensor], reported: set[str], step: int, scope: str, method: str, score: str = "magnitude"
) -> None:
    """Warn about the layers that ``masks`` cut off entirely and that are not in ``reported`` (then added)."""
    cut = newly_cut_off(masks, reported)
    if cut:
        reported.update(cut)
        rank_zero_warn(cut_off_message(cut, step, scope, method, score))


def newly_cut_off(masks: Mapping[str, Tensor], reported: set[str]) -> list[str]:
    """The layers whose masks keep no weight at all and that were not reported yet.

    One global threshold can do that to a layer whose weights are all small (as a wide layer's are at
    initialization), which disconnects the network there.
    """
    return sorted(name for name, mask in masks.items() if not bool(mask.any()) and name not in reported)


def cut_off_message(cut: list[str], step: int, scope: str, method: str, score: str = "magnitude") -> str:
    """The warning for layers that lost every weight, with the remedies (``score``: the ranking, if not magnitude).

    Example:
        >>> cut_off_message(["fc.weight"], 3, "global", "magnitude", "wanda")[:75]
        'PruningCallback: at step 3 the global masks ranked by score="wanda" removed'
    """
    kind = "" if method == "magnitude" and score != "magnitude" else f" {method}"
    ranked = "" if score == "magnitude" else f' ranked by score="{score}"'
    return (
        f"PruningCallback: at step {step} the {scope}{kind} masks{ranked} removed every weight of {cut},"
        " which cuts the network there. Consider `scope='layer'`, a later `start_epoch` (prune a trained"
        " network), or `exclude` for these layers."
    )


def summary(pl_module: pl.LightningModule, achieved: float | None, selected: int, target: float, method: str) -> str:
    """The fit-end line (the sparsity of the ``selected`` layers) and the table of the compressed module."""
    prefix, root = compression_root(pl_module)
    where = f" of `{prefix}`" if prefix else ""
    return (
        f"PruningCallback: {achieved or 0.0:.2%} of the weights of {selected} selected layers"
        f"{where} are zero (target {target:.2%}, method {method!r}).\n"
        f"{compression_report(root).table()}"
    )


def _overrides(obj: object, base: type, name: str) -> bool:
    return getattr(type(obj), name, None) is not getattr(base, name, None)


def may_touch_gradients(callback: Callback, trainer: pl.Trainer, module: pl.LightningModule) -> bool:
    """Whether code other than the optimizer may change gradients between our masking and the step.

    True with manual optimization (the user steps the optimizers), when the LightningModule
    overrides a hook that runs after ours (``on_before_optimizer_step``, ``configure_gradient_clipping``,
    ``optimizer_step``), or when a callback after this one in the Trainer's list overrides
    ``on_before_optimizer_step``. Then the masks are re-applied after every optimizer step.
    """
    if not module.automatic_optimization:
        return True
    for name in ("on_before_optimizer_step", "configure_gradient_clipping", "optimizer_step"):
        if _overrides(module, pl.LightningModule, name):
            return True
    callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
    later = callbacks[callbacks.index(callback) + 1 :] if callback in callbacks else []
    return any(_overrides(cb, Callback, "on_before_optimizer_step") for cb in later)


def check_finite(params: Mapping[str, Tensor], step: int) -> None:
    """Raise, naming the layer, when a weight to prune holds NaN or infinity: its magnitudes cannot be ranked."""
    for name in nonfinite(params):  # the flags are all-reduced over the shards of a sharded weight
        raise FloatingPointError(
            f"PruningCallback: the weight `{name}` holds NaN or infinite values at the mask update of step"
            f" {step}, so its magnitudes cannot be ranked (pruning it would report 0 % sparsity and leave NaN"
            " in place of zeros). Training diverged: lower the learning rate, clip gradients"
            " (`Trainer(gradient_clip_val=...)`) or check the inputs and the loss for NaN."
        )


def check_resumed_masks(masks: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
    """Raise when the masks of a checkpoint (if any) are not one per selected weight, of its shape."""
    expected = {name: tuple(p.shape) for name, p in params.items()}
    got = {name: tuple(m.shape) for name, m in masks.items()}
    if masks and got != expected:
        raise CompressionConfigError(
            "Expected the PruningCallback state in the checkpoint to hold masks for the weights this"
            f" callback selects {expected}, but it holds masks for {got}. Resume with the same model,"
            " `include` and `exclude`."
        )
