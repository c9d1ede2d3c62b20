"""benchmarks/hf_transformers.py runs end to end at tiny sizes (``--smoke``), also as benchmarks/transformers.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from benchmark_run import BENCHMARKS, run_benchmark


@pytest.mark.slow
@pytest.mark.parametrize("script", ["hf_transformers.py", "transformers.py"])
def test_transformers_benchmark_smoke(tmp_path, script):
    pytest.importorskip("transformers")
    run_benchmark(script, "--smoke", "--out", str(tmp_path), timeout=600)
    markdown = (tmp_path / "hf_transformers_smoke.md").read_text()
    assert markdown.startswith("# Hugging Face transformers") and f"{script} --smoke" in markdown
    r = json.loads((tmp_path / "hf_transformers_smoke.json").read_text())
    for name in ("gpt2", "vit"):
        s = r["sizes"][name]
        assert 0 < s["int8"] < s["float_artifact"] and s["pruned50_int8"] <= s["int8"] + 0.01
    if "minilm" in r["sizes"]:  # the shipped MiniLM's tokenizer (a tiny model of its vocabulary in smoke)
        assert r["sizes"]["minilm"]["int8"] < 0.3  # the 30522-row embedding is int8 too
        assert all(c["min"] > 0.99 for c in r["minilm_cosine"].values())
    v = r["view_cost"]
    assert v["vit_weight_reads_per_forward"] >= 1 and v["int8_weight_dtype_us"] > 0
    assert "SIMD flags" in r["cpu"]


def test_import_transformers_in_the_benchmarks_folder_gets_the_package():
    """benchmarks/transformers.py, found first by a script of that folder, hands over the real package."""
    package = pytest.importorskip("transformers")
    code = "import transformers, transformers.models.bert; print(transformers.__file__)"
    done = subprocess.run(  # `python -c` puts the working directory, benchmarks/, first on sys.path
        [sys.executable, "-c", code], cwd=BENCHMARKS, capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == package.__file__
