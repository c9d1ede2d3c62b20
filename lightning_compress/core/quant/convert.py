"""Turn the selected float layers of a model into int8 layers, in place.

The steps are plain functions so that a callback, a script or a test can run them in any order:
:func:`quantizable_targets` picks the layers (through :func:`~lightning_compress.core.selection.select_targets`),
:func:`record_input_ranges` observes their inputs on calibration batches (for ``mode="static"``),
:func:`quantize_model` swaps them for :class:`~lightning_compress.core.quant.modules.Int8Linear` /
:class:`~lightning_compress.core.quant.modules.Int8Conv2d`, and :func:`int8_layers` lists what a model holds.
:func:`quantize` runs the three in the order ``QuantizeOnFitEnd`` does (select, calibrate, convert), for
scripts and benchmarks that convert a model outside a Trainer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.batches import call_model
from lightning_compress.core.quant.base import MODES, Int8Module

# Re-exported: convert.py was their home.
from lightning_compress.core.quant.calibration import observed_ranges as observed_ranges
from lightning_compress.core.quant.calibration import record_input_ranges as record_input_ranges
from lightning_compress.core.quant.calibration import record_output_ranges as record_output_ranges
from lightning_compress.core.quant.calibration import static_input_modules as static_input_modules
from lightning_compress.core.quant.calibration import static_output_modules as static_output_modules
from lightning_compress.core.quant.fold import fold_batch_norms
from lightning_compress.core.quant.grids import relu_links, share_grids
from lightning_compress.core.quant.primitives import scale_from_range
from lightning_compress.core.quant.residual import put_input_grids, residual_grids
from lightning_compress.core.quant.table import INT8_TABLE, int8_kind_for, int8_types
from lightning_compress.core.quant.transformer import adapt_parents
from lightning_compress.core.selection import DEFAULT_QUANT_TYPES, Target, select_targets
from lightning_compress.errors import CompressionConfigError, check_choice

__all__ = [
    "ConversionResult",
    "int8_layers",
    "quantizable_targets",
    "quantize",
    "quantize_model",
    "residual_input_grids",
    "tie_int8_weights",
    "tied_weight_groups",
]


def quantizable_targets(
    model: nn.Module,
    include: Sequence[str] = DEFAULT_QUANT_TYPES,
    exclude: Sequence[str] = (),
    *,
    allow_empty: bool = False,
) -> tuple[list[Target], dict[str, str]]:
    """The selected layers that can become int8, and those left float with the reason.

    ``nn.Linear`` and ``nn.Conv2d`` (grouped and depthwise included) and their subclasses are
    converted. A subclass that overrides ``forward`` is left float, since its int8 version would
    lose what the override does.

    Args:
        model: the model; its ``compression_submodule`` attribute is honoured.
        include: module type names (a subclass counts).
        exclude: ``fnmatch`` globs of module names left float.
        allow_empty: return empty lists instead of raising when nothing is selected.

    Returns:
        ``(targets, skipped)``: the layers to convert, and ``{name: reason}`` for selected layers
        that stay float.

    Raises:
        CompressionConfigError: when nothing is selected, or ``include`` selects a type that has no
            int8 version (e.g. ``Conv1d``).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(2))
        >>> targets, skipped = quantizable_targets(model)
        >>> [t.name for t in targets], skipped
        (['0'], {'2': 'LazyLinear is not initialized yet'})
    """
    targets: list[Target] = []
    skipped: dict[str, str] = {}
    seen: set[int] = set()
    for target in select_targets(model, include, exclude, allow_empty=allow_empty):
        module = target.module
        kind = type(module).__name__
        kind_entry = int8_kind_for(module)
        attr = getattr(target, "attr", "weight")
        refusal = None if kind_entry is None or kind_entry.refusal is None else kind_entry.refusal(module)
        if id(module) in seen:
            continue
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            skipped[target.name] = f"{kind} is not initialized yet"
        elif isinstance(module, Int8Module):
            skipped[target.name] = "already int8"
        elif refusal is not None:
            skipped[target.name] = refusal
        elif kind_entry is not None and attr not in ("weight", "in_proj_weight"):
            skipped[f"{target.name}.{attr}"] = f"{kind}.{attr} has no int8 version; it stays float"
        elif kind_entry is not None:
            if kind_entry.forward_is_own(module):
                targets.append(target)
                seen.add(id(module))
            else:
                base = kind_entry.float_type
                # timm's `Linear` against `nn.Linear`: the same name needs the modules to tell them apart.
                mine, theirs = (
                    (f"{type(module).__module__}.{kind}", f"{base.__module__}.{base.__name__}")
                    if kind == base.__name__
                    else (kind, base.__name__)
                )
                skipped[target.name] = f"{mine} overrides {theirs}.forward"
        else:
            known = ", ".join(t.__name__ for t in INT8_TABLE)
            raise CompressionConfigError(
                f"Expected argument `include` to select only layers with an int8 version ({known} and"
                f" their subclasses), but it selected `{target.name}` of type {kind}. Drop {kind!r} from"
                " `include` or add the layer's name to `exclude`."
            )
        if target.name in skipped:
            # The weight's other owners (a tied `lm_head`) stay float with it: say so under their names.
            for tied_key in getattr(target, "tied", ()):
                partner = tied_key.rpartition(".")[0]
                skipped.setdefault(partner, f"tied to `{target.name}`, which stays float: {skipped[target.name]}")
    return targets, skipped


@dataclass
class ConversionResult:
    """What :func:`quantize_model` did: ``{name: mode}`` of the converted layers, and those that fell back."""

    converted: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)
    adapted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """Selected layers left float, with the reason (filled by :func:`quantize`)."""
    folded: dict[str, str] = field(default_factory=dict)
    """``{batch norm: convolution}`` folded before conversion (filled by :func:`quantize`; see
    :mod:`~lightning_compress.core.quant.fold`)."""
    input_grids: dict[str, str] = field(default_factory=dict)
    """``{block: convolution}``: static blocks whose input is rounded once on that convolution's input
    grid, so that their residual additions read int8 operands (filled by :func:`quantize` and
    :func:`residual_input_grids`; see :mod:`~lightning_compress.core.quant.residual`)."""


@torch.no_grad()
def quantize(
    model: nn.Module,
    mode: str = "dynamic",
    per_channel: bool = True,
    *,
    calibration: Iterable[Any] = (),
    include: Sequence[str] = DEFAULT_QUANT_TYPES,
    exclude: Sequence[str] = (),
    fold_batch_norm: bool = True,
) -> ConversionResult:
    """Select, fold, calibrate and convert, in place: what ``QuantizeOnFitEnd`` does at fit end, in one process.

    Args:
        model: the model (its ``compression_submodule`` attribute is honoured).
        mode: ``"dynamic"``, ``"static"`` or ``"weight_only"``.
        per_channel: one weight scale per output channel; otherwise one per tensor.
        calibration: for ``"static"``, the batches to observe, as a dataloader yields them; each is fed
            to the model by the package's one rule (:func:`~lightning_compress.core.batches.call_model`:
            a tensor is the input, a tuple's first item, a dict the keyword arguments), in eval mode. A
            layer they never reach is converted ``"dynamic"`` (listed in ``fallbacks``). A
            convolution that only feeds the next one through a ReLU takes that one's input grid as
            its output grid (:mod:`~lightning_compress.core.quant.grids`), and a residual block's
            input is put once on its static convolution's input grid
            (:mod:`~lightning_compress.core.quant.residual`; listed in ``result.input_grids``).
        include: module type names to convert.
        exclude: ``fnmatch`` globs of module names left float.
        fold_batch_norm: with ``per_channel``, first fold each eval-mode ``BatchNorm2d`` that reads
            only a selected convolution's output into that convolution
            (:func:`~lightning_compress.core.quant.fold.fold_batch_norms`; listed in ``result.folded``).
            Per tensor nothing is folded: one weight scale for the folded channels measured 2.9x the
            output error of the unfolded model on resnet18 (``benchmarks/batch_norm_fold.py``).

    Returns:
        The :class:`ConversionResult`; selected layers that stay float are in ``result.skipped``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> quantize(model, "static", calibration=[torch.randn(3, 4)]).converted
        {'0': 'static', '2': 'static'}
    """
    check_choice("mode", mode, MODES)
    targets, skipped = quantizable_targets(model, include, exclude)
    folded = fold_before_conversion(model, targets, per_channel) if fold_batch_norm else {}
    ranges: dict[str, tuple[Tensor, Tensor]] = {}
    output_ranges: dict[str, tuple[Tensor, Tensor]] = {}
    if mode == "static":
        was_training = model.training
        model.eval()
        try:
            with ExitStack() as stack:
                observers = stack.enter_context(record_input_ranges(static_input_modules(model, targets)))
                out_observers = stack.enter_context(record_output_ranges(static_output_modules(model, targets)))
                for batch in calibration:
                    call_model(model, batch)
        finally:
            model.train(was_training)
        ranges, output_ranges = observed_ranges(observers), observed_ranges(out_observers)
        output_ranges = shared_output_ranges(model, targets, ranges, output_ranges)
    result = quantize_model(model, targets, mode, per_channel, ranges, output_ranges)
    result.skipped.update(skipped)
    result.folded = folded
    if mode == "static":
        result.input_grids = residual_input_grids(model)
    return result


def residual_input_grids(model: nn.Module) -> dict[str, str]:
    """Put each residual block's input once on its static convolution's input grid (``core/quant/residual.py``).

    The last step of a post-training static conversion; returns ``{block: convolution path}``.
    """
    return put_input_grids(model, residual_grids(model))


def fold_before_conversion(model: nn.Module, targets: Sequence[Target], per_channel: bool) -> dict[str, str]:
    """The batch norm folding of a post-training conversion: per channel only (see :func:`quantize`)."""
    return fold_batch_norms(model, {t.name: t.module for t in targets}) if per_channel else {}


def shared_output_ranges(
    model: nn.Module,
    targets: Sequence[Target],
    input_ranges: Mapping[str, tuple[Tensor, Tensor]],
    output_ranges: Mapping[str, tuple[Tensor, Tensor]],
) -> dict[str, tuple[Tensor, Tensor]]:
    """``output_ranges`` with one grid between convolutions that only a ReLU joins (``core/quant/grids.py``)."""
    links = relu_links(model, {t.name: t.module for t in targets})
    return share_grids(links, input_ranges, output_ranges)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    if new is model:  # converted in place (a MultiheadAttention), the model itself included
        return
    if not name:
        raise TypeError(f"Cannot replace the model itself ({type(model).__name__}) by an int8 layer; wrap it.")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    targets: Sequence[Target],
    mode: str = "dynamic",
    per_channel: bool = True,
    input_ranges: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    output_ranges: Mapping[str, tuple[Tensor, Tensor]] | None = None,
) -> ConversionResult:
    """Replace each target layer of ``model`` by its int8 version, in place.

    Args:
        model: the model that holds the targets (names are full names in it).
        targets: layers from :func:`quantizable_targets`.
        mode: ``"dynamic"``, ``"static"`` or ``"weight_only"``.
        per_channel: one weight scale per output channel; otherwise one per tensor.
        input_ranges: for ``"static"``, ``{name: (min, max)}`` of each Linear's input; a Linear with
            no range, or a range that is all zero, is converted ``"dynamic"`` instead (listed in
            ``fallbacks``).
        output_ranges: for ``"static"``, ``{name: (min, max)}`` of each convolution's output (the
            layers of :func:`static_output_modules`); a convolution without one is converted
            ``"dynamic"`` too.

    Returns:
        A :class:`ConversionResult`. Transformer modules that hold int8 layers are adapted with
        :func:`~lightning_compress.core.quant.transformer.adapt_parents`.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> targets, _ = quantizable_targets(model)
        >>> quantize_model(model, targets).converted
        {'0': 'dynamic', '2': 'dynamic'}
        >>> model[0].int8_weight.dtype, model[0].weight.dtype
        (torch.int8, torch.float32)
    """
    check_choice("mode", mode, MODES)
    result = ConversionResult()
    ranges = input_ranges or {}
    outputs = output_ranges or {}
    for target in targets:
        first = _convert_one(model, target.name, target.module, mode, per_channel, (ranges, outputs), result)
        for tied_key in getattr(target, "tied", ()):
            name = tied_key.rpartition(".")[0]
            try:
                partner = model.get_submodule(name)
            except AttributeError:
                continue
            entry = int8_kind_for(partner)
            why = None if entry is None or entry.refusal is None else entry.refusal(partner)
            if isinstance(partner, Int8Module) or entry is None or why is not None or not entry.forward_is_own(partner):
                result.fallbacks[name] = f"float: tied to `{target.name}`, but it has no int8 version here"
                continue
            second = _convert_one(model, name, partner, mode, per_channel, (ranges, outputs), result)
            _share_weight(first, second, name, result)
    result.adapted = adapt_parents(model)
    return result


def _convert_one(
    model: nn.Module,
    name: str,
    module: nn.Module,
    mode: str,
    per_channel: bool,
    both: tuple[Mapping[str, tuple[Tensor, Tensor]], Mapping[str, tuple[Tensor, Tensor]]],
    result: ConversionResult,
) -> Int8Module:
    layer_mode = mode
    scale: Tensor | None = None
    out_scale: Tensor | None = None
    entry = int8_kind_for(module)
    if entry is None:
        raise TypeError(f"`{name}` is a {type(module).__name__}, which has no int8 version.")
    if entry.static_input and mode == "static":
        ranges, outputs = both
        scale = scale_from_range(*ranges[name]) if name in ranges else None
        reason = None
        if scale is None or not bool(scale > 0):
            reason = "input never observed" if name not in ranges else "input was all zeros"
        elif entry.static_output:
            out_scale = scale_from_range(*outputs[name]) if name in outputs else None
            if out_scale is None or not bool(out_scale > 0):
                reason = "output never observed" if name not in outputs else "output was all zeros"
        if reason is not None:
            layer_mode, scale, out_scale = "dynamic", None, None
            result.fallbacks[name] = f"dynamic ({reason} during calibration)"
    new: Int8Module = entry.int8_type.from_float(module, layer_mode, per_channel, scale)
    if out_scale is not None:
        new.set_output_scale(out_scale)  # type: ignore[operator]
    new.train(module.training)
    _set_submodule(model, name, new)
    result.converted[name] = layer_mode
    return new


def _share_weight(first: Int8Module, second: Int8Module, name: str, result: ConversionResult) -> None:
    """Make ``second`` hold ``first``'s int8 weight and scales (a tied weight stays one tensor)."""
    a, b = first._buffers, second._buffers
    wa, wb, sa, sb = a.get("weight"), b.get("weight"), a.get("weight_scale"), b.get("weight_scale")
    if wa is None or wb is None or sa is None or sb is None or wa.shape != wb.shape or sa.shape != sb.shape:
        result.fallbacks[name] = "int8, but not tied: its weight is stored apart from its partner's"
        return
    b["weight"], b["weight_scale"] = wa, sa


