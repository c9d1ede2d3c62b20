"""Folding a ``BatchNorm2d`` into the convolution that feeds it, before the convolution becomes int8.

In eval mode a batch norm is a per-channel affine map, ``y = x * a + b`` with
``a = gamma / sqrt(running_var + eps)`` and ``b = beta - running_mean * a``. When its only input is
the output of a convolution that nothing else reads, the convolution can compute it: weight
``W * a`` (per output channel), bias ``bias * a + b``. The batch norm is then replaced by a
:class:`FoldedBatchNorm` (an identity that remembers the convolution it went into).

Why: an int8 convolution of ``mode="static"`` puts its output on a calibrated int8 grid, and ONNX
Runtime runs the whole ``QuantizeLinear -> QLinearConv`` chain in int8 only when no float batch norm
sits between a convolution's quantized output and the next one's input (measured on resnet18:
see the *Deploying* page). Every int8 toolchain folds first for that reason (ONNX Runtime's graph
optimizer, PyTorch's ``fuse_modules``). The folded convolution computes what the pair computed up
to float rounding; its int8 weight then holds the batch norm's scale (per channel that costs no
precision; per tensor the widest channel sets the grid, which the docs measure).

Which pairs: only a convolution and a batch norm that are children of the same parent module, each
called once there, where the batch norm's only input is the convolution's output and that output
has no other reader. Inside an ``nn.Sequential`` that is two neighbours; any other parent is traced
with :mod:`torch.fx` with its children as leaves, and a parent that does not trace is left alone.
A batch norm without running statistics (``track_running_stats=False``), or of a subclass with its
own ``forward`` (timm's ``BatchNormAct2d``, which adds an activation), is never folded.

Pure torch.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn
from typing_extensions import override

from lightning_compress.core.quant._local_graph import child_calls, local_graph, only_reader
from lightning_compress.core.quant.conv2d import Int8Conv2d

__all__ = [
    "FoldedBatchNorm",
    "check_folded",
    "fold_batch_norms",
    "foldable_pairs",
    "folded_batch_norms",
    "restore_folded",
]


class FoldedBatchNorm(nn.Identity):
    """Where a ``BatchNorm2d`` was before it was folded into the convolution ``into`` (a sibling module name).

    It returns its input; it has no state, so the model's ``state_dict`` loses the batch norm's
    entries. An artifact lists it (``save_compressed``) and loading puts it back in place of the
    fresh model's batch norm.

    Example:
        >>> FoldedBatchNorm("conv1")
        FoldedBatchNorm(into='conv1')
    """

    def __init__(self, into: str) -> None:
        super().__init__()
        self.into = into

    @override
    def extra_repr(self) -> str:
        return f"into={self.into!r}"


def _traced_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """``(conv child, batch norm child)`` pairs of ``parent`` whose batch norm reads only the convolution."""
    graph = local_graph(parent)
    if graph is None:
        return []
    calls = child_calls(graph)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module" or id(only_reader(source)) != id(node):
            continue
        if calls[str(node.target)] == 1 and calls[str(source.target)] == 1:
            pairs.append((str(source.target), str(node.target)))
    return pairs


def _neighbour_pairs(parent: nn.Sequential) -> list[tuple[str, str]]:
    names = [name for name, _ in parent.named_children()]
    return list(itertools.pairwise(names))


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    # A subclass with its own forward (timm's BatchNormAct2d adds an activation) is more than the affine map.
    return (
        isinstance(conv, nn.Conv2d)
        and isinstance(bn, nn.BatchNorm2d)
        and type(bn).forward is nn.modules.batchnorm._BatchNorm.forward
        and bn.running_mean is not None
        and bn.running_var is not None
        and bn.num_features == conv.out_channels
    )


def foldable_pairs(model: nn.Module, convs: Mapping[str, nn.Module]) -> dict[str, str]:
    """``{batch norm name: convolution name}`` of the batch norms that can fold into one of ``convs``.

    Args:
        model: the model (names are full names in it).
        convs: ``{name: module}`` of the convolutions that may take a batch norm (those about to
            become int8).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> foldable_pairs(model, {"0": model[0]})
        {'1': '0'}
    """
    wanted = {id(m) for m in convs.values()}
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    found: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        children = dict(parent.named_children())
        has_conv = any(id(m) in wanted for m in children.values())
        if not has_conv or not any(isinstance(m, nn.BatchNorm2d) for m in children.values()):
            continue
        pairs = _neighbour_pairs(parent) if type(parent) is nn.Sequential else _traced_pairs(parent)
        prefix = f"{parent_name}." if parent_name else ""
        for conv_child, bn_child in pairs:
            conv, bn = children.get(conv_child), children.get(bn_child)
            if conv is None or bn is None or id(conv) not in wanted or not _foldable(conv, bn):
                continue
            if uses[id(conv)] == 1 and uses[id(bn)] == 1:
                found[prefix + bn_child] = prefix + conv_child
    return found


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Give ``conv`` the weight and bias that compute ``bn(conv(x))`` in eval mode (in float64, then cast)."""
    assert bn.running_mean is not None and bn.running_var is not None
    weight = conv.weight
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    a = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    weight.copy_((weight.double() * a.reshape(-1, 1, 1, 1)).to(weight.dtype))
    new_bias = (bias * a + beta - mean * a).to(device=weight.device, dtype=weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def fold_batch_norms(model: nn.Module, convs: Mapping[str, nn.Module]) -> dict[str, str]:
    """Fold each batch norm of :func:`foldable_pairs` into its convolution, in place; return the pairs.

    Each folded batch norm becomes a :class:`FoldedBatchNorm`. The model then computes in eval mode
    what it computed before, up to float rounding.

    Example:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).eval()
        >>> model[1].running_var.fill_(4.0)
        tensor([4., 4., 4., 4.])
        >>> x = torch.randn(2, 3, 5, 5)
        >>> before = model(x)
        >>> fold_batch_norms(model, {"0": model[0]})
        {'1': '0'}
        >>> model[1], bool(torch.allclose(model(x), before, atol=1e-6))
        (FoldedBatchNorm(into='0'), True)
    """
    pairs = foldable_pairs(model, convs)
    for bn_name, conv_name in pairs.items():
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        _fold_into(conv, bn)
        _replace(model, bn_name, FoldedBatchNorm(conv_name.rpartition(".")[2]))
    return pairs


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def folded_batch_norms(model: nn.Module) -> dict[str, str]:
    """``{name: convolution name}`` of the :class:`FoldedBatchNorm` modules of ``model`` (what an artifact records).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), FoldedBatchNorm("0"))
        >>> folded_batch_norms(model)
        {'1': '0'}
    """
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, FoldedBatchNorm):
            parent = name.rpartition(".")[0]
            found[name] = f"{parent}.{module.into}" if parent else module.into
    return found


