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
BERT/ViT layers, timm ``Attention`` / ``Mlp``), whose modules are kept whole in the trace.

Pure torch.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["ChannelGroup", "Cut", "Unit", "find_groups", "split_inputs"]


@dataclass(frozen=True)
class Cut:
    """A slice of one tensor of one module: ``module.<tensor>`` at ``indices`` along ``axis``."""

    module: str
    tensor: str
    axis: int
    indices: tuple[int, ...]

    @property
    def param(self) -> str:
        """The ``state_dict`` key of the tensor."""
        return f"{self.module}.{self.tensor}" if self.module else self.tensor


@dataclass
class Unit:
    """One removable channel or head.

    ``producers`` are the weight slices that must all be exactly zero for the unit to be dead
    (they are also what the channel score is summed over); ``cuts`` is everything removed with it;
    ``consumers`` are the input slices of the layers that read it (the constant a dead unit sends
    downstream is folded into their biases); ``constant`` names a bias slice whose value is that
    constant (attention heads), otherwise it is measured on the example inputs.
    """

    producers: list[Cut]
    cuts: list[Cut]
    consumers: list[Cut]
    constant: Cut | None = None
    scored: list[Cut] | None = None  # slices the score sums over; default ``producers``

    @property
    def score_cuts(self) -> list[Cut]:
        """The weight slices whose RMS norms sum to the unit's score."""
        return self.scored if self.scored is not None else self.producers


@dataclass
class ChannelGroup:
    """Units that belong to one set of coupled layers, and whether they may be removed at all."""

    name: str
    kind: str  # "channel" or "head"
    units: list[Unit]
    removable: bool = True
    reason: str = ""

    @property
    def modules(self) -> list[str]:
        """Names of the modules whose weights the group's producers live in."""
        return sorted({c.module for u in self.units for c in u.producers})


@dataclass
class _Groups:
    groups: list[ChannelGroup] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)  # selected layers no trace covered
    errors: dict[str, str] = field(default_factory=dict)  # module name -> why it did not trace


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


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of a model call: a tensor, a tuple of positional inputs or a dict of keyword inputs."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


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


def _attention_leaf(module: nn.Module) -> bool:
    return _pattern_of(module) is not None or isinstance(module, nn.MultiheadAttention)


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[int]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self._leaves or super().is_leaf_module(m, module_qualified_name)


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
        if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
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


# ----------------------------------------------------------------------------------------------- patterns


@dataclass
class _Pattern:
    kind: str  # "mha", "encoder_layer", "hf_layer", "timm_attention"


def _pattern_of(module: nn.Module) -> _Pattern | None:
    if isinstance(module, nn.TransformerEncoderLayer):
        return _Pattern("encoder_layer")
    cls = type(module).__name__
    if hasattr(module, "attention") and hasattr(module, "intermediate") and hasattr(module, "output"):
        inter, out = module.intermediate, module.output
        if isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(getattr(out, "dense", None), nn.Linear):
            return _Pattern("hf_layer")
    if cls == "Attention" and isinstance(getattr(module, "qkv", None), nn.Linear) and hasattr(module, "num_heads"):
        plain = getattr(module, "gate", None) is None and isinstance(
            getattr(module, "norm", nn.Identity()), nn.Identity
        )
        return _Pattern("timm_attention") if plain else None
    return None


def _range(start: int, size: int) -> tuple[int, ...]:
    return tuple(range(start, start + size))


def _linear_chain(name: str, first: str, second: str, first_module: nn.Linear, kind: str = "channel") -> ChannelGroup:
    """Units of ``first`` (rows) -> element-wise -> ``second`` (columns): a feed-forward block."""
    units = []
    has_bias = first_module.bias is not None
    for j in range(first_module.out_features):
        producers = [Cut(first, "weight", 0, (j,))]
        cuts = producers + ([Cut(first, "bias", 0, (j,))] if has_bias else []) + [Cut(second, "weight", 1, (j,))]
        units.append(Unit(producers, cuts, [Cut(second, "weight", 1, (j,))]))
    return ChannelGroup(name, kind, units)


