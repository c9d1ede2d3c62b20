"""Residual inputs on one int8 grid: a block whose input feeds static convolutions and an addition quantizes it once.

In a residual block (torchvision's and timm's ``BasicBlock`` and ``Bottleneck``, torchvision's
``InvertedResidual``) the block's input ``x`` is read by its first static convolution, which puts it
on the int8 grid of its ``input_scale``, and by the residual addition (directly, or through a
downsampling convolution that quantizes it too), which reads it in float. ONNX Runtime can run such
an addition in int8 (``QLinearAdd``) only when *both* operands are int8 tensors and the sum is
quantized next. The convolution's side is: a static convolution puts its output on its own grid.
The identity side is not.

:func:`residual_grids` finds the blocks where rounding ``x`` once, at the block's input, on the
grid its static convolution already puts it on, changes at most the identity operand of an
addition; :func:`put_input_grids` does that rounding with a forward pre-hook (:class:`InputGrid`)
that calls the convolution's own :meth:`~lightning_compress.core.quant.conv2d.Int8Conv2d.quantize_input`.
The convolution then re-rounds a tensor already on its grid (no change), and the identity
operand carries one rounding more, the one ONNX Runtime's own ``quantize_static`` applies there:
the PyTorch int8 model and its ONNX export compute the same sums, and ONNX Runtime runs the
additions as ``QLinearAdd`` on int8 tensors (measured 1.23x -> 1.05x of ``quantize_static`` on
resnet18, ``benchmarks/onnx_export.py``).

Which blocks: a module (not an int8 layer) whose ``forward`` traces (:mod:`._local_graph`), whose
first input is read at least twice, and whose every reader of it is either an addition
(``+``, ``+=``, ``torch.add``, ``Tensor.add``) or a child, called once with that input alone,
whose first computation is a static int8 convolution with a calibrated input scale (the child
itself, or the first of nested ``nn.Sequential`` s), at least one such, all of them with one and the
same input scale. The pre-hook touches only a tensor passed as the first positional argument.
Only for post-training static conversion: after QAT the layers compute what QAT trained with.

The hooks are instances of a module-level class holding a name (a model pickles and deep-copies
with them); an artifact records them in its ``"input_grids"`` entry
(:mod:`~lightning_compress.core.serialize`). Pure torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.quant._local_graph import input_readers, local_graph
from lightning_compress.core.quant.base import Int8Module
from lightning_compress.core.quant.conv2d import Int8Conv2d

__all__ = ["InputGrid", "check_input_grids", "input_grids", "put_input_grids", "residual_grids"]


class InputGrid:
    """Forward pre-hook: the module's first positional input on the input grid of its child ``child``.

    ``child`` is a dotted path below the hooked module; the rounding is the child's own
    ``quantize_input`` (an :class:`~lightning_compress.core.quant.conv2d.Int8Conv2d`, or its
    export form), read at call time, so that the hook follows the child's current scale and form.
    """

    def __init__(self, child: str) -> None:
        self.child = child

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The call's arguments with the first one rounded, or ``None`` (unchanged) when it is not a tensor."""
        if not args or not isinstance(args[0], Tensor):
            return None
        quantize_input = getattr(module.get_submodule(self.child), "quantize_input", None)
        if quantize_input is None:
            return None
        return (quantize_input(args[0]), *args[1:])

    def __repr__(self) -> str:
        return f"InputGrid({self.child!r})"


def _static_conv(module: nn.Module) -> bool:
    if not isinstance(module, Int8Conv2d) or module.mode != "static":
        return False
    scale = module.input_scale
    return scale is not None and bool(scale > 0)


def _entry_conv(child: nn.Module, name: str) -> tuple[str, Int8Conv2d] | None:
    """``(path, conv)`` of the static convolution that computes first in ``child``, if that is one."""
    while isinstance(child, nn.Sequential) and len(child) > 0:
        first, child = next(iter(child.named_children()))
        name = f"{name}.{first}"
    return (name, child) if isinstance(child, Int8Conv2d) and _static_conv(child) else None  # (the type, for mypy)


