"""The base of every lightning-compress callback: identity, versioned state, ``verbose``, release.

A callback subclasses :class:`CompressionCallback` and says what is its own:

* ``IDENTITY``: the names of the arguments that tell two instances apart in one checkpoint (they
  build ``state_key``, as Lightning's ``EarlyStopping`` does; ``_identity()`` reads them);
* ``SAVED``: the names of the arguments saved with the state and compared on resume
  (``_arguments()`` reads them; usually the identity and more: ``SAVED = (*IDENTITY, ...)``);
* ``_setup_fit(trainer, pl_module)``: its checks before a fit (``setup`` has already refused the
  strategies no callback supports);
* ``_state()`` / ``_load_state(state)``: its own resumable state (plain, picklable values: numbers,
  strings, CPU tensors), and ``_release()``: drop every reference to the model and every hook.

**Versioned state, one policy.** ``state_dict()`` returns ``{"version": STATE_VERSION,
"arguments": {...}, **_state()}``. ``load_state_dict`` accepts only the versions this release
reads (:attr:`CompressionCallback.READS_VERSIONS`) and raises a
:class:`~lightning_compress.CompressionConfigError` for any other, naming both. Why raise rather
than warn and start over: the promise of these callbacks is that a resumed run ends with the same
masks and weights as an uninterrupted one; silently restarting a schedule (or dropping masks)
would hand the user a different model with no error. The message says what to do instead (resume
with the release that wrote the checkpoint, or load only the model weights and start a new fit).

**Arguments on resume.** When the saved arguments differ from the current ones, one warning
(rank zero) lists every difference; the run goes on with the current arguments, which is what a
user who changed them meant.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_compress.callbacks._selection import warn_left_out
from lightning_compress.callbacks._strategies import check_strategy
from lightning_compress.core.selection import DEFAULT_PRUNE_TYPES, Target, select_targets
from lightning_compress.errors import CompressionConfigError, check_verbose

__all__ = ["CompressionCallback"]

log = logging.getLogger(__name__)


class CompressionCallback(Callback):
    """Common base of ``PruningCallback``, ``SparseRegularizer`` and ``QuantizeOnFitEnd``."""

    STATE_VERSION: ClassVar[int] = 1
    """The version ``state_dict`` writes."""

    READS_VERSIONS: ClassVar[tuple[int, ...]] = (1,)
    """The versions ``load_state_dict`` reads."""

    VERBOSE_LEVELS: ClassVar[int] = 1
    """The highest ``verbose`` level the callback knows (0 is always silent)."""

    IDENTITY: ClassVar[tuple[str, ...]] = ()
    """The arguments (attribute names) that identify an instance among others of its class in one checkpoint."""

    SAVED: ClassVar[tuple[str, ...]] = ()
    """The arguments (attribute names) saved with the state and compared when a run resumes."""

    include: list[str]
    """Module type names the callback selects (every subclass sets it from its argument)."""

    exclude: list[str]
    """``fnmatch`` globs of module names left out of the selection."""

    def __init__(self, verbose: int = 1) -> None:
        super().__init__()
        check_verbose(verbose, self.VERBOSE_LEVELS)
        self.verbose = verbose
        self._key_cache: tuple[tuple[Any, ...] | None, str] = (None, "")

    # ------------------------------------------------------------------ what a subclass says

    def _identity(self) -> dict[str, Any]:
        """The arguments that identify this instance among others of its class in one checkpoint."""
        return {name: getattr(self, name) for name in self.IDENTITY}

    def _arguments(self) -> dict[str, Any]:
        """The arguments saved with the state and compared when a run resumes."""
        return {name: getattr(self, name) for name in self.SAVED}

    def _setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The checks before a fit that need the Trainer (the strategy has been checked)."""

    def _state(self) -> dict[str, Any]:
        """The resumable state, beside ``version`` and ``arguments``."""
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_state` returned (the version has been checked)."""

    def _release(self) -> None:
        """Drop every reference to the model and every hook (teardown, exceptions, a second fit)."""

    # ------------------------------------------------------------------ shared by the subclasses

    def _warn_left_out(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        targets: Sequence[Target] | None = None,
        default: Sequence[str] = DEFAULT_PRUNE_TYPES,
        left_as: str = "dense",
    ) -> None:
        """Warn once when the default ``include`` leaves much of the model out (see ``warn_left_out``).

        ``targets=None``: select them now, unless the module has no parameters yet (layers made in
        ``configure_model`` are checked when they exist).
        """
        if targets is None:
            if not any(True for _ in pl_module.parameters()):
                return
            targets = select_targets(pl_module, self.include, self.exclude)
        name = type(self).__name__
        warn_left_out(trainer, pl_module, targets, self.include, self.exclude, default, name, left_as)

    # ------------------------------------------------------------------ Lightning's interface

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)  # FSDP1 and DeepSpeed are refused before training
        self._setup_fit(trainer, pl_module)

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads the key around every hook call, so it is built once per distinct identity.
        identity = self._identity()
        frozen = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in identity.items())
        if frozen != self._key_cache[0]:
            self._key_cache = (frozen, self._generate_state_key(**identity))
        return self._key_cache[1]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": self.STATE_VERSION, "arguments": self._arguments(), **self._state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        name = type(self).__name__
        if not isinstance(state_dict, dict):
            raise CompressionConfigError(
                f"Expected the {name} state in the checkpoint to be a dict, but got {type(state_dict).__name__}."
            )
        version = state_dict.get("version")
        if version not in self.READS_VERSIONS:
            readable = ", ".join(str(v) for v in self.READS_VERSIONS)
            raise CompressionConfigError(
                f"Expected a {name} state of version {readable}, but got version {version!r}. This release cannot"
                " resume it exactly: resume with the release that wrote the checkpoint, or load only the model"
                " weights (`model.load_state_dict(torch.load(ckpt)['state_dict'])`) and start a new fit."
            )
        saved = state_dict.get("arguments", state_dict)  # 0.1 states kept some arguments at the top level
        if isinstance(saved, dict):
            self._warn_changed_arguments(saved)
        self._load_state(state_dict)

    def _warn_changed_arguments(self, saved: dict[str, Any]) -> None:
        current = self._arguments()
        changed = [
            f"{key}={current[key]!r} (checkpoint: {saved[key]!r})"
            for key in current
            if key in saved and _differs(saved[key], current[key])
        ]
        if changed:
            rank_zero_warn(f"{type(self).__name__}: resuming with different arguments: {', '.join(changed)}.")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()
        if isinstance(exception, CompressionConfigError) and trainer.global_step == 0:
            _remove_empty_log_dirs(trainer)


def _remove_empty_log_dirs(trainer: pl.Trainer) -> None:
    """Remove the logger folders a refused fit left empty (``lightning_logs/version_N``).

    Lightning creates them before any callback's ``setup`` runs, so a run that a callback refuses
    before its first step would otherwise leave an empty ``version_N`` behind, and the next run would
    be ``version_N+1``. Only empty folders are removed (``os.rmdir`` refuses any other), on rank zero.
    """
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        folder = getattr(logger, "log_dir", None)
        if not isinstance(folder, (str, os.PathLike)):
            continue
        with contextlib.suppress(OSError):
            os.rmdir(folder)
            log.debug("removed the empty logger folder %s of a refused fit", folder)


def _differs(saved: Any, current: Any) -> bool:
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        return list(saved) != list(current)
    return bool(saved != current)
