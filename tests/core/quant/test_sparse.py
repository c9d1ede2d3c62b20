import io
import math

import pytest
import torch
from torch import nn

from lightning_compress.core.quant import kernels, sparse
from lightning_compress.core.quant.modules import Int8Linear

pytestmark = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the CSR route needs MKL (x86)")


@pytest.fixture
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = kernels.csr_linear

    def counted(*args):
        calls.append(args[2].shape)
        return real(*args)

    monkeypatch.setattr(kernels, "csr_linear", counted)
    return calls


def _pruned(k=300, n=100, keep=0.05, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        scores = torch.rand(n, k)
        lin.weight[scores >= torch.quantile(scores, keep)] = 0.0  # about `keep` of the weights left
    return Int8Linear.from_float(lin, "dynamic")


def test_rule_counts_non_zero_int8_weights_inputs_and_outputs():
    wide = torch.zeros(128, 300, dtype=torch.int8)
    wide.view(-1)[:3840] = 1  # exactly 10 % with 128 outputs
    assert sparse.sparse_pays(wide)
    wide.view(-1)[3840] = -1  # one more
    assert not sparse.sparse_pays(wide)
    w = torch.zeros(100, 300, dtype=torch.int8)
    w.view(-1)[:1500] = 1  # exactly 5 % with 64-127 outputs
    assert sparse.sparse_pays(w)
    w.view(-1)[1500] = 1
    assert not sparse.sparse_pays(w)
    odd = torch.zeros(101, 301, dtype=torch.int8)
    odd.view(-1)[:1521] = 1  # 5 % of 30,401 weights is 1,520.05: rounded up (a pruning target's rounding)
    assert sparse.sparse_pays(odd)
    odd.view(-1)[1521] = 1
    assert not sparse.sparse_pays(odd)
    narrow = torch.zeros(100, 255, dtype=torch.int8)
    narrow[:, 0] = 1
    assert not sparse.sparse_pays(narrow)  # fewer than SPARSE_MIN_IN inputs
    few_out = torch.zeros(63, 1024, dtype=torch.int8)
    few_out[:, 0] = 1
    assert not sparse.sparse_pays(few_out) and sparse.sparse_pays(torch.cat([few_out, few_out[:1]]))  # 63 / 64
    assert not sparse.sparse_pays(torch.zeros(3, 300, 300, dtype=torch.int8))  # not a Linear weight
    assert (sparse.SPARSE_MIN_IN, sparse.SPARSE_MIN_OUT, sparse.SPARSE_WIDE_OUT) == (256, 64, 128)
    assert (sparse.SPARSE_MIN_ROWS, sparse.SPARSE_MIN_WORK, sparse.SPARSE_MAX_DENSITY) == (32, 131072, 0.1)


def test_pruned_layer_reports_sparse_and_keeps_a_csr_of_its_dequantized_weight():
    layer = _pruned()
    assert layer.kernel == "sparse" and "sparse" in kernels.KERNELS
    assert kernels.prepare_kernels(nn.Sequential(layer)) == {"0": "sparse"}
    csr = layer.__dict__[kernels._ATTR].sparse
    assert csr.layout == torch.sparse_csr
    assert csr._nnz() == int(torch.count_nonzero(layer.int8_weight))
    assert torch.equal(csr.to_dense(), layer.dequantize_weight())
    assert set(layer.state_dict()) == {"weight", "weight_scale", "bias"}  # nothing of it in the file
    dense = Int8Linear.from_float(nn.Linear(300, 100), "dynamic")
    small_in = Int8Linear.from_float(nn.Linear(64, 300), "dynamic")
    with torch.no_grad():
        small_in.int8_weight[:, 6:] = 0
    assert dense.kernel == "float" and small_in.kernel == "float"
    # 10 % left: 100 outputs stay dense, 128 take the CSR route
    assert _pruned(keep=0.1).kernel == "float" and _pruned(n=128, keep=0.1).kernel == "sparse"


def test_enough_rows_on_one_thread_take_the_csr_product(one_thread, spy):
    layer = _pruned()
    nnz = int(torch.count_nonzero(layer.int8_weight))
    rows = math.ceil(sparse.SPARSE_MIN_WORK / nnz)  # rows x non-zero weights reach 131,072 here
    assert 1400 < nnz <= 1500 and rows > sparse.SPARSE_MIN_ROWS
    x = torch.randn(rows, 300)
    with torch.no_grad():
        got = layer(x)
    assert spy == [(rows, 300)]
    w = layer.dequantize_weight()
    # Written another way: the dense product of the same dequantized weight.
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, layer.bias), rtol=1e-5, atol=1e-5)
    assert got.is_contiguous() and got.shape == (rows, 100)
    seq = torch.cat([x, x]).reshape(2, rows, 300)  # leading dims flatten to 2 * rows
    with torch.no_grad():
        assert torch.equal(layer(seq)[1], got)
        layer(x[1:])  # one row fewer: the dense product
    assert spy == [(rows, 300), (2 * rows, 300)]


