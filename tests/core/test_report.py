import json

import torch
from torch import nn

from lightning_compress import compression_report


def test_counts_params_zeros_and_bytes_of_a_float_model():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.BatchNorm1d(20), nn.Linear(20, 5))
    with torch.no_grad():
        model[0].weight[:5].zero_()  # 50 zeros
        model[3].weight.view(-1)[:7] = 0.0
    r = compression_report(model)
    assert [layer.name for layer in r.layers] == ["0", "3"]
    first, last = r.layers
    assert (first.params, first.zeros, first.shape, first.dtype) == (200, 50, (20, 10), "float32")
    assert first.bytes == (200 + 20) * 4
    assert (last.params, last.zeros) == (100, 7)
    assert r.weight_params == 300 and r.weight_zeros == 57
    assert r.sparsity == 57 / 300
    n_params = sum(p.numel() for p in model.parameters())
    assert r.params == n_params
    # BatchNorm's affine weight is all ones; its zeros only come from biases initialised at zero.
    expected_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert r.zeros == expected_zeros
    n_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert r.bytes == n_bytes
    assert r.nonzero_params == n_params - expected_zeros


class Int8Like(nn.Module):
    """Stands in for an int8 layer: an int8 weight buffer plus float scales."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.tensor([[1, 0, -3], [0, 0, 2]], dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(2))
        self.bias = nn.Parameter(torch.zeros(2))


def test_int8_buffers_count_as_weights_at_one_byte_each():
    r = compression_report(nn.Sequential(Int8Like()))
    (layer,) = r.layers
    assert (layer.params, layer.zeros, layer.dtype) == (6, 3, "int8")
    assert layer.bytes == 6 * 1 + 2 * 4 + 2 * 4
    assert r.params == 6 + 2 and r.zeros == 3 + 2


def test_shared_weights_are_counted_once():
    a = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(a, a)
    assert compression_report(model).params == 16


def test_table_and_dict_views():
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[0].zero_()
    r = compression_report(model)
    text = str(r)
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "type", "shape", "dtype", "params", "zeros", "sparsity", "bytes"]
    assert lines[2].split()[:7] == ["0", "Linear", "3x4", "float32", "12", "4", "33.3%"]
    assert lines[-1].split()[:4] == ["total", "12", "4", "33.3%"]
    d = json.loads(json.dumps(r.to_dict()))
    assert d["layers"][0]["shape"] == [3, 4] and d["weight_zeros"] == 4 and d["sparsity"] == 4 / 12
