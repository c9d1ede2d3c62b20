"""Keeps pruned weights exactly zero through training, with no forward hooks and no renaming.

The weights stay ordinary parameters under their own names. Exactness comes from three places:

* at each mask update the weights *and* the optimizer state (momentum, Adam moments, ...) are
  multiplied by the mask, so nothing remembers a pruned weight;
* before every optimizer step the gradients of the masked weights are multiplied by the mask, so
  momentum and adaptive moments stay zero there and gradient clipping sees only live weights;
* right after an optimizer step (``Optimizer.register_step_post_hook``) the weights are multiplied
  by the mask again, so weight decay, noise or any optimizer rule cannot regrow them.

The third is needed only when something could move a weight whose gradient and optimizer state are
zero. For the optimizers of ``torch.optim`` listed in :data:`_ZERO_PRESERVING` it cannot happen:
their update of an entry is a function of that entry's gradient, state and value that is exactly
zero when all three are zero (``0 * lr``, ``0 / (sqrt(0) + eps)``, ``0 * (1 - lr * wd)``), so the
step after a masked gradient leaves a pruned weight at zero bit for bit. The callback then skips
the hook and a step costs one fused multiply; with any other optimizer (a subclass included), or
when user code could touch the gradients after they are masked, the hook is installed.

Each per-step operation is a single ``torch._foreach_mul_`` over the masked weights.
Pure torch; the callback decides when these run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_compress.core.sharding import count_nonzero, has_dtensors, local_rows, local_tensor

__all__ = ["MaskKeeper", "apply_masks_", "mask_optimizer_state_", "preserves_zeros"]

_ZERO_PRESERVING: tuple[type[Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.ASGD,
    torch.optim.Rprop,
)
"""Optimizers (exactly these classes, not subclasses) that never move an entry whose gradient and
per-entry state are zero; tested one by one in ``tests/callbacks/test_pruning_keeper.py``."""


@torch.no_grad()
def apply_masks_(tensors: Sequence[Tensor], multipliers: Sequence[Tensor]) -> None:
    """Multiply each tensor in place by its 0/1 multiplier: one fused kernel for the whole list.

    ``multipliers`` are the masks converted to the tensors' dtype and device (a ``bool`` multiplier
    would take a slow path). Pruned entries become exactly ``+0.0``: a negative weight times ``0`` is
    ``-0.0``, so ``+0.0`` is added after the product (``-0.0 + 0.0 == +0.0``; every other value is
    unchanged), one more fused pass.

    Example:
        >>> import torch
        >>> w = [torch.tensor([1.5, -2.0])]
        >>> apply_masks_(w, [torch.tensor([0.0, 1.0])])
        >>> w[0].tolist(), torch.signbit(w[0]).tolist()
        ([0.0, -2.0], [False, True])
    """
    if tensors:
        tensors = list(tensors)
        torch._foreach_mul_(tensors, list(multipliers))
        torch._foreach_add_(tensors, 0.0)


@torch.no_grad()
def mask_optimizer_state_(optimizer: torch.optim.Optimizer, multipliers: Mapping[Tensor, Tensor]) -> int:
    """Zero the optimizer state (momentum, Adam moments, ...) of pruned entries.

    Every state tensor of a masked parameter with the parameter's shape (``momentum_buffer``,
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``sum``, ...) is multiplied by the mask, so the
    state cannot move a pruned weight later. Scalars such as ``step`` and factored states of another
    shape are left alone.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        multipliers: ``parameter -> 0/1 multiplier`` of the parameter's shape.

    Returns:
        How many state tensors were masked.
    """
    masked = 0
    for param, state in optimizer.state.items():
        multiplier = multipliers.get(param)
        if multiplier is None:
            continue
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == param.shape and value.is_floating_point():
                block = local_tensor(value)  # a sharded (DTensor) state: its local rows, as the multiplier
                block.mul_(multiplier.to(block.dtype))
                masked += 1
    return masked


def preserves_zeros(optimizer: Optimizer) -> bool:
    """Whether a step of ``optimizer`` keeps a weight at zero when its gradient and state are zero."""
    return type(optimizer) in _ZERO_PRESERVING


class MaskKeeper:
    """Owns the device-side multipliers of one set of masks and the optimizer hooks that enforce them.

    Sharded parameters (FSDP2 ``DTensor``) are masked on their local rows: the multipliers, the
    weights, gradients and optimizer state touched are this rank's blocks, and nothing is gathered.

    Args:
        params: ``parameter name -> parameter`` of every selected weight.
        optimizers: the optimizers that update them.
        guard_all: re-apply the masks after every step of every optimizer, even of those that
            preserve zeros (when code outside the callback may change gradients after they are masked).
    """

    def __init__(self, params: Mapping[str, Tensor], optimizers: Sequence[Optimizer], guard_all: bool = True) -> None:
        self.params = dict(params)
        self.optimizers = list(optimizers)
        self.masks: dict[str, Tensor] = {}  # CPU bool, True = kept
        self._multipliers: dict[str, Tensor] = {}  # on the parameter's device and dtype
        # per optimizer (by id): the masked parameters it owns and their multipliers, as lists
        self._per_optimizer: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        self.guarded = [opt for opt in self.optimizers if guard_all or not preserves_zeros(opt)]
        self._handles: list[RemovableHandle] = [opt.register_step_post_hook(self._after_step) for opt in self.guarded]

    @torch.no_grad()
    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Install ``masks`` (bool, any device): zero the weights and the optimizer state they prune."""
        self.masks = {name: masks[name].detach().to("cpu", torch.bool).contiguous() for name in self.params}
        self._multipliers = {}
        for name, param in self.params.items():
            mask = self.masks[name]
            if bool(mask.all()):
                continue  # nothing pruned here: no work per step
            block = local_tensor(param)
            self._multipliers[name] = local_rows(mask, param).to(device=block.device, dtype=block.dtype)
        names = list(self._multipliers)
        apply_masks_([local_tensor(self.params[n]) for n in names], [self._multipliers[n] for n in names])
        self.mask_optimizer_state()
        self._per_optimizer = {}
        for optimizer in self.optimizers:
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            mine = [n for n in names if id(self.params[n]) in owned]
            self._per_optimizer[id(optimizer)] = ([self.params[n] for n in mine], [self._multipliers[n] for n in mine])

    def mask_optimizer_state(self) -> None:
        """Zero the optimizer state of pruned entries (after an optimizer state was restored, too)."""
        by_param = {self.params[name]: mult for name, mult in self._multipliers.items()}
        for optimizer in self.optimizers:
            mask_optimizer_state_(optimizer, by_param)

    def mask_gradients(self, optimizer: Optimizer) -> None:
        """Zero the gradients of pruned entries of the weights ``optimizer`` is about to update.

        Runs before every optimizer step, so it avoids even a ``no_grad`` context (gradients do not
        require grad, unless a double backward made them).
        """
        entry = self._per_optimizer.get(id(optimizer))
        if entry is None or not entry[0]:
            return
        params, multipliers = entry
        grads = [None if p.grad is None else local_tensor(p.grad) for p in params]
        if not all(g is not None for g in grads):
            pairs = [(g, m) for g, m in zip(grads, multipliers, strict=True) if g is not None]
            grads, multipliers = [g for g, _ in pairs], [m for _, m in pairs]
        if not grads:
            return
        if any(g.requires_grad for g in grads):  # type: ignore[union-attr]
            with torch.no_grad():
                torch._foreach_mul_(grads, multipliers)  # type: ignore[arg-type]
        else:
            torch._foreach_mul_(grads, multipliers)  # type: ignore[arg-type]

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        entry = self._per_optimizer.get(id(optimizer))
        if entry is not None and entry[0]:
            apply_masks_([local_tensor(p) for p in entry[0]], entry[1])

    @property
    def _sharded(self) -> bool:
        return has_dtensors(self.params.values())

    @torch.no_grad()
    def zeros_fraction(self) -> float:
        """Fraction of the selected weights that are exactly zero, counted on the real tensors.

        For sharded weights every rank counts its rows and the counts are all-reduced (every rank must call it).
        """
        if self._sharded:
            nonzero, total = count_nonzero(self.params.values())
            return 1.0 - nonzero / total if total else 0.0
        return _zeros_fraction(self.params.values())

    def close(self) -> None:
        """Remove the optimizer hooks and drop every reference to the model and the optimizers."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.guarded = []
        self._per_optimizer = {}
        self._multipliers = {}
        self.params = {}
        self.optimizers = []


@torch.no_grad()
def _zeros_fraction(tensors: Iterable[Tensor]) -> float:
    tensors = list(tensors)
    total = sum(t.numel() for t in tensors)
    if not total:
        return 0.0
    nonzero = torch.stack([torch.count_nonzero(t.detach()).to("cpu") for t in tensors]).sum()
    return 1.0 - int(nonzero) / total
