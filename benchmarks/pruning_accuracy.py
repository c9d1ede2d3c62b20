"""Accuracy against sparsity on the digits MLP: dense, 50, 80, 90 and 95% with PruningCallback, 3 seeds.

Recipe (the same for every row, dense included): ``Classifier(MLP())`` (64-300-100-10, Adam,
lr 1e-3) on ``DigitsDataModule(batch_size=64)`` (20 optimizer steps per epoch) for ``--epochs``
epochs; the pruned rows add ``PruningCallback(target)`` with its defaults (global magnitude, cubic
schedule from the first step to the end of the first half of the epochs, then fine-tuning at full
sparsity; masks updated every 10 steps). The test accuracy is that of the final model, with no
checkpoint selection; the seed sets the initial weights (the data split is the same for all).

Usage::

    python benchmarks/pruning_accuracy.py            # writes results/pruning_accuracy.{md,json}
    python benchmarks/pruning_accuracy.py --smoke    # tiny; checks that the script runs
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_trainer

from lightning_compress import PruningCallback, compression_report
from lightning_compress.core.files import atomic_write_text
from lightning_compress.demo import MLP, Classifier, DigitsDataModule

RESULTS = Path(__file__).resolve().parent / "results"
GOALS = {0.9: 0.5, 0.95: 1.0}  # sparsity -> allowed drop (points) of the 3-seed mean


def _fit(sparsity: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = Classifier(MLP())
    callbacks = [] if sparsity == 0 else [PruningCallback(sparsity, verbose=0, **args.pruning)]
    trainer = bench_trainer(
        max_epochs=args.epochs,
        callbacks=callbacks,
        limit_train_batches=args.limit_batches,
        default_root_dir=args.out / "lightning_logs",
    )
    data = DigitsDataModule(batch_size=64)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
        (metrics,) = trainer.test(model, data, verbose=False)
    report = compression_report(model.backbone)
    return {
        "sparsity": sparsity,
        "seed": seed,
        "test_acc": float(metrics["test/acc"]),
        "zeros": report.sparsity,
        "seconds": time.perf_counter() - start,
    }


def _summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    dense = statistics.fmean(r["test_acc"] for r in rows if r["sparsity"] == 0)
    out = []
    for sparsity in sorted({r["sparsity"] for r in rows}):
        accs = [r["test_acc"] for r in rows if r["sparsity"] == sparsity]
        mean = statistics.fmean(accs)
        drop = (dense - mean) * 100
        goal = GOALS.get(sparsity)
        out.append(
            {
                "sparsity": sparsity,
                "mean_acc": mean,
                "std_acc": statistics.pstdev(accs),
                "accs": accs,
                "drop_points": drop,
                "zeros": statistics.fmean(r["zeros"] for r in rows if r["sparsity"] == sparsity),
                "goal_points": goal,
                "meets_goal": None if goal is None else drop <= goal,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.9, 0.95])
    parser.add_argument("--update-every-n-steps", type=int, default=None, help="PruningCallback argument")
    parser.add_argument("--end-epoch", type=int, default=None, help="PruningCallback argument")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; checks that the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .json results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.limit_batches = 1.0
    if args.smoke:
        args.epochs, args.seeds, args.limit_batches = 2, [0], 3
    if 0.0 not in args.sparsities:
        args.sparsities.insert(0, 0.0)
    args.pruning = {}
    if args.update_every_n_steps is not None:
        args.pruning["update_every_n_steps"] = args.update_every_n_steps
    if args.end_epoch is not None:
        args.pruning["end_epoch"] = args.end_epoch
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for seed in args.seeds:
        for sparsity in args.sparsities:
            row = _fit(sparsity, seed, args)
            rows.append(row)
            print(
                f"seed {seed} sparsity {sparsity:.0%}: test acc {row['test_acc']:.4f},"
                f" zeros {row['zeros']:.4f} ({row['seconds']:.1f} s)",
                flush=True,
            )
    summary = _summary(rows)
    command = shlex.join(["python", "benchmarks/pruning_accuracy.py", *sys.argv[1:]])
    recipe = (
        f"`Classifier(MLP())` (64-300-100-10, Adam lr 1e-3), `DigitsDataModule(batch_size=64)`, {args.epochs} epochs,"
        f" `PruningCallback(target{''.join(f', {k}={v}' for k, v in args.pruning.items())})` (defaults otherwise);"
        f" seeds {args.seeds}; final model, no checkpoint selection; test set of 269 images."
    )
    lines = [
        "# Accuracy against sparsity: digits MLP",
        "",
        f"`{command}`",
        "",
        recipe,
        "",
        "| sparsity | test accuracy (mean ± std) | per seed | drop vs dense (points) | zeros in the weights | goal |",
        "|---:|---:|---|---:|---:|---|",
    ]
    for s in summary:
        goal = (
            "" if s["goal_points"] is None else f"<= {s['goal_points']} pt: {'met' if s['meets_goal'] else 'NOT met'}"
        )
        label = "dense" if s["sparsity"] == 0 else f"{s['sparsity']:.0%}"
        per_seed = ", ".join(f"{a:.2%}" for a in s["accs"])
        lines.append(
            f"| {label} | {s['mean_acc']:.2%} ± {s['std_acc']:.2%} | {per_seed} | {s['drop_points']:+.2f}"
            f" | {s['zeros']:.1%} | {goal} |"
        )
    name = "pruning_accuracy_smoke" if args.smoke else "pruning_accuracy"
    meta = {"command": command, "recipe": recipe, "epochs": args.epochs, "seeds": args.seeds, "pruning": args.pruning}
    atomic_write_text(args.out / f"{name}.md", "\n".join(lines) + "\n")
    atomic_write_text(
        args.out / f"{name}.json", json.dumps({**meta, "summary": summary, "rows": rows}, indent=2) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
