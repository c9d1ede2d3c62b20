"""Which weights a compression step acts on.

Layers are chosen by module *type names* (a subclass counts: ``NonDynamicallyQuantizableLinear``
is a ``Linear``) and left out by fully-qualified-name globs, so that every choice can be written
in a YAML file. A model can name the submodule that is to be compressed through a
``compression_submodule`` attribute (``DistillationModule`` names its student), so that a frozen
teacher beside it is never touched.

What counts as a layer:

* ``"Linear"`` means every linear projection: ``nn.Linear`` and its subclasses, Hugging Face's
  ``transformers.pytorch_utils.Conv1D`` (GPT-2; its weight is stored ``[in, out]``) and the input
  projections of ``nn.MultiheadAttention`` (the packed ``in_proj_weight``, or ``q/k/v_proj_weight``
  when keys and values have their own sizes). ``"Conv1D"`` and ``"MultiheadAttention"`` name them
  alone; naming ``"MultiheadAttention"`` selects its ``out_proj`` too. transformers is never imported:
  ``Conv1D`` is recognized by its class name and module.
* Each selected weight is a :class:`Target` that knows its :class:`~lightning_compress.core.layout.WeightLayout`
  (which axis holds the output channels, which projections a packed tensor holds), so that channel,
  N:M and group-lasso decisions follow the true axes.
* A weight shared by several modules (tied embeddings) is *one* target, named after its first owner in
  module order, and it is selected only when every module that owns it is selected: the default
  ``["Linear", ...]`` thus leaves GPT-2's ``lm_head`` (tied to the ``nn.Embedding`` ``wte``) dense;
  ``include=[..., "Embedding"]`` selects the shared table once, as ``transformer.wte.weight``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import Tensor, nn

from lightning_compress.core.layout import STANDARD, WeightLayout
from lightning_compress.errors import CompressionConfigError, check_str_list

__all__ = [
    "DEFAULT_PRUNE_TYPES",
    "DEFAULT_QUANT_TYPES",
    "LEFT_OUT_FRACTION",
    "ROOT_ATTRIBUTE",
    "Target",
    "compression_root",
    "is_hf_conv1d",
    "left_out_message",
    "linear_alias",
    "matches_type",
    "module_weights",
    "select_targets",
]

DEFAULT_PRUNE_TYPES: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d")
"""Module types whose ``weight`` is pruned or penalized by default."""

DEFAULT_QUANT_TYPES: tuple[str, ...] = ("Linear", "Conv2d", "Embedding")
"""Module types converted to int8 by default."""

ROOT_ATTRIBUTE = "compression_submodule"
"""Name of the attribute by which a model names the submodule to compress (a dotted path)."""

LEFT_OUT_FRACTION = 0.2
"""A default selection that leaves more than this fraction of a model's parameters out is reported."""


