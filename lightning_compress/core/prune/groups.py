"""Coupled channel groups: which output channels must disappear together, found by tracing once.

A *unit* is one removable channel (or one attention head): every slice that goes with it (the
producer's weight row and bias entry, the BatchNorm entries, a depthwise convolution's filter,
each consumer's input columns). A :class:`ChannelGroup` holds the units of layers that are tied
together: the convolutions feeding one residual add share one group, so unit ``i`` of it is
channel ``i`` of every one of them.

The graph comes from :mod:`torch.fx` (``symbolic_trace`` with a tracer that keeps attention blocks
whole), not from ``torch.export``: fx keeps every ``nn.Module`` call as one node under its own
qualified name, which is exactly what removal edits, it runs in milliseconds without compiling,
and a part that does not trace can be retried submodule by submodule. ``torch.export`` lowers
modules to ATen operators (module names survive only as metadata) and fails on the same
data-dependent Python. Shapes come from running the traced graph once on the example inputs.

Propagation is conservative: each tensor carries a *channel space* (its channel axis and one slot
id per position); producers (``Linear``, ``Conv``) start a fresh space, element-wise operations,
BatchNorm, pooling and depthwise convolutions pass it on, additions and multiplications tie slots
together, concatenation concatenates them and flattening repeats them. Any other use of a channel
(a LayerNorm across it, a reshape, an indexing, the model output) *blocks* its slots, so those
channels are never removed. Attention heads and transformer feed-forward blocks are found by
module patterns (:mod:`torch.nn` ``MultiheadAttention`` / ``TransformerEncoderLayer``, Hugging Face
BERT/ViT layers, timm ``Attention`` / ``Mlp``), whose modules are kept whole in the trace. So is a
BatchNorm subclass with its own ``forward`` whose children are only element-wise modules (timm's
``BatchNormAct2d``: batch norm, dropout, activation, in every timm CNN): it is a BatchNorm for the
channels, while traced through, its functional ``batch_norm`` blocked them.

Where the pieces live: the data (:class:`Cut`, :class:`Unit`, :class:`ChannelGroup`) in
:mod:`~lightning_compress.core.prune.group_types`, the fx tracing and slot propagation in
:mod:`~lightning_compress.core.prune.tracing`, the attention / feed-forward patterns in
:mod:`~lightning_compress.core.prune.attention_groups`; this module assembles the groups.

Pure torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_compress.core.prune.attention_groups import _mha_group, _pattern_groups, _pattern_of

# Their old home: callers import these from here (explicit re-exports, not in __all__: they belong to group_types).
from lightning_compress.core.prune.group_types import ChannelGroup as ChannelGroup
from lightning_compress.core.prune.group_types import Cut as Cut
from lightning_compress.core.prune.group_types import Unit as Unit
from lightning_compress.core.prune.group_types import _Groups
from lightning_compress.core.prune.tracing import _ELEMENTWISE_MODULES, _Member, _Slots, _trace_part

__all__ = ["find_groups", "split_inputs"]


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of a model call: a tensor, a tuple of positional inputs or a dict of keyword inputs."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


# ----------------------------------------------------------------------------------------------- assembly


def _assemble(slots: _Slots, members: dict[int, list[_Member]]) -> list[ChannelGroup]:
    """Turn slot classes into units, and units that share producer layers into groups."""
    classes: dict[int, list[_Member]] = {}
    blocked: dict[int, bool] = {}
    for s, ms in members.items():
        r = slots.find(s)
        classes.setdefault(r, []).extend(ms)
        blocked[r] = slots.blocked[r]
    for s in range(len(slots.parent)):
        r = slots.find(s)
        blocked.setdefault(r, slots.blocked[r])
    # groups: connected components of producer modules
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a

    for ms in classes.values():
        mods = [m.module for m in ms if m.kind in ("producer", "depthwise")]
        for other in mods[1:]:
            ra, rb = find(mods[0]), find(other)
            if ra != rb:
                parent[rb] = ra
    by_group: dict[str, list[tuple[int, list[_Member]]]] = {}
    for r, ms in classes.items():
        mods = [m.module for m in ms if m.kind in ("producer", "depthwise")]
        if not mods:
            continue
        by_group.setdefault(find(mods[0]), []).append((r, ms))
    groups = []
    for root, items in by_group.items():
        units, any_blocked, reason = [], False, ""
        for r, ms in sorted(items, key=lambda it: (it[1][0].module, it[1][0].position)):
            if blocked[r]:
                any_blocked = True
                reason = reason or slots.why.get(r, "blocked")
                continue
            units.append(_unit(ms))
        removable = not any_blocked
        groups.append(ChannelGroup(root, "channel", units if removable else [], removable, reason))
    return groups


def _unit(ms: list[_Member]) -> Unit:
    producers: list[Cut] = []
    cuts: list[Cut] = []
    consumers: list[Cut] = []
    per: dict[tuple[str, str], list[int]] = {}
    for m in ms:
        per.setdefault((m.kind, m.module), []).append(m.position)
    for (kind, module), positions in sorted(per.items()):
        idx = tuple(sorted(set(positions)))
        if kind in ("producer", "depthwise"):
            w = Cut(module, "weight", 0, idx)
            producers.append(w)
            cuts += [w, Cut(module, "bias", 0, idx)]
        elif kind == "norm":
            cuts += [Cut(module, t, 0, idx) for t in ("weight", "bias", "running_mean", "running_var")]
        else:
            c = Cut(module, "weight", 1, idx)
            consumers.append(c)
            cuts.append(c)
    return Unit(producers, cuts, consumers)


def _capture_inputs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """The inputs every named submodule receives on one forward pass (temporary hooks, removed after)."""
    seen: dict[str, Any] = {}
    handles = []
    for name, m in model.named_modules():
        if name in names:

            def hook(mod: nn.Module, a: Any, kw: Any, _name: str = name) -> None:
                seen.setdefault(_name, (a, kw))

            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def find_groups(model: nn.Module, example_inputs: Any, layers: Iterable[str] | None = None) -> _Groups:
    """Trace ``model`` once on ``example_inputs`` and return its coupled channel groups.

    Args:
        model: any module; it is run once in its current mode (no gradient).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        layers: names of the layers the caller cares about (those left outside every trace are
            reported in ``untraced``); default every ``Linear`` and convolution.

    Returns:
        The groups (``.groups``), the layers no trace covered (``.untraced``) and why (``.errors``).
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()  # a BatchNorm in training mode would update its running statistics
    try:
        return _find_groups(model, example_inputs, layers)
    finally:
        for m, training in modes.items():
            m.training = training


