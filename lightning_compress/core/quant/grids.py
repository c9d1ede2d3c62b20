"""Shared activation grids: a static convolution that only feeds, through a ReLU, the next one quantizes once.

A static :class:`~lightning_compress.core.quant.conv2d.Int8Conv2d` puts its output on the int8 grid
of its ``output_scale`` and the next static convolution puts its input on the grid of its
``input_scale``. When the first one's output reaches the second one only through a ReLU (and a
folded batch norm), the two grids quantize the same tensor twice. :func:`relu_links` finds such
pairs, and :func:`share_grids` gives the first convolution the second one's input range as its
output range, which it then uses as its output scale. The ReLU and the quantization commute on
a symmetric grid, and quantizing twice on one grid changes nothing, so the second convolution
then reads exactly the ReLU of the first one's float output on its own grid: one rounding fewer
than before, and in the exported file the first convolution writes the second one's uint8 input
directly (``lightning_compress/export/_chain.py``), as ONNX Runtime's own ``quantize_static`` does.

Which pairs: a convolution that is a child of a module, called once there, whose output is read
only by a (folded or not) batch norm and then a ReLU, or by the ReLU directly, and that ReLU's
output, through any max pooling (which commutes with a monotone rounding), only by the second
convolution, a sibling called once, or a sibling module whose input that convolution reads first:
the first child of an ``nn.Sequential``, or the first convolution of a residual block (its input
read only by additions and such children, :mod:`~lightning_compress.core.quant.residual`).
torchvision's and timm's residual blocks: ``conv1 -> bn1 -> relu -> conv2``; resnet's stem:
``conv1 -> bn1 -> relu -> maxpool -> layer1[0].conv1``. Only for post-training conversion: after
QAT each layer keeps the ranges it trained with.

Pure torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

from lightning_compress.core.quant._local_graph import child_calls, input_readers, local_graph, only_reader
from lightning_compress.core.quant.fold import FoldedBatchNorm

__all__ = ["relu_links", "share_grids"]

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_MAX_POOL_FUNCTIONS = (F.max_pool2d, torch.max_pool2d)


def _is_relu(node: fx.Node, children: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(children.get(str(node.target))) is nn.ReLU
    return node.op == "call_function" and node.target in _RELU_FUNCTIONS


def _is_norm(node: fx.Node, children: Mapping[str, nn.Module], calls: Mapping[str, int]) -> bool:
    module = children.get(str(node.target)) if node.op == "call_module" else None
    return isinstance(module, (nn.BatchNorm2d, FoldedBatchNorm)) and calls[str(node.target)] == 1


def _is_max_pool(node: fx.Node, children: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        pool = children.get(str(node.target))
        return type(pool) is nn.MaxPool2d and not pool.return_indices
    return node.op == "call_function" and node.target in _MAX_POOL_FUNCTIONS and not node.kwargs.get("return_indices")


def _entry(module: nn.Module, name: str, wanted: set[int], depth: int = 0) -> str | None:
    """The path (from ``name``) of the wanted convolution that first reads ``module``'s input, if one does.

    ``module`` itself; the first child of an ``nn.Sequential``; or, in a module whose input only
    additions and such children (each called once with it alone) read, the first of those children's
    (a residual block, whose input :mod:`~lightning_compress.core.quant.residual` then puts on that
    convolution's grid).
    """
    if id(module) in wanted:
        return name
    if depth > 8:
        return None
    if isinstance(module, nn.Sequential):
        if len(module) == 0:
            return None
        first, child = next(iter(module.named_children()))
        return _entry(child, f"{name}.{first}", wanted, depth + 1)
    graph = local_graph(module) if any(id(m) in wanted for m in module.modules()) else None
    read = None if graph is None else input_readers(graph)
    if read is None:
        return None
    children = dict(module.named_children())
    found = [_entry(children[target], f"{name}.{target}", wanted, depth + 1) for target in read[1]]
    if not found or any(path is None for path in found):
        return None
    return found[0]


def _links_in(parent: nn.Module, wanted: set[int]) -> list[tuple[str, str]]:
    graph = local_graph(parent)
    if graph is None:
        return []
    children = dict(parent.named_children())
    calls = child_calls(graph)

    def conv_call(node: fx.Node | None) -> bool:
        return (
            node is not None
            and node.op == "call_module"
            and id(children.get(str(node.target))) in wanted
            and calls[str(node.target)] == 1
        )

    def consumer_entry(node: fx.Node | None, step: fx.Node) -> str | None:
        if node is None or node.op != "call_module" or node.args[:1] != (step,) or node.kwargs:
            return None
        if conv_call(node):
            return str(node.target)
        target = str(node.target)
        if calls[target] != 1 or len(node.args) != 1:
            return None
        return _entry(children[target], target, wanted)

    links = []
    for node in graph.nodes:
        if not conv_call(node):
            continue
        step = only_reader(node)
        if step is not None and _is_norm(step, children, calls):
            step = only_reader(step)
        if step is None or not _is_relu(step, children):
            continue
        consumer = only_reader(step)
        while consumer is not None and _is_max_pool(consumer, children) and consumer.args[:1] == (step,):
            step, consumer = consumer, only_reader(consumer)  # max pooling commutes with the grid
        assert step is not None
        second = consumer_entry(consumer, step)
        if second is not None:
            links.append((str(node.target), second))
    return links


def relu_links(model: nn.Module, convs: Mapping[str, nn.Module]) -> dict[str, str]:
    """``{first convolution: second convolution}`` of the pairs of ``convs`` that only a ReLU (and a batch norm) join.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))
        >>> relu_links(model, {"0": model[0], "3": model[3]})
        {'0': '3'}
    """
    wanted = {id(m) for m in convs.values() if isinstance(m, nn.Conv2d)}
    found: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        if not any(id(m) in wanted for m in parent.children()):
            continue
        prefix = f"{parent_name}." if parent_name else ""
        for first, second in _links_in(parent, wanted):
            found[prefix + first] = prefix + second
    return found


def share_grids(
    links: Mapping[str, str],
    input_ranges: Mapping[str, tuple[Tensor, Tensor]],
    output_ranges: Mapping[str, tuple[Tensor, Tensor]],
) -> dict[str, tuple[Tensor, Tensor]]:
    """``output_ranges`` with each linked first convolution's range replaced by its partner's input range.

    A pair whose second convolution has no input range (never reached: it converts ``dynamic``)
    keeps the first one's own output range.
    """
    shared = dict(output_ranges)
    for first, second in links.items():
        if first in shared and second in input_ranges:
            shared[first] = input_ranges[second]
    return shared
