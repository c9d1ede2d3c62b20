"""Channel removal: a model whose whole output channels are zero becomes a smaller dense model.

:func:`remove_channels` finds the coupled groups once (:mod:`~lightning_compress.core.prune.groups`),
takes every unit (channel or head) whose producing weights are exactly zero, and cuts it out of
every tensor it lives in: producer rows and bias entries, BatchNorm entries, depthwise filters and
the consumers' input columns. The attributes model code reads are updated with the tensors.

A dead channel still sends a constant downstream (its bias, BatchNorm's ``beta - gamma * mean /
std``, through the activation). The constant is measured on the example inputs (every position of
the batch must show the same value, or the channel stays) and folded into each consumer's bias:
``b += W[:, c] * v`` for a ``Linear``, ``b += W[:, c].sum(kernel) * v`` for an unpadded
convolution. Where folding is not exact (a zero-padded convolution sees zeros at the border
instead of ``v``; a consumer without a bias) the channel is kept. So the slim model computes what
the masked one did, up to float rounding.

Pure torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.prune.groups import ChannelGroup, Cut, Unit, _capture_inputs, find_groups, split_inputs
from lightning_compress.core.prune.slim_attention import shrink_attention
from lightning_compress.core.prune.slim_io import mark_slim

__all__ = ["dead_units", "remove_channels"]

_CONSTANT_TOL = 1e-6


def _tensor(model: nn.Module, cut: Cut) -> Tensor | None:
    module = model.get_submodule(cut.module) if cut.module else model
    t = getattr(module, cut.tensor, None)
    return t if isinstance(t, Tensor) else None


def _slice(t: Tensor, cut: Cut) -> Tensor:
    return t.detach().index_select(cut.axis, torch.tensor(cut.indices, device=t.device))


def _is_zero(model: nn.Module, cut: Cut) -> bool:
    t = _tensor(model, cut)
    return t is not None and not bool(_slice(t, cut).any())


def dead_units(model: nn.Module, groups: Iterable[ChannelGroup]) -> list[tuple[ChannelGroup, list[Unit]]]:
    """Per removable group, the units whose producing weights are all exactly zero (one unit always stays)."""
    out = []
    for group in groups:
        if not group.removable or not group.units:
            continue
        dead = [u for u in group.units if u.producers and all(_is_zero(model, c) for c in u.producers)]
        if len(dead) == len(group.units):
            dead = dead[1:]  # a layer keeps at least one channel
        if dead:
            out.append((group, dead))
    return out


def _column_values(x: Tensor, module: nn.Module, cut: Cut) -> Tensor | None:
    """The consumer's input at ``cut.indices`` as ``(positions, len(indices))``, or ``None`` if not constant."""
    idx = torch.tensor(cut.indices, device=x.device)
    if isinstance(module, nn.Linear):
        cols = x.index_select(x.dim() - 1, idx).reshape(-1, len(cut.indices))
    else:
        cols = x.index_select(1, idx).movedim(1, -1).reshape(-1, len(cut.indices))
    first = cols[0]
    if not bool(((cols - first).abs() <= _CONSTANT_TOL * first.abs().clamp_min(1.0)).all()):
        return None
    return first.to(torch.float64)


def _fold_delta(module: nn.Module, cut: Cut, value: Tensor) -> Tensor | bool | None:
    """What to add to the consumer's bias for a constant input ``value``; ``False`` if not exact."""
    if not bool(value.any()):
        return None
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if not isinstance(weight, Tensor) or not isinstance(bias, Tensor):
        return False
    w = _slice(weight, cut).to(torch.float64)
    if isinstance(module, nn.Linear):
        return w @ value.to(w.device)
    if isinstance(module, nn.modules.conv._ConvNd):
        padding: Any = module.padding
        unpadded = padding == "valid" or (not isinstance(padding, str) and all(p == 0 for p in padding))
        if not unpadded or module.groups != 1:
            return False
        return w.sum(dim=tuple(range(2, w.dim()))) @ value.to(w.device)
    return False


def _constants(
    model: nn.Module, example_inputs: Any, units: Sequence[tuple[ChannelGroup, list[Unit]]]
) -> dict[int, list[tuple[str, Tensor]] | None]:
    """Per unit (by id): the bias additions folding its constant, or ``None`` when it must stay."""
    need = {c.module for _, us in units for u in us if u.constant is None for c in u.consumers}
    captured: dict[str, Any] = {}
    if need:
        args, kwargs = split_inputs(example_inputs)
        training = {name: m.training for name, m in model.named_modules()}
        model.eval()
        try:
            captured = _capture_inputs(model, args, kwargs, need)
        finally:
            for name, m in model.named_modules():
                m.training = training[name]
    out: dict[int, list[tuple[str, Tensor]] | None] = {}
    for _, us in units:
        for unit in us:
            folds: list[tuple[str, Tensor]] | None = []
            for cut in unit.consumers:
                module = model.get_submodule(cut.module)
                if unit.constant is not None:
                    t = _tensor(model, unit.constant)
                    value: Tensor | None = (
                        _slice(t, unit.constant).to(torch.float64)
                        if t is not None
                        else torch.zeros(len(cut.indices), dtype=torch.float64)
                    )
                elif cut.module in captured:
                    x = captured[cut.module][0][0]
                    value = _column_values(x.detach(), module, cut) if isinstance(x, Tensor) else None
                else:
                    value = None  # the layer never ran on the example inputs
                delta = _fold_delta(module, cut, value) if value is not None else False
                if delta is False:
                    folds = None
                    break
                if isinstance(delta, Tensor) and folds is not None:
                    folds.append((cut.module, delta))
            out[id(unit)] = folds
    return out


