"""QuantizeOnFitEnd: turn the trained model into an int8 model when ``trainer.fit`` ends."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_compress._lightning_compat import data_source, loader_at_setup
from lightning_compress.callbacks._base import CompressionCallback
from lightning_compress.callbacks._quantize_calibration import (
    agreement,
    calibration_batches,
    check_call,
    float_pass,
    predict,
)
from lightning_compress.callbacks._quantize_report import (
    check_onnx_path,
    float_layers,
    int8_rows,
    owned_bytes,
    report_metrics,
    summary,
)
from lightning_compress.core.files import file_problem
from lightning_compress.core.quant.agreement import is_poor, layer_errors, poor_agreement_message
from lightning_compress.core.quant.convert import (
    fold_before_conversion,
    int8_layers,
    quantizable_targets,
    quantize_model,
    residual_input_grids,
    shared_output_ranges,
    static_input_modules,
    static_output_modules,
)
from lightning_compress.core.quant.fake import FakeQuantSession
from lightning_compress.core.quant.modules import MODES
from lightning_compress.core.report import compression_report
from lightning_compress.core.selection import DEFAULT_QUANT_TYPES, compression_root
from lightning_compress.core.serialize import save_compressed
from lightning_compress.core.sharding import has_dtensors, unshard_module_
from lightning_compress.errors import CompressionConfigError, check_choice, check_number, check_str_list, config_error

__all__ = ["QuantizeOnFitEnd"]


class QuantizeOnFitEnd(CompressionCallback):
    r"""Convert the selected layers to int8 when fit ends, report the agreement, and save the artifact.

    In ``on_fit_end`` every selected ``Linear`` (Hugging Face ``Conv1D`` and the packed input
    projection of ``nn.MultiheadAttention`` included), ``Conv2d`` (grouped and depthwise included)
    and ``Embedding`` (one scale per row) of the LightningModule, or of the submodule its
    ``compression_submodule`` names, is replaced by an int8 layer: weights stored as ``torch.int8``
    with symmetric float32 scales (a pruned zero stays exactly zero); a tied weight (GPT-2's
    ``lm_head`` and token embedding) stays one int8 tensor. The int8 layers' ``.weight`` reads as a
    float tensor, so model code that casts its inputs to ``weight.dtype`` keeps computing in float.

    The model is called on the calibration batches the way a training step calls it (a tensor, a
    tuple whose first item is the input, a dict as ``model(**batch)`` without ``labels``, or the
    first items of a tuple when ``forward`` requires several; see :mod:`lightning_compress.core.batches`).
    That this call fits ``forward``'s signature is checked when training starts, so a model that
    cannot be driven fails with a ``CompressionConfigError`` before the first step. When the
    agreement is poor (relative error above 0.05 or top-1 agreement under 99 %), a warning names the
    layers with the largest own int8 error and the remedies (report entry ``worst_layers``).
    With ``per_channel=True`` and no QAT, each eval-mode ``BatchNorm2d`` that reads only a selected
    convolution's output is first folded into it (:mod:`~lightning_compress.core.quant.fold`).
    ``trainer.validate(model)`` and ``trainer.test(model)`` afterwards run the int8 model.

    Args:
        mode: ``"dynamic"`` (activations quantized per row at run time, int8 x int8 -> int32
            products), ``"static"`` (the activation scale of each Linear is fixed from
            ``calibration_batches`` training batches with a min/max observer, reduced over all
            processes) or ``"weight_only"`` (int8 storage, float compute). Convolutions compute
            with their dequantized weight in every mode.
        per_channel: one weight scale per output channel; otherwise one per tensor.
        calibration_batches: training batches on which the float and the int8 model are compared
            (and, for ``"static"``, the activation ranges observed), per process.
        include: module type names to convert.
        exclude: ``fnmatch`` globs of module names that stay float (e.g. ``["classifier"]``).
        save_path: if given, rank zero writes the compressed artifact there
            (:func:`~lightning_compress.save_compressed` of the compressed module).
        onnx_path: if given, rank zero also writes the int8 model as ONNX there at fit end
            (:func:`~lightning_compress.export_onnx`, with the first calibration batch as example
            input; needs ``pip install "lightning-compress[export]"``, checked at ``setup``).
        qat_epochs: the last ``qat_epochs`` epochs of the fit train with fake quantization
            (quantization-aware training, :mod:`~lightning_compress.core.quant.fake`): weights on the
            int8 grid (per channel or per tensor as ``per_channel`` says) and, for ``"static"``, each
            static Linear's input with a moving min/max range, which the conversion then uses as its
            input scale. ``quant/qat`` is logged (1 in QAT epochs, 0 before). ``0``: no QAT.
        verbose: ``1`` prints the report on rank zero; ``0`` stays quiet.

    After fit, :attr:`report` is a plain dict: ``layers_converted``, ``layers`` (name -> mode),
    ``kernels`` (name -> how the layer computes here, see :mod:`lightning_compress.core.quant.kernels`;
    for a convolution :mod:`lightning_compress.core.quant.onednn`),
    ``fallbacks``, ``skipped``, ``folded`` (batch norm -> the convolution it was folded into),
    ``weight_bytes_before`` / ``weight_bytes_after`` / ``weight_bytes_ratio`` (the converted layers),
    ``model_bytes_before`` / ``model_bytes_after``,
    ``calibration_batches``, ``relative_error`` (:math:`\lVert y_{int8} - y\rVert_2 / \lVert y\rVert_2`
    over the calibration batches of all processes) and ``top1_agreement``. Its numbers are logged to
    every logger under ``quantize/``.

    Example::

        trainer = Trainer(max_epochs=30, callbacks=[QuantizeOnFitEnd(mode="dynamic", save_path="model.int8.pt")])
        trainer.fit(model, datamodule=dm)   # ends with an int8 model
        trainer.test(model, datamodule=dm)  # int8 accuracy
    """

    IDENTITY = ("mode", "per_channel", "include", "exclude")
    SAVED = (*IDENTITY, "calibration_batches", "save_path", "qat_epochs", "onnx_path")

    def __init__(
        self,
        mode: str = "dynamic",
        *,
        per_channel: bool = True,
        calibration_batches: int = 32,
        include: list[str] = list(DEFAULT_QUANT_TYPES),  # noqa: B006 - never mutated; a list for the CLI
        exclude: list[str] = [],  # noqa: B006
        save_path: str | None = None,
        qat_epochs: int = 0,
        onnx_path: str | None = None,
        verbose: int = 1,
    ) -> None:
        super().__init__(verbose)
        check_choice("mode", mode, MODES)
        if not isinstance(per_channel, bool):
            raise config_error("per_channel", "a bool", per_channel)
        check_number("calibration_batches", calibration_batches, low=1, integer=True)
        self.include = check_str_list("include", include)
        self.exclude = check_str_list("exclude", exclude)
        if save_path is not None and (not isinstance(save_path, str) or not save_path):
            raise config_error("save_path", "a non-empty path string or None", save_path)
        if onnx_path is not None and (not isinstance(onnx_path, str) or not onnx_path):
            raise config_error("onnx_path", "a non-empty path string or None", onnx_path)
        self.onnx_path = onnx_path
        check_number("qat_epochs", qat_epochs, low=0, integer=True)
        self.qat_epochs = qat_epochs
        self._qat: FakeQuantSession | None = None
        self._qat_state: dict[str, Any] = {}
        self.mode = mode
        self.per_channel = per_channel
        self.calibration_batches = calibration_batches
        self.save_path = save_path
        self.report: dict[str, Any] = {}
        self._skip = False
        self._call_checked = False

    @override
    def _setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        problem = file_problem(self.save_path) if self.save_path is not None else None
        if problem is not None:  # found now, not after training
            raise config_error(
                "save_path", "the path of a file that can be written", self.save_path, f"It cannot: {problem}."
            )
        targets, _ = quantizable_targets(pl_module, self.include, self.exclude, allow_empty=True)
        self._skip = False
        if not targets:
            if int8_layers(compression_root(pl_module)[1]):
                self._skip = True
                rank_zero_warn("QuantizeOnFitEnd: the model is already int8; this fit will not convert it again.")
                return
            quantizable_targets(pl_module, self.include, self.exclude)  # raises the selection error
            raise config_error(
                "include",
                "a selection with at least one convertible layer",
                self.include,
                "The selected layers all stay float (see `quantizable_targets`).",
            )
        self._warn_left_out(trainer, pl_module, targets, DEFAULT_QUANT_TYPES, "float")
        self._check_qat_epochs(trainer)
        if self.onnx_path is not None:
            check_onnx_path(self.onnx_path)
        if self.mode == "static":
            source = data_source(trainer, "fit")
            if source is None or not source.is_defined() or trainer.limit_train_batches == 0:
                raise CompressionConfigError(
                    "Expected argument `mode`='static' to come with training batches to calibrate on, but the"
                    " trainer has no train dataloader (or `limit_train_batches=0`). Use mode='dynamic' or"
                    " 'weight_only', or give `fit` a train dataloader."
                )
        # Loaders given to `fit` or made by a data module exist now: check the model call before any
        # training. A loader from the LightningModule's own hook may need its `setup` (which runs after
        # this one): that one is checked at `on_train_start`, still before the first step.
        self._call_checked = check_call(pl_module, loader_at_setup(trainer, "fit"))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._skip:
            return
        if has_dtensors(pl_module.parameters()):  # FSDP2: gather the full weights once, on every rank
            unshard_module_(pl_module)  # then every rank converts the same plain model
        prefix, root = compression_root(pl_module)
        device = trainer.strategy.root_device
        pl_module.to(device)  # the trainer moved it to the CPU in its teardown
        targets, skipped = quantizable_targets(pl_module, self.include, self.exclude)
        weight_before = owned_bytes(*(t.module for t in targets))
        model_before = compression_report(root).bytes

        was_training = root.training
        root.eval()
        batches = calibration_batches(trainer, self.calibration_batches, self.mode)
        qat = self._qat is not None
        folded: dict[str, str] = {}
        if self._qat is not None:  # QAT: the reference is the fake-quantized model, the ranges QAT's own
            self._qat.attach()
            ranges, output_ranges = self._qat.input_ranges(), self._qat.output_ranges()
            float_outputs = float_pass(trainer, root, {}, batches)[2]
            self._stop_qat()
        else:  # after QAT the batch norms stay (the int8 model computes what QAT trained); per tensor too
            folded = fold_before_conversion(pl_module, targets, self.per_channel)
            static = self.mode == "static"
            ranges, output_ranges, float_outputs = float_pass(
                trainer,
                root,
                static_input_modules(pl_module, targets) if static else {},
                batches,
                static_output_modules(pl_module, targets) if static else {},
            )
            if static:  # a convolution that only feeds the next one through a ReLU quantizes once
                output_ranges = shared_output_ranges(pl_module, targets, ranges, output_ranges)
        originals = float_layers(pl_module, targets)
        result = quantize_model(pl_module, targets, self.mode, self.per_channel, ranges, output_ranges)
        if not qat and self.mode == "static":  # residual additions read int8 operands (core/quant/residual.py)
            result.input_grids = residual_input_grids(pl_module)
        agreed = agreement(trainer, root, batches, float_outputs)
        worst: dict[str, float] = {}
        if batches and is_poor(agreed["relative_error"], agreed["top1_agreement"]):
            worst = layer_errors(pl_module, originals, lambda: predict(trainer, root, batches[0]))
            rank_zero_warn(
                poor_agreement_message(
                    "QuantizeOnFitEnd", agreed["relative_error"], agreed["top1_agreement"], worst, qat=qat
                )
            )
        del originals
        root.train(was_training)

        layers = int8_layers(pl_module)
        weight_after = owned_bytes(*(layers[name] for name in result.converted))
        self.report = {
            "mode": self.mode,
            "per_channel": self.per_channel,
            "compressed_module": prefix or "(the LightningModule)",
            "layers_converted": len(result.converted),
            "layers": dict(result.converted),
            # How each int8 layer computes on its current device (core/quant/kernels.py): int8 or, where int8
            # does not pay on this CPU, float from the cached dequantized weight.
            "kernels": {name: str(getattr(layer, "kernel", "dequant")) for name, layer in layers.items()},
            # "float"-kernel Linear layers that compute in int8 from this many rows (at this thread count).
            "int8_from_rows": int8_rows(layers),
            "fallbacks": dict(result.fallbacks),
            "skipped": dict(skipped),
            "folded": folded,
            "input_grids": dict(result.input_grids),
            "weight_bytes_before": weight_before,
            "weight_bytes_after": weight_after,
            "weight_bytes_ratio": weight_after / weight_before if weight_before else float("nan"),
            "model_bytes_before": model_before,
            "model_bytes_after": compression_report(root).bytes,
            **agreed,
            "worst_layers": dict(list(worst.items())[:10]),
            "save_path": self.save_path,
            "qat_epochs": self.qat_epochs,
        }
        if self.save_path is not None:
            if trainer.is_global_zero:
                save_compressed(root, self.save_path)
            trainer.strategy.barrier("QuantizeOnFitEnd.save")
        self._log(trainer)
        pl_module.cpu()
        if self.onnx_path is not None:
            if trainer.is_global_zero and batches:
                from lightning_compress.core.batches import model_call
                from lightning_compress.export.onnx import export_onnx

                export_onnx(root, self.onnx_path, model_call(root, batches[0]).example_inputs())
            trainer.strategy.barrier("QuantizeOnFitEnd.onnx")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The model-call check of ``setup`` for a loader that only the training loop could build."""
        if not self._skip and not self._call_checked:
            check_call(pl_module, trainer.train_dataloader)

    def _log(self, trainer: pl.Trainer) -> None:
        metrics = report_metrics(self.report)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.verbose:
            rank_zero_info(summary(self.report))

    @override
    def _state(self) -> dict[str, Any]:
        qat = self._qat.state() if self._qat is not None else self._qat_state
        return {"report": dict(self.report), "qat": {n: dict(v) for n, v in qat.items()}}

    @override
    def _load_state(self, state: dict[str, Any]) -> None:
        self.report = dict(state.get("report", {}))
        self._qat_state = dict(state.get("qat", {}))
        if self._qat is not None:
            self._qat.load_state(self._qat_state)

    # ------------------------------------------------------------------ quantization-aware training

    def _check_qat_epochs(self, trainer: pl.Trainer) -> None:
        if not self.qat_epochs:
            return
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0 or self.qat_epochs > max_epochs:
            raise CompressionConfigError(
                f"Expected argument `qat_epochs` to be at most the fit's `max_epochs` ({max_epochs}), but got"
                f" {self.qat_epochs}. QAT trains the last `qat_epochs` epochs, so the Trainer needs a finite"
                " `max_epochs` at least that large."
            )

    def _qat_due(self, trainer: pl.Trainer) -> bool:
        start = int(trainer.max_epochs or 0) - self.qat_epochs
        return bool(self.qat_epochs) and not self._skip and trainer.current_epoch >= start

    def _start_qat(self, pl_module: pl.LightningModule) -> None:
        if self._qat is None:
            targets, _ = quantizable_targets(pl_module, self.include, self.exclude)
            layers = {t.name: t.module for t in targets}
            layers.update(static_input_modules(pl_module, targets))
            self._qat = FakeQuantSession(layers, self.mode, self.per_channel)
            self._qat.load_state(self._qat_state)
        self._qat.attach()

    def _stop_qat(self) -> None:
        if self._qat is not None:
            self._qat_state = self._qat.state()
            self._qat.detach()
            self._qat = None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.qat_epochs or self._skip:
            return
        if self._qat_due(trainer):
            self._start_qat(pl_module)
        pl_module.log("quant/qat", 1.0 if self._qat is not None else 0.0, on_step=False, on_epoch=True)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._qat is None and self._qat_due(trainer):  # a resume in the middle of a QAT epoch
            self._start_qat(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._qat is not None and trainer.world_size > 1:  # every rank holds the widest range of any rank
            device = trainer.strategy.root_device
            self._qat.reduce_ranges(lambda t: trainer.strategy.all_gather(t.to(device)))

    @override
    def _release(self) -> None:
        if self._qat is not None:
            self._qat.detach()
            self._qat = None
