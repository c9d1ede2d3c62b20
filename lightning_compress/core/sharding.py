"""Sharded parameters (FSDP2 ``fully_shard``, DTensor): local shards, full tensors, distributed masks.

Pure torch. Under FSDP2 each parameter is a ``DTensor`` whose rank holds a contiguous block of rows
(``Shard(0)`` on a one-dimensional mesh, ``torch.chunk`` sizes). The helpers here let the callbacks
work on the local block and reach the exact decision an unsharded run would make:

* :func:`is_dtensor`, :func:`local_tensor` (the rank's own block, which shares storage with the
  parameter: in-place edits land in the parameter), :func:`full_tensor` (a collective: every rank
  must call it), :func:`local_rows` (the rows of a full-shaped tensor this rank holds).
* :func:`distributed_kth_smallest`: the exact ``k``-th smallest value over every rank's values by a
  radix select: four rounds, each an all-reduce of a 256-bin histogram of the next byte of the
  values' order-preserving 32-bit keys. Nothing but 4 x 256 counts crosses the wire.
* :func:`sharded_masks`: pruning masks of each rank's local rows, equal to
  :func:`~lightning_compress.core.prune.masks.compute_masks` on the full weights (ties broken by
  layer, then flat position, as there). ``"magnitude"`` uses the distributed k-th value, N:M is
  row-local, ``"channel"`` all-gathers one score per channel. Weights that are not all ``Shard(0)``
  DTensors on a 1-D mesh, non-standard layouts and user-registered patterns fall back to gathering
  the full weights on every rank (correct, not memory-lean).

Every function that communicates must be called by every rank of the group, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_rows",
    "count_nonzero",
    "distributed_kth_smallest",
    "full_tensor",
    "has_dtensors",
    "is_dtensor",
    "local_rows",
    "local_tensor",
    "nonfinite",
    "row_shardable",
    "sharded_masks",
    "sum_over_shards",
    "unshard_module_",
]

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 / tensor-parallel parameter)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def has_dtensors(tensors: Iterable[Any]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor``."""
    return any(is_dtensor(t) for t in tensors)


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's block of a ``DTensor`` (sharing its storage), or ``tensor`` itself."""
    if is_dtensor(tensor):
        with torch.no_grad():
            return tensor.to_local()  # type: ignore[attr-defined]
    return tensor


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor as a plain one on every rank (a collective for a ``DTensor``), detached."""
    if is_dtensor(tensor):
        with torch.no_grad():
            return tensor.full_tensor().detach()  # type: ignore[attr-defined]
    return tensor.detach()


def row_shardable(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` split by rows over a 1-D mesh (FSDP2's ``Shard(0)``)."""
    if not is_dtensor(tensor):
        return False
    placements = tuple(tensor.placements)  # type: ignore[attr-defined]
    return tensor.device_mesh.ndim == 1 and placements == (Shard(0),)  # type: ignore[attr-defined]


def _group(tensor: Tensor) -> Any:
    return tensor.device_mesh.get_group()  # type: ignore[attr-defined]


def _row_counts(rows: int, world: int) -> list[int]:
    """Rows per rank of a ``Shard(0)`` tensor: ``torch.chunk`` sizes, zero-padded to ``world`` ranks."""
    sizes = [c.shape[0] for c in torch.empty(rows, 0).chunk(world)]
    return sizes + [0] * (world - len(sizes))


def _row_range(tensor: Tensor) -> tuple[int, int]:
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    counts = _row_counts(tensor.shape[0], mesh.size())
    rank = mesh.get_local_rank()
    start = sum(counts[:rank])
    return start, start + counts[rank]


def local_rows(full: Tensor, like: Tensor) -> Tensor:
    """The block of the full-shaped ``full`` that this rank holds of ``like`` (all of it for a plain tensor).

    Raises:
        ValueError: for a ``DTensor`` not split by rows over a 1-D mesh.
    """
    if not is_dtensor(like):
        return full
    if not row_shardable(like):
        raise ValueError(f"only Shard(0) DTensors on a 1-D mesh are supported, got {like.placements}")  # type: ignore[attr-defined]
    start, end = _row_range(like)
    return full[start:end]