def _replace(module: nn.Module, name: str, new: Tensor) -> None:
    if name in module._parameters:
        old = module._parameters[name]
        assert old is not None
        module._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = new


def _update_attributes(module: nn.Module, was_depthwise: bool) -> None:
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and isinstance(weight, Tensor):
        module.out_features, module.in_features = int(weight.shape[0]), int(weight.shape[1])
    elif isinstance(module, nn.modules.conv._ConvNd) and isinstance(weight, Tensor):
        module.out_channels = int(weight.shape[0])
        if was_depthwise:
            module.in_channels = module.groups = module.out_channels
        else:
            module.in_channels = int(weight.shape[1]) * module.groups
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        ref = weight if isinstance(weight, Tensor) else module.running_mean
        if isinstance(ref, Tensor):
            module.num_features = int(ref.shape[0])


@torch.no_grad()
def apply_cuts(model: nn.Module, cuts: Iterable[Cut]) -> list[str]:
    """Remove every slice in ``cuts`` from its tensor; returns the names of the modules changed."""
    drop: dict[tuple[str, str, int], set[int]] = {}
    for cut in cuts:
        drop.setdefault((cut.module, cut.tensor, cut.axis), set()).update(cut.indices)
    touched: dict[str, bool] = {}
    for (mod_name, tensor_name, axis), indices in sorted(drop.items()):
        module = model.get_submodule(mod_name) if mod_name else model
        t = getattr(module, tensor_name, None)
        if not isinstance(t, Tensor):
            continue
        if mod_name not in touched:
            touched[mod_name] = isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
        keep = torch.tensor([i for i in range(t.shape[axis]) if i not in indices], dtype=torch.long, device=t.device)
        _replace(module, tensor_name, t.detach().index_select(axis, keep).clone())
    for mod_name, was_depthwise in touched.items():
        _update_attributes(model.get_submodule(mod_name) if mod_name else model, was_depthwise)
    # a plain attribute of the containers (it survives int8 conversion of the layers): what save_compressed records
    mark_slim(model, touched)
    return list(touched)


@torch.no_grad()
def remove_channels(
    module: nn.Module, example_inputs: Any, *, groups: Sequence[ChannelGroup] | None = None
) -> dict[str, tuple[int, ...]]:
    """Remove, in place, every output channel (and attention head) whose weights are exactly zero.

    Every layer that consumes a removed channel loses the matching inputs (BatchNorm, residual
    adds, concatenation, depthwise convolutions and attention heads are followed through the graph
    traced on ``example_inputs``). The constant a dead channel still sends downstream is folded into
    the consumer's bias where that is exact; where it is not, the channel stays. The slim model's
    outputs equal the masked model's (float rounding aside), and it stays a plain model: same
    ``state_dict`` keys, no hooks, usable with ``torch.compile``, ``torch.export`` and
    :func:`~lightning_compress.save_compressed`. An optimizer built before the call holds the old
    tensors and must be rebuilt.

    Args:
        module: the model (it is run once on ``example_inputs`` in eval mode; its modes are restored).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        groups: the groups from :func:`~lightning_compress.core.prune.groups.find_groups`, if
            already known (they must describe the model as it is now).

    Returns:
        ``{layer name: new weight shape}`` for every layer that changed; ``{}`` (and the model
        untouched) when nothing is removable.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with torch.no_grad():
        ...     model[0].weight[1] = 0.0
        >>> x = torch.randn(5, 4)
        >>> before = model(x)
        >>> remove_channels(model, x)
        {'0': (2, 4), '2': (2, 2)}
        >>> torch.allclose(model(x), before, atol=1e-6)
        True
    """
    if groups is None:
        groups = find_groups(module, example_inputs).groups
    candidates = dead_units(module, groups)
    if not candidates:
        return {}
    constants = _constants(module, example_inputs, candidates)
    cuts: list[Cut] = []
    folds: dict[str, Tensor] = {}
    heads: dict[str, int] = {}
    for group, units in candidates:
        kept = [u for u in units if constants.get(id(u)) is not None]
        for unit in kept:
            for name, delta in constants[id(unit)] or []:
                folds[name] = folds[name] + delta if name in folds else delta
            cuts.extend(unit.cuts)
        if group.kind == "head" and kept:
            heads[group.name] = len(kept)
    if not cuts:
        return {}
    for name, delta in folds.items():
        bias: Any = module.get_submodule(name).bias
        bias.add_(delta.to(bias.dtype))
    before = {
        n: tuple(m.weight.shape) for n, m in module.named_modules() if isinstance(getattr(m, "weight", None), Tensor)
    }
    apply_cuts(module, cuts)
    for name, removed in heads.items():
        shrink_attention(module, name, removed)
    after = {
        n: tuple(m.weight.shape) for n, m in module.named_modules() if isinstance(getattr(m, "weight", None), Tensor)
    }
    shapes = {n: s for n, s in after.items() if before.get(n) != s}
    for n, m in module.named_modules():  # packed attention projections have no `weight`
        w = getattr(m, "in_proj_weight", None)
        if isinstance(m, nn.MultiheadAttention) and isinstance(w, Tensor) and n in heads:
            shapes[n] = tuple(w.shape)
    return shapes
