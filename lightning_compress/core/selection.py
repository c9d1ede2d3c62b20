"""Which weights a compression step acts on.

Layers are chosen by module *type names* (a subclass counts: ``NonDynamicallyQuantizableLinear``
is a ``Linear``) and left out by fully-qualified-name globs, so that every choice can be written
in a YAML file. A model can name the submodule that is to be compressed through a
``compression_submodule`` attribute (``DistillationModule`` names its student), so that a frozen
teacher beside it is never touched.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from lightning_compress.errors import CompressionConfigError, check_str_list

__all__ = [
    "DEFAULT_PRUNE_TYPES",
    "DEFAULT_QUANT_TYPES",
    "ROOT_ATTRIBUTE",
    "Target",
    "compression_root",
    "matches_type",
    "select_targets",
]

DEFAULT_PRUNE_TYPES: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d")
"""Module types whose ``weight`` is pruned or penalized by default."""

DEFAULT_QUANT_TYPES: tuple[str, ...] = ("Linear", "Conv2d")
"""Module types converted to int8 by default."""

ROOT_ATTRIBUTE = "compression_submodule"
"""Name of the attribute by which a model names the submodule to compress (a dotted path)."""


@dataclass(frozen=True)
class Target:
    """One selected layer: its fully qualified name and the module that owns the weight."""

    name: str
    module: nn.Module

    @property
    def weight(self) -> Tensor:
        """The layer's ``weight`` tensor (a parameter, or an int8 buffer once quantized)."""
        weight = self.module.weight
        assert isinstance(weight, Tensor)  # guaranteed by select_targets
        return weight

    @property
    def param_name(self) -> str:
        """Name of the weight as it appears in the model's ``state_dict``."""
        return f"{self.name}.weight" if self.name else "weight"


def matches_type(module: nn.Module, type_names: Sequence[str]) -> bool:
    """Whether ``module`` is an instance of a class named in ``type_names``.

    A name matches a class in the module's MRO by its bare name (``"Linear"``) or by its
    qualified name (``"torch.nn.modules.linear.Linear"``), so subclasses count.
    """
    wanted = set(type_names)
    for cls in type(module).__mro__:
        if cls.__name__ in wanted or f"{cls.__module__}.{cls.__qualname__}" in wanted:
            return True
    return False


def compression_root(model: nn.Module) -> tuple[str, nn.Module]:
    """The submodule a model asks to compress, and its name (``""`` for the whole model).

    A model opts in with a string attribute, e.g. ``compression_submodule = "student"``.
    """
    name = getattr(model, ROOT_ATTRIBUTE, None)
    if not name:
        return "", model
    if not isinstance(name, str):
        raise CompressionConfigError(
            f"Expected attribute `{ROOT_ATTRIBUTE}` of {type(model).__name__} to be the dotted name of a"
            f" submodule, but got {name!r}."
        )
    try:
        return name, model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Close matches: {close}." if close else ""
        raise CompressionConfigError(
            f"Expected attribute `{ROOT_ATTRIBUTE}` of {type(model).__name__} to name a submodule,"
            f" but got {name!r}, which does not exist.{hint}"
        ) from None


def _excluded(name: str, full_name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(full_name, p) for p in patterns)


def _type_names_with_weights(root: nn.Module) -> list[str]:
    names = {type(m).__name__ for m in root.modules() if isinstance(getattr(m, "weight", None), Tensor)}
    return sorted(names)


def select_targets(
    model: nn.Module,
    include: Sequence[str] = DEFAULT_PRUNE_TYPES,
    exclude: Sequence[str] = (),
    *,
    use_root: bool = True,
    allow_empty: bool = False,
) -> list[Target]:
    """Layers of ``model`` whose ``weight`` is to be compressed.

    Args:
        model: the model (or LightningModule). With ``use_root``, a ``compression_submodule``
            attribute on it narrows the search to that submodule.
        include: module type names; a module is selected when its class or a base class has one.
        exclude: ``fnmatch`` globs over module names. A glob is matched against the name relative
            to the compression root and against the full name in ``model``
            (``"classifier.*"`` and ``"student.classifier.*"`` both work for a student's classifier).
        use_root: honour the model's ``compression_submodule`` attribute.
        allow_empty: return an empty list instead of raising when nothing is selected.

    Returns:
        The selected layers in module order, named by their full name in ``model`` (the prefix of
        their keys in ``model.state_dict()``).

    Raises:
        CompressionConfigError: if ``include``/``exclude`` are not lists of strings, or if they select
            no weight (the message lists the module types the model has).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [t.name for t in select_targets(model, exclude=["2"])]
        ['0']
    """
    include = check_str_list("include", include)
    exclude = check_str_list("exclude", exclude)
    prefix, root = compression_root(model) if use_root else ("", model)
    targets = []
    for name, module in root.named_modules():
        full_name = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if not matches_type(module, include) or _excluded(name, full_name, exclude):
            continue
        if isinstance(getattr(module, "weight", None), Tensor):
            targets.append(Target(full_name, module))
    if not targets and not allow_empty:
        where = f" in submodule `{prefix}`" if prefix else ""
        raise CompressionConfigError(
            f"Expected arguments `include`={include} and `exclude`={exclude} to select at least one weight"
            f"{where}, but they selected none. The model has these module types with a weight:"
            f" {_type_names_with_weights(root)}."
        )
    return targets
