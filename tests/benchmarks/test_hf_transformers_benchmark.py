"""benchmarks/hf_transformers.py runs end to end at tiny sizes (``--smoke``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_transformers_benchmark_smoke(tmp_path):
    pytest.importorskip("transformers")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "hf_transformers.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "hf_transformers_smoke.md").read_text().startswith("# Hugging Face transformers")
    r = json.loads((tmp_path / "hf_transformers_smoke.json").read_text())
    for name in ("gpt2", "vit"):
        s = r["sizes"][name]
        assert 0 < s["int8"] < s["float_artifact"] and s["pruned50_int8"] <= s["int8"] + 0.01
    if "minilm" in r["sizes"]:  # the shipped MiniLM's tokenizer (a tiny model of its vocabulary in smoke)
        assert r["sizes"]["minilm"]["int8"] < 0.3  # the 30522-row embedding is int8 too
        assert all(c["min"] > 0.99 for c in r["minilm_cosine"].values())
    v = r["view_cost"]
    assert v["vit_weight_reads_per_forward"] >= 1 and v["int8_weight_dtype_us"] > 0