def tie_int8_weights(model: nn.Module, groups: Sequence[Sequence[str]]) -> None:
    """Make the int8 layers named in each group share the first one's int8 weight and scales.

    ``groups`` lists module names whose float weights were one tensor (a tied ``lm_head`` and token
    embedding); layers that are not int8, or whose weights differ in shape, are left as they are.
    """
    scratch = ConversionResult()
    for group in groups:
        layers = [m for n in group if isinstance(m := _get(model, n), Int8Module)]
        for other in layers[1:]:
            _share_weight(layers[0], other, "", scratch)


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def tied_weight_groups(model: nn.Module) -> list[list[str]]:
    """Names of the modules that own one and the same ``weight`` parameter, for each parameter owned twice or more.

    Example:
        >>> emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
        >>> head.weight = emb.weight
        >>> tied_weight_groups(nn.ModuleDict({"emb": emb, "head": head}))
        [['emb', 'head']]
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None:
            names = owners.setdefault(id(weight), [])
            if name not in names:
                names.append(name)
    return [names for names in owners.values() if len(names) > 1]


def int8_layers(model: nn.Module) -> dict[str, Int8Module]:
    """The int8 layers of ``model`` by name.

    Example:
        >>> from lightning_compress.core.quant.modules import Int8Linear
        >>> model = nn.Sequential(Int8Linear(4, 2), nn.ReLU())
        >>> list(int8_layers(model))
        ['0']
    """
    types = int8_types()
    return {name: m for name, m in model.named_modules() if isinstance(m, types)}
