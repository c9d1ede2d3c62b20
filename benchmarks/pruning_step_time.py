"""Training step time with pruning, as a ratio to no callback, side by side with Lightning's ModelPruning.

Same model, same data, same optimizer, same sparsity; the configurations run interleaved (one fit
of each per round, in a rotating order) in one process, so drifts of the machine hit them alike.

* ``none``: no pruning callback;
* ``PruningCallback``: masks in place at the target from the first step (``schedule="constant"``),
  the steady state of every step after a schedule ends;
* ``ModelPruning``: Lightning's callback, pruned once to the same target at the end of the warm-up
  epoch (``apply_pruning=lambda epoch: epoch == 0``), then its forward pre-hooks recompute
  ``weight = weight_orig * weight_mask`` on every forward;
* ``PruningCallback, gradual``: the default cubic schedule over the timed steps with the default
  ``update_every_n_steps``, so the mask updates themselves are in the time.

A step is timed from the first callback's ``on_train_batch_start`` to the last callback's
``on_train_batch_end`` (forward, backward, optimizer step and every callback hook in between);
the first epoch of every fit is a warm-up and is not timed. Ratios are of medians over all timed
steps of all rounds.

Usage::

    python benchmarks/pruning_step_time.py                      # CPU MLP (LeNet-300-100, batch 128)
    python benchmarks/pruning_step_time.py --model resnet18 --device cuda   # where a GPU is at hand
    python benchmarks/pruning_step_time.py --smoke              # tiny; checks that the script runs

Writes ``pruning_step_time[_<model>_<device>][_smoke].{md,json}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import PruningCallback

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("none", "PruningCallback", "ModelPruning", "PruningCallback, gradual")


class Net(pl.LightningModule):
    def __init__(self, backbone: nn.Module, lr: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.backbone(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def _backbone(name: str, smoke: bool) -> tuple[nn.Module, tuple[int, ...], int]:
    """The network, the shape of one input and the number of classes."""
    if name == "mlp":
        from lightning_compress.demo import MLP

        size = 8 if smoke else 28
        return MLP(in_features=size * size, hidden=(300, 100)), (1, size, size), 10
    import torchvision

    if smoke:
        return torchvision.models.resnet18(num_classes=10), (3, 16, 16), 10
    return torchvision.models.resnet18(num_classes=1000), (3, 224, 224), 1000


class _StepStart(Callback):
    def __init__(self) -> None:
        self.start = 0.0
        self.sync = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self.start = time.perf_counter()


class _StepEnd(Callback):
    def __init__(self, start: _StepStart) -> None:
        self.start = start
        self.times: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.start.sync:
            torch.cuda.synchronize()
        if trainer.current_epoch > 0:  # epoch 0 is the warm-up
            self.times.append(time.perf_counter() - self.start.start)


def _pruning_callbacks(config: str, target: float, model: nn.Module, epochs: int) -> list[Callback]:
    if config == "PruningCallback":
        return [PruningCallback(target, schedule="constant", verbose=0)]
    if config == "PruningCallback, gradual":
        return [PruningCallback(target, start_epoch=1, end_epoch=epochs - 1, verbose=0)]
    if config == "ModelPruning":
        layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        return [
            ModelPruning(
                "l1_unstructured",
                parameters_to_prune=layers,
                amount=target,
                use_global_unstructured=True,
                apply_pruning=lambda epoch: epoch == 0,
                use_lottery_ticket_hypothesis=False,
                make_pruning_permanent=True,
                verbose=0,
            )
        ]
    return []


def _fit(config: str, args: argparse.Namespace, data: TensorDataset) -> tuple[list[float], float]:
    torch.manual_seed(0)
    backbone, _, _ = _backbone(args.model, args.smoke)
    model = Net(backbone, lr=0.01)
    start = _StepStart()
    start.sync = args.device == "cuda"
    end = _StepEnd(start)
    callbacks = [start, *_pruning_callbacks(config, args.sparsity, backbone, args.epochs), end]
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        precision=args.precision,
        default_root_dir=args.out / "lightning_logs",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(data, batch_size=args.batch_size, shuffle=False))
    weights = [m.weight for m in backbone.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return end.times, zeros


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "resnet18"], default="mlp")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per fit (the first is a warm-up)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per epoch")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="rounds of interleaved fits")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--precision", default=None, help="Trainer precision (default 32, bf16-mixed on cuda)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="what to time")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; checks that the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .json results")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    defaults = {"mlp": (3, 100, 128, 5), "resnet18": (3, 30, 64, 3)}[args.model]
    if args.smoke:
        defaults = (2, 5, 8, 1)
    args.epochs = args.epochs or defaults[0]
    args.steps = args.steps or defaults[1]
    args.batch_size = args.batch_size or defaults[2]
    args.repeats = args.repeats or defaults[3]
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    _, shape, classes = _backbone(args.model, args.smoke)
    g = torch.Generator().manual_seed(0)
    n = args.steps * args.batch_size
    data = TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g))

    configs = ["none", *(c for c in CONFIGS if c in args.configs and c != "none")]
    times: dict[str, list[float]] = {c: [] for c in configs}
    zeros: dict[str, float] = {}
    for r in range(args.repeats):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        for config in order:
            t, z = _fit(config, args, data)
            times[config] += t
            zeros[config] = z
            print(f"round {r + 1}/{args.repeats} {config:<26} median {statistics.median(t) * 1e3:.3f} ms")

    base = statistics.median(times["none"])
    rows = []
    for config in configs:
        median = statistics.median(times[config])
        rows.append(
            {
                "config": config,
                "median_ms": median * 1e3,
                "mean_ms": statistics.fmean(times[config]) * 1e3,
                "ratio": median / base,
                "mean_ratio": statistics.fmean(times[config]) / statistics.fmean(times["none"]),
                "steps": len(times[config]),
                "final_sparsity": zeros[config],
            }
        )
    command = shlex.join(["python", "benchmarks/pruning_step_time.py", *sys.argv[1:]])
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    meta = {
        "command": command,
        "model": args.model,
        "device": device,
        "threads": torch.get_num_threads(),
        "sparsity": args.sparsity,
        "epochs": args.epochs,
        "steps_per_epoch": args.steps,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "precision": args.precision,
        "torch": torch.__version__,
        "lightning": pl.__version__,
    }
    lines = [
        f"# Training step time with pruning: {args.model} on {args.device}",
        "",
        f"`{command}`: {device}, {meta['threads']} threads, batch {args.batch_size}, precision {args.precision},"
        f" sparsity {args.sparsity:.0%}, {args.repeats} interleaved rounds of {args.epochs - 1} timed epochs x"
        f" {args.steps} steps (after a warm-up epoch); torch {torch.__version__}, lightning {pl.__version__}.",
        "",
        "| configuration | median step (ms) | mean step (ms) | ratio to none (median) | ratio (mean) | zeros at end |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['median_ms']:.3f} | {row['mean_ms']:.3f} | {row['ratio']:.3f}x"
            f" | {row['mean_ratio']:.3f}x | {row['final_sparsity']:.1%} |"
        )
    suffix = "" if (args.model, args.device) == ("mlp", "cpu") else f"_{args.model}_{args.device}"
    suffix += "_smoke" if args.smoke else ""
    _atomic_write(args.out / f"pruning_step_time{suffix}.md", "\n".join(lines) + "\n")
    _atomic_write(args.out / f"pruning_step_time{suffix}.json", json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