def all_gather_rows(local: Tensor, like: Tensor) -> Tensor:
    """The full tensor from every rank's block of rows (blocks shaped as ``like``'s shards; a collective)."""
    mesh = like.device_mesh  # type: ignore[attr-defined]
    world = mesh.size()
    counts = _row_counts(like.shape[0], world)
    longest = max(counts)
    pad = local.new_zeros((longest - local.shape[0], *local.shape[1:]))
    padded = torch.cat([local, pad]) if pad.shape[0] else local.contiguous()
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded, group=_group(like))
    return torch.cat([piece[:count] for piece, count in zip(pieces, counts, strict=True)])


def _sortable_keys(values: Tensor) -> Tensor:
    """float32 values as int64 keys in ``[0, 2**32)`` with the same order (``-0.0`` just below ``+0.0``)."""
    bits = values.float().contiguous().view(torch.int32).to(torch.int64)
    keys = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse their order
    return keys + 2**31


def _from_key(key: int) -> float:
    bits = key - 2**31
    if bits < 0:
        bits ^= 0x7FFFFFFF
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


def distributed_kth_smallest(values: Tensor, k: int, group: Any = None) -> float:
    """The exact ``k``-th smallest (1-based) of the float32 values of every rank together.

    A radix select on the values' order-preserving 32-bit keys: in each of four rounds every rank
    histograms the next byte of its candidates (256 bins), the histograms are all-reduced, and the
    bin that holds the ``k``-th value narrows the candidates. Exact for any float32 values (``-inf``
    included; no NaN); communication is 4 all-reduces of 256 counts whatever the size. ``group=None``
    with no process group initialized computes on ``values`` alone.

    Example:
        >>> distributed_kth_smallest(torch.tensor([3.0, -1.0, 2.5, float("-inf")]), 2)
        -1.0
    """
    keys = _sortable_keys(values.detach().flatten().cpu())
    remaining, prefix = k, 0
    for shift in (24, 16, 8, 0):
        high = 0xFFFFFFFF ^ ((1 << (shift + 8)) - 1)  # the bits already decided
        candidates = keys[(keys & high) == prefix]
        hist = torch.bincount((candidates >> shift) & 0xFF, minlength=256).to(torch.int64)
        if group is not None or (dist.is_available() and dist.is_initialized()):
            dist.all_reduce(hist, group=group)
        cumulative = torch.cumsum(hist, 0)
        byte = int(torch.searchsorted(cumulative, torch.tensor(remaining), right=False))
        if byte > 255:
            raise ValueError(f"k={k} is larger than the number of values")
        remaining -= int(cumulative[byte - 1]) if byte > 0 else 0
        prefix |= byte << shift
    return _from_key(prefix)


def _all_reduce_sum(tensor: Tensor, group: Any) -> Tensor:
    dist.all_reduce(tensor, group=group)
    return tensor


