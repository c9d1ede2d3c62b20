"""How the benchmark scripts time calls: side by side in interleaved rounds, the median over the rounds.

Imports nothing but the standard library. A script imports it after putting its own folder first on
``sys.path`` (so that it also works when a smoke test loads the script from its path)::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _timing import interleaved
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, inner: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, timed in interleaved rounds after ``warmup`` calls of each.

    A round calls every fn ``inner`` times in turn (a, a, b, b, ..., then the next round), so load on
    a shared machine hits them alike; the figure of a fn is the median over the rounds of its time per
    call. The warm-up matters for a compiled model (its first calls compile it).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}
