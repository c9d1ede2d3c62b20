"""Knowledge distillation: :class:`DistillationModule` (a LightningModule) and its helpers.

The losses themselves are pure torch, in :mod:`lightning_compress.core.distill`.
"""

from lightning_compress.distillation.module import DistillationModule

__all__ = ["DistillationModule"]
