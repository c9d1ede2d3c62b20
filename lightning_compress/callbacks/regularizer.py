r"""SparseRegularizer: train on ``loss + strength * penalty`` without touching ``training_step``.

A callback cannot change the loss a ``training_step`` returns, but it can change the gradient the
optimizer sees. ``on_before_optimizer_step`` runs once per optimizer step, after the backward pass of
every accumulated micro-batch, after AMP has unscaled the gradients and before gradient clipping;
adding :math:`\lambda \nabla\Omega(w)` to ``.grad`` there gives the optimizer exactly the gradient of
``loss + strength * sparse_penalty(...)``. With ``proximal=True`` the penalty is not differentiated;
instead, after each optimizer step, the weights go through the proximal operator of
:math:`\text{lr} \cdot \lambda\,\Omega` (soft-thresholding or group shrinkage) and land on exact zeros.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_compress.callbacks._base import CompressionCallback
from lightning_compress.core.penalties import PENALTIES, penalty_of, proximal_step_, strength_at
from lightning_compress.core.selection import DEFAULT_PRUNE_TYPES, Target, select_targets
from lightning_compress.core.sharding import has_dtensors, local_tensor, sum_over_shards
from lightning_compress.errors import check_choice, check_number, check_str_list, config_error

__all__ = ["SparseRegularizer"]

_PENALTY_METRIC = "sparse_reg/penalty"
_WEIGHTED_METRIC = "sparse_reg/weighted"


class SparseRegularizer(CompressionCallback):
    r"""Add ``strength * sparse_penalty(model, penalty, include, exclude)`` to the training objective.

    The optimizer sees the gradient of ``loss + strength * penalty`` (as if ``training_step`` added
    the penalty to its loss), also with ``accumulate_grad_batches``, mixed precision and DDP; or, with
    ``proximal=True``, a proximal step after each optimizer step that sets small weights (``l1``) or
    whole output channels (``group_lasso``) to exact zeros.

    Logs ``sparse_reg/penalty`` (:math:`\Omega`) and ``sparse_reg/weighted`` (:math:`\lambda\Omega`, with the
    ramped :math:`\lambda`) per optimizer step and per epoch through ``pl_module.log``.

    Args:
        strength: :math:`\lambda \ge 0`, the weight of the penalty. ``0`` only logs the penalty.
        penalty: ``"l1"`` (sum of :math:`|w|`; unstructured) or ``"group_lasso"`` (sum over output
            channels of their L2 norms; structured, pairs with ``PruningCallback(method="channel")``).
        proximal: apply the proximal operator with threshold ``lr * strength`` (each parameter group's
            current learning rate) after every optimizer step instead of adding a subgradient.
            Reaches exact zeros; exact proximal gradient descent for plain SGD.
        include: module type names whose ``weight`` is penalized (biases and norms are not).
        exclude: ``fnmatch`` globs of module names left out.
        start_epoch: first epoch with a nonzero penalty.
        warmup_epochs: epochs over which :math:`\lambda` rises linearly from ``0`` to ``strength``,
            step by step, from the start of ``start_epoch``; ``0`` for none.
        verbose: ``1`` prints the final penalty and the fraction of exact zeros at fit end (rank 0).

    Raises:
        CompressionConfigError: for a negative ``strength``, an unknown ``penalty``, bad ramp arguments,
            ``include``/``exclude`` that select nothing (at setup) or ``proximal=True`` with an optimizer
            whose parameter groups have no ``lr`` (at fit start), always before training.

    Example:
        >>> SparseRegularizer(1e-4, penalty="group_lasso", exclude=["classifier"]).penalty
        'group_lasso'
    """

    IDENTITY = ("penalty", "include", "exclude")
    SAVED = ("strength", "penalty", "proximal", "start_epoch", "warmup_epochs")

    def __init__(
        self,
        strength: float = 1e-4,
        *,
        penalty: str = "l1",
        proximal: bool = False,
        include: list[str] = list(DEFAULT_PRUNE_TYPES),  # noqa: B006 - never mutated; a plain list for the CLI
        exclude: list[str] = [],  # noqa: B006
        start_epoch: int = 0,
        warmup_epochs: float = 0,
        verbose: int = 1,
    ) -> None:
        super().__init__(verbose)
        check_number("strength", strength, low=0.0)
        check_choice("penalty", penalty, PENALTIES)
        if not isinstance(proximal, bool):
            raise config_error("proximal", "a bool", proximal)
        check_number("start_epoch", start_epoch, low=0, integer=True)
        check_number("warmup_epochs", warmup_epochs, low=0.0)
        self.strength = float(strength)
        self.penalty = penalty
        self.proximal = proximal
        self.include = check_str_list("include", include)
        self.exclude = check_str_list("exclude", exclude)
        self.start_epoch = start_epoch
        self.warmup_epochs = float(warmup_epochs)
        self._warning_filters: list[Any] = []
        self._reset()

    def _reset(self) -> None:
        self._targets: list[Target] = []
        self._handles: list[RemovableHandle] = []
        self._current_strength = 0.0
        self._steps = 0  # optimizer steps on which the penalty acted
        self._backwards = 0  # backward passes since the last optimizer step (automatic optimization)
        self._epochs_done = 0.0
        self._prox_pending: set[int] = set()  # ids of optimizers whose next step gets the proximal step

    @property
    def current_strength(self) -> float:
        r"""The :math:`\lambda` applied at the latest optimizer step (after ``start_epoch`` and the ramp)."""
        return self._current_strength

    # ------------------------------------------------------------------ setup and checks

    @override
    def _setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()
        self._reset()  # a second fit starts clean; a resumed one is restored by load_state_dict next
        if trainer.world_size > 1:
            # The penalty is computed from the (identical) parameters on every rank, so the epoch value needs
            # no sync; Lightning's advice to sync it would only add a barrier and an all-reduce per step.
            # The filters live for this fit only: _release removes exactly the entries added here.
            for name in (_PENALTY_METRIC, _WEIGHTED_METRIC):
                warnings.filterwarnings(
                    "ignore",
                    message=re.escape(f"It is recommended to use `self.log({name!r}, ..., sync_dist=True)`") + ".*",
                    category=PossibleUserWarning,
                )
                self._warning_filters.append(warnings.filters[0])
        self._warn_left_out(trainer, pl_module)  # layers made in configure_model are checked at fit start

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._targets = select_targets(pl_module, self.include, self.exclude)  # a tied weight is one target
        laid_out = [t.param_name for t in self._targets if t.layout is not None and not t.layout.is_standard]
        if self.penalty == "group_lasso" and laid_out and has_dtensors(t.weight for t in self._targets):
            raise config_error(
                "penalty",
                "'l1' for sharded (FSDP2) weights stored as [in, out] or packed q/k/v",
                self.penalty,
                f"The output channels of {laid_out[:3]} run across the shards of their rows.",
            )
        weight_ids = {id(t.weight) for t in self._targets}
        trained = False
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if not any(id(p) in weight_ids and p.requires_grad for p in group["params"]):
                    continue
                trained = True
                if self.proximal and "lr" not in group:
                    raise config_error(
                        "proximal",
                        "False for an optimizer without a learning rate",
                        self.proximal,
                        f"{type(optimizer).__name__} has a parameter group without `lr`, and the proximal step"
                        " needs one (its threshold is lr * strength). Use `proximal=False`, which adds the"
                        " penalty's gradient instead and works with any optimizer.",
                    )
        if not trained:
            rank_zero_warn(
                "SparseRegularizer: none of the selected weights is trained by an optimizer (frozen, or not in"
                " any parameter group); it will only log the penalty."
            )
        if self.proximal:
            self._handles = [opt.register_step_post_hook(self._proximal_hook) for opt in trainer.optimizers]

    @override
    def _release(self) -> None:
        for entry in self._warning_filters:
            filters: list[Any] = warnings.filters  # type: ignore[assignment]  # a list at run time
            if entry in filters:
                filters.remove(entry)
        if self._warning_filters:
            mutated = getattr(warnings, "_filters_mutated", None)  # drops the caches of the filter list
            if mutated is not None:
                mutated()
        self._warning_filters = []
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._targets = []
        self._prox_pending.clear()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.verbose and self._targets:
            weights = [t.weight.detach() for t in self._targets]
            total = sum(w.numel() for w in weights)
            zeros = sum(int((w == 0).sum()) for w in weights)
            value = float(penalty_of(weights, self.penalty, [t.layout for t in self._targets]))
            rank_zero_info(
                f"SparseRegularizer({self.penalty}{', proximal' if self.proximal else ''}): penalty {value:.6g},"
                f" {zeros:,} of {total:,} selected weights ({zeros / max(total, 1):.2%}) are exactly zero."
            )
        self._release()

    # ------------------------------------------------------------------ training

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        batches = trainer.num_training_batches
        fraction = (batch_idx + 1) / batches if batches not in (0, float("inf")) else 1.0
        self._epochs_done = trainer.current_epoch + fraction

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._backwards += 1

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # Automatic optimization: Lightning divides the loss by `accumulate_grad_batches` (N); a hand-added
        # penalty is in each of the k micro-batch losses since the last step, so its gradient adds up to k/N
        # of one: exactly one but in a short last window of an epoch. k == 0: training_step returned None
        # and nothing is added, as by hand. Manual optimization: once per step, as if added to the loss
        # that is backpropagated before each step.
        automatic = pl_module.automatic_optimization
        scale = self._backwards / trainer.accumulate_grad_batches if automatic else 1.0
        self._backwards = 0
        self._prox_pending.discard(id(optimizer))
        if scale == 0 or not self._targets:
            return
        lam = strength_at(self.strength, self._epochs_done, self.start_epoch, self.warmup_epochs)
        self._current_strength = lam
        weights = [t.weight for t in self._targets]
        layouts = [t.layout for t in self._targets]  # group lasso along the true output channels
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        trained = [w for w in weights if id(w) in in_optimizer and w.requires_grad and w.is_floating_point()]
        if has_dtensors(weights):  # FSDP2: each rank its rows; the value is the sum over the shards
            value = self._sharded_step(weights, layouts, trained, lam * scale * _pending_loss_scale(trainer, optimizer))
            if self.proximal and lam > 0 and trained:
                self._prox_pending.add(id(optimizer))
        elif self.proximal or lam == 0 or not trained:
            with torch.no_grad():
                value = penalty_of(weights, self.penalty, layouts)
            if self.proximal and lam > 0 and trained:
                self._prox_pending.add(id(optimizer))
        else:
            # optimizer.step runs this hook under no_grad; the gradient is autograd's, of the public function.
            scale *= _pending_loss_scale(trainer, optimizer)
            with torch.enable_grad():
                value = penalty_of(weights, self.penalty, layouts)
                grads = torch.autograd.grad(value * (lam * scale), trained)
            _add_to_grads(trained, grads)
        if lam > 0:
            self._steps += 1
        value = value.detach()
        pl_module.log(_PENALTY_METRIC, value, on_step=True, on_epoch=True, batch_size=1)
        pl_module.log(_WEIGHTED_METRIC, value * lam, on_step=True, on_epoch=True, batch_size=1)

    def _sharded_step(self, weights: list[Tensor], layouts: list[Any], trained: list[Tensor], factor: float) -> Tensor:
        """The penalty of row-sharded weights: local penalties summed over the ranks; gradients added locally.

        Both penalties are sums over rows (``l1`` over entries, ``group_lasso`` over output channels), so
        the sum of the local penalties is the penalty of the full weights and each local gradient is the
        full gradient's block. ``factor`` is ``strength * scale``; the gradient is added only where
        ``factor`` is nonzero and the proximal step is not used.
        """
        trained_ids = {id(w) for w in trained}
        add = not self.proximal and factor != 0
        total = torch.zeros((), dtype=torch.float64)
        for weight, layout in zip(weights, layouts, strict=True):
            block = local_tensor(weight).detach()
            if add and id(weight) in trained_ids and block.is_floating_point():
                leaf = block.clone().requires_grad_(True)
                with torch.enable_grad():
                    value = penalty_of([leaf], self.penalty, [layout])
                    (grad,) = torch.autograd.grad(value * factor, leaf)
                if weight.grad is None:
                    raise RuntimeError(
                        f"SparseRegularizer: the sharded weight of shape {tuple(weight.shape)} has no gradient"
                    )
                local_tensor(weight.grad).add_(grad)
            else:
                with torch.no_grad():
                    value = penalty_of([block], self.penalty, [layout])
            total += value.detach().double().cpu()
        return sum_over_shards(total, weights).float()

    def _proximal_hook(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """After a real optimizer step (AMP skips the step, and this hook, on non-finite gradients)."""
        if id(optimizer) not in self._prox_pending:
            return
        self._prox_pending.discard(id(optimizer))
        found_inf = getattr(optimizer, "found_inf", None)  # set by GradScaler for optimizers that unscale
        if isinstance(found_inf, Tensor) and bool(found_inf):  # themselves (fused): this step was skipped
            return
        layouts = {id(t.weight): t.layout for t in self._targets}
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if id(p) in layouts and p.requires_grad]
            if not params:
                continue
            if "lr" not in group:  # a group added after fit start without a learning rate
                raise config_error("proximal", "False for an optimizer without a learning rate", self.proximal)
            threshold = group["lr"] * self._current_strength
            for param in params:
                proximal_step_(local_tensor(param).detach(), self.penalty, threshold, layouts[id(param)])  # local rows

    # ------------------------------------------------------------------ checkpointing

    @override
    def _state(self) -> dict[str, Any]:
        progress = {"current_strength": self._current_strength, "epochs_done": self._epochs_done, "steps": self._steps}
        return {**self._arguments(), **progress}  # the arguments at the top level too, as version 1 wrote them

    @override
    def _load_state(self, state: dict[str, Any]) -> None:
        self._current_strength = float(state["current_strength"])
        self._epochs_done = float(state["epochs_done"])
        self._steps = int(state["steps"])


def _pending_loss_scale(trainer: pl.Trainer, optimizer: Optimizer) -> float:
    """The factor by which the gradients are still scaled when ``on_before_optimizer_step`` runs.

    Lightning unscales them before the hook, except for optimizers that unscale inside ``step()``
    (``fused=True``): GradScaler hands those the scale, so their gradients are still multiplied by it.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False) or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


def _add_to_grads(params: list[Tensor], grads: tuple[Tensor, ...]) -> None:
    """``p.grad += g``; a parameter the loss did not reach (``grad is None``) gets ``g`` alone, as by hand."""
    for param, grad in zip(params, grads, strict=True):
        if param.grad is None:
            param.grad = grad
        elif param.grad.is_sparse:
            param.grad = param.grad + grad
        else:
            param.grad.add_(grad)
