"""From how many rows a small int8 Linear on the ``"float"`` kernel computes in int8 after all.

A CPU layer with fewer than :data:`~lightning_compress.core.quant.kernels.MIN_INT8_WEIGHTS` weights
computes in float from its dequantized weight (the ``"float"`` kernel): at a few rows the extra
small kernels of an int8 product cost more than the whole float GEMM. At many rows they do not.
Timed on the layer itself, fbgemm's route over the ``"float"`` kernel
(``benchmarks/int8_crossover.py``, AMD EPYC with AVX-512 VNNI, results in
``benchmarks/results/int8_crossover_{1,2}thread.md``):

* one thread, static: 0.52x (256x256, 32 rows), 0.88x (64x300, 128 rows), 0.51x (300x100, 128
  rows), 0.91x (128x128, 128 rows); dynamic from twice the work: 0.79x (64x300, 256 rows),
  0.71-0.75x (300x100, 128-256 rows), 0.86x (128x128, 256 rows), 0.62x (256x256, 64 rows);
* two threads, the crossings at twice the work again: static 0.83x (64x300, 256 rows), 0.68x
  (300x100, 256), 0.80x (128x128, 256), 0.62x (256x256, 64); dynamic 0.86x (64x300, 512), 0.79x
  (300x100, 512), 0.78x (128x128, 512), 0.57x (256x256, 128);
* never on 100x10 (1.02-6.2x up to 512 rows), and not at half those amounts of work (0.93-1.27x);
* the whole digits MLP, dynamic, two threads, at 2^23 (64x300 and 300x100 switching at 437 and 280
  rows): 0.71-1.05x of float32 at 512-1024 rows, too close to 1, so dynamic on two threads waits
  for 2^24.

So a call takes fbgemm's route when its rows times the layer's weights reach :data:`CROSSOVER_WORK`
(static, one thread), twice that for dynamic on one thread and for static on more threads, eight
times that for dynamic on more threads, on layers of at least :data:`CROSSOVER_MIN_WEIGHTS` weights
with at least :data:`CROSSOVER_MIN_SIDE` inputs and outputs, on CPUs with VNNI (where it was
measured), when autograd does not record the call. The result is then the int8 one (static inputs on
their calibrated grid, dynamic rows on their own scales: what ``"fbgemm_u8s8"`` computes), where
fewer rows give the weight-only result: a row's output depends, at the int8 rounding level, on
whether its batch reached the crossing (as on large layers, where oneDNN's route takes large calls).
The rule is a function of the layer's shape and mode, the call's row count and the thread setting,
the same in every run on the same machine. Under ``torch.compile`` the layer stays on the
``"float"`` kernel at every size.

Pure torch.
"""

from __future__ import annotations

__all__ = ["CROSSOVER_MAX_ROWS", "CROSSOVER_MIN_SIDE", "CROSSOVER_MIN_WEIGHTS", "CROSSOVER_WORK", "crossover_rows"]

CROSSOVER_WORK = 1 << 21
"""Rows times weights from which a static ``"float"``-kernel layer computes in int8 on one thread."""

CROSSOVER_MIN_WEIGHTS = 1 << 14
"""Smaller layers never switch (100x10 was slower in int8 at every row count up to 512)."""

CROSSOVER_MIN_SIDE = 64
"""... nor layers with fewer inputs or outputs than this (the narrowest side measured was 64)."""


CROSSOVER_MAX_ROWS = 512
"""... and calls of more rows than this stay in float (see the module docstring)."""


def crossover_rows(in_features: int, out_features: int, mode: str, threads: int) -> int | None:
    """The row count from which a ``"float"``-kernel layer computes in int8, or ``None`` for never.

    Only the shape rule (calls of that many rows up to :data:`CROSSOVER_MAX_ROWS`); the caller
    checks the kernel, the CPU and autograd.

    Example:
        >>> crossover_rows(300, 100, "static", 1), crossover_rows(300, 100, "dynamic", 1)
        (70, 140)
        >>> crossover_rows(300, 100, "static", 2), crossover_rows(300, 100, "dynamic", 2)  # 560 > 512 rows
        (140, None)
        >>> crossover_rows(256, 256, "dynamic", 2), crossover_rows(100, 10, "static", 1)
        (256, None)
        >>> crossover_rows(300, 100, "weight_only", 1) is None
        True
    """
    weights = in_features * out_features
    if mode not in ("static", "dynamic") or weights < CROSSOVER_MIN_WEIGHTS:
        return None
    if min(in_features, out_features) < CROSSOVER_MIN_SIDE:
        return None
    # log2 of the work over CROSSOVER_WORK: (static, dynamic) x (one thread, more).
    shift = ((0, 1), (1, 3))[mode == "dynamic"][threads > 1]
    rows = -(-(CROSSOVER_WORK << shift) // weights)
    return rows if rows <= CROSSOVER_MAX_ROWS else None