def _head_units(
    name: str,
    q: tuple[str, str, int],
    k: tuple[str, str, int],
    v: tuple[str, str, int],
    out: str,
    heads: int,
    head_dim: int,
    biases: bool,
) -> ChannelGroup:
    """One unit per head: q/k/v rows (``(module, tensor, row offset)``) and the output projection's columns."""
    units = []
    for h in range(heads):
        rows = _range(h * head_dim, head_dim)
        cuts, producers = [], []
        for mod, tensor, offset in (q, k, v):
            cut = Cut(mod, tensor, 0, tuple(offset + r for r in rows))
            producers.append(cut)
            cuts.append(cut)
            if biases:
                cuts.append(Cut(mod, tensor.replace("weight", "bias"), 0, cut.indices))
        consumer = Cut(out, "weight", 1, rows)
        cuts.append(consumer)
        v_mod, v_tensor, v_offset = v
        constant = (
            Cut(v_mod, v_tensor.replace("weight", "bias"), 0, tuple(v_offset + r for r in rows)) if biases else None
        )
        # a head is dead once its value rows are zero: its output is then the value bias, whatever q and k
        units.append(Unit([producers[2]], cuts, [consumer], constant, scored=producers))
    return ChannelGroup(name, "head", units)


def _mha_group(name: str, mha: nn.MultiheadAttention) -> ChannelGroup | None:
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.in_proj_weight is None:
        return None
    e, hd = mha.embed_dim, mha.head_dim
    prefix = f"{name}." if name else ""
    return _head_units(
        name,
        (name, "in_proj_weight", 0),
        (name, "in_proj_weight", e),
        (name, "in_proj_weight", 2 * e),
        f"{prefix}out_proj",
        mha.num_heads,
        hd,
        mha.in_proj_bias is not None,
    )


def _pattern_groups(name: str, module: Any, pattern: _Pattern) -> list[ChannelGroup]:
    prefix = f"{name}." if name else ""
    groups: list[ChannelGroup] = []
    if pattern.kind == "encoder_layer":
        assert isinstance(module, nn.TransformerEncoderLayer)
        mha = _mha_group(f"{prefix}self_attn", module.self_attn)
        if mha is not None:
            groups.append(mha)
        groups.append(_linear_chain(f"{prefix}linear1", f"{prefix}linear1", f"{prefix}linear2", module.linear1))
    elif pattern.kind == "hf_layer":
        attn = module.attention
        self_attn = getattr(attn, "self", getattr(attn, "attention", None))
        out = getattr(getattr(attn, "output", None), "dense", None)
        if self_attn is not None and isinstance(out, nn.Linear) and _hf_heads_ok(self_attn):
            sa = next(n for n, m in module.named_modules() if m is self_attn)
            heads = int(self_attn.num_attention_heads)
            hd = int(self_attn.attention_head_size)
            groups.append(
                _head_units(
                    f"{prefix}{sa}",
                    (f"{prefix}{sa}.query", "weight", 0),
                    (f"{prefix}{sa}.key", "weight", 0),
                    (f"{prefix}{sa}.value", "weight", 0),
                    f"{prefix}{sa.rpartition('.')[0]}.output.dense",
                    heads,
                    hd,
                    self_attn.query.bias is not None,
                )
            )
        inter = module.intermediate.dense
        groups.append(
            _linear_chain(f"{prefix}intermediate.dense", f"{prefix}intermediate.dense", f"{prefix}output.dense", inter)
        )
    elif pattern.kind == "timm_attention":
        dim = module.qkv.in_features
        heads = int(module.num_heads)
        hd = int(getattr(module, "head_dim", dim // heads))
        if module.qkv.out_features == 3 * heads * hd and isinstance(getattr(module, "proj", None), nn.Linear):
            groups.append(
                _head_units(
                    name,
                    (f"{prefix}qkv", "weight", 0),
                    (f"{prefix}qkv", "weight", heads * hd),
                    (f"{prefix}qkv", "weight", 2 * heads * hd),
                    f"{prefix}proj",
                    heads,
                    hd,
                    module.qkv.bias is not None,
                )
            )
    return groups


def _hf_heads_ok(self_attn: nn.Module) -> bool:
    return all(isinstance(getattr(self_attn, n, None), nn.Linear) for n in ("query", "key", "value")) and hasattr(
        self_attn, "num_attention_heads"
    )


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
