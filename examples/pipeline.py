"""The whole story in plain Python: train, prune, quantize, distill, and compare in one table.

    python examples/pipeline.py              # about a minute on 2 CPU cores
    python examples/pipeline.py --smoke      # a few batches of each step, in seconds

Every model is a LightningModule trained by a plain ``Trainer``; compression is only callbacks
(``PruningCallback``, ``QuantizeOnFitEnd``) and a LightningModule (``DistillationModule``). Each
compressed model is written with ``save_compressed`` and measured from the real tensors and files.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_compress import DistillationModule, PruningCallback, QuantizeOnFitEnd, save_compressed
from lightning_compress.core.selection import compression_root
from lightning_compress.demo import MLP, Classifier, DigitsDataModule
from lightning_compress.pipeline import Measurement, measure, measure_latencies


def _trainer(args: argparse.Namespace, epochs: int, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    limits: dict[str, Any] = {}
    if args.smoke:
        limits = {"limit_train_batches": 5, "limit_val_batches": 2, "limit_test_batches": 2}
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks or [],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.smoke,
        log_every_n_steps=5,
        default_root_dir=args.out,
        **limits,
    )


def _fit_and_test(args: argparse.Namespace, model: pl.LightningModule, epochs: int, callbacks=None) -> float:
    trainer = _trainer(args, epochs, callbacks)
    trainer.fit(model, datamodule=args.data)
    return trainer.test(model, datamodule=args.data, verbose=False)[0]["test/acc"]


def run(args: argparse.Namespace) -> list[tuple[str, Measurement]]:
    """Train and compress the five models; return each one's measurement, in order."""
    pl.seed_everything(0, verbose=False)
    args.data = DigitsDataModule(batch_size=64)
    epochs = args.epochs
    models: list[tuple[str, torch.nn.Module, float]] = []

    # 1. The original: LeNet-300-100 on the 8x8 digits, dense float32.
    dense = Classifier(backbone=MLP(hidden=(300, 100)))
    models.append(("dense MLP (float32)", copy.deepcopy(dense), _fit_and_test(args, dense, epochs)))

    # 2. Quantize: one more epoch, then QuantizeOnFitEnd stores every Linear in int8.
    int8 = copy.deepcopy(dense)
    accuracy = _fit_and_test(args, int8, 1, [QuantizeOnFitEnd(verbose=0)])
    models.append(("dense MLP, int8", int8, accuracy))

    # 3. Prune: fine-tune from the dense model while 90% of the weights go to zero (cubic schedule).
    pruned = copy.deepcopy(dense)
    accuracy = _fit_and_test(args, pruned, epochs, [PruningCallback(0.9, verbose=0)])
    models.append(("pruned 90% (float32)", copy.deepcopy(pruned), accuracy))

    # 4. Prune + quantize: one more epoch holding the same mask (the zeros are the smallest weights),
    #    then int8. The zeros survive quantization, and the artifact packs them.
    callbacks = [PruningCallback(0.9, schedule="constant", verbose=0), QuantizeOnFitEnd(verbose=0)]
    accuracy = _fit_and_test(args, pruned, 1, callbacks)
    models.append(("pruned 90% + int8", pruned, accuracy))

    # 5. Distill: a 64-32-10 student (21x fewer weights) learns from the dense model.
    student = DistillationModule(MLP(hidden=(32,)), copy.deepcopy(dense.backbone), temperature=4.0, alpha=0.9, lr=3e-3)
    accuracy = _fit_and_test(args, student, epochs)
    models.append(("distilled student 64-32-10", student.student, accuracy))

    # 6. All at once: a 64-64-10 student distilled while pruned to 80% and quantized at the end.
    student = DistillationModule(MLP(hidden=(64,)), copy.deepcopy(dense.backbone), temperature=4.0, alpha=0.9, lr=3e-3)
    callbacks = [PruningCallback(0.8, verbose=0), QuantizeOnFitEnd(verbose=0)]
    accuracy = _fit_and_test(args, student, epochs, callbacks)
    models.append(("distilled 64-64-10, pruned 80% + int8", compression_root(student)[1], accuracy))

    # Measure: artifacts written by save_compressed, CPU latency on one test batch (timed in turns).
    args.data.setup("test")
    inputs = next(iter(args.data.test_dataloader()))[0]
    modules = [module.cpu() for _, module, _ in models]
    latencies = measure_latencies(modules, inputs, repeats=args.latency_repeats)
    results = []
    for (name, module, accuracy), latency in zip(models, latencies, strict=True):
        path = Path(args.out) / f"{len(results) + 1}.pt"
        save_compressed(module, path)
        results.append((name, measure(module, accuracy, path, latency)))
    return results


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def table(results: list[tuple[str, Measurement]]) -> str:
    """One row per model, sizes and latency also as a ratio to the first (the dense original)."""
    base = results[0][1]
    header = ("model", "test acc", "nonzero params", "weight bytes", "artifact", "latency / batch")
    rows = [header]
    for name, m in results:
        rows.append(
            (
                name,
                f"{m.accuracy:.2%}",
                f"{m.nonzero_params:,} ({m.nonzero_params / base.nonzero_params:.3f}x)",
                f"{_kib(m.weight_bytes)} ({m.weight_bytes / base.weight_bytes:.3f}x)",
                f"{_kib(m.artifact_bytes)} ({m.artifact_bytes / base.artifact_bytes:.3f}x)",
                f"{m.latency_ms:.3f} ms ({m.latency_ms / base.latency_ms:.2f}x)",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[tuple[str, Measurement]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs of each training run (default 30)")
    parser.add_argument("--out", default=None, help="folder for the artifacts (default: a temporary folder)")
    parser.add_argument("--latency-repeats", type=int, default=50, help="timed forward passes per model")
    parser.add_argument("--smoke", action="store_true", help="2 epochs of 5 batches each: checks that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.latency_repeats = 2, 3
    with tempfile.TemporaryDirectory() as scratch:
        args.out = args.out or scratch
        results = run(args)
        print(table(results))
    return results


if __name__ == "__main__":
    main()