@dataclass(frozen=True)
class Target:
    """One selected weight: the module that owns it, under which attribute, and how it is laid out.

    Attributes:
        name: fully qualified name of the owning module (the prefix of its ``state_dict`` keys).
        module: the owning module.
        attr: the attribute holding the weight: ``"weight"``, or ``"in_proj_weight"`` (and
            ``q/k/v_proj_weight``) for ``nn.MultiheadAttention``.
        layout: where the output channels are (``out_axis=1`` for Hugging Face ``Conv1D``) and which
            projections a packed weight holds (``blocks=(E, E, E)`` for ``in_proj_weight``).
        tied: ``state_dict`` names of the same tensor under its other owners (a tied ``lm_head``).
    """

    name: str
    module: nn.Module
    attr: str = "weight"
    layout: WeightLayout = STANDARD
    tied: tuple[str, ...] = ()

    @property
    def weight(self) -> Tensor:
        """The weight tensor (a parameter, or an int8 buffer once quantized)."""
        weight = getattr(self.module, self.attr)
        assert isinstance(weight, Tensor)  # guaranteed by select_targets
        return weight

    @property
    def param_name(self) -> str:
        """Name of the weight as it appears in the model's ``state_dict``."""
        return f"{self.name}.{self.attr}" if self.name else self.attr


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is (a subclass of) Hugging Face's ``Conv1D``, without importing transformers.

    Example:
        >>> is_hf_conv1d(nn.Conv1d(2, 2, 1)), is_hf_conv1d(nn.Linear(2, 2))
        (False, False)
    """
    return any(
        cls.__name__ == "Conv1D" and cls.__module__.partition(".")[0] == "transformers" for cls in type(module).__mro__
    )


def linear_alias(module: nn.Module) -> str | None:
    """``"Conv1D"`` or ``"MultiheadAttention"`` for the layers that ``"Linear"`` covers without being ``nn.Linear``.

    Example:
        >>> linear_alias(nn.MultiheadAttention(4, 1)), linear_alias(nn.Linear(2, 2))
        ('MultiheadAttention', None)
    """
    if isinstance(module, nn.MultiheadAttention):
        return "MultiheadAttention"
    if is_hf_conv1d(module):
        return "Conv1D"
    return None


def matches_type(module: nn.Module, type_names: Sequence[str]) -> bool:
    """Whether ``module`` is an instance of a class named in ``type_names``.

    A name matches a class in the module's MRO by its bare name (``"Linear"``) or by its
    qualified name (``"torch.nn.modules.linear.Linear"``), so subclasses count. ``"Linear"``
    also matches Hugging Face ``Conv1D`` and ``nn.MultiheadAttention`` (see :func:`linear_alias`).
    """
    wanted = set(type_names)
    for cls in type(module).__mro__:
        if cls.__name__ in wanted or f"{cls.__module__}.{cls.__qualname__}" in wanted:
            return True
    return "Linear" in wanted and linear_alias(module) is not None


def module_weights(module: nn.Module) -> list[tuple[str, WeightLayout]]:
    """The weights a selected module contributes, as ``(attribute, layout)`` pairs.

    ``weight`` for most layers (``out_axis=1`` for Hugging Face ``Conv1D``); the input projections
    for ``nn.MultiheadAttention`` (its ``out_proj`` is a ``Linear`` module of its own).

    Example:
        >>> module_weights(nn.MultiheadAttention(4, 2))
        [('in_proj_weight', WeightLayout(out_axis=0, blocks=(4, 4, 4)))]
    """
    if isinstance(module, nn.MultiheadAttention):
        packed = getattr(module, "in_proj_weight", None)
        if isinstance(packed, Tensor):
            size = module.embed_dim
            return [("in_proj_weight", WeightLayout(blocks=(size, size, size)))]
        attrs = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        return [(attr, STANDARD) for attr in attrs if isinstance(getattr(module, attr, None), Tensor)]
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return []
    if is_hf_conv1d(module) and weight.dim() == 2:
        return [("weight", WeightLayout(out_axis=1))]
    return [("weight", STANDARD)]


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


def _check_exclude_matches(root: nn.Module, prefix: str, exclude: Sequence[str]) -> None:
    """Raise when a glob of ``exclude`` matches no module (a typo such as ``"classifer.*"`` would do nothing)."""
    if not exclude:
        return
    names = [(name, _full(prefix, name)) for name, _ in root.named_modules() if name]
    for pattern in exclude:
        if any(fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(f, pattern) for n, f in names):
            continue
        candidates = sorted({n for n, _ in names} | {f for _, f in names})
        close = difflib.get_close_matches(pattern, candidates, n=3, cutoff=0.5)
        close += [c for c in difflib.get_close_matches(pattern.rstrip(".*"), candidates, n=3) if c not in close]
        hint = f" The closest module names: {close[:3]}." if close else f" The modules are named {candidates[:8]}."
        raise CompressionConfigError(
            f"Expected every glob of argument `exclude` to match a module name, but {pattern!r} matches none.{hint}"
        )


def _type_names_with_weights(root: nn.Module) -> list[str]:
    names = {type(m).__name__ for m in root.modules() if module_weights(m)}
    return sorted(names)


def _full(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _owners(root: nn.Module, prefix: str) -> dict[int, list[str]]:
    """``id(tensor) -> state_dict names`` of every parameter and buffer, under each module that owns it."""
    owners: dict[int, list[str]] = {}
    for name, module in root.named_modules():
        full = _full(prefix, name)
        for attr, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is not None:
                owners.setdefault(id(tensor), []).append(f"{full}.{attr}" if full else attr)
    return owners


def select_targets(
    model: nn.Module,
    include: Sequence[str] = DEFAULT_PRUNE_TYPES,
    exclude: Sequence[str] = (),
    *,
    use_root: bool = True,
    allow_empty: bool = False,
) -> list[Target]:
    """Weights of ``model`` that are to be compressed, one :class:`Target` per distinct tensor.

    Args:
        model: the model (or LightningModule). With ``use_root``, a ``compression_submodule``
            attribute on it narrows the search to that submodule.
        include: module type names; a module is selected when its class or a base class has one
            (``"Linear"`` also covers Hugging Face ``Conv1D`` and ``nn.MultiheadAttention``).
        exclude: ``fnmatch`` globs over module names. A glob is matched against the name relative
            to the compression root and against the full name in ``model``
            (``"classifier.*"`` and ``"student.classifier.*"`` both work for a student's classifier).
        use_root: honour the model's ``compression_submodule`` attribute.
        allow_empty: return an empty list instead of raising when nothing is selected.

    Returns:
        The selected weights in module order, named by their owner's full name in ``model`` (the
        prefix of their keys in ``model.state_dict()``). A tensor shared by several modules appears
        once, under its first owner, and only when all its owners are selected.

    Raises:
        CompressionConfigError: if ``include``/``exclude`` are not lists of strings, if a glob of
            ``exclude`` matches no module (the message lists the closest names), or if they select
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
    _check_exclude_matches(root, prefix, exclude)
    candidates: list[Target] = []
    implied: set[int] = set()  # out_proj of a selected MultiheadAttention
    for name, module in root.named_modules():
        full_name = _full(prefix, name)
        if not (matches_type(module, include) or id(module) in implied) or _excluded(name, full_name, exclude):
            continue
        if isinstance(module, nn.MultiheadAttention) and isinstance(module.out_proj, nn.Module):
            implied.add(id(module.out_proj))
        candidates.extend(Target(full_name, module, attr, layout) for attr, layout in module_weights(module))
    chosen = {c.param_name for c in candidates}
    owners = _owners(root, prefix) if candidates else {}
    targets: dict[int, Target] = {}
    for candidate in candidates:
        key = id(candidate.weight)
        if key in targets:
            continue  # a tied weight, already selected under its first owner
        names = owners.get(key, [candidate.param_name])
        if all(n in chosen for n in names):  # a weight shared with an unselected module stays as it is
            targets[key] = replace(candidate, tied=tuple(n for n in names if n != candidate.param_name))
    if not targets and not allow_empty:
        where = f" in submodule `{prefix}`" if prefix else ""
        raise CompressionConfigError(
            f"Expected arguments `include`={include} and `exclude`={exclude} to select at least one weight"
            f"{where}, but they selected none. The model has these module types with a weight:"
            f" {_type_names_with_weights(root)}."
        )
    return list(targets.values())


