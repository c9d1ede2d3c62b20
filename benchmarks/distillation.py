"""How much of the teacher-student gap does distillation recover? Digits MLPs, side by side, 3 seeds.

Per seed, on scikit-learn's digits (``DigitsDataModule(batch_size=64, seed=seed)``):

* teacher: the 64-300-100-10 MLP (50,610 parameters) with dropout 0.5 after each hidden layer,
  trained with cross-entropy (Adam lr 1e-3, 200 epochs): a regularized teacher, as in Hinton et al.;
* student from scratch: ``MLP(hidden=[64])`` (4,810 parameters, 9.5% of the teacher), cross-entropy,
  Adam, 60 epochs, at its own best learning rate (3e-3) and at the distilled arm's (1e-2);
* distilled student: the same student from the same initial weights and batch order, 60 epochs,
  trained by ``DistillationModule(temperature=4, alpha=0.9, lr=1e-2, weight_decay=0)`` (AdamW without
  weight decay is Adam).

The gap recovered is ``(distilled - scratch) / (teacher - scratch)`` in test accuracy (269 images:
one image is 0.37 pt), per seed and for the means over seeds; the headline uses the student from
scratch at its own best learning rate. Both learning rates, T and alpha were chosen on the
validation split of other seeds by ``--sweep``, which reruns that search with these modules.

    python benchmarks/distillation.py          # full run (about 10 min on 2 shared cores)
    python benchmarks/distillation.py --sweep  # the recipe search (about 30 min on 2 shared cores)
    python benchmarks/distillation.py --smoke  # tiny sizes, seconds

Results: ``benchmarks/results/distillation.{md,json}`` and ``distillation_sweep.{md,json}``
(``--out`` to change the folder).
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_trainer

from lightning_compress import DistillationModule
from lightning_compress.core.files import atomic_write_text
from lightning_compress.demo import MLP, Classifier, DigitsDataModule

RESULTS = Path(__file__).resolve().parent / "results"
HINTON_MNIST = {"teacher_errors": 67, "scratch_errors": 146, "distilled_errors": 74}  # Hinton et al. 2015, sec. 3


def teacher_mlp(dropout: float = 0.5) -> nn.Module:
    """The 64-300-100-10 MLP of ``lightning_compress.demo`` with dropout after each hidden layer."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 300),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(100, 10),
    )


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _trainer(epochs: int, limit: float | int) -> pl.Trainer:
    return bench_trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        limit_train_batches=limit,
        check_val_every_n_epoch=epochs,  # validate once, at the end
        num_sanity_val_steps=0,
        deterministic=True,
    )


def _fit(module: pl.LightningModule, data: DigitsDataModule, epochs: int, limit: float | int) -> dict[str, float]:
    trainer = _trainer(epochs, limit)
    start = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - start
    out = {"val_acc": float(trainer.callback_metrics["val/acc"]), "fit_s": seconds}
    tested = trainer.test(module, data, verbose=False)[0]
    out["test_acc"] = float(tested["test/acc"])
    if "test/teacher_acc" in tested:
        out["teacher_test_acc"] = float(tested["test/teacher_acc"])
    return out


HIDDEN = [64]  # the student: 4,810 parameters, 9.5% of the teacher
SCRATCH_LR = 3e-3  # the student from scratch: its best learning rate in --sweep (validation accuracy)
DISTILL_LR = 1e-2  # the distilled student: its best learning rate in --sweep, with T=4 and alpha=0.9


def train_teacher(seed: int, epochs: int, limit: float | int) -> tuple[nn.Module, dict[str, float]]:
    pl.seed_everything(seed, verbose=False)
    teacher = teacher_mlp()
    result = _fit(Classifier(teacher, lr=1e-3), DigitsDataModule(batch_size=64, seed=seed), epochs, limit)
    return teacher.eval(), result