def test_wide_layer_takes_the_csr_product_from_32_rows(one_thread, spy):
    layer = _pruned(k=784, n=256, keep=0.1)
    assert layer.kernel == "sparse" and 32 * int(torch.count_nonzero(layer.int8_weight)) >= sparse.SPARSE_MIN_WORK
    with torch.no_grad():
        layer(torch.randn(31, 784))
        assert spy == []
        got = layer(x := torch.randn(32, 784))
    assert spy == [(32, 784)]
    torch.testing.assert_close(got, torch.nn.functional.linear(x, layer.dequantize_weight(), layer.bias))


def test_dense_product_with_too_few_rows_with_two_threads_or_with_autograd(one_thread, spy):
    layer = _pruned()
    wt = layer.dequantize_weight().t().contiguous()
    x = torch.randn(87, 300)  # 87 x ~1,500 non-zero weights < 131,072
    with torch.no_grad():
        assert torch.equal(layer(x), torch.addmm(layer.bias, x, wt))
    assert spy == []
    x = torch.randn(256, 300)
    torch.set_num_threads(2)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.addmm(layer.bias, x, wt))
    torch.set_num_threads(1)
    assert spy == []
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert spy == []
    torch.testing.assert_close(xg.grad, layer.dequantize_weight().sum(0).expand(256, 300))


def test_non_finite_input_rows_stay_non_finite(one_thread, spy):
    layer = _pruned()
    x = torch.randn(256, 300)
    clean = x.clone()
    x[3, 7] = float("nan")
    x[5, 11] = float("inf")
    with torch.no_grad():
        got = layer(x)
        ref = layer(clean)
    assert len(spy) == 2
    bad = torch.zeros(256, dtype=torch.bool)
    bad[[3, 5]] = True
    assert not torch.isfinite(got[bad]).any()
    assert torch.equal(got[~bad], ref[~bad])


def test_use_kernel_sparse_forces_the_csr_product_on_any_float_layer(spy):
    layer = Int8Linear.from_float(nn.Linear(40, 16), "dynamic")
    x = torch.randn(1, 40)
    with kernels.use_kernel("sparse"), torch.no_grad():
        assert layer.kernel == "sparse"
        got = layer(x)
    assert spy == [(1, 40)]
    torch.testing.assert_close(got, torch.nn.functional.linear(x, layer.dequantize_weight(), layer.bias))
    with torch.no_grad():
        layer(x)
    assert len(spy) == 1  # outside the block: its usual (dense) kernel again


def test_loaded_and_edited_layers_decide_again(one_thread, spy):
    layer = _pruned()
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = Int8Linear.from_float(nn.Linear(300, 100), "dynamic")
    assert fresh.kernel == "float"
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.kernel == "sparse"
    x = torch.randn(256, 300)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
        assert len(spy) == 2
        fresh.int8_weight.fill_(1)  # edited in place: dense now, and the plan follows
        assert fresh.kernel == "float"
        few = x[:64]  # under the layer's int8 crossover (crossover.py): the dense float GEMM
        out = fresh(few)
    assert len(spy) == 2
    torch.testing.assert_close(out, torch.nn.functional.linear(few, fresh.dequantize_weight(), fresh.bias))