def left_out_message(
    model: nn.Module,
    targets: Sequence[Target],
    exclude: Sequence[str] = (),
    *,
    threshold: float = LEFT_OUT_FRACTION,
    top: int = 5,
    left_as: str = "dense",
) -> str | None:
    """What a selection leaves out, when it is more than ``threshold`` of the model's parameters; else ``None``.

    Counted over the compression root (a ``compression_submodule``): the parameters of modules that own
    no selected weight (a selected layer's bias is covered by its layer), by module, largest first.
    Modules that ``exclude`` names were left out on purpose and are not counted as left out.
    ``left_as`` says what they stay (``"dense"``, or ``"float"`` for quantization).
    The callbacks say it once, on rank zero, for their default ``include``.

    Example:
        >>> model = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 2))
        >>> print(left_out_message(model, select_targets(model)))  # doctest: +NORMALIZE_WHITESPACE
        The default selection leaves 800 of 818 parameters (97.80%) dense, in modules it does not select:
        0 (Embedding, 800). Add their types to `include` to compress them too, or pass `include`
        explicitly to silence this.
    """
    prefix, root = compression_root(model)
    covered: set[str] = set()
    for target in targets:
        covered.add(target.name)
        covered.update(name.rpartition(".")[0] for name in target.tied)
    total = 0
    left: dict[str, tuple[str, int]] = {}
    ties: dict[str, list[str]] = {}
    first_owner: dict[int, str] = {}
    for name, module in root.named_modules():
        full = _full(prefix, name)
        for param in module._parameters.values():
            if param is None:
                continue
            owner = first_owner.setdefault(id(param), full)
            if owner != full:  # a tied parameter, counted under its first owner
                if owner not in covered:
                    ties.setdefault(owner, []).append(full)
                continue
            total += param.numel()
            if full not in covered and not _excluded(name, full, exclude):
                kind, count = left.get(full, (type(module).__name__, 0))
                left[full] = (kind, count + param.numel())
    missing = sum(count for _, count in left.values())
    if not total or missing <= threshold * total:
        return None
    ranked = sorted(left.items(), key=lambda item: -item[1][1])
    parts = []
    for name, (kind, count) in ranked[:top]:
        tied = f", tied to {', '.join(ties[name])}" if name in ties else ""
        parts.append(f"{name or '(root)'} ({kind}, {count:,}{tied})")
    more = f" and {len(ranked) - top} more" if len(ranked) > top else ""
    return (
        f"The default selection leaves {missing:,} of {total:,} parameters ({missing / total:.2%}) {left_as}, in"
        f" modules it does not select: {', '.join(parts)}{more}. Add their types to `include` to compress them"
        " too, or pass `include` explicitly to silence this."
    )
