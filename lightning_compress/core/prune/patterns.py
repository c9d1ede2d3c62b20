"""The table of mask patterns: which ``method`` names a pruning pattern, and the function behind it.

A *mask pattern* is a function ``(scores, sparsity, scope, previous) -> masks``: given each weight's
score (:mod:`~lightning_compress.core.prune.scores`, larger = kept first), the fraction to prune now,
the scope (``"global"`` or ``"layer"``) and the masks of the last update (whose pruned entries must
stay pruned), it returns one ``bool`` mask per weight (``True`` = kept), of the score's shape and
device. :func:`~lightning_compress.core.prune.masks.compute_masks` looks ``method`` up here.

The built-ins (registered by :mod:`~lightning_compress.core.prune.masks`) are ``"magnitude"``
(unstructured: the lowest scores anywhere), ``"channel"`` (whole output channels) and the ``"N:M"``
family (``"2:4"``, ...). A new pattern is one entry::

    from lightning_compress.core.prune.patterns import register_pattern

    def every_other_row(scores, sparsity, scope, previous):
        masks = {}
        for name, s in scores.items():
            keep = torch.ones_like(s, dtype=torch.bool)
            keep[1::2] = False
            masks[name] = keep if previous is None or name not in previous else keep & previous[name]
        return masks

    register_pattern("every_other_row", every_other_row)

after which ``PruningCallback(method="every_other_row")`` accepts it. The ranking tools the built-ins
use are here too: :func:`prune_count`, :func:`smallest` (ties go to the lower index, so every process
decides alike) and :func:`rank_pruned_last`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

try:  # numpy ships with every torch wheel; fall back to torch.kthvalue if it is missing
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None  # type: ignore[assignment]

__all__ = [
    "MaskPattern",
    "describe_patterns",
    "is_pattern",
    "pattern_for",
    "pattern_names",
    "prune_count",
    "rank_pruned_last",
    "register_pattern",
    "register_pattern_family",
    "smallest",
]

MaskPattern = Callable[[Mapping[str, Tensor], float, str, "Mapping[str, Tensor] | None"], dict[str, Tensor]]
"""``(scores, sparsity, scope, previous) -> masks``: which entries to keep, given each weight's score."""

_PATTERNS: dict[str, MaskPattern] = {}
_FAMILIES: dict[str, tuple[Callable[[str], MaskPattern | None], str | None]] = {}


def register_pattern(name: str, pattern: MaskPattern, *, replace: bool = False) -> None:
    """Register a mask pattern under an exact ``method`` name.

    Args:
        name: the ``method`` string users give.
        pattern: ``(scores, sparsity, scope, previous) -> masks``; it must keep the ``previous`` masks'
            pruned entries pruned and return one bool mask per score, of its shape and device.
        replace: allow replacing an existing entry.

    Raises:
        ValueError: for an empty or taken name.
    """
    _check_new_name(name, replace)
    _PATTERNS[name] = pattern


def register_pattern_family(
    name: str, resolve: Callable[[str], MaskPattern | None], *, example: str | None = None, replace: bool = False
) -> None:
    """Register a parametrised pattern: ``resolve(method)`` is its pattern, or ``None`` when not of the family.

    ``"N:M"`` is one: ``resolve("2:4")`` is the 2:4 pattern. ``example`` (``"2:4"``) shows in error messages.
    Exact names (:func:`register_pattern`) are looked up first, then families in registration order.
    """
    _check_new_name(name, replace)
    _FAMILIES[name] = (resolve, example)


def _check_new_name(name: str, replace: bool) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a mask pattern needs a non-empty name, got {name!r}")
    if not replace and (name in _PATTERNS or name in _FAMILIES):
        raise ValueError(f"mask pattern {name!r} is registered already (pass replace=True to replace it)")


def pattern_for(method: str) -> MaskPattern:
    """The pattern registered for ``method`` (an exact name, or one a family resolves).

    Raises:
        ValueError: for a method no entry knows.
    """
    if isinstance(method, str):
        if method in _PATTERNS:
            return _PATTERNS[method]
        for resolve, _ in _FAMILIES.values():
            pattern = resolve(method)
            if pattern is not None:
                return pattern
    raise ValueError(f"unknown pruning method {method!r}")


def is_pattern(method: str) -> bool:
    """Whether ``method`` names a registered pattern.

    Example:
        >>> is_pattern("channel"), is_pattern("2:4"), is_pattern("random")
        (True, True, False)
    """
    try:
        pattern_for(method)
    except ValueError:
        return False
    return True


def pattern_names() -> tuple[str, ...]:
    """Registered pattern names (families by their name, such as ``"N:M"``), exact names first.

    Example:
        >>> pattern_names()[:3]
        ('magnitude', 'channel', 'N:M')
    """
    return (*_PATTERNS, *_FAMILIES)


def describe_patterns() -> list[str]:
    """The registered patterns as an error message lists them: ``["'magnitude'", ..., "'N:M' such as '2:4'"]``."""
    families = [f"{name!r} such as {example!r}" if example else repr(name) for name, (_, example) in _FAMILIES.items()]
    return [repr(name) for name in _PATTERNS] + families


# ---------------------------------------------------------------- ranking tools for patterns


def prune_count(sparsity: float, total: int) -> int:
    """Number of entries to prune out of ``total`` (round half up, exact for representable fractions).

    Example:
        >>> prune_count(0.5, 5), prune_count(0.3, 10), prune_count(1.2, 4)
        (3, 3, 4)
    """
    return min(max(math.floor(sparsity * total + 0.5), 0), total)


def _kth_smallest(scores: Tensor, k: int) -> Tensor:
    """The ``k``-th smallest value (1-based) of a 1-D float tensor, as a 0-d tensor on its device."""
    if scores.device.type == "cpu" and _np is not None:
        # numpy's introselect is about ten times faster than torch.kthvalue on the CPU
        value = _np.partition(scores.numpy(), k - 1)[k - 1]
        return torch.tensor(float(value), dtype=scores.dtype)
    return torch.kthvalue(scores, k).values


def smallest(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` smallest entries of a 1-D tensor; ties go to the lower index.

    Example:
        >>> smallest(torch.tensor([3.0, 1.0, 1.0, 2.0]), 2).tolist()
        [False, True, True, False]
    """
    n = scores.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    threshold = _kth_smallest(scores, k)
    chosen = scores < threshold
    missing = k - int(chosen.sum())
    equal = scores == threshold
    if int(equal.sum()) == missing:  # no tie to break (the usual case with real weights)
        return chosen.logical_or_(equal)
    ties = torch.nonzero(equal).flatten()
    chosen[ties[:missing]] = True  # the first `missing` of the tied entries, by position
    return chosen


def rank_pruned_last(score: Tensor, previous: Tensor | None) -> Tensor:
    """A score flattened, with the entries ``previous`` prunes set to ``-inf`` (ranked below everything).

    Example:
        >>> rank_pruned_last(torch.tensor([[2.0, 5.0]]), torch.tensor([[True, False]])).tolist()
        [2.0, -inf]
    """
    flat = score.flatten()
    if previous is not None:
        flat = flat.masked_fill(~previous.to(flat.device).flatten(), -math.inf)
    return flat
