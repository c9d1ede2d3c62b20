"""``CompressTrainer.compress``: train dense, compress, validate both, and report the difference."""

from __future__ import annotations

import copy
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Literal

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_compress.__about__ import __version__
from lightning_compress._warnings import lightning_info_filtered, quiet_known_warnings
from lightning_compress.core.batches import (
    batch_size,
    batch_to,
    call_model,
    check_model_call,
    first_loader,
    first_tensor,
)
from lightning_compress.core.files import atomic_write_text, folder_problem
from lightning_compress.core.selection import compression_root
from lightning_compress.errors import CompressionConfigError, check_choice, check_number, config_error

# Their old home: the recipe defaults and PipelineData are imported from here (explicit re-exports, not in
# __all__: they belong to pipeline/defaults.py).
from lightning_compress.pipeline.defaults import DEFAULT_CALLBACKS as DEFAULT_CALLBACKS
from lightning_compress.pipeline.defaults import DEFAULT_COMPRESS_EPOCHS as DEFAULT_COMPRESS_EPOCHS
from lightning_compress.pipeline.defaults import PipelineData as PipelineData
from lightning_compress.pipeline.defaults import _in_memory_data
from lightning_compress.pipeline.defaults import default_callbacks as default_callbacks
from lightning_compress.pipeline.figure import MATPLOTLIB_HINT, matplotlib_available, write_figure
from lightning_compress.pipeline.measure import measure, measure_latencies
from lightning_compress.pipeline.onnx_timing import onnxruntime_runners
from lightning_compress.pipeline.result import INCOMPLETE_MARKER, ComparisonResult, file_record

__all__ = ["CompressTrainer"]

log = logging.getLogger(__name__)

# Arguments that belong to one fit only: the dense phase gets its own.
_PHASE_ARGUMENTS = frozenset(
    {"callbacks", "logger", "enable_checkpointing", "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time"}
)
_COMPRESSION_CALLBACKS = (
    "lightning_compress.callbacks.pruning.PruningCallback",
    "lightning_compress.callbacks.regularizer.SparseRegularizer",
    "lightning_compress.callbacks.quantize.QuantizeOnFitEnd",
)


