import copy

import pytest
import torch
from torch import nn

from lightning_compress.core.quant.convert import int8_layers, quantizable_targets, quantize_model
from lightning_compress.core.quant.transformer import (
    Int8InProjMultiheadAttention,
    Int8MultiheadAttention,
    Int8TransformerEncoderLayer,
    adapt_parents,
)

# The float reference models take PyTorch's nested-tensor fast path, which warns that it is a prototype.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage"),
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True, but self.use_nested_tensor is False"),
]


def _encoder(batch_first, norm_first=False):
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_transformer_encoder_converts_runs_and_agrees(batch_first, train, mode):
    enc = _encoder(batch_first)
    ref = copy.deepcopy(enc)
    targets, _ = quantizable_targets(enc)
    assert len(targets) == 8  # in_proj_weight (the attention), out_proj, linear1, linear2 in each layer
    result = quantize_model(enc, targets, mode=mode)
    assert len(int8_layers(enc)) == 8
    assert isinstance(enc.layers[0].self_attn, Int8InProjMultiheadAttention)
    assert enc.layers[0].self_attn.state_dict()["in_proj_weight"].dtype == torch.int8
    assert isinstance(enc.layers[0], Int8TransformerEncoderLayer)
    assert isinstance(enc.layers[0].self_attn, Int8MultiheadAttention)
    assert enc.layers[0].self_attn.out_proj.int8_weight.dtype == torch.int8
    assert "layers.0" in result.adapted
    enc.train(train)
    ref.train(train)
    shape = (3, 5, 32) if batch_first else (5, 3, 32)
    x = torch.randn(*shape)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[:, -2:] = True
    keep = (~pad).unsqueeze(-1) if batch_first else (~pad).t().unsqueeze(-1)
    with torch.no_grad():
        assert _rel(enc(x), ref(x)) < 0.02
        # PyTorch's fast path returns zeros at padded positions, its slow path does not: compare the rest.
        out, want = enc(x, src_key_padding_mask=pad), ref(x, src_key_padding_mask=pad)
        assert _rel(out * keep, want * keep) < 0.02
        causal = nn.Transformer.generate_square_subsequent_mask(5)
        assert _rel(enc(x, mask=causal, is_causal=True), ref(x, mask=causal, is_causal=True)) < 0.02


def test_without_adaptation_the_eval_fast_path_breaks():
    enc = _encoder(batch_first=True).eval()
    targets, _ = quantizable_targets(enc)
    quantize_model(enc, targets)
    # Undo the adaptation: PyTorch's fused kernel would then read the int8 buffers directly.
    for layer in enc.layers:
        layer.__class__ = nn.TransformerEncoderLayer
        layer.self_attn.__class__ = nn.MultiheadAttention
    with torch.no_grad(), pytest.raises(Exception):  # noqa: B017 - whatever the fused kernel raises
        enc(torch.randn(2, 4, 32))


def test_norm_first_and_need_weights_and_cross_attention():
    enc = _encoder(batch_first=True, norm_first=True).eval()
    ref = copy.deepcopy(enc)
    quantize_model(enc, quantizable_targets(enc)[0])
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        assert _rel(enc(x), ref(x)) < 0.02
    mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=8).eval()
    ref_mha = copy.deepcopy(mha)
    quantize_model(mha, quantizable_targets(mha)[0])
    assert isinstance(mha, Int8MultiheadAttention)
    q, kv = torch.randn(3, 2, 16), torch.randn(4, 2, 8)
    with torch.no_grad():
        out, weights = mha(q, kv, kv, need_weights=True)
        want, want_weights = ref_mha(q, kv, kv, need_weights=True)
    assert _rel(out, want) < 0.02
    torch.testing.assert_close(weights, want_weights)  # attention weights do not involve out_proj


def test_decoder_layers_and_excluded_out_proj():
    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0), 1).eval()
    ref = copy.deepcopy(dec)
    quantize_model(dec, quantizable_targets(dec)[0])
    tgt, mem = torch.randn(3, 2, 16), torch.randn(4, 2, 16)
    with torch.no_grad():
        assert _rel(dec(tgt, mem), ref(tgt, mem)) < 0.02
    enc = _encoder(batch_first=True).eval()
    ref = copy.deepcopy(enc)
    quantize_model(enc, quantizable_targets(enc, exclude=["*.out_proj", "*.self_attn"])[0])
    assert type(enc.layers[0].self_attn) is nn.MultiheadAttention  # its in_proj and out_proj stayed float
    assert isinstance(enc.layers[0], Int8TransformerEncoderLayer)  # linear1/linear2 are int8
    with torch.no_grad():
        assert _rel(enc(torch.ones(2, 3, 32)), ref(torch.ones(2, 3, 32))) < 0.02


def test_adapt_parents_leaves_float_models_alone():
    enc = _encoder(batch_first=True)
    assert adapt_parents(enc) == []
    assert type(enc.layers[0]) is nn.TransformerEncoderLayer and enc.use_nested_tensor


@pytest.mark.parametrize("per_channel", [True, False])
def test_packed_in_proj_weight_is_int8_with_scales_per_row_or_per_projection(per_channel):
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():  # make the three projections of very different sizes, so one scale would not fit all
        mha.in_proj_weight[16:32] *= 10
        mha.in_proj_weight[32:] *= 0.1
    ref = copy.deepcopy(mha)
    targets, _ = quantizable_targets(mha, include=["MultiheadAttention"], exclude=["out_proj"])
    quantize_model(mha, targets, per_channel=per_channel)
    assert isinstance(mha, Int8InProjMultiheadAttention)
    state = mha.state_dict()
    assert state["in_proj_weight"].dtype == torch.int8 and state["in_proj_weight"].shape == (48, 16)
    scale = state["in_proj_weight_scale"]
    float_w = ref.in_proj_weight.detach()
    if per_channel:
        torch.testing.assert_close(scale, float_w.abs().amax(1) / 127)
    else:  # one scale per projection, repeated over its rows
        want = torch.stack([b.abs().max() / 127 for b in float_w.split(16)]).repeat_interleave(16)
        torch.testing.assert_close(scale, want)
    assert mha.in_proj_weight.dtype == torch.float32  # what code that reads the dtype sees
    torch.testing.assert_close(mha.in_proj_weight.dequantize(), float_w, atol=float(scale.max()) / 2 + 1e-7, rtol=0)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert _rel(mha(x, x, x)[0], ref(x, x, x)[0]) < 0.02
    mha.half()
    assert mha.in_proj_weight_scale.dtype == torch.float32 and mha.in_proj_weight.dtype == torch.float16
