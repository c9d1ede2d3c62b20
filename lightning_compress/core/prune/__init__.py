"""The pruning room: how many weights to zero and when, which ones, and keeping them zero.

* :mod:`~lightning_compress.core.prune.schedules`: sparsity schedules and the pruning window;
* :mod:`~lightning_compress.core.prune.masks`: magnitude, channel and N:M masks;
* :mod:`~lightning_compress.core.prune.keeper`: the mask keeper (no hooks on the forward pass).
"""
