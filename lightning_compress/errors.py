"""The one error type users see for bad configuration, and helpers that build its messages."""

from __future__ import annotations

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
    """Raise unless ``value`` is a real number (an int when ``integer``) inside the given interval."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise config_error(argument, kind, value)
    lo = "" if low is None else ("[" if low_inclusive else "(") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + ("]" if high_inclusive else ")")
    interval = f"{lo or '(-inf'}, {hi or 'inf)'}"
    bad_low = low is not None and (value < low if low_inclusive else value <= low)
    bad_high = high is not None and (value > high if high_inclusive else value >= high)
    if bad_low or bad_high or value != value:  # the last test catches NaN
        raise config_error(argument, f"{kind} in {interval}", value)


def check_str_list(argument: str, value: Any) -> list[str]:
    """Raise unless ``value`` is a list (or tuple) of strings; return it as a list."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise config_error(argument, "a list of strings", value)
    return list(value)
