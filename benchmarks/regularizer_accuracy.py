"""Does sparse regularization before/while pruning buy accuracy? Digits MLP, side by side, 3 seeds.

Arms, each trained from the same initial weights per seed on scikit-learn's digits (the 64-300-100-10
MLP of ``lightning_compress.demo``, Adam lr 1e-3, batch 64, 30 epochs):

* dense: no callback;
* magnitude pruning alone (``PruningCallback``, global, cubic from epoch 5 to the end of epoch 19,
  10 epochs of fine-tuning) at 90% and 95% sparsity, against the same pruning with
  ``SparseRegularizer(penalty="l1")`` on for the whole run, for a grid of strengths;
* channel pruning alone (``method="channel"``, ``scope="layer"``, classifier left dense, same
  schedule) against the same with ``SparseRegularizer(penalty="group_lasso")``;
* ``SparseRegularizer(proximal=True)`` and no pruning at all: the fraction of the selected weights
  that end exactly zero, and the accuracy that goes with it.

The strength of each regularized arm is chosen on the validation split (mean over seeds); test
accuracy (269 images: one image is 0.37 pt) is reported for that choice and for the whole grid.

    python benchmarks/regularizer_accuracy.py          # full run (about 10 min on 2 cores)
    python benchmarks/regularizer_accuracy.py --smoke  # tiny sizes, a few seconds

Results: ``benchmarks/results/regularizer_accuracy.{md,json}`` (``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_trainer

from lightning_compress import PruningCallback, SparseRegularizer
from lightning_compress.core.files import atomic_write_text
from lightning_compress.core.selection import select_targets
from lightning_compress.demo import MLP, Classifier, DigitsDataModule

RESULTS = Path(__file__).resolve().parent / "results"
CLASSIFIER = "backbone.net.5"  # the 100 -> 10 output layer: channel pruning would delete classes


def _fit(seed: int, epochs: int, callbacks: list[pl.Callback], limit: float | int) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)
    model = Classifier(MLP())
    data = DigitsDataModule(batch_size=64, seed=seed)
    trainer = bench_trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        limit_train_batches=limit,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    val = float(trainer.callback_metrics["val/acc"])
    test = float(trainer.test(model, data, verbose=False)[0]["test/acc"])
    weights = [t.weight.detach() for t in select_targets(model)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    hidden = [t.weight.detach() for t in select_targets(model, exclude=[CLASSIFIER])]
    rows = sum(int((w == 0).all(dim=1).sum()) for w in hidden) / sum(w.shape[0] for w in hidden)
    return {"val_acc": val, "test_acc": test, "zeros": zeros, "zero_channels": rows, "fit_s": seconds}


def _pruning(sparsity: float, method: str, epochs: int) -> PruningCallback:
    start, end = (5, 19) if epochs >= 20 else (0, max(epochs - 2, 0))
    if method == "channel":
        return PruningCallback(
            sparsity, method="channel", scope="layer", start_epoch=start, end_epoch=end, exclude=[CLASSIFIER], verbose=0
        )
    return PruningCallback(sparsity, start_epoch=start, end_epoch=end, verbose=0)


def _arms(smoke: bool, epochs: int) -> list[dict[str, Any]]:
    """Every configuration: name, family, sparsity, strength, and a factory of its callbacks."""
    sparsities = [0.9] if smoke else [0.9, 0.95]
    l1_grid = [1e-4] if smoke else [3e-5, 1e-4, 3e-4]
    gl_grid = [1e-3] if smoke else [3e-4, 1e-3, 3e-3]
    prox_grid = [0.3] if smoke else [0.1, 0.15, 0.2, 0.3, 1.0]
    arms: list[dict[str, Any]] = [{"family": "dense", "sparsity": 0.0, "strength": 0.0, "make": list}]
    for s in sparsities:
        arms.append(
            {
                "family": "magnitude",
                "sparsity": s,
                "strength": 0.0,
                "make": lambda s=s: [_pruning(s, "magnitude", epochs)],
            }
        )
        for lam in l1_grid:
            arms.append(
                {
                    "family": "l1+magnitude",
                    "sparsity": s,
                    "strength": lam,
                    "make": lambda s=s, lam=lam: [SparseRegularizer(lam, verbose=0), _pruning(s, "magnitude", epochs)],
                }
            )
        arms.append(
            {"family": "channel", "sparsity": s, "strength": 0.0, "make": lambda s=s: [_pruning(s, "channel", epochs)]}
        )
        for lam in gl_grid:
            arms.append(
                {
                    "family": "group_lasso+channel",
                    "sparsity": s,
                    "strength": lam,
                    "make": lambda s=s, lam=lam: [
                        SparseRegularizer(lam, penalty="group_lasso", exclude=[CLASSIFIER], verbose=0),
                        _pruning(s, "channel", epochs),
                    ],
                }
            )
    for lam in prox_grid:
        arms.append(
            {
                "family": "proximal l1",
                "sparsity": None,
                "strength": lam,
                "make": lambda lam=lam: [SparseRegularizer(lam, proximal=True, verbose=0)],
            }
        )
    return arms


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _summarize(arms: list[dict[str, Any]], runs: dict[int, list[dict[str, float]]]) -> list[dict[str, Any]]:
    rows = []
    for i, arm in enumerate(arms):
        r = runs[i]
        rows.append(
            {
                "family": arm["family"],
                "sparsity": arm["sparsity"],
                "strength": arm["strength"],
                "seeds": len(r),
                "val_acc": _mean([x["val_acc"] for x in r]),
                "test_acc": _mean([x["test_acc"] for x in r]),
                "test_acc_std": _std([x["test_acc"] for x in r]),
                "test_acc_per_seed": [x["test_acc"] for x in r],
                "zeros": _mean([x["zeros"] for x in r]),
                "zero_channels": _mean([x["zero_channels"] for x in r]),
                "fit_s": _mean([x["fit_s"] for x in r]),
            }
        )
    return rows


def _chosen(rows: list[dict[str, Any]], family: str, sparsity: float) -> dict[str, Any]:
    """The strength with the best mean validation accuracy (ties: the smaller strength)."""
    grid = [r for r in rows if r["family"] == family and r["sparsity"] == sparsity]
    return max(grid, key=lambda r: (r["val_acc"], -r["strength"]))


def _paired(b: dict[str, Any], a: dict[str, Any]) -> dict[str, Any]:
    """Test accuracy of ``b`` minus ``a``, seed by seed (same split and initial weights): mean, std, wins."""
    diffs = [x - y for x, y in zip(b["test_acc_per_seed"], a["test_acc_per_seed"], strict=True)]
    return {
        "diff": _mean(diffs),
        "diff_std": _std(diffs),
        "diff_per_seed": diffs,
        "better": sum(d > 0 for d in diffs),
        "worse": sum(d < 0 for d in diffs),
    }


def _compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    comparisons = []
    for sparsity in sorted({r["sparsity"] for r in rows if r["sparsity"]}):
        for alone, regularized, method in (
            ("magnitude", "l1+magnitude", "magnitude + L1"),
            ("channel", "group_lasso+channel", "channel + group lasso"),
        ):
            a = next(r for r in rows if r["family"] == alone and r["sparsity"] == sparsity)
            b = _chosen(rows, regularized, sparsity)
            comparisons.append(
                {
                    "sparsity": sparsity,
                    "method": method,
                    "alone": a["test_acc"],
                    "regularized": b["test_acc"],
                    "strength": b["strength"],
                    **_paired(b, a),
                }
            )
    return comparisons


def _proximal(rows: list[dict[str, Any]], tolerance: float = 0.01) -> dict[str, Any]:
    """Per strength, against dense; and the sparsest strength whose validation accuracy is within
    ``tolerance`` of dense (chosen without looking at the test split)."""
    dense = next(r for r in rows if r["family"] == "dense")
    grid = [{**r, **_paired(r, dense)} for r in rows if r["family"] == "proximal l1"]
    eligible = [r for r in grid if r["val_acc"] >= dense["val_acc"] - tolerance]
    best = max(eligible, key=lambda r: r["zeros"]) if eligible else None
    return {"tolerance": tolerance, "grid": grid, "chosen": best}


def _pt(x: float) -> str:
    return f"{100 * x:.2f}"


def _diff(r: dict[str, Any]) -> str:
    per_seed = ", ".join(f"{100 * d:+.2f}" for d in r["diff_per_seed"])
    return f"{100 * r['diff']:+.2f} ± {100 * r['diff_std']:.2f} ({per_seed})"


def _markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    dense = next(r for r in rows if r["family"] == "dense")
    proximal = result["proximal"]
    lines = [
        "# Sparse regularization and pruning: accuracy on the digits MLP",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; torch {result['torch']}, lightning {result['lightning']}; "
        f"{result['epochs']} epochs, seeds {result['seeds']}, {result['total_minutes']:.1f} min in all.",
        "",
        f"Dense: test accuracy {_pt(dense['test_acc'])} % (per seed: "
        + ", ".join(_pt(x) for x in dense["test_acc_per_seed"])
        + "). Each seed has its own train/val/test split, so accuracies vary more between seeds than between"
        " arms of one seed: compare the paired differences (same seed, same split, same initial weights).",
        "The test split has 269 images: one image is 0.37 pt. Strengths are chosen on the validation split.",
        "",
        "## Pruning alone vs regularized, then pruned",
        "",
        "| sparsity | method | pruning alone: test % | + regularizer: test % | strength (by val) |"
        " paired difference, pt: mean ± std (per seed) | better / worse seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["comparisons"]:
        lines.append(
            f"| {c['sparsity']:.0%} | {c['method']} | {_pt(c['alone'])} | {_pt(c['regularized'])} | {c['strength']:g}"
            f" | {_diff(c)} | {c['better']} / {c['worse']} |"
        )
    lines += [
        "",
        "## Proximal L1 (`SparseRegularizer(strength, proximal=True)`, Adam), no pruning",
        "",
        "| strength | exact zeros among the selected weights | all-zero hidden units | test % |"
        " vs dense, pt: mean ± std (per seed) |",
        "|---|---|---|---|---|",
    ]
    for r in proximal["grid"]:
        lines.append(
            f"| {r['strength']:g} | {r['zeros']:.2%} | {r['zero_channels']:.2%} | {_pt(r['test_acc'])} | {_diff(r)} |"
        )
    chosen = proximal["chosen"]
    if chosen is not None:
        lines += [
            "",
            f"Sparsest strength whose validation accuracy is within {100 * proximal['tolerance']:g} pt of dense:"
            f" {chosen['strength']:g}, with {chosen['zeros']:.2%} of the selected weights exactly zero and"
            f" {_pt(chosen['test_acc'])} % test accuracy ({100 * chosen['diff']:+.2f} pt vs dense).",
        ]
    lines += [
        "",
        "## Every configuration (mean over seeds)",
        "",
        "Fit times were measured on a shared, loaded machine: they are not a timing benchmark.",
        "",
        "| family | sparsity | strength | val % | test % | test std | exact zeros | all-zero hidden units | fit s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sparsity = "-" if r["sparsity"] is None else f"{r['sparsity']:.0%}"
        lines.append(
            f"| {r['family']} | {sparsity} | {r['strength']:g} | {_pt(r['val_acc'])} | {_pt(r['test_acc'])}"
            f" | {_pt(r['test_acc_std'])} | {r['zeros']:.2%} | {r['zero_channels']:.2%} | {r['fit_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; checks that the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .json results")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    epochs = 2 if args.smoke else 30
    seeds = [0] if args.smoke else [0, 1, 2]
    limit: float | int = 3 if args.smoke else 1.0

    started = time.perf_counter()
    arms = _arms(args.smoke, epochs)
    runs: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(arms))}
    for seed in seeds:
        for i, arm in enumerate(arms):
            run = _fit(seed, epochs, arm["make"](), limit)
            runs[i].append(run)
            print(
                f"seed {seed} {arm['family']:>20} sparsity {arm['sparsity']} strength {arm['strength']:g}:"
                f" val {_pt(run['val_acc'])} test {_pt(run['test_acc'])} zeros {run['zeros']:.2%}"
                f" zero channels {run['zero_channels']:.2%} ({run['fit_s']:.1f} s)",
                flush=True,
            )
    rows = _summarize(arms, runs)
    result = {
        "command": "python benchmarks/regularizer_accuracy.py" + (" --smoke" if args.smoke else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "epochs": epochs,
        "seeds": seeds,
        "total_minutes": (time.perf_counter() - started) / 60,
        "comparisons": _compare(rows),
        "proximal": _proximal(rows),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "regularizer_accuracy_smoke" if args.smoke else "regularizer_accuracy"
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    markdown = _markdown(result)
    atomic_write_text(args.out / f"{stem}.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