def train_student(
    seed: int,
    teacher: nn.Module | None,
    *,
    hidden: list[int],
    lr: float,
    epochs: int,
    limit: float | int,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> dict[str, float]:
    """From scratch when ``teacher`` is None, else distilled; the same initial student either way."""
    pl.seed_everything(seed + 1000, verbose=False)
    student = MLP(hidden=hidden)
    data = DigitsDataModule(batch_size=64, seed=seed)
    if teacher is None:
        return _fit(Classifier(student, lr=lr), data, epochs, limit)
    module = DistillationModule(
        student, teacher, temperature=temperature, alpha=alpha, lr=lr, weight_decay=0.0, num_classes=10
    )
    return _fit(module, data, epochs, limit)


def recovered(teacher: float, scratch: float, distilled: float) -> float:
    gap = teacher - scratch
    return (distilled - scratch) / gap if gap > 0 else float("nan")


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def run_main(args: argparse.Namespace) -> dict[str, Any]:
    smoke = args.smoke
    seeds = [0] if smoke else [0, 1, 2]
    teacher_epochs, student_epochs = (2, 2) if smoke else (200, 60)
    limit: float | int = 3 if smoke else 1.0
    rows = []
    for seed in seeds:
        teacher, t = train_teacher(seed, teacher_epochs, limit)
        common: dict[str, Any] = {"hidden": HIDDEN, "epochs": student_epochs, "limit": limit}
        scratch = train_student(seed, None, lr=SCRATCH_LR, **common)
        scratch_same = train_student(seed, None, lr=DISTILL_LR, **common)
        distilled = train_student(seed, teacher, lr=DISTILL_LR, **common)
        row = {
            "seed": seed,
            "teacher_test_acc": t["test_acc"],
            "teacher_test_acc_from_module": distilled["teacher_test_acc"],
            "scratch_test_acc": scratch["test_acc"],
            "scratch_same_lr_test_acc": scratch_same["test_acc"],
            "distilled_test_acc": distilled["test_acc"],
            "scratch_val_acc": scratch["val_acc"],
            "scratch_same_lr_val_acc": scratch_same["val_acc"],
            "distilled_val_acc": distilled["val_acc"],
            "scratch_fit_s": scratch["fit_s"],
            "distilled_fit_s": distilled["fit_s"],
            "teacher_fit_s": t["fit_s"],
        }
        row["recovered"] = recovered(row["teacher_test_acc"], row["scratch_test_acc"], row["distilled_test_acc"])
        row["recovered_vs_same_lr"] = recovered(
            row["teacher_test_acc"], row["scratch_same_lr_test_acc"], row["distilled_test_acc"]
        )
        rows.append(row)
        print(
            f"seed {seed}: teacher {row['teacher_test_acc']:.4f}  scratch {row['scratch_test_acc']:.4f}"
            f" (same lr {row['scratch_same_lr_test_acc']:.4f})  distilled {row['distilled_test_acc']:.4f}"
            f"  recovered {row['recovered']:.0%}",
            flush=True,
        )
    accs = ("teacher_test_acc", "scratch_test_acc", "scratch_same_lr_test_acc", "distilled_test_acc")
    means = {k: _mean([r[k] for r in rows]) for k in rows[0] if k not in ("seed", "recovered", "recovered_vs_same_lr")}
    summary = {
        **{f"mean_{k}": v for k, v in means.items()},
        **{f"std_{k}": _std([r[k] for r in rows]) for k in accs},
        "recovered_of_means": recovered(
            means["teacher_test_acc"], means["scratch_test_acc"], means["distilled_test_acc"]
        ),
        "recovered_of_means_vs_same_lr": recovered(
            means["teacher_test_acc"], means["scratch_same_lr_test_acc"], means["distilled_test_acc"]
        ),
        "distilled_over_scratch_fit_time": means["distilled_fit_s"] / means["scratch_fit_s"],
    }
    h = HINTON_MNIST
    student_params, teacher_params = n_params(MLP(hidden=HIDDEN)), n_params(teacher_mlp())
    return {
        "benchmark": "distillation",
        "smoke": smoke,
        "recipe": {
            "data": "scikit-learn digits, DigitsDataModule(batch_size=64, seed=seed): 1259 train / 269 val / 269 test",
            "teacher": f"64-300-100-10 MLP with dropout 0.5 ({teacher_params} parameters), Adam lr 1e-3,"
            f" {teacher_epochs} epochs, cross-entropy",
            "student": f"MLP(hidden={HIDDEN}) ({student_params} parameters, {student_params / teacher_params:.1%} of"
            " the teacher)",
            "student_training": f"Adam (AdamW with weight_decay=0 in DistillationModule), {student_epochs} epochs,"
            " batch 64, the same initial weights and batch order in every arm",
            "scratch": f"cross-entropy, lr {SCRATCH_LR:g} (its best on the validation split in --sweep); also at the"
            f" distilled arm's lr {DISTILL_LR:g}",
            "distillation": f"DistillationModule(temperature=4.0, alpha=0.9, lr={DISTILL_LR:g}) (the best on the"
            " validation split in --sweep)",
            "seeds": seeds,
        },
        "rows": rows,
        "summary": summary,
        "reference": {
            "name": "Hinton et al. 2015, MNIST (test errors of 10,000)",
            **h,
            "recovered": (h["scratch_errors"] - h["distilled_errors"]) / (h["scratch_errors"] - h["teacher_errors"]),
        },
        "goal": {"recovered_of_means": 0.5},
    }


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    smoke = args.smoke
    seeds = [20] if smoke else [20, 21, 22]
    teacher_epochs, student_epochs = (2, 2) if smoke else (200, 60)
    limit: float | int = 3 if smoke else 1.0
    grid_t = [4.0] if smoke else [2.0, 4.0, 8.0, 20.0]
    grid_a = [0.9] if smoke else [0.5, 0.9]
    ce_lrs = [1e-2] if smoke else [1e-3, 3e-3, 1e-2]
    kd_lrs = [1e-2] if smoke else [3e-3, 1e-2]
    results: dict[str, list[float]] = {}
    common: dict[str, Any] = {"hidden": HIDDEN, "epochs": student_epochs, "limit": limit}  # as in run_main
    for seed in seeds:
        teacher, t = train_teacher(seed, teacher_epochs, limit)
        results.setdefault("teacher", []).append(t["val_acc"])
        for lr in ce_lrs:
            r = train_student(seed, None, lr=lr, **common)
            results.setdefault(f"scratch lr={lr:g}", []).append(r["val_acc"])
        for lr in kd_lrs:
            for temperature in grid_t:
                for alpha in grid_a:
                    r = train_student(seed, teacher, lr=lr, temperature=temperature, alpha=alpha, **common)
                    results.setdefault(f"distilled lr={lr:g} T={temperature:g} alpha={alpha:g}", []).append(
                        r["val_acc"]
                    )
        print(f"sweep seed {seed} done", flush=True)
    return {
        "benchmark": "distillation_sweep",
        "smoke": smoke,
        "seeds": seeds,
        "teacher_epochs": teacher_epochs,
        "student_epochs": student_epochs,
        "val_acc": results,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def main_markdown(result: dict[str, Any], command: str) -> str:
    s, rec, ref = result["summary"], result["recipe"], result["reference"]
    conservative = min(s["recovered_of_means"], s["recovered_of_means_vs_same_lr"])
    lines = [
        "# Distillation: the teacher-student gap recovered (digits)",
        "",
        f"Command: `{command}`",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "",
        f"- Data: {rec['data']}",
        f"- Teacher: {rec['teacher']}",
        f"- Student: {rec['student']}",
        f"- Student training (every arm): {rec['student_training']}",
        f"- Student from scratch: {rec['scratch']}",
        f"- Distilled student: {rec['distillation']}",
        "",
        "Test accuracy (%), per seed (mean ± standard deviation over the seeds in the last row); the gap"
        " recovered is (distilled - scratch) / (teacher - scratch):",
        "",
        "| seed | teacher | from scratch | from scratch, distilled arm's lr | distilled | gap recovered |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['seed']} | {_pct(r['teacher_test_acc'])} | {_pct(r['scratch_test_acc'])} |"
            f" {_pct(r['scratch_same_lr_test_acc'])} | {_pct(r['distilled_test_acc'])} | {r['recovered']:.0%} |"
        )
    lines += [
        f"| mean | {_pct(s['mean_teacher_test_acc'])} ± {_pct(s['std_teacher_test_acc'])} |"
        f" {_pct(s['mean_scratch_test_acc'])} ± {_pct(s['std_scratch_test_acc'])} |"
        f" {_pct(s['mean_scratch_same_lr_test_acc'])} ± {_pct(s['std_scratch_same_lr_test_acc'])} |"
        f" {_pct(s['mean_distilled_test_acc'])} ± {_pct(s['std_distilled_test_acc'])} |"
        f" **{s['recovered_of_means']:.0%}** |",
        "",
        f"Gap recovered, of the means over seeds: **{s['recovered_of_means']:.0%}** against the student from scratch"
        f" at its own best learning rate, {s['recovered_of_means_vs_same_lr']:.0%} against the same student at the"
        f" distilled arm's learning rate (goal >= 50%; reference: {ref['name']}, {ref['scratch_errors']} ->"
        f" {ref['distilled_errors']} errors with the teacher at {ref['teacher_errors']}: {ref['recovered']:.0%}).",
        f"The conservative figure, against whichever baseline did better on the test set: **{conservative:.0%}**.",
        "",
        f"Validation accuracy (%), means: scratch {_pct(s['mean_scratch_val_acc'])} (at the distilled arm's lr"
        f" {_pct(s['mean_scratch_same_lr_val_acc'])}), distilled {_pct(s['mean_distilled_val_acc'])}.",
        f"Fit time, means: scratch {s['mean_scratch_fit_s']:.1f} s, distilled {s['mean_distilled_fit_s']:.1f} s"
        f" ({s['distilled_over_scratch_fit_time']:.2f}x: the teacher's forward pass on every batch and its"
        f" accuracy once); teacher {s['mean_teacher_fit_s']:.1f} s. Measured on a shared machine: indicative only.",
        "",
        "One test image is 0.37 pt, so a seed's gap (1-2 pt) is a handful of images: read the mean.",
        "",
    ]
    return "\n".join(lines)


def sweep_markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        "# Distillation recipe search (validation accuracy, digits)",
        "",
        f"Command: `{command}`",
        f"Seeds {result['seeds']} (not the benchmark's); student MLP(hidden={HIDDEN}),"
        f" {result['student_epochs']} epochs, batch 64; the teacher as in the benchmark,"
        f" {result['teacher_epochs']} epochs.",
        "",
        "| arm | per seed (%) | mean (%) |",
        "|---|---|---:|",
    ]
    for name, values in result["val_acc"].items():
        lines.append(f"| {name} | {', '.join(_pct(v) for v in values)} | {_pct(_mean(values))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, numbers meaningless")
    parser.add_argument("--sweep", action="store_true", help="rerun the recipe search instead of the benchmark")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .json results")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and steadier on a shared machine
    args.out.mkdir(parents=True, exist_ok=True)
    command = (
        "python benchmarks/distillation.py" + (" --sweep" if args.sweep else "") + (" --smoke" if args.smoke else "")
    )
    name = ("distillation_sweep" if args.sweep else "distillation") + ("_smoke" if args.smoke else "")
    result = run_sweep(args) if args.sweep else run_main(args)
    result["command"] = command
    markdown = sweep_markdown(result, command) if args.sweep else main_markdown(result, command)
    atomic_write_text(args.out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out / f"{name}.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
