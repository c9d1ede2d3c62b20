"""Tracing a model with :mod:`torch.fx` and propagating channel slots through its graph.

The graph comes from :mod:`torch.fx` (``symbolic_trace`` with a tracer that keeps attention blocks
whole); shapes come from running the traced graph once on the example inputs (``_Shapes``). Each
tensor carries a *channel space* (``_Space``: its channel axis and one slot id per position); the
slots live in a union-find (``_Slots``) with a *blocked* flag per class, and ``_Propagation``
records which module slices (``_Member``) each slot touches. Why fx and how each operation
propagates: :mod:`~lightning_compress.core.prune.groups`, which turns the slot classes into units
and groups.

Pure torch.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from lightning_compress.core.linear_forwards import computes_linear

__all__: list[str] = []  # the engine of find_groups; nothing here is public


_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.PReLU, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS: set[Any] = {
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu,
    F.mish, F.softplus, F.dropout, F.hardtanh, torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.relu_,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d, torch.clamp, torch.exp, torch.abs,
    operator.neg, torch.neg,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clamp", "clamp_", "contiguous", "float", "to", "type_as",
    "exp", "abs", "neg", "detach", "clone",
}  # fmt: skip
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
           torch.add, torch.sub, torch.mul, torch.div, "add", "add_", "sub", "mul", "mul_", "div"}  # fmt: skip
_RESHAPES = {"view", "reshape", "flatten", torch.flatten, torch.reshape}
_REDUCTIONS = {"mean", "sum", "amax", torch.mean, torch.sum, torch.amax}
_SHAPE_ONLY = {"size", "dim", getattr, "numel"}

# ----------------------------------------------------------------------------------------------- slots


class _Slots:
    """Union-find over channel slots, with a *blocked* flag per class."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.blocked: list[bool] = []
        self.why: dict[int, str] = {}

    def new(self, n: int, blocked: bool = False) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.blocked.extend([blocked] * n)
        return list(range(start, start + n))

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.blocked[ra] = self.blocked[ra] or self.blocked[rb]

    def block(self, slots: Iterable[int], why: str) -> None:
        for s in slots:
            r = self.find(s)
            if not self.blocked[r]:
                self.blocked[r] = True
                self.why[r] = why


@dataclass
class _Space:
    axis: int  # non-negative channel axis
    slots: list[int]


@dataclass
class _Member:
    kind: str  # "producer" | "norm" | "consumer" | "depthwise"
    module: str
    position: int  # the channel / input position in that module


# ----------------------------------------------------------------------------------------------- tracing


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[int]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # A Linear subclass of another library that computes nn.Linear (timm's classifiers) is a Linear.
        return (
            id(m) in self._leaves
            or super().is_leaf_module(m, module_qualified_name)
            or (type(m) is not nn.Linear and computes_linear(m))
        )


def _shape(node: Any) -> tuple[int, ...] | None:
    shape = node.meta.get("lc_shape") if isinstance(node, fx.Node) else None
    return shape if isinstance(shape, tuple) else None


