import copy
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from lightning_compress.core.quant.conv1d import Int8Conv1D  # noqa: E402
from lightning_compress.core.quant.convert import int8_layers, quantizable_targets, quantize_model  # noqa: E402
from lightning_compress.core.quant.modules import Int8Linear  # noqa: E402
from lightning_compress.core.quant.table import int8_kind_for, int8_kind_of  # noqa: E402


def test_scales_run_along_the_true_output_channels():
    layer = Conv1D(6, 10)  # nf=6 outputs, nx=10 inputs: weight [10, 6]
    with torch.no_grad():
        layer.weight.mul_(torch.arange(1, 7.0))  # each output column has its own range
    q = Int8Conv1D.from_float(layer)
    assert q.int8_weight.shape == (6, 10) and q.int8_weight.is_contiguous()
    torch.testing.assert_close(q.weight_scale, layer.weight.detach().abs().amax(0) / 127)
    assert q.weight.shape == (10, 6) and q.weight.dtype == torch.float32  # reads as the float layer did
    torch.testing.assert_close(q.weight.dequantize(), layer.weight.detach(), atol=float(q.weight_scale.max()), rtol=0)
    assert set(q.state_dict()) == {"weight", "weight_scale", "bias"} and q.state_dict()["weight"].dtype == torch.int8


@pytest.mark.parametrize("mode", ["dynamic", "static", "weight_only"])
def test_forward_equals_the_dynamic_product_written_another_way(mode):
    layer = Conv1D(12, 40)
    x = torch.randn(3, 5, 40)
    scale = x.abs().max() / 127 if mode == "static" else None
    q = Int8Conv1D.from_float(layer, mode, input_scale=scale)
    with torch.no_grad():
        out, ref = q(x), layer(x)
    assert out.shape == ref.shape == (3, 5, 12)
    assert float((out - ref).norm() / ref.norm()) < 0.02
    # The same int8 data in an Int8Linear (weight [out, in]) computes exactly the same thing.
    linear = Int8Linear(40, 12, mode=mode)
    linear.load_state_dict(q.state_dict())
    with torch.no_grad():
        assert torch.equal(linear(x), out)


def test_the_table_knows_conv1d_once_transformers_is_imported():
    assert "transformers.pytorch_utils" in sys.modules
    layer = Conv1D(4, 4)
    assert int8_kind_for(layer).name == "Int8Conv1D"
    assert int8_kind_of(Int8Conv1D.from_float(layer)).name == "Int8Conv1D"

    class Overrides(Conv1D):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.ModuleDict({"a": Conv1D(4, 4), "b": Overrides(4, 4)})
    targets, skipped = quantizable_targets(model)  # "Linear" covers Conv1D
    assert [t.name for t in targets] == ["a"] and skipped == {"b": "Overrides overrides Conv1D.forward"}


def test_gpt2_blocks_convert_and_agree():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=16)
    model = transformers.GPT2Model(cfg).eval()
    ref = copy.deepcopy(model)
    quantize_model(model, quantizable_targets(model, include=["Linear"])[0])
    assert sorted(type(m).__name__ for m in int8_layers(model).values()) == ["Int8Conv1D"] * 4
    ids = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        out, want = model(ids).last_hidden_state, ref(ids).last_hidden_state
    assert float((out - want).norm() / want.norm()) < 0.02
