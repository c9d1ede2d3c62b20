"""Test accuracy of float32 against int8 on the digits MLP and CNN, 3 seeds, side by side in one run.

Each seed trains the float model (``Classifier`` over ``DigitsDataModule``), tests it, then converts
a copy with each mode exactly as ``QuantizeOnFitEnd`` does at fit end (the core's ``quantize``:
min/max observers on ``calibration_batches`` training batches for ``static``, through ``_common.to_int8``)
and tests the int8 model with the same ``trainer.test``. The figure is the drop in points.

    python benchmarks/int8_accuracy.py           # 3 seeds x 30 epochs; writes results/int8_accuracy.{md,json}
    python benchmarks/int8_accuracy.py --smoke   # 1 seed, 1 epoch
"""

from __future__ import annotations

import statistics
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_trainer, first_batches, seeds_parser, table_head, to_int8, write_results

from lightning_compress.demo import MLP, Classifier, DigitsDataModule, SmallCNN

MODES = ("dynamic", "static", "weight_only")


def trainer(epochs: int) -> pl.Trainer:
    return bench_trainer(max_epochs=epochs, accelerator="cpu", deterministic=True)


def main() -> None:
    args = seeds_parser(__doc__, epochs=30).parse_args()
    seeds = 1 if args.smoke else args.seeds
    epochs = 1 if args.smoke else args.epochs
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    rows = []
    for name, make in (("digits-mlp", MLP), ("digits-cnn", SmallCNN)):
        for seed in range(seeds):
            pl.seed_everything(seed, verbose=False)
            dm = DigitsDataModule(batch_size=64, seed=seed)
            model = Classifier(make())
            t = trainer(epochs)
            t.fit(model, datamodule=dm)
            row: dict[str, object] = {"model": name, "seed": seed}
            row["float32"] = t.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
            for mode in MODES:
                calibration = first_batches(dm.train_dataloader(), args.calibration_batches) if mode == "static" else ()
                q = to_int8(model, mode, calibration=calibration)
                acc = trainer(epochs).test(q, datamodule=dm, verbose=False)[0]["test/acc"]
                row[mode] = acc
                row[f"{mode}_drop_pt"] = 100 * (row["float32"] - acc)  # type: ignore[operator]
            rows.append(row)
            print(
                f"{name} seed {seed}: float32 {100 * row['float32']:.2f}% | "  # type: ignore[operator]
                + " | ".join(f"{m} {100 * row[m]:.2f}% (drop {row[f'{m}_drop_pt']:+.2f} pt)" for m in MODES),  # type: ignore[operator]
                flush=True,
            )
    summary = {}
    for name in ("digits-mlp", "digits-cnn"):
        sel = [r for r in rows if r["model"] == name]
        summary[name] = {
            m: {
                "mean_drop_pt": statistics.mean(r[f"{m}_drop_pt"] for r in sel),  # type: ignore[misc]
                "max_drop_pt": max(r[f"{m}_drop_pt"] for r in sel),  # type: ignore[type-var]
            }
            for m in MODES
        }
    command = "python benchmarks/int8_accuracy.py" + (" --smoke" if args.smoke else "")
    result = {"command": command, "torch": torch.__version__, "epochs": epochs, "rows": rows, "summary": summary}
    md = [
        f"# Test accuracy, float32 vs int8 ({command})",
        "",
        f"torch {torch.__version__}; {epochs} epochs, digits test set (269 images: one image is 0.37 pt).",
        "Goal: drop <= 0.5 pt.",
        "",
        *table_head("model", "seed", "float32", *(f"{m} (drop pt)" for m in MODES)),
    ]
    for r in rows:
        cells = [f"{100 * r[m]:.2f} ({r[f'{m}_drop_pt']:+.2f})" for m in MODES]  # type: ignore[operator]
        md.append(f"| {r['model']} | {r['seed']} | {100 * r['float32']:.2f} | " + " | ".join(cells) + " |")  # type: ignore[operator]
    md += [
        "",
        *table_head("model", *(f"{m} mean / max drop pt" for m in MODES)),
    ]
    for name, s in summary.items():
        md.append(
            f"| {name} | "
            + " | ".join(f"{s[m]['mean_drop_pt']:+.2f} / {s[m]['max_drop_pt']:+.2f}" for m in MODES)
            + " |"
        )
    write_results(args.out, "int8_accuracy_smoke" if args.smoke else "int8_accuracy", result, md)


if __name__ == "__main__":
    main()
