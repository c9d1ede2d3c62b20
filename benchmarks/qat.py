"""Quantization-aware training vs post-training int8 on the digits MLP and CNN, 3 seeds, side by side.

For each model and seed one float run trains ``--epochs`` epochs (``Classifier`` over
``DigitsDataModule``, Adam); a checkpoint is taken after epoch ``epochs - qat_epochs``. Then, for each
int8 configuration (static per channel, static per tensor, weight-only per channel):

* **PTQ**: a copy of the finished float model is converted as ``QuantizeOnFitEnd`` does without QAT
  (min/max observers on ``--calibration-batches`` training batches for ``static``, ``quantize``);
* **QAT**: the fit is resumed from the checkpoint with ``QuantizeOnFitEnd(mode, per_channel=...,
  qat_epochs=Q)``, so the last ``Q`` epochs train with fake quantization and the callback converts.

So float, PTQ and QAT share their first ``epochs - Q`` epochs exactly and use the same number of
training steps. Accuracies are on the digits test set (269 images: one image is 0.37 pt), computed
with the int8 layers on the ``int_mm`` kernel (``use_kernel("int_mm")``: the int8 grid itself, what
CUDA runs). On the CPU, Linear layers with fewer than 2^18 weights (every layer here) normally pick
the ``float`` kernel, which multiplies by the dequantized weight and does not quantize the input at
all, so the CPU's own static accuracy equals its weight-only accuracy; ``int_mm`` measures what
static int8 costs. The same accuracies on the validation split (as many images; the fits never
validate, so nothing was trained or chosen on it) and, per configuration, on how many seeds QAT's
int8 model is worse / better than PTQ's tell a systematic difference from the noise of one image
(0.37 pt). Step time: the median training step (forward, backward, optimizer) of the QAT
epochs against that of the float run's last ``Q`` epochs, one thread by default.

    python benchmarks/qat.py           # 2 models x 3 seeds x 20 epochs (3 QAT); writes results/qat.{md,json}
    python benchmarks/qat.py --smoke   # 1 model, 1 seed, 2 epochs, 3 batches per epoch
"""

from __future__ import annotations

import copy
import itertools
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when a smoke test loads this script from its path
from _common import bench_trainer, seeds_parser, table_head, write_results
from _cpu import cpu_header

from lightning_compress import QuantizeOnFitEnd
from lightning_compress.core.quant.convert import quantize
from lightning_compress.core.quant.kernels import use_kernel
from lightning_compress.demo import MLP, Classifier, DigitsDataModule, SmallCNN

CONFIGS = (("static", True), ("static", False), ("weight_only", True))
MODELS = {"digits-mlp": MLP, "digits-cnn": SmallCNN}


def config_name(mode: str, per_channel: bool) -> str:
    return f"{mode}/{'per-channel' if per_channel else 'per-tensor'}"


class _Snapshot(Callback):
    """Saves a resumable checkpoint at the end of training epoch ``epoch``."""

    def __init__(self, epoch: int, path: Path) -> None:
        self.epoch, self.path = epoch, path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.save_checkpoint(self.path)


class _StepTimer(Callback):
    """Wall time of every training step, by epoch."""

    def __init__(self) -> None:
        self.times: dict[int, list[float]] = {}
        self._t = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self.times.setdefault(trainer.current_epoch, []).append(time.perf_counter() - self._t)

    def from_epoch(self, epoch: int) -> list[float]:
        return [t for e, ts in self.times.items() if e >= epoch for t in ts]


def make_trainer(epochs: int, callbacks: list[Callback], limit_batches: int | None) -> pl.Trainer:
    return bench_trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        limit_train_batches=limit_batches if limit_batches else 1.0,
        deterministic=True,
        callbacks=callbacks,
    )


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: Any) -> float:
    model.eval()
    right = total = 0
    with use_kernel("int_mm"):
        for x, y in loader:
            right += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return right / total


