r"""Sparsity-inducing penalties: their values, (sub)gradients and proximal steps.

Two penalties over the selected weights :math:`W_\ell` (the same selection as pruning):

* ``"l1"``: :math:`\Omega(W) = \sum_\ell \sum_{ij} |W_{\ell,ij}|`, which drives single weights to zero
  (unstructured sparsity, for magnitude pruning).
* ``"group_lasso"``: :math:`\Omega(W) = \sum_\ell \sum_c \lVert W_{\ell,c} \rVert_2`, the sum over output
  channels :math:`c` (dim 0: rows of a ``Linear``, filters of a ``Conv``) of each channel's L2 norm, which
  drives whole channels to zero (structured sparsity, for channel pruning). Groups are not weighted
  by :math:`\sqrt{\text{size}}`: all channels of one layer have the same size.

Values are accumulated in at least ``float32``. The subgradient at a non-differentiable point is
the one autograd takes: ``sign(0) = 0`` for ``l1`` and ``0`` for a channel whose norm is ``0``.

The proximal operators solve :math:`\min_v \tfrac12\lVert v - w\rVert^2 + t\,\Omega(v)` in closed form:
soft-thresholding :math:`v = \operatorname{sign}(w)\max(|w| - t, 0)` for ``l1`` and group shrinkage
:math:`v_c = w_c \max(1 - t / \lVert w_c \rVert_2, 0)` for ``group_lasso``. Both land on exact zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_compress.core.layout import WeightLayout, from_out_first, out_first
from lightning_compress.core.selection import DEFAULT_PRUNE_TYPES, select_targets
from lightning_compress.errors import check_choice

__all__ = [
    "PENALTIES",
    "Penalty",
    "group_lasso_penalty",
    "group_shrink_",
    "l1_penalty",
    "penalty_gradient",
    "penalty_named",
    "penalty_of",
    "proximal_step_",
    "soft_threshold_",
    "sparse_penalty",
    "strength_at",
]


def _accumulation_dtype(weight: Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)


def _channels(weight: Tensor) -> Tensor:
    """``weight`` as a 2-D view with one row per output channel (dim 0)."""
    return weight.reshape(weight.shape[0], -1) if weight.dim() > 0 else weight.reshape(1, 1)


def l1_penalty(weight: Tensor) -> Tensor:
    """Sum of absolute values of ``weight``, accumulated in at least ``float32``.

    Example:
        >>> l1_penalty(torch.tensor([[1.0, -2.0], [0.0, 0.5]]))
        tensor(3.5000)
    """
    return weight.abs().sum(dtype=_accumulation_dtype(weight))


def group_lasso_penalty(weight: Tensor) -> Tensor:
    """Sum over output channels (dim 0) of the L2 norm of each channel's weights.

    Example:
        >>> group_lasso_penalty(torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]]))
        tensor(6.)
    """
    norms = torch.linalg.vector_norm(_channels(weight), ord=2, dim=1, dtype=_accumulation_dtype(weight))
    return norms.sum()


def penalty_of(
    weights: Sequence[Tensor], penalty: str = "l1", layouts: Sequence[WeightLayout | None] | None = None
) -> Tensor:
    """The penalty summed over ``weights`` (a 0-dim tensor on the first weight's device).

    This is the function behind :func:`sparse_penalty` and :class:`~lightning_compress.SparseRegularizer`.
    Integer (quantized) weights are skipped: their stored values are not the weights.

    Args:
        weights: the tensors to penalize; gradients flow to those that require them.
        penalty: ``"l1"`` or ``"group_lasso"``.
        layouts: one layout per weight (:attr:`~lightning_compress.core.selection.Target.layout`), so that
            ``group_lasso`` groups the true output channels (the columns of a Hugging Face ``Conv1D``
            weight); ``None`` for ``(out, in, ...)`` weights.

    Raises:
        CompressionConfigError: for an unknown ``penalty``.
    """
    one = penalty_named(penalty).value
    given = list(layouts) if layouts is not None else [None] * len(weights)
    floating = [out_first(w, lay) for w, lay in zip(weights, given, strict=True) if w.is_floating_point()]
    if not floating:
        return torch.zeros(())
    device = floating[0].device
    total = one(floating[0])
    for weight in floating[1:]:
        total = total + one(weight).to(device)
    return total


def sparse_penalty(
    module: nn.Module,
    penalty: str = "l1",
    include: list[str] = list(DEFAULT_PRUNE_TYPES),  # noqa: B006 - never mutated; the contract's list
    exclude: list[str] = [],  # noqa: B006
) -> Tensor:
    r"""The sparsity penalty :math:`\Omega` of a model's selected weights, differentiable.

    Adding ``strength * sparse_penalty(self, ...)`` to the loss in ``training_step`` optimizes the same
    objective as :class:`~lightning_compress.SparseRegularizer` with the same arguments, which applies
    exactly this function's gradient without touching ``training_step``.

    Args:
        module: the model. A ``compression_submodule`` attribute on it narrows the selection to that
            submodule, as for every callback. A weight shared by several selected modules counts once.
        penalty: ``"l1"`` (sum of :math:`|w|`) or ``"group_lasso"`` (sum over output channels of
            their L2 norms).
        include: module type names whose ``weight`` is penalized (biases and norms are not).
        exclude: ``fnmatch`` globs of module names left out.

    Returns:
        A 0-dim tensor (``float32`` or wider).

    Raises:
        CompressionConfigError: for an unknown ``penalty`` or when ``include``/``exclude`` select no weight.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([[3.0, -4.0], [0.0, 1.0]]))
        ...     _ = model[2].weight.fill_(0.5)
        >>> sparse_penalty(model)
        tensor(9., grad_fn=<AddBackward0>)
        >>> sparse_penalty(model, "group_lasso", exclude=["2"])
        tensor(6., grad_fn=<SumBackward0>)
    """
    penalty_named(penalty)  # checked before selecting, so a bad name is named first
    targets = select_targets(module, include, exclude)  # a tied weight is one target
    return penalty_of([t.weight for t in targets], penalty, [t.layout for t in targets])


def penalty_gradient(weight: Tensor, penalty: str = "l1", layout: WeightLayout | None = None) -> Tensor:
    """The (sub)gradient of the penalty of one weight, in closed form; what autograd computes.

    ``sign(w)`` for ``l1`` (``0`` at ``0``); ``w_c / ||w_c||`` per channel for ``group_lasso``
    (``0`` for a channel of norm ``0``).

    Example:
        >>> penalty_gradient(torch.tensor([[3.0, -4.0], [0.0, 0.0]]), "group_lasso")
        tensor([[ 0.6000, -0.8000],
                [ 0.0000,  0.0000]])
    """
    return from_out_first(penalty_named(penalty).gradient(out_first(weight, layout)), layout)


def _group_gradient(weight: Tensor) -> Tensor:
    rows = _channels(weight)
    norms = torch.linalg.vector_norm(rows, ord=2, dim=1, keepdim=True, dtype=_accumulation_dtype(weight))
    scale = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    return (rows * scale).to(weight.dtype).reshape(weight.shape)


@torch.no_grad()
def soft_threshold_(weight: Tensor, threshold: float | Tensor) -> Tensor:
    """Proximal step of ``threshold * l1``, in place: ``sign(w) * max(|w| - threshold, 0)``.

    Weights with ``|w| <= threshold`` become exactly zero.

    Example:
        >>> soft_threshold_(torch.tensor([0.5, -0.05, -0.3, 0.1]), 0.1)
        tensor([ 0.4000,  0.0000, -0.2000,  0.0000])
    """
    # w - clamp(w, -t, t) is w - w == 0 exactly inside the band and w -/+ t outside it.
    band = (
        weight.clamp(min=-threshold, max=threshold)
        if isinstance(threshold, Tensor)
        else weight.clamp(-threshold, threshold)
    )
    return weight.sub_(band)


@torch.no_grad()
def group_shrink_(weight: Tensor, threshold: float | Tensor) -> Tensor:
    """Proximal step of ``threshold * group_lasso``, in place: each channel ``w_c *= max(1 - t/||w_c||, 0)``.

    Channels with ``||w_c|| <= threshold`` become exactly zero.

    Example:
        >>> group_shrink_(torch.tensor([[3.0, 4.0], [0.03, 0.04]]), 1.0)
        tensor([[2.4000, 3.2000],
                [0.0000, 0.0000]])
    """
    norms = torch.linalg.vector_norm(_channels(weight), ord=2, dim=1, dtype=_accumulation_dtype(weight))
    # A zero channel stays zero whatever its scale; the clamp keeps 0/0 from making it NaN.
    scale = (1.0 - threshold / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp_min(0.0)
    # Scale through a broadcast view, so that non-contiguous (channels-last) weights change in place;
    # adding +0.0 turns the -0.0 of a zeroed negative weight into +0.0 and changes nothing else.
    return weight.mul_(scale.to(weight.dtype).reshape(weight.shape[:1] + (1,) * (weight.dim() - 1))).add_(0.0)


def proximal_step_(
    weight: Tensor, penalty: str, threshold: float | Tensor, layout: WeightLayout | None = None
) -> Tensor:
    """Apply the proximal operator of ``threshold * penalty`` to ``weight`` in place.

    After a gradient step with learning rate ``lr`` on the data loss, calling this with
    ``threshold = lr * strength`` completes a proximal-gradient step on
    ``loss + strength * penalty`` (exact for plain SGD). ``layout`` says where the output channels
    of ``weight`` are (for ``group_lasso``).
    """
    penalty_named(penalty).proximal(out_first(weight, layout), threshold)  # in place, through the view
    return weight


@dataclass(frozen=True)
class Penalty:
    """One penalty of the table: its value, its (sub)gradient and its proximal step.

    Attributes:
        name: the name ``penalty`` arguments take.
        value: ``weight -> 0-dim tensor`` (at least ``float32``), differentiable.
        gradient: ``weight -> (sub)gradient`` of the weight's shape, in closed form.
        proximal: ``(weight, threshold) -> weight``, the proximal operator of ``threshold * value``, in place.
    """

    name: str
    value: Callable[[Tensor], Tensor]
    gradient: Callable[[Tensor], Tensor]
    proximal: Callable[[Tensor, float | Tensor], Tensor]


_TABLE: dict[str, Penalty] = {
    entry.name: entry
    for entry in (
        Penalty("l1", l1_penalty, torch.sign, soft_threshold_),
        Penalty("group_lasso", group_lasso_penalty, _group_gradient, group_shrink_),
    )
}

PENALTIES: tuple[str, ...] = tuple(_TABLE)
"""Names accepted by ``penalty`` arguments."""


def penalty_named(penalty: str) -> Penalty:
    """The table's entry for ``penalty``.

    Raises:
        CompressionConfigError: for an unknown name (the message lists the known ones).

    Example:
        >>> penalty_named("l1").value(torch.tensor([1.0, -2.0]))
        tensor(3.)
    """
    check_choice("penalty", penalty, _TABLE)
    return _TABLE[penalty]


def strength_at(strength: float, epochs_done: float, start_epoch: int = 0, warmup_epochs: float = 0.0) -> float:
    """The penalty weight after ``epochs_done`` epochs of training: ``0``, then a linear ramp, then ``strength``.

    ``epochs_done`` counts the current step's batch as done (``epoch + (batch_idx + 1) / batches``), so
    the first step of ``start_epoch`` is the first with a nonzero weight and the last step of epoch
    ``start_epoch + warmup_epochs - 1`` the first at full ``strength``.

    Example:
        >>> [strength_at(1.0, e, start_epoch=1, warmup_epochs=2) for e in (0.5, 1.0, 1.5, 2.0, 3.0, 9.0)]
        [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    """
    past = epochs_done - start_epoch
    if past <= 0:
        return 0.0
    if warmup_epochs <= 0 or past >= warmup_epochs:
        return strength
    return strength * past / warmup_epochs
