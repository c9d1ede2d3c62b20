"""Knowledge distillation as a LightningModule: train a small student from a frozen teacher.

See :mod:`lightning_compress.core.distill` for the losses.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torchmetrics
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from lightning_compress._lightning_compat import given_by_cli
from lightning_compress.core.distill import HintProjection, capture_outputs, distillation_loss, hint_loss
from lightning_compress.core.sharding import is_dtensor
from lightning_compress.distillation._frozen_teacher import FrozenTeacherMixin
from lightning_compress.distillation._helpers import (
    FeaturePair,
    load_teacher_weights,
    probe_batch,
    read_teacher_checkpoint,
    resolve_feature_pairs,
)
from lightning_compress.errors import CompressionConfigError, check_choice, check_number, config_error

__all__ = ["OUTPUT_LOSSES", "DistillationModule"]

OUTPUT_LOSSES: tuple[str, ...] = ("kd", "cosine", "mse")
"""How ``DistillationModule`` matches the outputs: soft targets on logits, or cosine / MSE on embeddings."""


def embedding_loss(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """``"cosine"``: mean ``1 - cos`` over the last dimension; ``"mse"``: the mean squared error."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    return F.mse_loss(student.float(), teacher.float())


class DistillationModule(FrozenTeacherMixin, pl.LightningModule):
    r"""Train ``student`` to match a frozen ``teacher`` (Hinton et al. 2015), optionally with hints (FitNets).

    The student minimizes :math:`\alpha T^2 \mathrm{KL}(\mathrm{softmax}(z_t/T) \| \mathrm{softmax}(z_s/T))
    + (1-\alpha)\,\mathrm{CE}(z_s, y)`, plus ``feature_weight`` times the mean squared error between
    each pair of ``feature_pairs`` (the student's output through a learnable
    :class:`~lightning_compress.core.distill.HintProjection`).

    The teacher is frozen: its parameters do not require gradients, are in no optimizer, it stays in
    eval mode (also after Lightning calls ``.train()``), runs under :func:`torch.no_grad`, is never
    wrapped by DDP, and is **not** part of ``state_dict()``: checkpoints hold the student (and the
    feature projections) only, and the teacher is rebuilt from the constructor arguments (and
    ``teacher_checkpoint``) when a run resumes. It still moves with the module (``.to()``,
    ``.half()``...). Compression callbacks act on the student only (``compression_submodule``).

    Args:
        student: the network to train. ``module.student``.
        teacher: the trained network to learn from, with outputs of the same shape. ``module.teacher``.
        temperature: softening temperature :math:`T > 0`.
        alpha: weight of the soft (KD) term, in ``[0, 1]``; ``1 - alpha`` weighs the cross-entropy.
        teacher_checkpoint: file with the teacher's weights: a Lightning checkpoint (its
            ``state_dict``, with a prefix such as ``model.`` or ``backbone.`` removed automatically)
            or a plain state dict. Loaded in the constructor with ``torch.load(weights_only=True)``.
        num_classes: number of classes, for the accuracy metrics; read from the teacher's output at
            setup when not given.
        lr: learning rate of the default AdamW optimizer (the CLI's ``--optimizer`` replaces it).
        weight_decay: weight decay of the default AdamW optimizer.
        feature_pairs: hints, as ``{"student.<submodule>": "teacher.<submodule>"}`` (the
            ``student.``/``teacher.`` prefixes are optional). Each submodule's output (or the first
            element of a returned tuple) is captured with a forward hook during the step.
        feature_weight: weight of the summed hint losses.
        output_loss: how the student's output is matched to the teacher's: ``"kd"`` (the soft-target
            loss above, for logits), or, for models whose output is an embedding (a sentence encoder
            with no classification head), ``"cosine"`` (mean of :math:`1 - \cos(s, t)` over the batch)
            or ``"mse"``. With an embedding loss no labels are needed (``alpha`` and the cross-entropy
            are unused, batches may be plain input tensors), and validation logs ``val/loss`` (that
            loss against the teacher) and ``val/cosine`` (the mean cosine) instead of accuracies.

    Raises:
        CompressionConfigError: on invalid arguments, feature names that do not exist (with close
            matches), an unreadable or mismatching ``teacher_checkpoint``; at setup, when the teacher
            and student outputs differ in shape.

    Example:
        >>> from lightning_compress.demo import MLP
        >>> module = DistillationModule(MLP(hidden=[32]), MLP(), temperature=4.0, alpha=0.9)
        >>> sorted({key.split(".")[0] for key in module.state_dict()})
        ['student']
    """

    compression_submodule = "student"
    """The submodule that compression callbacks (pruning, regularization, quantization) act on."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        temperature: float = 4.0,
        alpha: float = 0.9,
        teacher_checkpoint: str | None = None,
        num_classes: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        feature_pairs: dict[str, str] | None = None,
        feature_weight: float = 1.0,
        output_loss: str = "kd",
    ) -> None:
        super().__init__()
        for name, value in (("student", student), ("teacher", teacher)):
            if not isinstance(value, nn.Module):
                raise config_error(name, "an nn.Module", type(value).__name__)
        if student is teacher or _shared_parameters(student, teacher):
            raise config_error(
                "teacher",
                "a module that shares no parameters with the student",
                type(teacher).__name__,
                "Freezing the teacher would freeze the student too; pass a copy (copy.deepcopy(model)).",
            )
        check_number("temperature", temperature, low=0.0, low_inclusive=False)
        check_number("alpha", alpha, low=0.0, high=1.0)
        check_number("lr", lr, low=0.0)  # 0 as torch.optim allows: evaluate or freeze the student
        check_number("weight_decay", weight_decay, low=0.0)
        check_number("feature_weight", feature_weight, low=0.0)
        check_choice("output_loss", output_loss, OUTPUT_LOSSES)
        if num_classes is not None:
            check_number("num_classes", num_classes, low=1, integer=True)
        if teacher_checkpoint is not None:
            if not isinstance(teacher_checkpoint, (str, os.PathLike)):
                raise config_error("teacher_checkpoint", "a path or None", teacher_checkpoint)
            teacher_checkpoint = os.fspath(teacher_checkpoint)  # a str in the hyperparameters (weights_only loads)
        # Under LightningCLI the hyperparameters are the config (class paths), which rebuilds both models.
        self.save_hyperparameters(ignore=[] if given_by_cli() else ["student", "teacher"])

        self.student = student
        self.teacher = teacher
        if teacher_checkpoint is not None:
            load_teacher_weights(teacher, read_teacher_checkpoint(teacher_checkpoint), teacher_checkpoint)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.lr = lr
        self.weight_decay = weight_decay
        self.feature_weight = float(feature_weight)
        self.output_loss = output_loss
        self.feature_pairs: list[FeaturePair] = resolve_feature_pairs(feature_pairs, student, teacher)
        self.feature_projections = nn.ModuleDict({p.key: HintProjection() for p in self.feature_pairs})
        self.num_classes = num_classes
        if num_classes is not None:
            self._build_metrics(num_classes)
        self._teacher_val_acc: float | None = None

    @override
    def _teacher_changed(self) -> None:
        self._teacher_val_acc = None

    # ------------------------------------------------------------------ batches and metrics

    def unpack_batch(self, batch: Any) -> tuple[Any, Tensor | None]:
        """Split a batch into the models' input and the labels.

        Override it for other batch layouts, e.g. ``return batch["image"], batch["label"]``. The
        input is passed to both models as is; labels may be ``None`` (unlabelled data) when
        ``alpha == 1``.

        Args:
            batch: what the dataloader yields; by default an ``(x, y)`` pair.

        Returns:
            ``(x, y)``.
        """
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        if isinstance(batch, Tensor) and self.output_loss != "kd":  # an embedding loss needs no labels
            return batch, None
        raise TypeError(
            f"Expected a batch `(x, y)`, but got {type(batch).__name__}"
            f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}. Override"
            " `DistillationModule.unpack_batch` to read other batch layouts."
        )

    def _build_metrics(self, num_classes: int) -> None:
        def accuracy() -> torchmetrics.Metric:
            return torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

        self.num_classes = num_classes
        self.val_acc, self.test_acc = accuracy(), accuracy()
        self.val_teacher_acc, self.test_teacher_acc = accuracy(), accuracy()

    # ------------------------------------------------------------------ setup: shapes, classes, projections

    @override
    def setup(self, stage: str) -> None:
        if stage == "predict":
            return
        batch = self.example_input_array
        with torch.random.fork_rng(devices=[]):  # drawing a batch must not change the random state
            if batch is None:
                x, y = self.unpack_batch(probe_batch(self.trainer, stage))
            else:
                x, y = batch, None
            self._check_shapes(x, y, stage)

    def _check_shapes(self, x: Any, y: Tensor | None, stage: str) -> None:
        device = next(itertools.chain(self.student.parameters(), self.student.buffers()), torch.empty(0)).device
        x = move_data_to_device(x, device)
        modes = {m: m.training for m in self.student.modules()}
        self.student.eval()
        try:
            with torch.no_grad(), capture_outputs(self._feature_modules("teacher")) as t_feats:
                teacher_out = self._teacher_forward(x)
            with torch.no_grad(), capture_outputs(self._feature_modules("student")) as s_feats:
                student_out = self.student(x)
        finally:
            for module, mode in modes.items():
                module.training = mode
        for role, out in (("teacher", teacher_out), ("student", student_out)):
            if not isinstance(out, Tensor) or out.dim() < 2:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise CompressionConfigError(
                    f"Expected the {role} to return logits of shape (N, num_classes, ...), but got {shape}."
                )
        if teacher_out.shape != student_out.shape:
            raise CompressionConfigError(
                f"Expected the teacher and the student to return outputs of the same shape, but got teacher"
                f" {tuple(teacher_out.shape)} and student {tuple(student_out.shape)} on the same batch."
                " Give both the same number of classes."
            )
        if self.output_loss != "kd":  # embeddings: no classes, no labels
            self._configure_features(s_feats, t_feats, device)
            return
        classes = teacher_out.shape[1]
        if self.num_classes is None:
            self._build_metrics(classes)
            self.to(device)
        elif self.num_classes != classes:
            raise config_error("num_classes", f"the teacher's number of outputs ({classes})", self.num_classes)
        if stage == "fit" and y is None and self.alpha != 1 and self.example_input_array is None:
            raise config_error("alpha", "1.0 when batches carry no labels", self.alpha)
        self._configure_features(s_feats, t_feats, device)

    def _configure_features(self, s_feats: dict[str, Tensor], t_feats: dict[str, Tensor], device: torch.device) -> None:
        for pair in self.feature_pairs:
            self._projection(pair.key).configure(s_feats[pair.student].shape, t_feats[pair.teacher].shape)
        self.feature_projections.to(device)

    def _projection(self, key: str) -> HintProjection:
        projection = self.feature_projections[key]
        assert isinstance(projection, HintProjection)  # built in __init__
        return projection

    def _feature_modules(self, role: str) -> dict[str, nn.Module]:
        root = self.student if role == "student" else self.teacher
        names = [p.student if role == "student" else p.teacher for p in self.feature_pairs]
        return {name: root.get_submodule(name) for name in names}

    @override
    def on_fit_start(self) -> None:
        # Every rank distils from the same teacher, even when each built its own (e.g. random) copy.
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            with torch.no_grad():
                for tensor in itertools.chain(self.teacher.parameters(), self.teacher.buffers()):
                    if is_dtensor(tensor):  # FSDP2: each rank holds its own rows of the one sharded teacher
                        continue
                    dist.broadcast(tensor.data, src=0)

    # ------------------------------------------------------------------ steps

    @override
    def forward(self, x: Any) -> Any:
        """The student's output."""
        return self.student(x)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self.unpack_batch(batch)
        with capture_outputs(self._feature_modules("teacher")) as t_feats:
            teacher_logits = self._teacher_forward(x)
        with capture_outputs(self._feature_modules("student")) as s_feats:
            student_logits = self.student(x)
        if self.output_loss != "kd":
            loss = embedding_loss(student_logits, teacher_logits, self.output_loss)
            self.log("distill/embedding_loss", loss)
        else:
            terms = distillation_loss(student_logits, teacher_logits, y, temperature=self.temperature, alpha=self.alpha)
            loss = terms.loss
            self.log("distill/kd_loss", terms.kd)
            if terms.ce is not None:
                self.log("distill/ce_loss", terms.ce)
        if self.feature_pairs:
            hint = torch.stack(
                [hint_loss(self._projection(p.key)(s_feats[p.student]), t_feats[p.teacher]) for p in self.feature_pairs]
            ).sum()
            self.log("distill/feature_loss", hint)
            loss = loss + self.feature_weight * hint
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: Any, stage: str) -> tuple[Any, Tensor] | None:
        """Log ``stage``'s loss and the student's score; the labelled ``(x, y)`` for the teacher's accuracy."""
        x, y = self.unpack_batch(batch)
        logits = self(x)
        on_bar = stage == "val"
        if self.output_loss != "kd":
            teacher = self._teacher_forward(x)
            self.log(f"{stage}/loss", embedding_loss(logits, teacher, self.output_loss))
            cosine = F.cosine_similarity(logits.float(), teacher.float(), dim=-1).mean()
            self.log(f"{stage}/cosine", cosine, prog_bar=on_bar)
            return None
        if y is None:
            return None
        self.log(f"{stage}/loss", F.cross_entropy(logits, y))
        accuracy = self.val_acc if stage == "val" else self.test_acc
        accuracy(logits, y)
        self.log(f"{stage}/acc", accuracy, prog_bar=on_bar)
        return x, y

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        labelled = self._evaluate(batch, "val")
        if labelled is not None and self._teacher_val_acc is None and not self.trainer.sanity_checking:
            self.val_teacher_acc.update(self._teacher_forward(labelled[0]), labelled[1])

    @override
    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self.output_loss != "kd":
            return
        if self._teacher_val_acc is None and self.val_teacher_acc.update_called:
            self._teacher_val_acc = float(self.val_teacher_acc.compute())  # synced across processes
            self.val_teacher_acc.reset()
        if self._teacher_val_acc is not None:
            self.log("val/teacher_acc", self._teacher_val_acc, sync_dist=False)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        labelled = self._evaluate(batch, "test")
        if labelled is not None:
            self.test_teacher_acc(self._teacher_forward(labelled[0]), labelled[1])
            self.log("test/teacher_acc", self.test_teacher_acc)

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = self.unpack_batch(batch)[0] if isinstance(batch, (tuple, list)) else batch
        return self(x) if self.output_loss != "kd" else self(x).argmax(1)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the student and the feature projections (the teacher is never optimized)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


def _shared_parameters(a: nn.Module, b: nn.Module) -> bool:
    ids = {id(p) for p in a.parameters()}
    return any(id(p) in ids for p in b.parameters())
