"""The pruning room: how many weights to zero and when, which ones, and keeping them zero.

* :mod:`~lightning_compress.core.prune.schedules`: sparsity schedules and the pruning window;
* :mod:`~lightning_compress.core.prune.scores`: the table of scores (how much each weight matters);
* :mod:`~lightning_compress.core.prune.patterns`: the table of mask patterns and tools to rank by score;
* :mod:`~lightning_compress.core.prune.masks`: magnitude, channel and N:M masks (registered in the table);
* :mod:`~lightning_compress.core.prune.keeper`: the mask keeper (no hooks on the forward pass).
"""

from lightning_compress.core.prune import masks as _masks  # noqa: F401  (registers the built-in patterns)
