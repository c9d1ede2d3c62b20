"""The ``"shapes"`` entry of an artifact: the layer widths of a channel-removed model, and rebuilding them.

:func:`slim_shapes` records ``{layer name: [weight dims]}`` (the same form
:func:`~lightning_compress.remove_channels` returns) for every ``Linear``, convolution and
BatchNorm, int8 forms included (read from their integer attributes). Attention head counts
follow from their projections (``out_proj`` of ``nn.MultiheadAttention``, ``query`` of Hugging
Face attention, ``qkv`` of timm attention), so no attention entry is needed.

:func:`check_slim_shapes` validates an entry against a freshly built full model without touching
it (each name a layer of the model, each shape a list of positive ints of the weight's rank, no
dimension larger than the model's, kernels unchanged, channels divisible by the groups), and
:func:`apply_slim_shapes` shrinks the model's layers (new tensors are zeros, bounded by the
model's own sizes) so that the saved ``state_dict`` loads into them.

Pure torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.prune.slim_attention import set_heads

__all__ = ["SLIM_FLAG", "apply_slim_shapes", "check_slim_shapes", "mark_slim", "slim_shapes"]

SLIM_FLAG = "_lc_slim"
"""Plain attribute (a set of layer names) that channel removal sets on the module it shrank."""


def mark_slim(model: nn.Module, names: Any) -> None:
    """Record the shrunk layers ``names`` (relative to ``model``) on ``model`` and on every container between.

    The record is a plain attribute of the containers (it survives int8 conversion of the layers, which
    replaces them), so :func:`slim_shapes` finds the layers whether the whole model or a part of it
    (a LightningModule's backbone) is saved.
    """
    for name in names:
        parts = name.split(".") if name else []
        for i in range(len(parts)):
            prefix = ".".join(parts[:i])
            holder = model.get_submodule(prefix) if prefix else model
            holder.__dict__.setdefault(SLIM_FLAG, set()).add(".".join(parts[i:]))


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shape_of(module: nn.Module) -> list[int] | None:
    """The float weight shape of a Linear / convolution / BatchNorm (or int8 form), from its attributes."""
    a = module.__dict__
    if _int(a.get("nf")):  # Hugging Face Conv1D / Int8Conv1D (weight [in, out]): channel removal leaves it
        return None
    if _int(a.get("in_features")) and _int(a.get("out_features")):
        return [a["out_features"], a["in_features"]]
    if _int(a.get("in_channels")) and _int(a.get("out_channels")) and _int(a.get("groups")):
        kernel = a.get("kernel_size")
        if isinstance(kernel, tuple) and all(_int(k) for k in kernel):
            return [a["out_channels"], a["in_channels"] // a["groups"], *kernel]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return [int(module.num_features)]
    return None


def slim_shapes(module: nn.Module) -> dict[str, list[int]]:
    """``{layer name: weight shape}`` of every layer that channel removal shrank (``{}`` for other models)."""
    out = {}
    for prefix, root in module.named_modules():
        for name in sorted(root.__dict__.get(SLIM_FLAG, ())):
            full = f"{prefix}.{name}" if prefix else name
            try:
                shape = _shape_of(module.get_submodule(full))
            except AttributeError:
                continue
            if shape is not None and full:
                out[full] = shape
    return out


def check_slim_shapes(module: nn.Module, shapes: Any) -> list[str]:
    """Problems of a ``"shapes"`` entry against ``module`` (empty when it can be applied); touches nothing."""
    if not isinstance(shapes, Mapping):
        return [f"expected a dict, got a {type(shapes).__name__}"]
    problems = []
    modules = dict(module.named_modules())
    for name, shape in shapes.items():
        m = modules.get(name) if isinstance(name, str) and name else None
        full = _shape_of(m) if m is not None else None
        if full is None or m is None:
            problems.append(f"{name!r}: the model has no such Linear, convolution or BatchNorm")
            continue
        if not isinstance(shape, (list, tuple)) or not all(_int(s) and s > 0 for s in shape) or len(shape) != len(full):
            problems.append(f"{name!r}: expected {len(full)} positive ints, got {shape!r}")
            continue
        if any(s > f for s, f in zip(shape, full, strict=True)):
            problems.append(f"{name!r}: {list(shape)} does not fit in the model's {full}")
            continue
        if len(full) > 2 and list(shape[2:]) != full[2:]:
            problems.append(f"{name!r}: the kernel {list(shape[2:])} is not the model's {full[2:]}")
            continue
        groups = getattr(m, "groups", 1)
        if len(full) > 2 and groups > 1:
            depthwise = groups == m.in_channels == m.out_channels and full[1] == 1
            if not (depthwise and shape[1] == 1) and (shape[0] % groups or shape[1] != full[1]):
                problems.append(f"{name!r}: {list(shape)} does not keep the {groups} groups of the model")
    return problems


def _set(module: nn.Module, name: str, shape: tuple[int, ...]) -> None:
    t = getattr(module, name, None)
    if not isinstance(t, Tensor) or tuple(t.shape) == shape:
        return
    new = torch.zeros(shape, dtype=t.dtype, device=t.device)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(new, requires_grad=t.requires_grad)
    else:
        module._buffers[name] = new


@torch.no_grad()
def apply_slim_shapes(module: nn.Module, shapes: Mapping[str, Any]) -> list[str]:
    """Shrink the layers of ``module`` to ``shapes`` (checked first with :func:`check_slim_shapes`).

    Returns the names of the modules changed (attention modules whose head count followed included).
    """
    changed = []
    for name, shape in shapes.items():
        m: Any = module.get_submodule(name)
        s = [int(v) for v in shape]
        if _shape_of(m) == s:
            continue
        changed.append(name)
        mark_slim(module, [name])
        if isinstance(m, nn.modules.conv._ConvNd):
            if m.groups > 1 and m.groups == m.in_channels == m.out_channels:
                m.groups = m.in_channels = m.out_channels = s[0]
            else:
                m.out_channels, m.in_channels = s[0], s[1] * m.groups
            _set(m, "weight", tuple(s))
            _set(m, "bias", (s[0],))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.num_features = s[0]
            for t in ("weight", "bias", "running_mean", "running_var"):
                _set(m, t, (s[0],))
        else:
            m.out_features, m.in_features = s[0], s[1]
            _set(m, "weight", (s[0], s[1]))
            _set(m, "bias", (s[0],))
    for name, mod in module.named_modules():
        m = mod
        heads = _heads_from_projections(m)
        if heads is None:
            continue
        current = int(getattr(m, "num_heads", getattr(m, "num_attention_heads", 0)))
        if heads != current:
            if isinstance(m, nn.MultiheadAttention):
                inner = heads * m.head_dim
                _set(m, "in_proj_weight", (3 * inner, m.embed_dim))
                _set(m, "in_proj_bias", (3 * inner,))
            set_heads(m, heads)
            changed.append(name)
    return changed


def _heads_from_projections(m: Any) -> int | None:
    if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
        return int(m.out_proj.in_features) // int(m.head_dim)
    query = getattr(m, "query", None)
    if isinstance(query, nn.Linear) and _int(getattr(m, "attention_head_size", None)):
        return int(query.out_features) // int(m.attention_head_size)
    qkv = getattr(m, "qkv", None)
    if type(m).__name__ == "Attention" and isinstance(qkv, nn.Linear) and _int(getattr(m, "head_dim", None)):
        return int(qkv.out_features) // (3 * int(m.head_dim))
    return None