def _grid_in(parent: nn.Module) -> str | None:
    """The child path whose input grid ``parent``'s first input should be rounded to, if any (see the module doc)."""
    graph = local_graph(parent)
    read = None if graph is None else input_readers(graph)
    if read is None or len(read[0].users) < 2 or not read[1]:
        return None
    children = dict(parent.named_children())
    convs = [_entry_conv(children[target], target) for target in read[1]]
    found = [entry for entry in convs if entry is not None]
    if len(found) != len(convs):
        return None
    first_scale = found[0][1].input_scale
    assert first_scale is not None  # _static_conv
    if any(not torch.equal(conv.input_scale, first_scale) for _, conv in found[1:]):  # type: ignore[arg-type]
        return None
    return found[0][0]


def residual_grids(model: nn.Module) -> dict[str, str]:
    """``{block: child path}`` of the blocks whose input is to be rounded once on that child's input grid.

    Example:
        >>> from lightning_compress.core.quant.convert import quantize
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = nn.Conv2d(4, 4, 3, padding=1)
        ...     def forward(self, x):
        ...         return self.conv(x) + x
        >>> model = nn.Sequential(Block(), Block())
        >>> _ = quantize(model, "static", calibration=[torch.randn(2, 4, 6, 6)])
        >>> residual_grids(model)
        {'0': 'conv', '1': 'conv'}
    """
    found: dict[str, str] = {}
    for name, parent in model.named_modules():
        if isinstance(parent, Int8Module) or not any(_entry_conv(c, n) for n, c in parent.named_children()):
            continue  # no child starts with a static convolution: nothing to trace
        child = _grid_in(parent)
        if child is not None:
            found[name] = child
    return found


def input_grids(model: nn.Module) -> dict[str, str]:
    """``{block: child path}`` of the :class:`InputGrid` hooks ``model`` holds."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, InputGrid):
                found[name] = hook.child
    return found


def put_input_grids(model: nn.Module, grids: Mapping[str, str], *, only: bool = False) -> dict[str, str]:
    """Give each named block its :class:`InputGrid` pre-hook (a block that has it keeps it); returns ``grids``.

    ``only``: also take the hook off every other block (loading an artifact: its grids and no others).
    """
    have = input_grids(model)
    for name in set(have) - set(grids) if only else ():
        _take_off(model.get_submodule(name))
    for name, child in grids.items():
        if have.get(name) == child:
            continue
        block = model.get_submodule(name)
        _take_off(block)
        block.register_forward_pre_hook(InputGrid(child))
    return dict(grids)


def _take_off(block: nn.Module) -> None:
    for key, hook in list(block._forward_pre_hooks.items()):
        if isinstance(hook, InputGrid):
            del block._forward_pre_hooks[key]


def check_input_grids(model: nn.Module, grids: Any, layers: Mapping[str, Any]) -> list[str]:
    """What keeps an artifact's ``"input_grids"`` entry from fitting ``model`` and the artifact's ``layers``.

    Each block must be a module of ``model``; each child path must name a layer that ``layers`` (the
    artifact's layer table) lists as a static ``Int8Conv2d``.
    """
    if not isinstance(grids, dict):
        return [f"expected a table (dict) of names, got a {type(grids).__name__}"]
    problems = []
    for block, child in grids.items():
        if not isinstance(block, str) or not isinstance(child, str) or not child:
            problems.append(f"expected module names (strings), got {block!r}: {child!r}")
            continue
        try:
            model.get_submodule(block)
        except AttributeError:
            problems.append(f"{block!r}: the model has no such module")
            continue
        layer = layers.get(f"{block}.{child}" if block else child)
        if not isinstance(layer, dict) or layer.get("kind") != "Int8Conv2d" or layer.get("mode") != "static":
            problems.append(f"{block!r}: {child!r} is not a static Int8Conv2d of the artifact")
    return problems
