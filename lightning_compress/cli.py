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

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
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
        argv = kwargs.get("args")
        self._given = _classes_given(list(argv) if isinstance(argv, (list, tuple)) else sys.argv[1:])
        super().__init__(*args, **kwargs)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "compress": {"model", "datamodule"}}

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The demo is the default only where the user names no class: jsonargparse would otherwise
        # carry the demo's init_args that the user's class also accepts (its `num_classes=10`,
        # `weight_decay=0.0`) into it, in place of that class's own defaults (jsonargparse#460).
        defaults = {
            key: {"class_path": class_path} for key, class_path in _DEMO_CLASSES.items() if key not in self._given
        }
        if defaults:
            parser.set_defaults(defaults)

    @override
    def before_instantiate_classes(self) -> None:
        self._keep_the_models_own_loaders()
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

    def _keep_the_models_own_loaders(self) -> None:
        """No demo data for a named model that brings its own loaders (``BoringModel``), as in plain LightningCLI.

        The demo data is injected only where the user names no data and the model has no loader of its
        own for the subcommand's stage (``train_dataloader`` for ``fit`` and ``compress``).
        """
        if "data" in self._given:
            return
        config = self.config[self.subcommand] if self.subcommand else self.config
        model, data = config.get("model"), config.get("data")
        class_path = model.get("class_path") if model is not None else None
        if data is None or not isinstance(class_path, str) or class_path == _DEMO_CLASSES["model"]:
            return
        model_class = _import_class(class_path)
        hook = _LOADER_OF_STAGE.get(self.subcommand or "fit", "train_dataloader")
        if model_class is not None and getattr(model_class, hook, None) is not getattr(pl.LightningModule, hook):
            config["data"] = None


_DEMO_CLASSES = {"model": "lightning_compress.demo.Classifier", "data": "lightning_compress.demo.DigitsDataModule"}

_LOADER_OF_STAGE = {
    "fit": "train_dataloader",
    "compress": "train_dataloader",
    "validate": "val_dataloader",
    "test": "test_dataloader",
    "predict": "predict_dataloader",
}
"""The loader a model must bring for each subcommand to run without data."""


def _import_class(class_path: str) -> type | None:
    module_name, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None  # jsonargparse has resolved the class already; nothing to decide without it
    return found if isinstance(found, type) else None


def _classes_given(argv: Sequence[str]) -> set[str]:
    """Which of ``model`` / ``data`` the arguments or their config files name a class for."""
    given: set[str] = set()
    configs: list[str] = []
    for i, arg in enumerate(argv):
        name, has_value, value = arg.partition("=")
        following = argv[i + 1] if i + 1 < len(argv) else None
        for key in _DEMO_CLASSES:
            if name in (f"--{key}", f"--{key}.class_path"):
                given.add(key)
        if name in ("--config", "-c"):
            path = value if has_value else following
            if path is not None:
                configs.append(path)
    for path in configs:
        given |= _classes_in_config(path)
    return given


def _classes_in_config(path: str) -> set[str]:
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return set()  # jsonargparse reports an unreadable config itself
    if not isinstance(config, dict):
        return set()
    # A subcommand's config has `model:` at the top; a config before the subcommand nests it.
    sections = [config, *(v for v in config.values() if isinstance(v, dict))]
    return {
        key
        for key in _DEMO_CLASSES
        for section in sections
        if isinstance(section.get(key), str) or (isinstance(section.get(key), dict) and "class_path" in section[key])
    }


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
                None,  # `--data` is optional, as in plain LightningCLI: a model may bring its own loaders
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