def _find_groups(model: nn.Module, example_inputs: Any, layers: Iterable[str] | None) -> _Groups:
    args, kwargs = split_inputs(example_inputs)
    result = _Groups()
    leaves: set[int] = set()
    for name, m in model.named_modules():
        pattern = _pattern_of(m)
        if pattern is not None and not any(id(p) in leaves for p in _parents(model, name)):
            result.groups.extend(_pattern_groups(name, m, pattern))
            leaves.add(id(m))
        elif isinstance(m, nn.MultiheadAttention) and not _inside_leaf(model, name, leaves):
            group = _mha_group(name, m)
            if group is not None:
                result.groups.append(group)
            leaves.add(id(m))
        elif _norm_with_activation(m):
            leaves.add(id(m))
    slots, members = _Slots(), dict[int, list[_Member]]()
    covered: list[str] = []
    pending: list[tuple[str, nn.Module, tuple[Any, ...] | None, dict[str, Any]]] = [("", model, args, kwargs)]
    captured: dict[str, Any] | None = None
    while pending:
        name, module, a, kw = pending.pop(0)
        try:
            _trace_part(module, name, a, kw, leaves, slots, members)
            covered.append(name)
            continue
        except Exception as err:  # data-dependent Python, unsupported calls: retry the children
            result.errors[name or type(module).__name__] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        children = [(f"{name}.{c}" if name else c, m) for c, m in module.named_children() if id(m) not in leaves]
        if captured is None:
            captured = _capture_inputs(model, args, kwargs, {n for n, _ in model.named_modules() if n})
        for child_name, child in children:
            if child_name not in captured:
                continue
            ca, ckw = captured[child_name]
            pending.append((child_name, child, ca, ckw))
            # its inputs and outputs are outside any traced graph: the child's graph blocks them itself
    groups = _assemble(slots, members)
    result.groups.extend(groups)
    wanted = (
        set(layers)
        if layers is not None
        else {
            n
            for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not _inside_leaf(model, n, leaves)
        }
    )
    in_groups = {c.module for g in result.groups for u in g.units for c in u.producers} | {
        m for g in result.groups if not g.removable for m in [g.name]
    }
    traced = {n for n, _ in model.named_modules() if any(_covers(p, n) for p in covered)}
    result.untraced = sorted(n for n in wanted if n not in traced and n not in in_groups)
    return result


def _norm_with_activation(module: nn.Module) -> bool:
    """A BatchNorm subclass whose own ``forward`` adds only element-wise children (timm's ``BatchNormAct2d``)."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    if type(module).forward is nn.modules.batchnorm._BatchNorm.forward:
        return False  # a plain BatchNorm is a leaf already
    children = list(module.children())
    return all(_elementwise(c) for c in children)


def _elementwise(module: nn.Module) -> bool:
    """An element-wise module (a per-channel ``PReLU`` is not: it holds a weight per channel)."""
    if isinstance(module, nn.PReLU):
        return module.num_parameters == 1
    return type(module) in _ELEMENTWISE_MODULES


def _covers(prefix: str, name: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _parents(model: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".") if name else []
    return [model.get_submodule(".".join(parts[:i])) for i in range(len(parts))]


def _inside_leaf(model: nn.Module, name: str, leaves: set[int]) -> bool:
    return any(id(p) in leaves for p in _parents(model, name))


def describe(groups: Iterable[ChannelGroup]) -> str:
    """One line per group: name, kind, units, removable."""
    return "\n".join(
        f"{g.name}: {g.kind} x{len(g.units)} {'removable' if g.removable else 'kept: ' + g.reason}" for g in groups
    )
