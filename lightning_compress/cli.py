"""The ``lightning-compress`` command line: a LightningCLI in subclass mode, plus ``compress``.

``--model`` and ``--data`` take any LightningModule / LightningDataModule class path (the
embedded default is :class:`~lightning_compress.demo.Classifier` on
:class:`~lightning_compress.demo.DigitsDataModule`) and ``--trainer.callbacks+=`` takes the
lightning-compress callbacks by class path. Besides ``fit``, ``validate``, ``test`` and ``predict``,
``compress`` runs :meth:`~lightning_compress.pipeline.CompressTrainer.compress`: train dense,
compress, validate both and print one comparison table.

A mistake in the arguments or the configuration (a :class:`~lightning_compress.CompressionConfigError`,
a Lightning misconfiguration, a missing optional dependency) ends the command with a one-line
``error:`` message and exit status 2, without a stack trace.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_compress._warnings import quiet_known_warnings
from lightning_compress.errors import CompressionConfigError
from lightning_compress.pipeline.trainer import DEFAULT_CALLBACKS, DEFAULT_COMPRESS_EPOCHS, CompressTrainer

__all__ = ["COMPRESS_DEFAULTS", "CompressCLI", "main"]

COMPRESS_DEFAULTS: dict[str, Any] = {
    "max_epochs": DEFAULT_COMPRESS_EPOCHS,
    "log_every_n_steps": 5,
    "callbacks": [dict(c) for c in DEFAULT_CALLBACKS],
}
"""Trainer settings that ``compress`` fills in when they are not given (the callbacks only when none
are given at all; add yours with ``--trainer.callbacks+=`` to replace them)."""


class CompressCLI(LightningCLI):
    """LightningCLI whose model and data default to the digits demo, with a ``compress`` subcommand.

    The trainer class defaults to :class:`~lightning_compress.pipeline.CompressTrainer` (a ``Trainer``
    with a ``compress`` method), and the seed to 0 so that runs repeat.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_class", CompressTrainer)
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(*args, **kwargs)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "compress": {"model", "datamodule"}}

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": "lightning_compress.demo.Classifier"},
                "data": {"class_path": "lightning_compress.demo.DigitsDataModule"},
            }
        )

    @override
    def before_instantiate_classes(self) -> None:
        if self.subcommand != "compress":
            return
        trainer = self.config["compress"]["trainer"]
        given: dict[str, Any] = {}
        if trainer.get("max_epochs") is None and trainer.get("max_steps") in (None, -1):
            given["max_epochs"] = COMPRESS_DEFAULTS["max_epochs"]
        if trainer.get("log_every_n_steps") is None:
            given["log_every_n_steps"] = COMPRESS_DEFAULTS["log_every_n_steps"]
        if not trainer.get("callbacks"):
            given["callbacks"] = COMPRESS_DEFAULTS["callbacks"]
        if given:
            # Parsed like user input, so the saved config.yaml lists them in full and reloads.
            self.config = self.parser.parse_object({"compress": {"trainer": given}}, self.config)


_USER_ERRORS = (CompressionConfigError, MisconfigurationException, ImportError)


def _user_error(err: BaseException) -> BaseException | None:
    """The user mistake behind ``err``, if any (jsonargparse wraps errors raised by constructors)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, _USER_ERRORS):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(args: Sequence[str] | None = None) -> None:
    """Run the command line (the ``lightning-compress`` console script and ``python -m lightning_compress``).

    Args:
        args: the arguments; ``sys.argv[1:]`` when ``None``.

    Raises:
        SystemExit: with status 2 and a one-line ``error:`` message on standard error for a user
            mistake (bad arguments, configuration or a missing optional dependency).
    """
    with quiet_known_warnings():
        try:
            CompressCLI(
                pl.LightningModule,
                pl.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=list(args) if args is not None else None,
                auto_configure_optimizers=True,
            )
        except Exception as err:
            mistake = _user_error(err)
            if mistake is None:
                raise
            print(f"lightning-compress: error: {_one_line(mistake)}", file=sys.stderr)
            raise SystemExit(2) from None
