r"""Knowledge distillation: the temperature-scaled KD loss and feature (hint) matching.

**Soft targets** (Hinton, Vinyals and Dean 2015). With student logits :math:`z_s`, teacher logits
:math:`z_t`, temperature :math:`T` and labels :math:`y`, the student minimizes

.. math::

    \mathcal{L} = \alpha\, T^2\, \mathrm{KL}\big(\mathrm{softmax}(z_t/T)\,\|\,\mathrm{softmax}(z_s/T)\big)
                 + (1-\alpha)\,\mathrm{CE}(z_s, y).

The :math:`T^2` factor keeps the gradient of the soft term at the same scale as the hard term when
:math:`T` changes (the gradient of the softened KL shrinks as :math:`1/T^2`). The KL is summed over
classes (dimension 1) and averaged over every other position (``reduction="batchmean"`` for
``(N, C)`` logits; per pixel for ``(N, C, H, W)`` segmentation logits).

**Hints** (FitNets, Romero et al. 2015). An intermediate student output is mapped to the shape of
a teacher output by a learnable :class:`HintProjection` and matched with the mean squared error.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.parameter import UninitializedParameter
from torch.utils.hooks import RemovableHandle

from lightning_compress.core.batches import first_tensor
from lightning_compress.errors import CompressionConfigError, check_number

__all__ = [
    "DistillationLoss",
    "HintProjection",
    "capture_outputs",
    "distillation_loss",
    "hint_loss",
    "kd_loss",
]


class DistillationLoss(NamedTuple):
    """The terms of the distillation objective (all scalars), as returned by :func:`distillation_loss`."""

    #: ``alpha * kd + (1 - alpha) * ce``, the value to minimize.
    loss: Tensor
    #: The soft term :math:`T^2\,\mathrm{KL}(p_t \| p_s)`, before weighting by ``alpha``.
    kd: Tensor
    #: The hard term (cross-entropy with the labels), before weighting by ``1 - alpha``; ``None``
    #: when no labels were given.
    ce: Tensor | None


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    r"""Soft-target loss :math:`T^2\,\mathrm{KL}(\mathrm{softmax}(z_t/T) \| \mathrm{softmax}(z_s/T))`.

    Classes are along dimension 1; the KL is summed over classes and averaged over the batch (and
    over any further positions). Computed in at least ``float32``. Gradients flow to
    ``student_logits`` only when the teacher logits do not require them.

    Args:
        student_logits: ``(N, C, *)`` logits of the student.
        teacher_logits: logits of the teacher, same shape.
        temperature: softening temperature :math:`T > 0`.

    Returns:
        A scalar tensor; zero when both logits agree.

    Raises:
        CompressionConfigError: if ``temperature`` is not positive.
        ValueError: if the shapes differ.

    Example:
        >>> z = torch.tensor([[2.0, 0.0, -1.0]])
        >>> kd_loss(z, z).item()
        0.0
        >>> # KL([0.881, 0.119] || [0.5, 0.5]) = 0.881 ln(0.881 / 0.5) + 0.119 ln(0.119 / 0.5)
        >>> round(kd_loss(torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), temperature=1.0).item(), 4)
        0.3278
    """
    check_number("temperature", temperature, low=0.0, low_inclusive=False)
    _check_same_shape(student_logits, teacher_logits, "student logits", "teacher logits")
    if student_logits.dim() < 2:
        raise ValueError(f"Expected logits of shape (N, C, ...), but got shape {tuple(student_logits.shape)}.")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=1).mean()
    return kl * (temperature * temperature)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> DistillationLoss:
    """The Hinton et al. objective ``alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(z_s, y)``.

    Args:
        student_logits: ``(N, C, *)`` logits of the student.
        teacher_logits: logits of the teacher, same shape (compute them without autograd).
        target: class indices ``(N, *)`` for the cross-entropy term, or ``None`` (unlabelled data,
            only allowed with ``alpha == 1``).
        temperature: softening temperature :math:`T > 0`.
        alpha: weight of the soft term, in ``[0, 1]``.

    Returns:
        The total loss and its two unweighted terms.

    Raises:
        CompressionConfigError: on a non-positive ``temperature``, an ``alpha`` outside ``[0, 1]``, or
            missing labels with ``alpha < 1``.

    Example:
        >>> z_s, z_t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> out = distillation_loss(z_s, z_t, torch.tensor([0]), temperature=1.0, alpha=0.5)
        >>> bool(torch.isclose(out.loss, 0.5 * out.kd + 0.5 * out.ce))
        True
    """
    check_number("alpha", alpha, low=0.0, high=1.0)
    kd = kd_loss(student_logits, teacher_logits, temperature)
    if target is None:
        if alpha != 1:
            raise CompressionConfigError(
                f"Expected argument `alpha` to be 1.0 when batches carry no labels, but got {alpha!r}."
                " Without labels only the soft (KD) term can be trained."
            )
        return DistillationLoss(kd, kd, None)
    ce = F.cross_entropy(student_logits.to(kd.dtype), target)
    return DistillationLoss(alpha * kd + (1.0 - alpha) * ce, kd, ce)


def hint_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Mean squared error between a (projected) student feature and a teacher feature (FitNets).

    Computed in at least ``float32``; the teacher feature is treated as a constant.

    Example:
        >>> hint_loss(torch.ones(2, 3), torch.zeros(2, 3)).item()
        1.0
    """
    _check_same_shape(student_feature, teacher_feature, "projected student feature", "teacher feature")
    dtype = torch.promote_types(student_feature.dtype, torch.float32)
    return F.mse_loss(student_feature.to(dtype), teacher_feature.detach().to(dtype))


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"Expected the {name_a} and the {name_b} to have the same shape, but got {tuple(a.shape)}"
            f" and {tuple(b.shape)}."
        )


