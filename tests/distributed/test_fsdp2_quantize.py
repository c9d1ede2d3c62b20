"""QuantizeOnFitEnd under ModelParallelStrategy (FSDP2) on two CPU processes: one int8 model on every rank.

Before 0.2 the conversion crashed at fit end (``aten._int_mm.default got mixed torch.Tensor and
DTensor``). The script runs with a hard timeout in its own process group: a hang fails the test.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import load_ranks, run_ddp_script


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any]:
    out = tmp_path_factory.mktemp("fsdp2_quantize")
    run_ddp_script("fsdp2_quantize.py", out, timeout=300)
    a, b = load_ranks(out, "quantized")
    return a, b, out


@pytest.mark.ddp
def test_every_rank_holds_the_same_plain_int8_model(ranks) -> None:
    a, b, _ = ranks
    assert a["dtensors"] == b["dtensors"] == []  # gathered once: plain tensors, no FSDP wrapper left
    int8 = {n for n, t in a["types"].items() if t == "Int8Linear"}
    assert int8 == {"body.0", "body.2", "body.4", "body.6", "head"}
    assert a["types"][""] == "ShardedNet"  # fully_shard's FSDPShardedNet class is undone
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert a["state"]["body.0.weight"].dtype == torch.int8
    assert torch.equal(a["output"], b["output"])
    assert a["report"]["layers_converted"] == 5 and a["report"]["top1_agreement"] > 0.9


@pytest.mark.ddp
def test_pruned_zeros_survive_in_the_int8_weights(ranks) -> None:
    a, _, _ = ranks
    for name, mask in a["masks"].items():
        weight = a["state"][name]
        assert weight.shape == mask.shape
        assert (weight[~mask] == 0).all(), name
        assert (
            (weight != 0)
            .view(weight.shape[0], -1)[:, : weight.shape[1] // 4 * 4]
            .reshape(weight.shape[0], -1, 4)
            .sum(-1)
            <= 2
        ).all()


@pytest.mark.ddp
def test_the_artifact_loads_into_a_plain_model_with_the_same_outputs(ranks) -> None:
    a, b, out = ranks
    assert (out / "model.int8.pt").is_file()
    assert not any(p.name.startswith("model.int8.pt.") for p in out.iterdir())  # no leftover temporary file
    assert torch.equal(a["loaded_output"], a["output"]) and torch.equal(b["loaded_output"], b["output"])
