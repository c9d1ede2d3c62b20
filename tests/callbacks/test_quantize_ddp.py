"""QuantizeOnFitEnd under ``strategy="ddp"`` on two CPU processes (see tests/scripts/ddp_quantize.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import load_ranks, run_ddp_script

from lightning_compress import load_compressed
from lightning_compress.demo import MLP, Classifier


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_ranks_hold_identical_int8_weights_and_scales(tmp_path):
    run_ddp_script("ddp_quantize.py", tmp_path)
    state0, state1 = load_ranks(tmp_path, "state")
    assert state0.keys() == state1.keys()
    for key in state0:
        assert torch.equal(state0[key], state1[key]), key
    assert state0["backbone.net.1.weight"].dtype == torch.int8

    # The ranks saw different activations on their own batches; the scales are those of the union.
    local0, local1 = load_ranks(tmp_path, "local")
    assert any(not torch.equal(local0[n], local1[n]) for n in local0)
    for name in local0:
        low = torch.minimum(local0[name][0], local1[name][0])
        high = torch.maximum(local0[name][1], local1[name][1])
        expected = torch.maximum(low.abs(), high.abs()) / 127
        torch.testing.assert_close(state0[f"{name}.input_scale"], expected)

    # Both ranks report the same agreement numbers, gathered over all calibration batches.
    report0, report1 = load_ranks(tmp_path, "report")
    assert report0 == report1 and report0["calibration_batches"] == 6

    # Rank zero wrote the artifact (and no temporary file is left); it restores rank zero's model.
    files = sorted(p.name for p in tmp_path.iterdir() if "int8" in p.name)
    assert files == ["model.int8.pt"]
    fresh = load_compressed(tmp_path / "model.int8.pt", Classifier(MLP()))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state0.items())
