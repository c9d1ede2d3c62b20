"""How the benchmark scripts time calls: side by side in interleaved rounds, the median over the rounds.

Imports nothing but the standard library. A script imports it after putting its own folder first on
``sys.path`` (so that it also works when a smoke test loads the script from its path)::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _timing import interleaved

The order of the variants is shuffled in every round (:func:`round_orders`, seeded, so a run is
repeatable). Measured on an AMD EPYC (AVX-512 VNNI, one thread, 4096-wide MLP): with a fixed order,
the variant timed right after float32 came out 3-5 % slower than with the same variants in another
order (ours over ``quantize_dynamic`` 1.054 with ours after float32, 1.007 and 0.997 with the order
reversed or with the peer after float32), more than the 5 % margin the goals allow. A shuffled order
gives every variant that handicap in the same share of rounds, and the median sees through it.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

ORDER_SEED = 0
"""Seed of the per-round shuffle: the same variants in the same rounds get the same orders."""


def round_orders(names: list[str], rounds: int, seed: int = ORDER_SEED) -> list[list[str]]:
    """The order in which each round calls the variants: a seeded shuffle per round.

    Example:
        >>> orders = round_orders(["a", "b", "c"], 4)
        >>> [sorted(o) for o in orders] == [["a", "b", "c"]] * 4
        True
        >>> orders == round_orders(["a", "b", "c"], 4)
        True
    """
    rng = random.Random(seed)
    orders = []
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        orders.append(order)
    return orders


def interleaved_samples(
    fns: dict[str, Callable[[], object]], rounds: int, inner: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each fn in every round (:func:`interleaved` without the median), in round order.

    Round ``r`` of one fn and round ``r`` of another were timed next to each other, so their ratio
    (:func:`paired_ratio`) sees the machine in the same state.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for order in round_orders(list(fns), rounds):
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner)
    return samples


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, inner: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, timed in interleaved rounds after ``warmup`` calls of each.

    A round calls every fn ``inner`` times in turn (a, a, b, b, ..., then the next round), in the
    round's shuffled order (:func:`round_orders`), so load on a shared machine, and the state one
    variant leaves for the next, hit them alike; the figure of a fn is the median over the rounds
    of its time per call. The warm-up matters for a compiled model (its first calls compile it).
    """
    samples = interleaved_samples(fns, rounds, inner, warmup)
    return {k: statistics.median(v) for k, v in samples.items()}


def paired_ratio(mine: list[float], other: list[float]) -> tuple[float, float, float]:
    """The median and the quartiles of ``mine[r] / other[r]`` over the rounds ``r``.

    A ratio of medians compares two figures taken over the whole run; the per-round ratio compares
    calls made side by side, so load that drifts during the run (another process on a shared machine)
    cancels out, and the quartiles say how much the ratio itself varied.

    Example:
        >>> paired_ratio([1.0, 2.0, 4.0, 1.1], [1.0, 2.0, 4.0, 1.0])  # load doubled, then doubled again
        (1.0, 1.0, 1.025)
    """
    ratios = sorted(a / b for a, b in zip(mine, other, strict=True))
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return median, q1, q3