def _plan(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> tuple[int, tuple[int, ...] | None]:
    """The channel dimension to project and the spatial size to pool to (``None``: keep)."""
    s, t = tuple(student_shape), tuple(teacher_shape)
    shapes = f"student {s} and teacher {t}"
    if len(s) != len(t) or len(s) < 2 or s[0] != t[0]:
        raise CompressionConfigError(
            f"Expected the features of a pair in `feature_pairs` to have the same number of dimensions and"
            f" batch size, but got {shapes}."
        )
    if len(s) == 2:
        return 1, None
    if len(s) == 3:
        if s[1] == t[1]:
            return 2, None  # (N, L, C) token sequences, or equal shapes
        if s[2] == t[2]:
            return 1, None  # (N, C, L) one-dimensional feature maps
        raise CompressionConfigError(
            f"Expected the features of a pair in `feature_pairs` to differ in one dimension only, but got {shapes}."
            " Three-dimensional features are projected over their last dimension (N, L, C) or over dimension 1"
            " (N, C, L), with the other one equal."
        )
    if len(s) > 5:
        raise CompressionConfigError(
            f"Expected the features of a pair in `feature_pairs` to have at most 5 dimensions, but got {shapes}."
        )
    return 1, (t[2:] if s[2:] != t[2:] else None)


class HintProjection(nn.Module):
    """Learnable map from a student feature to the shape of a teacher feature (the FitNets regressor).

    A weight of shape ``(C_teacher, C_student)`` and a bias applied over the channel dimension: a
    linear layer for ``(N, C)`` vectors and ``(N, L, C)`` token sequences, a 1x1 convolution for
    ``(N, C, L)``, ``(N, C, H, W)`` and ``(N, C, D, H, W)`` feature maps, followed by adaptive average
    pooling to the teacher's spatial size when that differs. When the widths agree the weight
    starts as the identity (the loss starts as the plain MSE between the features).

    The parameters start uninitialized, so that an optimizer can be built before the shapes are
    known; :meth:`configure` creates them from the two feature shapes, and loading a state dict
    creates them from the stored tensors.

    Example:
        >>> proj = HintProjection()
        >>> proj.configure((8, 16, 7, 7), (8, 64, 4, 4))
        >>> tuple(proj.weight.shape), tuple(proj(torch.randn(8, 16, 7, 7)).shape)
        ((64, 16), (8, 64, 4, 4))
    """

    weight: nn.Parameter | UninitializedParameter
    bias: nn.Parameter | UninitializedParameter

    def __init__(self) -> None:
        super().__init__()
        self.weight = UninitializedParameter()
        self.bias = UninitializedParameter()
        self.channel_dim: int | None = None
        self.output_size: tuple[int, ...] | None = None

    def is_materialized(self) -> bool:
        """Whether the parameters have been created (by :meth:`configure` or a state dict)."""
        return not isinstance(self.weight, UninitializedParameter)

    def configure(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        """Choose the channel dimension and pooling for these shapes and create the parameters.

        Parameters that already exist (loaded from a checkpoint) are kept when their shape fits.

        Raises:
            CompressionConfigError: if no 1x1 projection maps one shape to the other, or if loaded
                parameters do not fit them.
        """
        dim, size = _plan(student_shape, teacher_shape)
        c_in, c_out = student_shape[dim], teacher_shape[dim]
        if self.is_materialized():
            if tuple(self.weight.shape) != (c_out, c_in):
                raise CompressionConfigError(
                    f"Expected the loaded feature projection to map {c_in} to {c_out} channels (student"
                    f" {tuple(student_shape)} to teacher {tuple(teacher_shape)}), but its weight has shape"
                    f" {tuple(self.weight.shape)}."
                )
        else:
            for param, shape in ((self.weight, (c_out, c_in)), (self.bias, (c_out,))):
                if isinstance(param, UninitializedParameter):
                    param.materialize(shape)
            self.reset_parameters()
        self.channel_dim = dim if dim < len(student_shape) - 1 else -1
        self.output_size = size

    def reset_parameters(self) -> None:
        """Identity when the widths agree, else the initialization of :class:`torch.nn.Linear`."""
        with torch.no_grad():
            c_out, c_in = self.weight.shape
            if c_out == c_in:
                self.weight.copy_(torch.eye(c_in, dtype=self.weight.dtype, device=self.weight.device))
                self.bias.zero_()
            else:
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
                bound = 1.0 / math.sqrt(c_in)
                nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """Project ``x`` (the student feature) to the teacher's shape."""
        if self.channel_dim is None:
            raise RuntimeError("HintProjection.configure() must run before the projection is used.")
        y = F.linear(x.movedim(self.channel_dim, -1), self.weight, self.bias).movedim(-1, self.channel_dim)
        size = self.output_size
        if size is not None:
            if len(size) == 2:
                y = F.adaptive_avg_pool2d(y, (size[0], size[1]))
            else:
                y = F.adaptive_avg_pool3d(y, (size[0], size[1], size[2]))
        return y

    def extra_repr(self) -> str:
        """Shape of the map, or that it is not created yet."""
        if not self.is_materialized():
            return "uninitialized"
        c_out, c_in = self.weight.shape
        return f"{c_in} -> {c_out}, channel_dim={self.channel_dim}, output_size={self.output_size}"

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        # Uninitialized parameters cannot be detached; store them as they are (like torch's lazy modules).
        for name, param in self._parameters.items():
            if param is not None:
                uninitialized = isinstance(param, UninitializedParameter)
                destination[prefix + name] = param if keep_vars or uninitialized else param.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A checkpoint creates the parameters with its shapes; `configure` then checks them.
        for name, param in self._parameters.items():
            key = prefix + name
            value = state_dict.get(key)
            if (
                isinstance(param, UninitializedParameter)
                and isinstance(value, Tensor)
                and not isinstance(value, UninitializedParameter)
            ):
                with torch.no_grad():
                    param.materialize(value.shape)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


@contextmanager
def capture_outputs(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of ``modules`` during the forward passes run inside the ``with`` block.

    Forward hooks are registered on entry and removed on exit. A module's output is kept as is when
    it is a tensor, else its first tensor (:func:`~lightning_compress.core.batches.first_tensor`: the
    first of a tuple or list, the ``logits`` / ``last_hidden_state`` of a Hugging Face output). A
    module called several times keeps its last output.

    Args:
        modules: the modules to watch, by the name under which their outputs are returned.

    Yields:
        A dict that fills up with ``name -> output`` as the forward passes run.

    Raises:
        TypeError: (during the forward pass) if a watched module returns no tensor.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
        >>> with capture_outputs({"hidden": net[0]}) as outputs:
        ...     _ = net(torch.ones(2, 4))
        >>> tuple(outputs["hidden"].shape), len(net[0]._forward_hooks)
        ((2, 3), 0)
    """
    outputs: dict[str, Tensor] = {}
    handles: list[RemovableHandle] = []

    def _hook_for(name: str) -> Any:
        def _hook(module: nn.Module, args: Any, output: Any) -> None:
            tensor = first_tensor(output)
            if tensor is None:
                raise TypeError(
                    f"Expected the feature module `{name}` ({type(module).__name__}) to return a tensor or a tuple"
                    f" starting with one, but it returned {type(output).__name__}."
                )
            outputs[name] = tensor

        return _hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(_hook_for(name)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
