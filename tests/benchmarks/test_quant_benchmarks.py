"""The int8 benchmarks run end to end at tiny sizes (``--smoke``), so they never rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_run import run_benchmark

from lightning_compress.core.quant.fbgemm import fbgemm_available


def _run(script: str, out: Path) -> dict:
    run_benchmark(script, "--smoke", "--out", str(out))
    stem = script.removesuffix(".py") + "_smoke"
    assert (out / f"{stem}.md").read_text().startswith("# ")
    return json.loads((out / f"{stem}.json").read_text())


@pytest.mark.slow
def test_int8_latency_smoke(tmp_path):
    result = _run("int8_latency.py", tmp_path)
    assert [r["batch"] for r in result["linear"]] == [1, 4]
    for row in result["linear"]:
        assert row["ours_dynamic_ratio"] > 0 and row["ours_dynamic_rel_err"] < 0.05
        assert row["ours_static_rel_err"] < 0.1
    assert all(r["ours_dequant_rel_err"] < 0.05 for r in result["conv"])
    assert [r["batch"] for r in result["digits"]] == [1, 4]
    assert set(result["digits_kernels"].values()) == {"float"}  # layers too small for int8 to pay
    assert all(r["ours_dynamic_rel_err"] < 0.02 for r in result["digits"])
    assert "model name" not in result["cpu"] and result["cpu"]
    for row in result["linear"] + result["digits"]:  # the round-by-round ratios lie inside their quartiles
        for key in ("ours_dynamic_ratio", "ours_static_ratio", "ours_dynamic_over_peer", "ours_static_over_peer"):
            assert 0 < row[f"{key}_q1"] <= row[f"{key}_paired"] <= row[f"{key}_q3"]


@pytest.mark.slow
def test_int8_size_smoke(tmp_path):
    (row,) = _run("int8_size.py", tmp_path)["rows"]
    assert 0.2 < row["int8_ratio"] < 0.3
    assert row["int8_sparse90_ratio"] < row["int8_ratio"]


@pytest.mark.slow
def test_int8_accuracy_smoke(tmp_path):
    result = _run("int8_accuracy.py", tmp_path)
    assert {r["model"] for r in result["rows"]} == {"digits-mlp", "digits-cnn"}
    assert all(0 <= r["dynamic"] <= 1 for r in result["rows"])


@pytest.mark.slow
def test_gpu_int8_check_smoke(tmp_path):
    result = _run("gpu_int8_check.py", tmp_path)
    assert result["failures"] == 0 and result["layers"] and result["models"]


@pytest.mark.slow
def test_batch_norm_fold_smoke(tmp_path):
    result = _run("batch_norm_fold.py", tmp_path)
    errors = result["errors"]
    # per channel the fold costs nothing (the same weights up to float rounding); per tensor it does
    for mode in ("dynamic", "weight_only"):
        row = errors[f"{mode}, per channel"]
        assert row["folded"] == pytest.approx(row["not folded"], rel=0.05)
        assert errors[f"{mode}, per tensor"]["folded"] > errors[f"{mode}, per tensor"]["not folded"]
    assert {"PyTorch float32", "PyTorch static, folded", "ONNX Runtime static, folded"} <= set(result["ms"])


@pytest.mark.slow
def test_static_conv_forms_smoke(tmp_path):
    result = _run("static_conv_forms.py", tmp_path)
    assert set(result["ms"]) == {
        "float32", "float32_channels_last", "static_integer", "static_integer_channels_last",
        "static_integer_fconv", "static_float_form", "dynamic",
    }  # fmt: skip
    (row,) = result["agreement"]
    assert 0 <= row["integer_vs_ort"] <= 0.02 and 0 <= row["float_vs_ort"] <= 0.05


@pytest.mark.slow
def test_sparse_linear_smoke(tmp_path):
    result = _run("sparse_linear.py", tmp_path)
    rows = {(r["kept"], r["batch"]): r for r in result["layers"]}
    assert set(rows) == {(0.1, 1), (0.1, 64), (0.05, 1), (0.05, 64)}
    # 300 inputs: 10 % kept is still the dense float kernel, 5 % kept takes the sparse one
    assert rows[(0.1, 64)]["kernel"] == "float" and rows[(0.05, 64)]["kernel"] == "sparse"
    assert all(0 < r["ours_rel_err"] < 0.01 and r["ours_csr_ratio"] > 0 for r in result["layers"])
    assert result["model_kernels"] == {"0": "float", "2": "sparse", "4": "float"}
    assert [r["batch"] for r in result["model"]] == [1, 64]


@pytest.mark.skipif(not fbgemm_available(), reason="compares against fbgemm, which this torch / CPU lacks")
def test_int8_crossover_smoke(tmp_path):
    result = _run("int8_crossover.py", tmp_path)
    rows = result["rows"]
    assert [(r["layer"], r["batch"]) for r in rows] == [("300x100", 16), ("300x100", 256)]
    # the forced fbgemm product is the int8 one: close to the float layer, not equal to it
    assert all(0 < r["fbgemm_dynamic_rel_err"] < 0.02 for r in rows)
    assert all(r[f"{k}_ratio"] > 0 for r in rows for k in ("fbgemm_dynamic", "fbgemm_static", "peer"))