def _class_path(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


class CompressTrainer(pl.Trainer):
    """A :class:`~lightning.pytorch.trainer.trainer.Trainer` with one more verb: :meth:`compress`.

    It takes exactly the arguments of ``Trainer`` (and is one: ``fit``, ``validate``, ``test`` and
    ``predict`` work as usual). The ``lightning-compress`` command line uses it for all subcommands.

    Example::

        trainer = CompressTrainer(max_epochs=30, callbacks=default_callbacks())
        result = trainer.compress(Classifier(), DigitsDataModule(), dense_epochs=30)
        print(result.table())
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sibling_kwargs = {k: v for k, v in kwargs.items() if k not in _PHASE_ARGUMENTS}
        for key in ("strategy", "profiler", "plugins"):  # live objects belong to this trainer alone
            if key in self._sibling_kwargs and not isinstance(self._sibling_kwargs[key], (str, type(None))):
                del self._sibling_kwargs[key]

    def _sibling(self, **overrides: Any) -> pl.Trainer:
        """A plain Trainer on the same hardware, precision and batch limits, without logger or callbacks."""
        kwargs = {**self._sibling_kwargs, "logger": False, "enable_checkpointing": False, "callbacks": []}
        return pl.Trainer(**{**kwargs, **overrides})

    def compress(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        *,
        dense_epochs: int = 30,
        run_dir: str | None = None,
        stage: Literal["test", "validate"] = "test",
        metric: str | None = None,
        latency_repeats: int = 50,
        figure: bool = True,
    ) -> ComparisonResult:
        """Train the model dense, compress it with this trainer's callbacks, then compare the two.

        1. A plain trainer (same hardware, precision and batch limits; no callbacks, no logger) fits
           the model for ``dense_epochs`` epochs (``0``: the model comes trained) and evaluates it.
        2. This trainer fits it again with its callbacks, which compress it (with the command line's
           defaults: pruning to 90 % with an L1 penalty, then int8), and evaluates it.
        3. Both are measured: accuracy, nonzero parameters, weight bytes, artifact size on disk and
           CPU latency per batch. The run folder gets ``original.pt`` and ``compressed.pt``
           (:func:`~lightning_compress.save_compressed` of the compressed submodule, checked to
           reload into the same outputs), ``report.json``, ``report.txt`` and ``report.png``.

        Args:
            model: the LightningModule; its ``compression_submodule`` (if any) is what is measured.
            datamodule: the data.
            dense_epochs: epochs of dense training before compression.
            run_dir: folder for the artifacts and the report; the logger's folder by default
                (``lightning_logs/version_N``), or ``default_root_dir`` without a logger.
            stage: ``"test"`` or ``"validate"``: which loop measures the accuracy.
            metric: the logged metric to compare; ``test/acc`` (or ``val/acc``) by default. A metric
                named here must be logged by the model; the default may be absent when the model logs
                no metric at all in ``stage`` (``BoringModel``): the report then compares sizes and
                latency, its accuracy row says "not logged", and a warning says so.
            latency_repeats: timed forward passes per model (the median is reported).
            figure: draw ``report.png`` (needs matplotlib; without it a message says how to get it).

        Returns:
            The :class:`~lightning_compress.pipeline.ComparisonResult`; ``str(result)`` is the table.
        """
        check_number("dense_epochs", dense_epochs, low=0, integer=True)
        check_choice("stage", stage, ("test", "validate"))
        metric_named = metric is not None
        metric = metric if metric is not None else ("test/acc" if stage == "test" else "val/acc")
        if not isinstance(metric, str) or not metric:
            raise config_error("metric", "the name of a logged metric such as 'test/acc'", metric)
        check_number("latency_repeats", latency_repeats, low=1, integer=True)
        if self.world_size > 1:
            raise config_error(
                "trainer.devices",
                "a single device (compress compares two models in one process)",
                self.num_devices * self.num_nodes,
                "Use `fit` to train on several devices, then `compress --dense_epochs 0` from the checkpoint.",
            )
        if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
            raise config_error("run_dir", "the path of a folder", run_dir)
        self._check_run_folder(run_dir)
        in_memory = _in_memory_data(datamodule)
        log.debug("compress: %s in_memory_data=%s", type(datamodule).__name__, in_memory)
        with quiet_known_warnings(in_memory_data=in_memory):
            return self._compress(
                model, datamodule, dense_epochs, run_dir, stage, (metric, metric_named), latency_repeats, figure
            )

    def _run_folder(self, run_dir: str | os.PathLike[str] | None) -> Path:
        return Path(run_dir if run_dir is not None else (self.log_dir or self.default_root_dir))

    def _check_run_folder(self, run_dir: str | os.PathLike[str] | None) -> None:
        """Before any training: the run folder can be written, and no saved config of an earlier run is in the way."""
        folder = self._run_folder(run_dir)
        problem = folder_problem(folder)
        if problem is not None:
            raise config_error(
                "run_dir" if run_dir is not None else "trainer.default_root_dir",
                "a folder that can be created and written to",
                os.fspath(folder),
                f"It cannot: {problem}.",
            )
        for callback in self.callbacks:  # type: ignore[attr-defined]
            # LightningCLI's SaveConfigCallback refuses, at the setup of the compression fit (after the dense
            # training), to overwrite the config.yaml of an earlier run in the same log folder.
            name, overwrite = getattr(callback, "config_filename", None), getattr(callback, "overwrite", True)
            if type(callback).__name__ != "SaveConfigCallback" or overwrite or not isinstance(name, str):
                continue
            log_dir = self.log_dir or self.default_root_dir
            if (Path(log_dir) / name).is_file():
                raise CompressionConfigError(
                    f"Expected the log folder {os.fspath(log_dir)!r} to hold no {name} of an earlier run, but it"
                    f" does, and Lightning's SaveConfigCallback would refuse to overwrite it after the dense"
                    f" training. Give `--trainer.default_root_dir` a new folder, keep a logger (each run gets its"
                    f" own version_N), or delete {name}."
                )
        if (folder / "report.json").exists():
            # An earlier run's report: until this run's report replaces it, the folder is not one run.
            _mark_incomplete(folder)

    def _compress(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None,
        dense_epochs: int,
        run_dir: str | None,
        stage: str,
        metric_and_named: tuple[str, bool],
        latency_repeats: int,
        figure: bool,
    ) -> ComparisonResult:
        metric, named = metric_and_named
        callbacks: list[Callback] = self.callbacks  # type: ignore[attr-defined]
        compressing = [c for c in callbacks if _class_path(c) in _COMPRESSION_CALLBACKS]
        if not compressing:
            rank_zero_warn(
                "CompressTrainer.compress: the trainer has none of PruningCallback, SparseRegularizer or"
                " QuantizeOnFitEnd among its callbacks, so unless a callback of your own compresses the model"
                " the two models compared will be alike."
            )
        # Written to after the compression fit, so that the logger finds its folder empty when it starts.
        folder = self._run_folder(run_dir)
        seconds: dict[str, float] = {}
        start = time.perf_counter()

        # Before any training: the metric exists and a batch is at hand (one evaluation batch).
        with lightning_info_filtered(drop_all=True):
            probe = self._sibling(
                **{
                    ("limit_test_batches" if stage == "test" else "limit_val_batches"): 1,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                }
            )
            measured = _evaluate(probe, stage, model, datamodule, metric, required=named) is not None
            inputs = _first_input(probe, stage, compression_root(model)[1])

        dense = self._sibling(max_epochs=max(dense_epochs, 1))
        if dense_epochs:
            rank_zero_info(f"lightning-compress: [1/3] training the dense model for {dense_epochs} epochs")
            dense.fit(model, datamodule=datamodule)
        if not measured:
            rank_zero_warn(
                f"CompressTrainer.compress: {type(model).__name__} logs no metric in `{stage}`, so the report compares"
                f" sizes and latency without accuracy. Log {metric!r} in its `{stage}_step` (self.log), or name a"
                " logged metric with `metric`."
            )
        original_accuracy = _evaluate(dense, stage, model, datamodule, metric, required=measured)
        _, root = compression_root(model)
        original = copy.deepcopy(root).cpu()
        seconds["dense"] = time.perf_counter() - start

        names = ", ".join(type(c).__name__ for c in compressing) or "its callbacks"
        length = f"{self.max_steps} steps" if self.max_steps != -1 else f"{self.max_epochs} epochs"
        rank_zero_info(f"lightning-compress: [2/3] compressing with {names} for {length}")
        start = time.perf_counter()
        self.fit(model, datamodule=datamodule)
        compressed_accuracy = _evaluate(self, stage, model, datamodule, metric, required=measured)
        _, root = compression_root(model)
        compressed = root.cpu()
        seconds["compress"] = time.perf_counter() - start

        rank_zero_info("lightning-compress: [3/3] measuring both models")
        start = time.perf_counter()
        from lightning_compress.core.serialize import load_compressed, save_compressed

        folder.mkdir(parents=True, exist_ok=True)
        _mark_incomplete(folder)
        files = {"original": str(folder / "original.pt"), "compressed": str(folder / "compressed.pt")}
        save_compressed(original, files["original"])
        save_compressed(compressed, files["compressed"])
        restored = load_compressed(files["compressed"], copy.deepcopy(original))
        roundtrip_error = _max_output_difference(compressed, restored, inputs)
        latencies = measure_latencies([original, compressed], inputs, repeats=latency_repeats)
        # The two ONNX Runtime sessions in turns with each other, after the PyTorch models and not among
        # them: ONNX Runtime's worker threads spin for a while after each run, which slowed the PyTorch call
        # timed next (the compressed model measured 1.18-1.22x the original there, against 0.97-1.05x alone).
        runners = onnxruntime_runners(folder, {"original": original, "compressed": compressed}, inputs, files)
        ort_latencies: list[float | None] = [None, None]
        if runners:
            ort_latencies = list(measure_latencies([], inputs, repeats=latency_repeats, runners=runners))
        seconds["measure"] = time.perf_counter() - start
        log.debug("compress: seconds per phase %s", seconds)
        settings = {
            "dense_epochs": dense_epochs,
            "compress_epochs": self.max_epochs,
            "compress_steps": self.max_steps,
            "stage": stage,
            "callbacks": [_class_path(c) for c in callbacks if not _class_path(c).startswith("lightning.")],
            "batch_size": batch_size(inputs),
            "latency_repeats": latency_repeats,
            "torch_threads": torch.get_num_threads(),
            "artifact_roundtrip_max_abs_diff": roundtrip_error,
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "versions": {
                "lightning_compress": __version__,
                "torch": torch.__version__,
                "lightning": lightning.__version__,
                "python": platform.python_version(),
            },
            "machine": platform.machine(),
        }
        files.update(report_json=str(folder / "report.json"), report_txt=str(folder / "report.txt"))
        if figure and matplotlib_available():
            files["figure"] = str(folder / "report.png")
        result = ComparisonResult(
            metric=metric,
            original=measure(original, original_accuracy, files["original"], latencies[0], ort_latencies[0]),
            compressed=measure(compressed, compressed_accuracy, files["compressed"], latencies[1], ort_latencies[1]),
            settings=settings,
            files=files,
            artifacts={role: file_record(files[role]) for role in ("original", "compressed")},
        )
        atomic_write_text(files["report_txt"], result.table() + "\n")
        if "figure" in files:
            write_figure(result, files["figure"])
        elif figure:
            rank_zero_info(f"lightning-compress: no report.png: {MATPLOTLIB_HINT}")
        result.write_json(files["report_json"])  # last: it names the sizes and digests of the artifacts
        (folder / INCOMPLETE_MARKER).unlink(missing_ok=True)
        if roundtrip_error:
            rank_zero_warn(
                f"The artifact {files['compressed']} reloads with outputs that differ from the compressed model's"
                f" by up to {roundtrip_error:.3g}."
            )
        rank_zero_info(f"\n{result.table()}\n\nRun folder: {os.fspath(folder)}")
        return result


def _mark_incomplete(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        folder / INCOMPLETE_MARKER,
        f"A lightning-compress `compress` run started here at {time.strftime('%Y-%m-%d %H:%M:%S')} and has not"
        " finished: the files in this folder may come from different runs. report.json, written last, names the"
        " size and SHA-256 digest of each artifact of a finished run; this file is removed after it.\n",
    )


def _evaluate(
    trainer: pl.Trainer,
    stage: str,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    metric: str,
    *,
    required: bool = True,
) -> float | None:
    """``metric`` after one evaluation loop; ``None`` (when not ``required``) for a model that logs nothing there."""
    loop = trainer.test if stage == "test" else trainer.validate
    results = loop(model, datamodule=datamodule, verbose=False)
    for metrics in results:
        if metric in metrics:
            return float(metrics[metric])
    logged = sorted({k for metrics in results for k in metrics})
    if not logged and not required:
        return None
    raise config_error(
        "metric",
        f"one of the metrics that {type(model).__name__} logs in `{stage}` ({', '.join(map(repr, logged)) or 'none'})",
        metric,
    )


def _first_input(trainer: pl.Trainer, stage: str, root: torch.nn.Module) -> Any:
    """One evaluation batch (on the CPU) to time the models on, checked against ``root``'s ``forward`` now."""
    loader = first_loader(trainer.test_dataloaders if stage == "test" else trainer.val_dataloaders)
    if loader is None:
        raise CompressionConfigError(
            f"Expected the model or data module to provide a {stage} dataloader, but got none."
        )
    batch = batch_to(next(iter(loader)), "cpu")
    check_model_call(root, batch, "compress")
    return batch


@torch.inference_mode()
def _max_output_difference(a: torch.nn.Module, b: torch.nn.Module, inputs: Any) -> float | None:
    """Largest absolute difference of the two models' outputs on ``inputs``; ``None`` for non-tensor outputs."""
    modes = a.training, b.training
    a.eval()
    b.eval()
    try:
        out_a, out_b = first_tensor(call_model(a, inputs)), first_tensor(call_model(b, inputs))
    finally:
        a.train(modes[0])
        b.train(modes[1])
    if out_a is None or out_b is None:
        return None
    return float((out_a.float() - out_b.float()).abs().max()) if out_a.numel() else 0.0
