r"""How much each weight matters: the score functions that the masks rank by, in one registry.

A *score* is a function ``(weight, statistics) -> Tensor``: it returns a floating-point tensor shaped
like the weight (larger means more important, the masks keep the largest), computed without
gradients. ``statistics`` is what the score needs measured while training, ``None`` for a score that
needs nothing. Each score is registered once under a name, with the statistic it needs:

* ``"magnitude"``: :math:`|w|` (needs nothing);
* ``"wanda"``: :math:`|w_{ij}| \cdot \lVert x_j \rVert_2`, the magnitude times the L2 norm of the input
  feature the weight multiplies (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large
  Language Models"); needs ``"input_norm"``: one norm per input feature of the layer.

Weights are in torch's own layout, ``(out, in, *kernel)`` (``in / groups`` for grouped
convolutions); the input axis is dim 1.

A user's own score is one entry::

    from lightning_compress.core.prune.scores import register_score

    register_score("squared", lambda weight, statistics: weight.detach().float().square())
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_compress.errors import check_choice, config_error

__all__ = [
    "STATISTICS",
    "Score",
    "ScoreFn",
    "magnitude_score",
    "register_score",
    "score_named",
    "score_names",
    "score_weights",
    "wanda_score",
]

ScoreFn = Callable[[Tensor, "Tensor | None"], Tensor]
"""``(weight, statistics) -> score``: a float tensor of the weight's shape, larger = kept first."""

STATISTICS: tuple[str, ...] = ("input_norm",)
"""Statistics a score can ask for: ``"input_norm"``, the L2 norm of each input feature of a layer."""


@dataclass(frozen=True)
class Score:
    """One entry of the registry.

    Attributes:
        name: the name users give (``score="magnitude"``).
        fn: the score function.
        statistic: what must be measured while training for it (one of :data:`STATISTICS`), or ``None``.
    """

    name: str
    fn: ScoreFn
    statistic: str | None = None


_SCORES: dict[str, Score] = {}


def register_score(name: str, fn: ScoreFn, *, statistic: str | None = None, replace: bool = False) -> Score:
    """Register a score under ``name``; the entry the masks and callbacks look up.

    Args:
        name: a new name (or an existing one with ``replace=True``).
        fn: ``(weight, statistics) -> Tensor`` of the weight's shape.
        statistic: the statistic ``fn`` needs, one of :data:`STATISTICS`, or ``None``.
        replace: allow replacing an existing entry.

    Returns:
        The new entry.

    Raises:
        CompressionConfigError: for an empty or taken name, a ``fn`` that is not callable or an
            unknown ``statistic``.

    Example:
        >>> entry = register_score("doc_squared", lambda w, s: w.detach().float().square(), replace=True)
        >>> score_named("doc_squared").fn(torch.tensor([-2.0, 1.0]), None)
        tensor([4., 1.])
    """
    if not isinstance(name, str) or not name:
        raise config_error("name", "a non-empty string", name)
    if name in _SCORES and not replace:
        raise config_error("name", "a name not registered yet (or replace=True)", name)
    if not callable(fn):
        raise config_error("fn", "a callable (weight, statistics) -> Tensor", fn)
    if statistic is not None:
        check_choice("statistic", statistic, STATISTICS)
    entry = Score(name, fn, statistic)
    _SCORES[name] = entry
    return entry


def score_names() -> tuple[str, ...]:
    """The registered names, in registration order.

    Example:
        >>> score_names()[:2]
        ('magnitude', 'wanda')
    """
    return tuple(_SCORES)


def score_named(name: str) -> Score:
    """The entry registered under ``name``.

    Raises:
        CompressionConfigError: for an unknown name (the message lists the registered ones).
    """
    check_choice("score", name, _SCORES)
    return _SCORES[name]


def magnitude_score(weight: Tensor, statistics: Tensor | None = None) -> Tensor:
    """``|w|`` in float32 (``statistics`` is ignored).

    Example:
        >>> magnitude_score(torch.tensor([[-2.0, 0.5]]))
        tensor([[2.0000, 0.5000]])
    """
    return weight.detach().abs().float()


def wanda_score(weight: Tensor, statistics: Tensor | None) -> Tensor:
    r"""``|w_ij| * ||x_j||_2``: the magnitude times the norm of the input feature ``j`` it multiplies.

    Args:
        weight: ``(out, in, *kernel)``.
        statistics: the input norms: one per input feature (``weight.shape[1]`` entries), or shaped
            ``weight.shape[1:]`` (per input channel and kernel position of a convolution), or like the
            weight (a grouped convolution, whose groups see different inputs).

    Raises:
        ValueError: when the norms are missing or their count is not the weight's input size.

    Example:
        >>> wanda_score(torch.tensor([[1.0, -1.0], [2.0, 0.5]]), torch.tensor([3.0, 0.0]))
        tensor([[3., 0.],
                [6., 0.]])
    """
    if weight.dim() < 2:
        raise ValueError(f"score 'wanda' needs a weight with an input axis (dim 1), got shape {tuple(weight.shape)}")
    if statistics is not None and tuple(statistics.shape) in (tuple(weight.shape), tuple(weight.shape[1:])):
        # per input feature and kernel position (a convolution's unfolded patches), or per entry
        return magnitude_score(weight) * statistics.detach().to(device=weight.device, dtype=torch.float32)
    if statistics is None or statistics.numel() != weight.shape[1]:
        given = "none" if statistics is None else f"{statistics.numel()}"
        raise ValueError(
            f"score 'wanda' needs one input norm per input feature ({weight.shape[1]} for a weight of shape "
            f"{tuple(weight.shape)}; or one per input feature and kernel position, {tuple(weight.shape[1:])}),"
            f" got {given}"
        )
    shape = (1, weight.shape[1]) + (1,) * (weight.dim() - 2)
    norms = statistics.detach().to(device=weight.device, dtype=torch.float32).reshape(shape)
    return magnitude_score(weight) * norms


@torch.no_grad()
def score_weights(
    weights: Mapping[str, Tensor],
    score: str | ScoreFn = "magnitude",
    statistics: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Each weight's score: ``name -> score tensor`` of the weight's shape.

    Args:
        weights: ``name -> weight``.
        score: a registered name or a score function.
        statistics: ``name -> statistic`` for the score (a weight without an entry gets ``None``).

    Raises:
        CompressionConfigError: for an unknown score name.
        ValueError: when a score comes back with another shape than its weight.

    Example:
        >>> score_weights({"fc": torch.tensor([[-3.0, 1.0]])})["fc"]
        tensor([[3., 1.]])
    """
    fn = score_named(score).fn if isinstance(score, str) else score
    stats = statistics or {}
    scores = {}
    for name, weight in weights.items():
        value = fn(weight, stats.get(name))
        if not isinstance(value, Tensor) or value.shape != weight.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"score {score if isinstance(score, str) else getattr(score, '__name__', score)!r} gave {shape} "
                f"for {name!r}, expected a tensor of the weight's shape {tuple(weight.shape)}"
            )
        scores[name] = value
    return scores


register_score("magnitude", magnitude_score)
register_score("wanda", wanda_score, statistic="input_norm")
