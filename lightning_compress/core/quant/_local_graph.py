"""One module's own ``forward`` as a :mod:`torch.fx` graph whose nodes call its children (its children are leaves).

Batch norm folding (:mod:`~lightning_compress.core.quant.fold`) and shared activation grids
(:mod:`~lightning_compress.core.quant.grids`) read which child feeds which from it. A module whose
``forward`` does not trace (control flow on values, dict inputs, ...) has no graph: nothing is
changed inside it. Pure torch.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
from torch import fx, nn
from typing_extensions import override

__all__: list[str] = []  # read by fold.py, grids.py and residual.py

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


class _ChildrenAreLeaves(fx.Tracer):
    @override
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return "." not in module_qualified_name or super().is_leaf_module(m, module_qualified_name)


def local_graph(parent: nn.Module) -> fx.Graph | None:
    """The graph of ``parent.forward`` with its children as leaves, or ``None`` when it does not trace."""
    try:
        return _ChildrenAreLeaves().trace(parent)
    except Exception:  # arbitrary user code: tracing is an attempt, and a failed one changes nothing
        return None


def child_calls(graph: fx.Graph) -> Counter[str]:
    """How many times the graph calls each child module (by name)."""
    return Counter(str(n.target) for n in graph.nodes if n.op == "call_module")


def only_reader(node: fx.Node) -> fx.Node | None:
    """The one node that reads ``node``'s output, if exactly one does."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def is_add(node: fx.Node) -> bool:
    """Whether ``node`` is an addition without keyword arguments: ``+``, ``+=``, ``torch.add``, ``Tensor.add(_)``."""
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and not node.kwargs


def input_readers(graph: fx.Graph) -> tuple[fx.Node, list[str]] | None:
    """``(first input, children reading it)`` when additions and children called once with it alone read it.

    ``None`` when the graph has no input or another node reads it (a function, a child called with
    more, or twice). The children are named in the order the graph reads the input.
    """
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if not inputs:
        return None
    x, calls = inputs[0], child_calls(graph)
    children: list[str] = []
    for reader in x.users:
        if is_add(reader):
            continue
        target = str(reader.target)
        if reader.op != "call_module" or reader.args != (x,) or reader.kwargs or calls[target] != 1:
            return None
        children.append(target)
    return x, children