def check_folded(model: nn.Module, folded: Any) -> list[str]:
    """What keeps an artifact's ``"folded"`` entry (``{batch norm name: convolution name}``) from fitting ``model``.

    Each batch norm must be a ``BatchNorm2d`` (or already a :class:`FoldedBatchNorm`) of the model,
    its convolution a sibling ``Conv2d`` (or int8 convolution). Their widths are not compared: a
    channel-removed artifact shrinks the convolution but never the batch norm it replaces (the
    convolution's own shapes are checked with the rest of the state).
    """
    if not isinstance(folded, dict):
        return [f"expected a table (dict) of names, got a {type(folded).__name__}"]
    problems = []
    for bn_name, conv_name in folded.items():
        if not isinstance(bn_name, str) or not isinstance(conv_name, str) or not bn_name or not conv_name:
            problems.append(f"expected module names (non-empty strings), got {bn_name!r}: {conv_name!r}")
            continue
        if bn_name.rpartition(".")[0] != conv_name.rpartition(".")[0] or bn_name == conv_name:
            problems.append(f"{bn_name!r} and {conv_name!r} are not two children of one module")
            continue
        bn, conv = _get(model, bn_name), _get(model, conv_name)
        if not isinstance(bn, (nn.BatchNorm2d, FoldedBatchNorm)):
            problems.append(f"{bn_name!r}: the model has no such BatchNorm2d")
        elif not isinstance(conv, (nn.Conv2d, Int8Conv2d)):
            problems.append(f"{conv_name!r}: the model has no such convolution")
    return problems


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def restore_folded(model: nn.Module, folded: Mapping[str, str]) -> None:
    """Make ``model`` look like the folded one, before the artifact's state is loaded into it.

    Each named batch norm becomes a :class:`FoldedBatchNorm`, and its convolution gets a bias (zeros
    until the state is loaded). ``folded`` must have passed :func:`check_folded`.
    """
    for bn_name, conv_name in folded.items():
        conv = model.get_submodule(conv_name)
        if getattr(conv, "bias", None) is None:
            weight = conv._buffers.get("weight")  # an int8 convolution's int8 weight
            like = weight if weight is not None else conv.weight
            assert isinstance(like, Tensor)
            dtype = like.dtype if like.is_floating_point() else torch.float32
            conv.bias = nn.Parameter(torch.zeros(like.shape[0], device=like.device, dtype=dtype))
        _replace(model, bn_name, FoldedBatchNorm(conv_name.rpartition(".")[2]))
