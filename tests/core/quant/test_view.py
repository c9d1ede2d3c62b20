"""The float-typed weight of int8 layers: model code that reads ``.weight.dtype`` keeps computing in float."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_compress.core.quant.convert import quantizable_targets, quantize_model
from lightning_compress.core.quant.modules import Int8Conv2d, Int8Linear
from lightning_compress.core.quant.view import Int8WeightView


def test_the_weight_attribute_reads_float_and_the_state_dict_stays_int8():
    layer = nn.Linear(16, 8)
    q = Int8Linear.from_float(layer)
    w = q.weight
    assert isinstance(w, Int8WeightView) and w.dtype == torch.float32 and w.device == layer.weight.device
    assert w.shape == (8, 16) and w.is_floating_point() and not w.requires_grad
    assert q.int8_weight is q._buffers["weight"] and q.int8_weight.dtype == torch.int8
    assert q.state_dict()["weight"].dtype == torch.int8 and set(q.state_dict()) == {"weight", "weight_scale", "bias"}
    assert [n for n, _ in q.named_buffers()] == ["weight", "weight_scale"]
    # Every operation runs on the dequantized weight.
    deq = q.dequantize_weight()
    assert torch.equal(w.dequantize(), deq) and torch.equal(w.clone(), deq) and torch.equal(w * 1, deq)
    x = torch.randn(3, 16)
    torch.testing.assert_close(F.linear(x, q.weight, q.bias), F.linear(x, deq, q.bias))
    assert "Int8WeightView(int8 (8, 16)" in repr(w)


def test_compute_dtype_follows_half_and_bfloat16_but_storage_does_not():
    q = Int8Linear.from_float(nn.Linear(16, 8))
    q.to(torch.bfloat16)
    assert q.weight.dtype == torch.bfloat16 and q.int8_weight.dtype == torch.int8
    assert q.weight_scale.dtype == torch.float32
    q.half()
    assert q.weight.dtype == torch.float16
    q.float()
    assert q.weight.dtype == torch.float32
    assert Int8Linear.from_float(nn.Linear(4, 4).to(torch.bfloat16)).weight.dtype == torch.bfloat16


def test_a_model_that_casts_its_input_to_the_weight_dtype_computes_in_float():
    class CastsLikeViT(nn.Module):  # transformers' ViTEmbeddings: pixel_values.to(projection.weight.dtype)
        def __init__(self):
            super().__init__()
            self.projection = nn.Conv2d(3, 8, 4, stride=4)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            x = x.to(self.projection.weight.dtype)
            x = self.projection(x).flatten(2).mean(-1)
            return self.head(x.to(device=self.head.weight.device))

    model = CastsLikeViT()
    ref = copy.deepcopy(model)
    quantize_model(model, quantizable_targets(model)[0])
    assert isinstance(model.projection, Int8Conv2d)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        rel = float((model(x) - ref(x)).norm() / ref(x).norm())
    assert rel < 0.02


def test_the_view_is_traceable_by_torch_export():
    class ReadsDtype(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(x.to(self.fc.weight.dtype))

    model = ReadsDtype().eval()
    quantize_model(model, quantizable_targets(model, include=["Linear"])[0], mode="weight_only")
    x = torch.randn(2, 8)
    try:
        exported = torch.export.export(model, (x,))
    except Exception as err:  # pragma: no cover - report which part of export failed
        pytest.fail(f"torch.export failed on a model that reads an int8 layer's weight dtype: {err}")
    torch.testing.assert_close(exported.module()(x), model(x))
