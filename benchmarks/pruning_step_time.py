"""Training step time with pruning, as a ratio to no callback, side by side with Lightning's ModelPruning.

Same model, same data, same optimizer, same sparsity, in one process. In each round, one fit per
configuration runs in its own thread and the fits take their training steps strictly in turn
(a baton passes from one to the next at every step: ``_step_timing.py``), so any drift of the machine
hits them alike.

* ``none``: no pruning callback;
* ``empty callback``: a callback that does nothing, the floor for any callback (Lightning calls
  every hook of every callback around every step);
* ``PruningCallback``: masks in place at the target from the first step (``schedule="constant"``),
  the steady state of every step after a schedule ends;
* ``ModelPruning``: Lightning's callback, pruned once to the same target at the end of the warm-up
  epoch (``apply_pruning=lambda epoch: epoch == 0``), then its forward pre-hooks recompute
  ``weight = weight_orig * weight_mask`` on every forward;
* ``PruningCallback, gradual``: the default cubic schedule over the timed steps with the default
  ``update_every_n_steps``, so the mask updates themselves are in the time;
* ``PruningCallback, wanda`` / ``PruningCallback, gradual, wanda``: the same with ``score="wanda"``
  (the constant one gathers its input norms in a no-grad pass before the first step and has no hook
  afterwards; the gradual one has forward pre-hooks on the ``score_batches`` batches before each update).

A step is timed from the first callback's ``on_train_batch_start`` to the last callback's
``on_train_batch_end`` (forward, backward, optimizer step and every callback hook in between);
the first epoch of every fit is a warm-up and is not timed. The ratio of a configuration is the
median, over rounds, of its median step divided by the median step of ``none`` in the same round.
On the CPU the clock is the CPU time of the stepping thread (``time.thread_time``), which neither
other processes on a shared machine nor the waiting fits stretch; torch then runs on one thread
(``--threads 1``, the default there) so that all of a step's work is in that thread. On a GPU the
clock is the elapsed time after ``torch.cuda.synchronize()``.

Usage::

    python benchmarks/pruning_step_time.py                      # the digits MLP on the CPU (batch 64)
    python benchmarks/pruning_step_time.py --model lenet        # LeNet-300-100 on 28x28 (batch 128)
    python benchmarks/pruning_step_time.py --model resnet18 --device cuda   # where a GPU is at hand
    python benchmarks/pruning_step_time.py --smoke              # tiny; checks that the script runs

Writes ``pruning_step_time[_<model>_<device>][_smoke].{md,json}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_trainer
from _cpu import cpu_header
from _step_timing import Baton, StepEnd, StepStart, in_turn

from lightning_compress import PruningCallback
from lightning_compress.core.files import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


class Net(pl.LightningModule):
    def __init__(self, backbone: nn.Module, lr: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.backbone(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def _backbone(name: str, smoke: bool) -> tuple[nn.Module, tuple[int, ...], int]:
    """The network, the shape of one input and the number of classes."""
    from lightning_compress.demo import MLP

    if name == "mlp":  # the project's digits MLP: 64-300-100-10 over 8x8 images
        return MLP(), (1, 8, 8), 10
    if name == "lenet":  # LeNet-300-100 over 28x28 images (MNIST-sized)
        return MLP(in_features=784, hidden=(300, 100)), (1, 28, 28), 10
    import torchvision

    if smoke:
        return torchvision.models.resnet18(num_classes=10), (3, 16, 16), 10
    return torchvision.models.resnet18(num_classes=1000), (3, 224, 224), 1000


class _Empty(Callback):
    """Does nothing: what Lightning's dispatch of one more callback's hooks costs per step."""


_Callbacks = Callable[[float, nn.Module, int], list[Callback]]
"""A configuration's callbacks for ``(target sparsity, the network, epochs)``."""


def _pruning(schedule: str, score: str = "magnitude") -> _Callbacks:
    """PruningCallback: at the target from the first step, or the default cubic schedule over the timed epochs."""

    def callbacks(target: float, model: nn.Module, epochs: int) -> list[Callback]:
        if schedule == "constant":
            return [PruningCallback(target, schedule="constant", score=score, verbose=0)]
        return [PruningCallback(target, start_epoch=1, end_epoch=epochs - 1, score=score, verbose=0)]

    return callbacks


def _model_pruning(target: float, model: nn.Module, epochs: int) -> list[Callback]:
    """Lightning's ModelPruning, pruned once to ``target`` at the end of the warm-up epoch."""
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


