"""The ``lightning-compress`` command line: a LightningCLI in subclass mode.

``--model`` and ``--data`` take any LightningModule / LightningDataModule class path (the
embedded default is :class:`~lightning_compress.demo.Classifier` on
:class:`~lightning_compress.demo.DigitsDataModule`) and ``--trainer.callbacks+=`` takes the
lightning-compress callbacks by class path.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

__all__ = ["CompressCLI", "main"]


class CompressCLI(LightningCLI):
    """LightningCLI whose model and data default to the digits demo."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": "lightning_compress.demo.Classifier"},
                "data": {"class_path": "lightning_compress.demo.DigitsDataModule"},
            }
        )


def main(args: Sequence[str] | None = None) -> None:
    """Run the command line (the ``lightning-compress`` console script)."""
    CompressCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(args) if args is not None else None,
        auto_configure_optimizers=True,
    )
