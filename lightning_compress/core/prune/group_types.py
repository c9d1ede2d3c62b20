"""The data of coupled channel groups: a slice (:class:`Cut`), a removable channel or head (:class:`Unit`), a group.

:func:`~lightning_compress.core.prune.groups.find_groups` builds them; surgery and the group masks read them.

Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ChannelGroup", "Cut", "Unit"]


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
