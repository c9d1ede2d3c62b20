"""One module's own ``forward`` as a :mod:`torch.fx` graph whose nodes call its children (its children are leaves).

Batch norm folding (:mod:`~lightning_compress.core.quant.fold`) and shared activation grids
(:mod:`~lightning_compress.core.quant.grids`) read which child feeds which from it. A module whose
``forward`` does not trace (control flow on values, dict inputs, ...) has no graph: nothing is
changed inside it. Pure torch.
"""

from __future__ import annotations

from collections import Counter

from torch import fx, nn
from typing_extensions import override

__all__: list[str] = []  # read by fold.py and grids.py


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