class _Shapes(fx.Interpreter):
    """Runs the traced graph once and records every tensor's shape in ``node.meta["lc_shape"]``."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, Tensor):
            n.meta["lc_shape"] = tuple(int(s) for s in result.shape)
        return result


def _flat_nodes(obj: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(obj, lambda n: out.append(n) or n)  # type: ignore[func-returns-value]
    return out


class _Propagation:
    """Walks one traced graph and records the members of every slot."""

    def __init__(self, gm: fx.GraphModule, prefix: str, slots: _Slots, members: dict[int, list[_Member]]) -> None:
        self.gm = gm
        self.prefix = prefix
        self.slots = slots
        self.members = members
        self.space: dict[fx.Node, _Space] = {}
        self.modules = dict(gm.named_modules())

    def name(self, target: str) -> str:
        return f"{self.prefix}.{target}" if self.prefix else target

    def add(self, kind: str, module: str, slots: Sequence[int]) -> None:
        for position, s in enumerate(slots):
            self.members.setdefault(s, []).append(_Member(kind, module, position))

    def block_node(self, node: Any, why: str) -> None:
        for n in _flat_nodes(node):
            if n in self.space:
                self.slots.block(self.space[n].slots, why)

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                self.visit(node)
            except Exception as err:  # an op whose arguments we do not understand: block what it reads
                self.block_node((node.args, node.kwargs), f"{node.target}: {err}")

    def visit(self, node: fx.Node) -> None:
        if node.op in ("placeholder", "get_attr"):
            return
        if node.op == "output":
            self.block_node(node.args, "model output")
            return
        if node.op == "call_module":
            self.visit_module(node, self.modules[str(node.target)])
            return
        target: Any = node.target
        inputs = [n for n in _flat_nodes((node.args, node.kwargs)) if n in self.space]
        if target in _SHAPE_ONLY and node.op != "call_module":
            return
        if not inputs:
            return
        first = node.args[0] if node.args else None
        elementwise = target in _ELEMENTWISE_FUNCTIONS or (node.op == "call_method" and target in _ELEMENTWISE_METHODS)
        if elementwise and isinstance(first, fx.Node) and first in self.space and self._keeps_axis(first, node):
            self.space[node] = self.space[first]
            return
        if target in _BINARY:
            self.visit_binary(node)
            return
        if target is torch.cat:
            self.visit_cat(node)
            return
        if target in _RESHAPES:
            self.visit_reshape(node)
            return
        if target in _REDUCTIONS:
            self.visit_reduction(node)
            return
        self.block_node((node.args, node.kwargs), f"{getattr(target, '__name__', target)}")

    def _keeps_axis(self, src: fx.Node, node: fx.Node) -> bool:
        a, b = _shape(src), _shape(node)
        sp = self.space[src]
        return a is not None and b is not None and len(a) == len(b) and a[sp.axis] == b[sp.axis]

    def visit_module(self, node: fx.Node, module: nn.Module) -> None:
        name = self.name(str(node.target))
        x = node.args[0] if node.args else None
        src = self.space.get(x) if isinstance(x, fx.Node) else None
        out_shape = _shape(node)
        others = [n for n in _flat_nodes((node.args[1:], node.kwargs)) if n in self.space]
        if others:
            self.block_node(others, f"extra input of {name}")
        if computes_linear(module):
            if src is not None:
                if src.axis == len(_shape(x) or ()) - 1:
                    self.add("consumer", name, src.slots)
                else:
                    self.slots.block(src.slots, f"{name} reads another axis")
            if out_shape is not None:
                self.space[node] = _Space(len(out_shape) - 1, self.slots.new(module.out_features))
                self.add("producer", name, self.space[node].slots)
            return
        if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            if depthwise:
                slots = self.slots.new(module.out_channels, blocked=True) if src is None else src.slots
                self.space[node] = _Space(1, slots)
                self.add("depthwise", name, slots)
                return
            if src is not None:
                if module.groups == 1 and src.axis == 1:
                    self.add("consumer", name, src.slots)
                else:
                    self.slots.block(src.slots, f"{name} is a grouped convolution")
            blocked = module.groups != 1
            self.space[node] = _Space(1, self.slots.new(module.out_channels, blocked=blocked))
            self.add("producer", name, self.space[node].slots)
            return
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if src is not None:
                self.space[node] = src
                self.add("norm", name, src.slots)
            return
        if isinstance(module, nn.PReLU) and module.num_parameters > 1:
            # One weight per channel, which removal does not slice: its channels stay.
            self.block_node((node.args, node.kwargs), f"{name} (a PReLU with a weight per channel)")
            return
        if isinstance(module, (*_ELEMENTWISE_MODULES, *_POOL_MODULES)):
            if src is not None and isinstance(x, fx.Node) and self._keeps_axis(x, node):
                self.space[node] = src
            elif src is not None:
                self.slots.block(src.slots, f"{name} changes the channel axis")
            return
        if isinstance(module, nn.Flatten):
            self.visit_reshape(node, (module.start_dim, module.end_dim))
            return
        self.block_node((node.args, node.kwargs), f"{name} ({type(module).__name__})")

    def visit_binary(self, node: fx.Node) -> None:
        out = _shape(node)
        operands = list(node.args[:2])
        tracked = [a for a in operands if isinstance(a, fx.Node) and a in self.space]
        if out is None or not tracked:
            self.block_node(node.args, "binary")
            return
        ref = self.space[tracked[0]]
        axis_from_right = len(_shape(tracked[0]) or ()) - ref.axis
        out_axis = len(out) - axis_from_right
        for a in operands:
            if not isinstance(a, fx.Node):
                continue  # a Python number broadcasts over every channel alike
            shape = _shape(a)
            if a in self.space:
                sp = self.space[a]
                if shape is None or len(shape) - sp.axis != axis_from_right or len(sp.slots) != len(ref.slots):
                    self.block_node(node.args, "binary of two channel layouts")
                    return
                continue
            if shape is not None and len(shape) >= axis_from_right and shape[len(shape) - axis_from_right] != 1:
                self.block_node(node.args, "binary with an untracked tensor")
                return
        for a in tracked[1:]:
            for s, t in zip(ref.slots, self.space[a].slots, strict=True):
                self.slots.union(s, t)
        self.space[node] = _Space(out_axis, ref.slots)

    def visit_cat(self, node: fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out = _shape(node)
        if not isinstance(tensors, (list, tuple)) or out is None or not isinstance(dim, int):
            self.block_node(node.args, "cat")
            return
        dim = dim % len(out)
        parts = [self.space.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        if all(p is not None and p.axis == dim for p in parts):
            self.space[node] = _Space(dim, [s for p in parts if p is not None for s in p.slots])
            return
        self.block_node(node.args, "cat along another axis")

    def visit_reshape(self, node: fx.Node, dims: tuple[int, int] | None = None) -> None:
        x = node.args[0]
        src = self.space.get(x) if isinstance(x, fx.Node) else None
        a, b = _shape(x), _shape(node)
        if src is None or a is None or b is None:
            self.block_node(node.args, "reshape")
            return
        if dims is None and node.target in ("flatten", torch.flatten):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            dims = (int(start), int(end))  # type: ignore[arg-type]
        if dims is None:  # view / reshape: only the flatten-from-the-channel-axis case is understood
            if len(b) == src.axis + 1 and a[: src.axis] == b[: src.axis]:
                dims = (src.axis, len(a) - 1)
            else:
                self.block_node(node.args, "reshape")
                return
        start, end = dims[0] % len(a), dims[1] % len(a)
        if src.axis < start:
            self.space[node] = src
        elif src.axis == start:
            inner = 1
            for s in a[start + 1 : end + 1]:
                inner *= s
            self.space[node] = _Space(start, [s for s in src.slots for _ in range(inner)])
        elif src.axis > end:
            self.space[node] = _Space(src.axis - (end - start), src.slots)
        else:
            self.block_node(node.args, "flatten across the channel axis")

    def visit_reduction(self, node: fx.Node) -> None:
        x = node.args[0]
        src = self.space.get(x) if isinstance(x, fx.Node) else None
        a = _shape(x)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        if src is None or a is None or dim is None:
            self.block_node(node.args, "reduction")
            return
        dims = [int(d) % len(a) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]  # type: ignore[arg-type]
        if src.axis in dims:
            self.block_node(node.args, "reduction over channels")
            return
        axis = src.axis if keep else src.axis - sum(d < src.axis for d in dims)
        self.space[node] = _Space(axis, src.slots)


def _trace_part(
    module: nn.Module,
    prefix: str,
    args: tuple[Any, ...] | None,
    kwargs: dict[str, Any],
    leaves: set[int],
    slots: _Slots,
    members: dict[int, list[_Member]],
) -> None:
    tracer = _Tracer(leaves)
    graph = tracer.trace(module, concrete_args=None)
    gm = fx.GraphModule(tracer.root, graph)
    if args is not None:
        values = []
        for i, n in enumerate(n for n in graph.nodes if n.op == "placeholder"):
            if i < len(args):
                values.append(args[i])
            elif n.target in kwargs:
                values.append(kwargs[n.target])
            else:  # an argument left to its default
                values.append(n.args[0] if n.args else None)
        with torch.no_grad():
            _Shapes(gm).run(*values)
    prop = _Propagation(gm, prefix, slots, members)
    prop.run()