def _smallest_sharded(flats: list[Tensor], k: int, group: Any) -> list[Tensor]:
    """Distributed :func:`~lightning_compress.core.prune.patterns.smallest` over row-sharded layers.

    ``flats[i]`` is this rank's part of layer ``i`` (flattened rows, in order). The chosen entries are
    the ``k`` smallest of the concatenation of the full layers, ties to the lower (layer, flat index),
    exactly as ``smallest`` decides on one process: rank ``r``'s rows precede rank ``r + 1``'s.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    total = int(_all_reduce_sum(torch.tensor([sum(f.numel() for f in flats)], dtype=torch.int64), group))
    if k <= 0 or k >= total:
        return [torch.full((f.numel(),), k > 0, dtype=torch.bool) for f in flats]
    threshold = distributed_kth_smallest(torch.cat(flats), k, group)
    chosen = [f < threshold for f in flats]
    equal = [f == threshold for f in flats]
    below = int(_all_reduce_sum(torch.tensor([sum(int(c.sum()) for c in chosen)], dtype=torch.int64), group))
    missing = k - below
    counts = torch.zeros(world, len(flats), dtype=torch.int64)
    counts[rank] = torch.tensor([int(e.sum()) for e in equal], dtype=torch.int64)
    _all_reduce_sum(counts, group)
    order = counts.t().flatten()  # layer-major, then rank: the global position order of the ties
    before = torch.cumsum(order, 0) - order
    for i, (c, e) in enumerate(zip(chosen, equal, strict=True)):
        j = i * world + rank
        take = max(0, min(int(order[j]), missing - int(before[j])))
        if take:
            c[torch.nonzero(e).flatten()[:take]] = True
    return chosen


def sharded_masks(
    weights: Mapping[str, Tensor], sparsity: float, method: str = "magnitude", scope: str = "global",
    previous: Mapping[str, Tensor] | None = None, layouts: Mapping[str, Any] | None = None, *,
    score: Any = "magnitude", statistics: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:  # fmt: skip
    """Masks of sharded weights, equal to ``compute_masks`` on the full weights; every rank must call it.

    Args:
        weights: ``name -> parameter`` (FSDP2 ``DTensor`` or plain).
        sparsity: fraction to prune now (as for :func:`~lightning_compress.core.prune.masks.compute_masks`).
        method: ``"magnitude"``, ``"channel"``, N:M (lean), or any registered pattern (gathers the weights).
        scope: ``"global"`` or ``"layer"``.
        previous: the full masks of the last update (CPU bool), kept pruned.
        layouts: ``name -> layout``; a non-standard layout gathers the weights.
        score: the score name or function; any but ``"magnitude"`` gathers the weights.
        statistics: what the score needs (full tensors, the same on every rank).

    Returns:
        ``(local, full)``: each rank's masks of its local rows, and the full masks (CPU bool, the same
        on every rank).
    """
    from lightning_compress.core.prune.masks import (
        _channel_scores,
        _expand_channels,
        compute_masks,
        global_channel_keep,
        layer_channel_keep,
    )
    from lightning_compress.core.prune.nm import parse_nm
    from lightning_compress.core.prune.patterns import prune_count, rank_pruned_last

    prev = dict(previous or {})
    lean = all(row_shardable(w) for w in weights.values()) and not any((layouts or {}).get(n) for n in weights)
    lean = lean and score == "magnitude" and statistics is None
    if not lean or not (method in ("magnitude", "channel") or parse_nm(method) is not None) or not weights:
        full = {n: full_tensor(w) for n, w in weights.items()}  # the fallback: every rank decides alike
        decided = compute_masks(
            full, sparsity, method, scope, prev or None, score=score, statistics=statistics, layouts=layouts
        )
        masks = {n: m.cpu() for n, m in decided.items()}
        return {n: local_rows(m, weights[n]).to(local_tensor(weights[n]).device) for n, m in masks.items()}, masks
    group = _group(next(iter(weights.values())))
    locals_ = {n: local_tensor(w).detach() for n, w in weights.items()}
    local_prev = {n: local_rows(prev[n], weights[n]).to(locals_[n].device) for n in weights if n in prev}
    local: dict[str, Tensor]
    if parse_nm(method) is not None:  # groups run along the input: every row decides alone
        local = compute_masks(locals_, sparsity, method, scope, local_prev or None)
    elif method == "magnitude":
        flats = [rank_pruned_last(locals_[n].abs().float(), local_prev.get(n)) for n in weights]
        if scope == "layer":
            chosen = [
                _smallest_sharded([f], prune_count(sparsity, w.numel()), group)[0]
                for f, w in zip(flats, weights.values(), strict=True)
            ]
        else:
            k = prune_count(sparsity, sum(w.numel() for w in weights.values()))
            chosen = _smallest_sharded(flats, k, group)
        local = {n: (~c).view(locals_[n].shape) for n, c in zip(weights, chosen, strict=True)}
    else:  # channel: one score per output channel crosses the wire
        gathered = [
            all_gather_rows(_channel_scores(locals_[n].abs().float(), local_prev.get(n)), w).cpu()
            for n, w in weights.items()
        ]
        if scope == "layer":
            keeps = [layer_channel_keep(s, sparsity) for s in gathered]
        else:
            keeps = global_channel_keep(gathered, [w[0].numel() for w in weights.values()], sparsity)
        local = {
            n: _expand_channels(local_rows(keep, w), locals_[n])
            for (n, w), keep in zip(weights.items(), keeps, strict=True)
        }
    full_masks = {n: all_gather_rows(local[n].to(torch.uint8), weights[n]).bool().cpu() for n in weights}
    return local, full_masks


def count_nonzero(tensors: Iterable[Tensor]) -> tuple[int, int]:
    """``(nonzero, total)`` entries over full tensors: local counts, all-reduced over a ``DTensor``'s group."""
    tensors = list(tensors)
    local = torch.zeros(2, dtype=torch.int64)
    for t in tensors:
        block = local_tensor(t).detach()
        local[0] += int(torch.count_nonzero(block))
    total = sum(t.numel() for t in tensors)
    sharded = [t for t in tensors if is_dtensor(t)]
    if sharded:
        plain = [t for t in tensors if not is_dtensor(t)]
        # plain tensors are replicated: count them once, on the group's rank 0
        group = _group(sharded[0])
        if dist.get_rank(group) != 0:
            local[0] -= sum(int(torch.count_nonzero(t.detach())) for t in plain)
        dist.all_reduce(local, group=group)
    return int(local[0]), total