CALLBACKS: dict[str, _Callbacks] = {
    "none": lambda target, model, epochs: [],
    "empty callback": lambda target, model, epochs: [_Empty()],
    "PruningCallback": _pruning("constant"),
    "PruningCallback, wanda": _pruning("constant", "wanda"),  # input norms from a no-grad pass, then no hooks
    "ModelPruning": _model_pruning,
    "PruningCallback, gradual": _pruning("cubic"),
    "PruningCallback, gradual, wanda": _pruning("cubic", "wanda"),  # hooks on the batches before each update
}
CONFIGS = tuple(CALLBACKS)


def _fit(config: str, args: argparse.Namespace, data: TensorDataset, baton: Baton) -> tuple[list[float], float]:
    torch.manual_seed(0)
    backbone, _, _ = _backbone(args.model, args.smoke)
    model = Net(backbone, lr=0.01)
    start = StepStart(config, baton, args.clock, sync=args.device == "cuda")
    end = StepEnd(start)
    callbacks = [start, *CALLBACKS[config](args.sparsity, backbone, args.epochs), end]
    trainer = bench_trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        max_epochs=args.epochs,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        precision=args.precision,
        default_root_dir=args.out / "lightning_logs",
    )
    trainer.fit(model, DataLoader(data, batch_size=args.batch_size, shuffle=False))
    weights = [m.weight for m in backbone.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return end.times, zeros


def _mechanisms(args: argparse.Namespace, data: TensorDataset) -> list[dict[str, Any]]:
    """The per-step cost of each masking mechanism alone, in a plain PyTorch loop, interleaved step by step.

    Four copies of the model train side by side, one step each in turn, on the same batches:
    no masks; our fast path (gradients masked, one fused multiply); our guarded path (gradients
    masked and weights re-masked after the step, two multiplies); ``torch.nn.utils.prune`` as
    ModelPruning uses it (``weight = weight_orig * weight_mask`` in a forward pre-hook). Alternating
    every step cancels the machine's drifts far better than separate fits can.
    """
    from torch.nn.utils import prune

    from lightning_compress.core.prune.keeper import MaskKeeper
    from lightning_compress.core.prune.masks import magnitude_masks

    device = torch.device(args.device)
    setups: dict[str, tuple[nn.Module, torch.optim.Optimizer, Any]] = {}
    for name in ("no masks", "PruningCallback (fast path)", "PruningCallback (guarded)", "torch prune hooks"):
        torch.manual_seed(0)
        backbone = _backbone(args.model, args.smoke)[0].to(device)
        layers = {f"{n}.weight": m for n, m in backbone.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        keeper = None
        if name == "torch prune hooks":
            prune.global_unstructured(
                [(m, "weight") for m in layers.values()], pruning_method=prune.L1Unstructured, amount=args.sparsity
            )
        optimizer = torch.optim.SGD(backbone.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        if name.startswith("PruningCallback"):
            params = {n: m.weight for n, m in layers.items()}
            keeper = MaskKeeper(params, [optimizer], guard_all=name.endswith("(guarded)"))
            keeper.set_masks(magnitude_masks({n: p.detach() for n, p in params.items()}, args.sparsity))
        setups[name] = (backbone, optimizer, keeper)
    loader = DataLoader(data, batch_size=args.batch_size)
    times: dict[str, list[float]] = {name: [] for name in setups}
    now = time.perf_counter if args.device == "cuda" else time.process_time
    for epoch in range(args.epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            for name, (backbone, optimizer, keeper) in setups.items():
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = now()
                optimizer.zero_grad()
                F.cross_entropy(backbone(x), y).backward()
                if keeper is not None:
                    keeper.mask_gradients(optimizer)
                optimizer.step()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                if epoch > 0:
                    times[name].append(now() - start)
    base = statistics.median(times["no masks"])
    return [
        {"mechanism": name, "median_ms": statistics.median(t) * 1e3, "ratio": statistics.median(t) / base}
        for name, t in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        choices=["mlp", "lenet", "resnet18"],
        default="mlp",
        help="mlp: the digits MLP (64-300-100-10, batch 64); lenet: LeNet-300-100 on 28x28 (batch 128)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per fit (the first is a warm-up)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per epoch")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="rounds of interleaved fits")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on the CPU)")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default=None,
        help="cpu: CPU time of the stepping thread (default on the CPU; robust on a shared machine); wall: elapsed",
    )
    parser.add_argument("--precision", default=None, help="Trainer precision (default 32, bf16-mixed on cuda)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="what to time")
    parser.add_argument(
        "--mechanisms",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the masking mechanisms alone in a plain PyTorch loop",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; checks that the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .json results")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    # epochs, steps per epoch, batch size and rounds where not given
    defaults = {"mlp": (3, 100, 64, 8), "lenet": (3, 100, 128, 8), "resnet18": (3, 30, 64, 3)}[args.model]
    defaults = (2, 5, 8, 1) if args.smoke else defaults
    for key, default in zip(("epochs", "steps", "batch_size", "repeats"), defaults, strict=True):
        setattr(args, key, getattr(args, key) or default)
    args.clock = args.clock or ("wall" if args.device == "cuda" else "cpu")
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu cannot time GPU work; use --clock wall with --device cuda")
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    if args.device == "cpu" and args.threads is None:
        args.threads = 1  # other threads' spinning would count as CPU time
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    _, shape, classes = _backbone(args.model, args.smoke)
    g = torch.Generator().manual_seed(0)
    n = args.steps * args.batch_size
    data = TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g))

    configs = ["none", *(c for c in CONFIGS if c in args.configs and c != "none")]
    times: dict[str, list[float]] = {c: [] for c in configs}
    round_medians: dict[str, list[float]] = {c: [] for c in configs}
    zeros: dict[str, float] = {}
    for r in range(args.repeats):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        for config, (t, z) in in_turn(order, lambda c, baton: _fit(c, args, data, baton)).items():
            times[config] += t
            round_medians[config].append(statistics.median(t))
            zeros[config] = z
        line = ", ".join(f"{c} {round_medians[c][-1] * 1e3:.3f}" for c in configs)
        print(f"round {r + 1}/{args.repeats} median step (ms): {line}", flush=True)

    base = statistics.median(times["none"])
    rows = []
    for config in configs:
        median = statistics.median(times[config])
        # Each round's median over the round's "none" median: drifts of the machine between rounds cancel.
        paired = [m / b for m, b in zip(round_medians[config], round_medians["none"], strict=True)]
        rows.append(
            {
                "config": config,
                "median_ms": median * 1e3,
                "mean_ms": statistics.fmean(times[config]) * 1e3,
                "ratio": statistics.median(paired),
                "round_ratios": paired,
                "pooled_ratio": median / base,
                "mean_ratio": statistics.fmean(times[config]) / statistics.fmean(times["none"]),
                "steps": len(times[config]),
                "final_sparsity": zeros[config],
            }
        )
    command = shlex.join(["python", "benchmarks/pruning_step_time.py", *sys.argv[1:]])
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_header()
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
        "clock": args.clock,
        "torch": torch.__version__,
        "lightning": pl.__version__,
    }
    lines = [
        f"# Training step time with pruning: {args.model} on {args.device}",
        "",
        f"`{command}`: {device}, {meta['threads']} threads, {args.clock} clock, batch {args.batch_size},"
        f" precision {args.precision},"
        f" sparsity {args.sparsity:.0%}, {args.repeats} interleaved rounds of {args.epochs - 1} timed epochs x"
        f" {args.steps} steps (after a warm-up epoch); torch {torch.__version__}, lightning {pl.__version__}.",
        "",
        "| configuration | median step (ms) | mean step (ms) | ratio to none | range over rounds | pooled median"
        " ratio | mean ratio | zeros at end |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        spread = f"{min(row['round_ratios']):.3f}-{max(row['round_ratios']):.3f}"
        lines.append(
            f"| {row['config']} | {row['median_ms']:.3f} | {row['mean_ms']:.3f} | **{row['ratio']:.3f}x** | {spread}"
            f" | {row['pooled_ratio']:.3f}x | {row['mean_ratio']:.3f}x | {row['final_sparsity']:.1%} |"
        )
    lines += [
        "",
        "Ratio to none: the median over rounds of (the round's median step) / (the same round's median step"
        " without a callback). Mean ratio: mean steps, so the mask updates of the gradual schedule count.",
    ]
    mechanisms = _mechanisms(args, data) if args.mechanisms else []
    if mechanisms:
        lines += [
            "",
            "## The masking mechanisms alone",
            "",
            "A plain PyTorch loop (no Lightning), the four variants taking one step each in turn on the same"
            f" batches ({args.epochs - 1} timed epochs x {args.steps} steps), so the ratios are free of the"
            " drifts between fits:",
            "",
            "| mechanism | median step (ms) | ratio to no masks |",
            "|---|---:|---:|",
            *(f"| {m['mechanism']} | {m['median_ms']:.3f} | {m['ratio']:.3f}x |" for m in mechanisms),
        ]
    suffix = "" if (args.model, args.device) == ("mlp", "cpu") else f"_{args.model}_{args.device}"
    suffix += "_smoke" if args.smoke else ""
    atomic_write_text(args.out / f"pruning_step_time{suffix}.md", "\n".join(lines) + "\n")
    atomic_write_text(
        args.out / f"pruning_step_time{suffix}.json",
        json.dumps({**meta, "rows": rows, "mechanisms": mechanisms}, indent=2) + "\n",
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