def post_training(
    model: Classifier, dm: DigitsDataModule, mode: str, per_channel: bool, batches: int
) -> torch.nn.Module:
    model = copy.deepcopy(model).eval()
    calibration = itertools.islice(dm.train_dataloader(), batches) if mode == "static" else ()
    quantize(model, mode, per_channel, calibration=calibration)
    return model


def main() -> None:
    parser = seeds_parser(__doc__, epochs=20)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    seeds, epochs, qat_epochs = (1, 2, 1) if args.smoke else (args.seeds, args.epochs, args.qat_epochs)
    models = ["digits-mlp"] if args.smoke else args.models
    limit = 3 if args.smoke else None
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*agrees poorly.*")
    warnings.filterwarnings("ignore", ".*callbacks used to create the checkpoint.*")
    warnings.filterwarnings("ignore", ".*is missing from the checkpoint.*")
    rows: list[dict[str, Any]] = []
    float_steps: dict[str, list[float]] = {m: [] for m in models}
    qat_steps: dict[str, list[float]] = {m: [] for m in models}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            for seed in range(seeds):
                ckpt = Path(tmp) / f"{name}-{seed}.ckpt"
                pl.seed_everything(seed, verbose=False)
                dm = DigitsDataModule(batch_size=64, seed=seed)
                model = Classifier(MODELS[name]())
                timer = _StepTimer()
                make_trainer(epochs, [_Snapshot(epochs - qat_epochs - 1, ckpt), timer], limit).fit(model, dm)
                float_steps[name] += timer.from_epoch(epochs - qat_epochs)
                val = dm.val_dataloader()  # the split the fits never validate on (limit_val_batches=0)
                row: dict[str, Any] = {"model": name, "seed": seed}
                row["float32"], row["val float32"] = accuracy(model, dm.test_dataloader()), accuracy(model, val)
                for mode, per_channel in CONFIGS:
                    key = config_name(mode, per_channel)
                    ptq = post_training(model, dm, mode, per_channel, args.calibration_batches)
                    row[f"ptq {key}"], row[f"val ptq {key}"] = accuracy(ptq, dm.test_dataloader()), accuracy(ptq, val)
                    pl.seed_everything(seed, verbose=False)
                    qat_model = Classifier(MODELS[name]())
                    qat_dm = DigitsDataModule(batch_size=64, seed=seed)
                    cb = QuantizeOnFitEnd(mode, per_channel=per_channel, qat_epochs=qat_epochs, verbose=0)
                    timer = _StepTimer()
                    trainer = make_trainer(epochs, [cb, timer], limit)
                    if epochs - qat_epochs - 1 >= 0:
                        trainer.fit(qat_model, qat_dm, ckpt_path=ckpt)
                    else:
                        trainer.fit(qat_model, qat_dm)
                    qat_steps[name] += timer.from_epoch(epochs - qat_epochs)
                    row[f"qat {key}"], row[f"val qat {key}"] = (
                        accuracy(qat_model, dm.test_dataloader()),
                        accuracy(qat_model, val),
                    )
                rows.append(row)
                print(
                    f"{name} seed {seed}: float {100 * row['float32']:.2f} | "
                    + " | ".join(
                        f"{config_name(m, pc)} PTQ {100 * row[f'ptq {config_name(m, pc)}']:.2f}"
                        f" QAT {100 * row[f'qat {config_name(m, pc)}']:.2f}"
                        for m, pc in CONFIGS
                    ),
                    flush=True,
                )
    wall = time.perf_counter() - start
    summary: dict[str, Any] = {}
    for name in models:
        sel = [r for r in rows if r["model"] == name]
        fl = statistics.mean(r["float32"] for r in sel)
        entry: dict[str, Any] = {"float32_mean": fl}
        for mode, pc in CONFIGS:
            key = config_name(mode, pc)
            for kind in ("ptq", "qat"):
                entry[f"{kind} {key} mean"] = statistics.mean(r[f"{kind} {key}"] for r in sel)
                entry[f"{kind} {key} drop_pt"] = 100 * (fl - entry[f"{kind} {key} mean"])
                entry[f"val {kind} {key} drop_pt"] = 100 * statistics.mean(
                    r["val float32"] - r[f"val {kind} {key}"] for r in sel
                )
            # The paired view: on how many seeds QAT's int8 model is worse / better than PTQ's (test split).
            entry[f"{key} qat_worse_seeds"] = sum(r[f"qat {key}"] < r[f"ptq {key}"] for r in sel)
            entry[f"{key} qat_better_seeds"] = sum(r[f"qat {key}"] > r[f"ptq {key}"] for r in sel)
        f_med, q_med = statistics.median(float_steps[name]), statistics.median(qat_steps[name])
        entry.update({"float_step_ms": 1e3 * f_med, "qat_step_ms": 1e3 * q_med, "qat_step_ratio": q_med / f_med})
        summary[name] = entry
    command = "python benchmarks/qat.py" + (" --smoke" if args.smoke else "")  # the options that shape the run
    if not args.smoke and seeds != 3:
        command += f" --seeds {seeds}"
    if not args.smoke and models != list(MODELS):
        command += " --models " + " ".join(models)
    header = f"CPU: {cpu_header()}"
    result = {
        "command": command,
        "torch": torch.__version__,
        "cpu": header,
        "threads": args.threads,
        "epochs": epochs,
        "qat_epochs": qat_epochs,
        "wall_s": wall,
        "rows": rows,
        "summary": summary,
    }
    keys = [config_name(m, pc) for m, pc in CONFIGS]
    md = [
        f"# QAT vs PTQ int8 accuracy, digits ({command})",
        "",
        f"torch {torch.__version__}; {header}; torch threads: {args.threads}. The machine was shared with other",
        f"jobs (load varies), so step times are medians. {epochs} epochs, the last {qat_epochs} with fake",
        "quantization for QAT (resumed from the float run's checkpoint: same first epochs, same steps).",
        "Digits test set: 269 images, one image is 0.37 pt. int8 accuracy on the `int_mm` kernel (the int8",
        f"grid itself, with static inputs really quantized). Wall time {wall:.0f} s.",
        "Goals: QAT static per-tensor within 0.2 pt of float; QAT never worse than PTQ on the mean.",
        "",
        *table_head("model", "seed", "float32", *(f"{k} PTQ / QAT" for k in keys)),
    ]
    for r in rows:
        cells = [f"{100 * r[f'ptq {k}']:.2f} / {100 * r[f'qat {k}']:.2f}" for k in keys]
        md.append(f"| {r['model']} | {r['seed']} | {100 * r['float32']:.2f} | " + " | ".join(cells) + " |")
    md += [
        "",
        "Means over seeds (drop vs float in pt, positive = worse):",
        "",
        *table_head("model", "float32", *(f"{k} PTQ drop / QAT drop" for k in keys), "QAT step / float step"),
    ]
    for name, s in summary.items():
        cells = [f"{s[f'ptq {k} drop_pt']:+.2f} / {s[f'qat {k} drop_pt']:+.2f}" for k in keys]
        md.append(
            f"| {name} | {100 * s['float32_mean']:.2f} | "
            + " | ".join(cells)
            + f" | {s['qat_step_ms']:.2f} ms / {s['float_step_ms']:.2f} ms = {s['qat_step_ratio']:.2f}x |"
        )
    md += [
        "",
        "Paired by seed (test split): seeds where QAT's int8 model is worse / better than PTQ's; and the",
        "mean drops on the validation split (as many images, which no run trained or chose anything on):",
        "",
        *table_head("model", *(f"{k} QAT worse / better" for k in keys), *(f"{k} val PTQ / QAT drop" for k in keys)),
    ]
    for name, s in summary.items():
        pairs = [f"{s[f'{k} qat_worse_seeds']} / {s[f'{k} qat_better_seeds']}" for k in keys]
        vals = [f"{s[f'val ptq {k} drop_pt']:+.2f} / {s[f'val qat {k} drop_pt']:+.2f}" for k in keys]
        md.append(f"| {name} | " + " | ".join(pairs + vals) + " |")
    write_results(args.out, "qat_smoke" if args.smoke else "qat", result, md)


if __name__ == "__main__":
    main()
