"""``nn.Linear`` subclasses of other libraries whose own ``forward`` computes ``nn.Linear``'s.

Falcon's every block layer is a ``FalconLinear`` (``input @ weight.T + bias``) and timm's classifiers
are ``timm.layers.Linear`` (``F.linear``, casting the weight first only under TorchScript). Both
override ``forward``, which would otherwise make them opaque: the int8 conversion leaves a subclass
with its own ``forward`` float, and channel tracing follows its ``F.linear`` call instead of seeing a
Linear. They are known by the qualified name of their ``forward``, so a subclass of theirs that
overrides ``forward`` again is not.

Pure torch.
"""

from __future__ import annotations

from typing import Any, TypeGuard

from torch import nn

__all__ = ["LINEAR_FORWARDS", "computes_linear"]

LINEAR_FORWARDS: frozenset[str] = frozenset(
    {
        "transformers.models.falcon.modeling_falcon.FalconLinear.forward",
        "timm.layers.linear.Linear.forward",
    }
)
"""Qualified names of the ``forward`` methods known to compute ``nn.Linear.forward``."""


def _qualified(function: Any) -> str:
    return f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', '')}"


def computes_linear(module: nn.Module) -> TypeGuard[nn.Linear]:
    """Whether ``module`` is an ``nn.Linear`` whose ``forward`` is ``nn.Linear``'s or one of :data:`LINEAR_FORWARDS`.

    Example:
        >>> class Doubled(nn.Linear):
        ...     def forward(self, x):
        ...         return 2 * super().forward(x)
        >>> computes_linear(nn.Linear(2, 2)), computes_linear(Doubled(2, 2)), computes_linear(nn.ReLU())
        (True, False, False)
    """
    if not isinstance(module, nn.Linear):
        return False
    forward = type(module).forward
    return forward is nn.Linear.forward or _qualified(forward) in LINEAR_FORWARDS
