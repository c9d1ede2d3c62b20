"""The one error type users see for bad configuration, and helpers that build its messages."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["CompressionConfigError"]


class CompressionConfigError(ValueError):
    """Raised before training when an argument of a lightning-compress object is invalid.

    The message names the argument, what is allowed and what was given, e.g.
    ``Expected argument `method` to be one of 'magnitude', 'channel' or 'N:M' such as '2:4', but got 'l1'.``
    """


def _fmt_choices(choices: Iterable[Any]) -> str:
    items = [repr(c) for c in choices]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


def config_error(argument: str, expected: str, got: Any, hint: str | None = None) -> CompressionConfigError:
    """Build the standard message: ``Expected argument `x` to be <expected>, but got <got>.`` plus a hint."""
    message = f"Expected argument `{argument}` to be {expected}, but got {got!r}."
    if hint:
        message += f" {hint}"
    return CompressionConfigError(message)


def check_choice(argument: str, value: Any, choices: Iterable[Any], hint: str | None = None) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise config_error(argument, f"one of {_fmt_choices(choices)}", value, hint)


def check_number(
    argument: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
) -> None:
    """Raise unless ``value`` is a finite real number (an int when ``integer``) inside the given interval.

    The one check for every number a user gives: its type (``bool`` is refused where a number or an
    int is meant, a float where an int is meant, strings always), its finiteness (``nan``, ``inf``
    and ``-inf`` are refused even where the interval is unbounded) and its range.

    Example:
        >>> check_number("lr", 0.0, low=0.0)
        >>> check_number("lr", float("inf"), low=0.0)
        Traceback (most recent call last):
        ...
        lightning_compress.errors.CompressionConfigError: Expected argument `lr` to be a number in [0, inf), \
but got inf. Infinity and NaN are not allowed.
    """
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise config_error(argument, kind, value)
    lo = "" if low is None else ("[" if low_inclusive else "(") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + ("]" if high_inclusive else ")")
    interval = f"{lo or '(-inf'}, {hi or 'inf)'}"
    if not math.isfinite(value):
        raise config_error(argument, f"{kind} in {interval}", value, "Infinity and NaN are not allowed.")
    bad_low = low is not None and (value < low if low_inclusive else value <= low)
    bad_high = high is not None and (value > high if high_inclusive else value >= high)
    if bad_low or bad_high:
        raise config_error(argument, f"{kind} in {interval}", value)


VERBOSE_LEVELS = (0, 1, 2)
"""The ``verbose`` levels of the callbacks: 0 silent, 1 a summary at fit end, 2 also a line per step taken."""


def check_verbose(value: Any, highest: int = 2) -> int:
    """Raise unless ``value`` is an ``int`` (not a ``bool``, not a float) from 0 to ``highest``; return it.

    The one ``verbose`` check of every callback (``highest`` is the most detailed level it has).

    Example:
        >>> check_verbose(1)
        1
        >>> check_verbose(True)
        Traceback (most recent call last):
        ...
        lightning_compress.errors.CompressionConfigError: Expected argument `verbose` to be an integer in [0, 2], \
but got True.
    """
    top = min(highest, VERBOSE_LEVELS[-1])
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise config_error("verbose", f"an integer in [0, {top}]", value)
    return value


def check_str_list(argument: str, value: Any) -> list[str]:
    """Raise unless ``value`` is a list (or tuple) of strings; return it as a list."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise config_error(argument, "a list of strings", value)
    return list(value)