def nonfinite(params: Mapping[str, Tensor]) -> list[str]:
    """Names of the tensors holding NaN or infinity on any rank (all-reduced for ``DTensor``s: call on every rank)."""
    names = list(params)
    flags = torch.tensor([not bool(torch.isfinite(local_tensor(params[n]).detach()).all()) for n in names])
    sharded = [t for t in params.values() if is_dtensor(t)]
    if sharded:
        flags = flags.to(torch.int64)
        dist.all_reduce(flags, group=_group(sharded[0]))
    return [n for n, bad in zip(names, flags.tolist(), strict=True) if bad]


def _remove_handle(handle: Any) -> None:
    if handle is not None and hasattr(handle, "remove"):
        handle.remove()


def _strip_fsdp(module: torch.nn.Module) -> None:
    """Undo ``fully_shard`` on one module: its hooks removed and its own class back (parameters untouched)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        return
    state = module._get_fsdp_state()
    _remove_handle(getattr(state, "_pre_forward_hook_handle", None))
    _remove_handle(getattr(state, "_post_forward_hook_handle", None))
    group = getattr(state, "_fsdp_param_group", None)
    if group is not None:
        for handles in (
            group._module_to_pre_save_state_dict_hook_handle,
            group._module_to_pre_load_state_dict_hook_handle,
        ):
            for handle in handles.values():
                _remove_handle(handle)
            handles.clear()
        for fsdp_param in group.fsdp_params:
            _remove_handle(getattr(fsdp_param, "_post_load_hook_handle", None))
    bases = type(module).__bases__
    if len(bases) == 2 and bases[0] is FSDPModule:
        module.__class__ = bases[1]


def unshard_module_(module: torch.nn.Module) -> int:
    """Turn a model sharded with FSDP2 into a plain one on every rank, in place; a collective.

    Every ``DTensor`` parameter or buffer is gathered once (``full_tensor``, in the same order on
    every rank) and registered back as a plain tensor of the same name; ``fully_shard``'s hooks and
    wrapper classes are removed, so the model then runs, converts and saves as an unsharded one.
    Its optimizer (which still holds the sharded parameters) is not usable afterwards: call it when
    training is over.

    Returns:
        How many tensors were gathered.
    """
    gathered: dict[int, torch.nn.Parameter] = {}
    count = 0
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None or not is_dtensor(param):
                continue
            if id(param) not in gathered:  # a tied parameter is gathered once
                gathered[id(param)] = torch.nn.Parameter(full_tensor(param).clone(), requires_grad=param.requires_grad)
                count += 1
            sub._parameters[name] = gathered[id(param)]
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and is_dtensor(buffer):
                sub._buffers[name] = full_tensor(buffer).clone()
                count += 1
    for sub in module.modules():
        _strip_fsdp(sub)
    return count


def sum_over_shards(value: Tensor, tensors: Iterable[Tensor]) -> Tensor:
    """``value`` (a rank's share of a sum over ``tensors``) summed over the ranks of the first ``DTensor``'s group.

    ``value`` is returned unchanged when no tensor is a ``DTensor``; otherwise every rank must call it.
    """
    sharded = [t for t in tensors if is_dtensor(t)]
    if not sharded:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, group=_group(sharded[0]))
    return total
