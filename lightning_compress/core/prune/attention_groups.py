"""Attention heads and transformer feed-forward blocks, found by module patterns instead of tracing.

:mod:`torch.nn` ``MultiheadAttention`` / ``TransformerEncoderLayer``, Hugging Face BERT/ViT layers
and timm ``Attention`` each give one group of heads (the q/k/v rows and the output projection's
columns of one head) and, for whole layers, one group for the feed-forward block. Their modules are
kept whole (as leaves) in the trace.

Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_compress.core.prune.group_types import ChannelGroup, Cut, Unit

__all__: list[str] = []  # read by find_groups; nothing here is public


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


def _attention_leaf(module: nn.Module) -> bool:
    return _pattern_of(module) is not None or isinstance(module, nn.MultiheadAttention)
