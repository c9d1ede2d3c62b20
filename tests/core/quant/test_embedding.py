import copy

import pytest
import torch
from torch import nn

from lightning_compress.core.quant.convert import quantizable_targets, quantize_model
from lightning_compress.core.quant.embedding import Int8Embedding
from lightning_compress.core.quant.primitives import dequantize


@pytest.mark.parametrize("per_channel", [True, False])
def test_lookup_equals_the_dequantized_rows(per_channel):
    emb = nn.Embedding(50, 16)
    with torch.no_grad():
        emb.weight[7] *= 100  # one large row: per-row scales keep the other rows precise
    q = Int8Embedding.from_float(emb, per_channel=per_channel)
    assert q.int8_weight.dtype == torch.int8 and q.int8_weight.shape == (50, 16)
    assert q.weight_scale.shape == ((50,) if per_channel else (1,))
    ids = torch.tensor([[1, 7, 49], [0, 0, 3]])
    emb.requires_grad_(False)
    table = dequantize(q.int8_weight, q.weight_scale)
    torch.testing.assert_close(q(ids), table[ids], rtol=0, atol=0)
    err = (q(ids) - emb(ids)).abs().amax(-1)  # per looked-up row
    bound = q.weight_scale.expand(50)[ids] / 2 + 1e-7
    assert bool((err <= bound).all())
    if per_channel:
        assert float(err[1, 0]) < 0.01  # row 0 is not rounded at row 7's scale


def test_padding_row_stays_exactly_zero_and_dtype_follows_the_model():
    emb = nn.Embedding(10, 4, padding_idx=-1)
    q = Int8Embedding.from_float(emb)
    assert q.padding_idx == 9 and torch.equal(q(torch.tensor([9])), torch.zeros(1, 4))
    assert "padding_idx=9" in repr(q)
    q.half()
    assert q(torch.tensor([1])).dtype == torch.float16 and q.weight.dtype == torch.float16


def test_max_norm_is_refused_and_left_float_by_the_conversion():
    emb = nn.Embedding(10, 4, max_norm=1.0)
    with pytest.raises(ValueError, match="max_norm renormalizes its weight in place"):
        Int8Embedding.from_float(emb)
    model = nn.ModuleDict({"emb": emb, "ok": nn.Embedding(10, 4), "fc": nn.Linear(4, 2)})
    targets, skipped = quantizable_targets(model)  # Embedding is in the default include
    assert [t.name for t in targets] == ["ok", "fc"]
    assert skipped == {"emb": "Embedding with max_norm renormalizes its weight in place, which an int8 table cannot"}


def test_tied_embedding_and_head_become_one_int8_tensor():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 8)
            self.head = nn.Linear(8, 30, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    model = TiedLM()
    ref = copy.deepcopy(model)
    targets, _ = quantizable_targets(model)
    assert [(t.name, t.tied) for t in targets] == [("emb", ("head.weight",))]
    result = quantize_model(model, targets)
    assert result.converted == {"emb": "dynamic", "head": "dynamic"}
    assert model.head._buffers["weight"] is model.emb._buffers["weight"]
    assert model.head.weight_scale is model.emb.weight_scale
    ids = torch.randint(0, 30, (2, 5))
    with torch.no_grad():
        assert float((model(ids) - ref(ids)).norm() / ref(ids).norm()) < 0.03
