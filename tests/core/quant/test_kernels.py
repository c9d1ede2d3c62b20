import copy
import io

import pytest
import torch
from torch import nn

from lightning_compress.core.quant import kernels
from lightning_compress.core.quant.convert import quantize
from lightning_compress.core.quant.modules import Int8Linear
from lightning_compress.core.quant.onednn_linear import onednn_linear_available, onednn_pays
from lightning_compress.core.quant.primitives import QMAX

needs_fbgemm = pytest.mark.skipif(not kernels.fbgemm_available(), reason="this torch/CPU has no fbgemm int8 Linear")


def _int_reference(q, w):
    """sum_k q_mk w_nk in int64, written as a broadcast multiply and sum (not a matmul)."""
    return (q.long()[:, None, :] * w.long()[None, :, :]).sum(-1)


def _layer(k, n, mode="dynamic", bias=True, scale=None):
    torch.manual_seed(0)
    return Int8Linear.from_float(nn.Linear(k, n, bias=bias), mode, input_scale=scale)


def test_select_kernel_is_a_deterministic_rule_of_shape_mode_and_device():
    assert kernels.select_kernel(64, 300, "dynamic", "cpu") == "float"  # digits MLP: float pays
    assert kernels.select_kernel(100, 10, "static", "cpu") == "float"
    big = kernels.select_kernel(4096, 4096, "dynamic", "cpu")
    u8s8 = "onednn_u8s8" if onednn_linear_available() else "fbgemm_u8s8"
    assert big == (u8s8 if kernels.fbgemm_available() else big)
    assert big in ("onednn_u8s8", "fbgemm_u8s8", "int_mm", "float")
    # Below ONEDNN_MIN_WEIGHTS a layer stays on fbgemm's route.
    assert kernels.select_kernel(512, 1024, "dynamic", "cpu") == ("fbgemm_u8s8" if kernels.fbgemm_available() else big)
    assert [kernels.select_kernel(4096, 4096, "dynamic", "cpu") for _ in range(3)] == [big] * 3
    assert kernels.select_kernel(4096, 4096, "weight_only", "cpu") == "dequant"
    assert kernels.select_kernel(4096, 4096, "dynamic", "cuda") == "int_mm"
    assert kernels.select_kernel(4096, 4096, "dynamic", "meta") == "dequant"
    assert _layer(64, 30).kernel == "float"
    with pytest.raises(ValueError, match="Expected `kernel` to be one of"), kernels.use_kernel("vnni"):
        pass


@needs_fbgemm
@pytest.mark.parametrize("k", [7, 64, 300])
def test_u8s8_products_are_exact_integers(k):
    qmax = kernels.activation_qmax()
    assert qmax in (63, 127)
    g = torch.Generator().manual_seed(k)
    w = torch.randint(-127, 128, (13, k), dtype=torch.int8, generator=g)
    w[0] = 127  # the saturating corner: largest activations times largest weights
    q = torch.randint(-qmax, qmax + 1, (5, k), generator=g)
    q[0] = qmax
    packed = kernels.fbgemm_pack(w, torch.ones(13), None)
    out = kernels.fbgemm_u8s8_mm(q.float(), packed, 1.0, qmax + 1)
    assert torch.equal(out.double(), _int_reference(q, w).double())


@needs_fbgemm
def test_activation_qmax_matches_whether_full_range_u8_saturates():
    k = 64
    w = torch.full((8, k), QMAX, dtype=torch.int8)
    packed = kernels.fbgemm_pack(w, torch.ones(8), None)
    full = kernels.fbgemm_u8s8_mm(torch.full((2, k), 127.0), packed, 1.0, 128)
    exact = bool((full == 127 * 127 * k).all())
    assert kernels.activation_qmax() == (127 if exact else 63)


def _dynamic_reference(t, w, w_scale, by_inverse=False):
    """The per-call u8 product of rows ``t``, by hand: ATen's qparams, rounding, an int64 sum.

    ``by_inverse``: round ``t * (1 / scale)`` in float32, as fbgemm's AVX-512 quantizer does (measured on
    an AMD EPYC with AVX-512 VNNI: a few codes differ from ``t / scale`` in float64); otherwise divide.
    """
    reduce_range = kernels.activation_qmax() < QMAX
    scale, zero_point = torch._choose_qparams_per_tensor(t, reduce_range)
    if by_inverse:
        codes = torch.round(t.float() * (torch.tensor(1.0) / torch.tensor(scale, dtype=torch.float32)))
    else:
        codes = torch.round(t.double() / scale)
    # fbgemm clamps to the u8 range even with reduce_range: the top of a 7-bit range may round to 128
    # (128 * 127 * 2 still fits the int16 pair sum).
    u = torch.clamp(codes + zero_point, 0, 255).long()
    assert int(u.max()) <= (128 if reduce_range else 255)
    acc = _int_reference(u - zero_point, w).double()
    return acc * scale * w_scale.double()


@needs_fbgemm
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("rows", [7, 20])  # 14 rows: max |x| from |x|; 40: from the row's max and min
def test_fbgemm_dynamic_equals_a_hand_quantized_integer_product(bias, per_channel, rows):
    torch.manual_seed(1)
    float_layer = nn.Linear(96, 40, bias=bias)
    layer = Int8Linear.from_float(float_layer, "dynamic", per_channel=per_channel)
    x = torch.randn(2, rows, 96) * torch.logspace(-2, 2, rows)[:, None]  # rows of very different sizes
    x[0, 0] = x[0, 0].abs()  # a row without negatives, for a zero point other than the midpoint
    with kernels.use_kernel("fbgemm_u8s8"):
        assert layer.kernel == "fbgemm_u8s8"
        got = layer(x)
        one = layer(x[1, 3])  # a single row: the op quantizes it on its own range
    # The documented relation: each row divided by its max |x|, then one asymmetric u8 grid over
    # the batch's range of those rows (7 bits without VNNI), an exact integer sum, the row's max back.
    x2 = x.reshape(-1, 96)
    row_max = x2.abs().amax(1, keepdim=True)
    t = x2 / row_max
    # One of the two roundings, for the whole call (which one depends on fbgemm's code path for this CPU).
    matches = []
    for by_inverse in (False, True):
        expected = _dynamic_reference(t, layer.int8_weight, layer.weight_scale, by_inverse) * row_max.double()
        expected_one = _dynamic_reference(x[1, 3][None], layer.int8_weight, layer.weight_scale, by_inverse)
        if bias:
            expected = expected + layer.bias.double()
            expected_one = expected_one + layer.bias.double()
        matches.append(
            torch.allclose(got.reshape(-1, 40).double(), expected, rtol=2e-6, atol=1e-5)
            and torch.allclose(one.double(), expected_one[0], rtol=2e-6, atol=1e-5)
        )
    assert any(matches)
    assert got.shape == (2, rows, 40) and one.shape == (40,)
    assert float((got - float_layer(x)).norm() / float_layer(x).norm()) < 0.03


@needs_fbgemm
def test_fbgemm_dynamic_keeps_small_rows_accurate_next_to_an_outlier_row():
    torch.manual_seed(2)
    float_layer = nn.Linear(256, 64)
    layer = Int8Linear.from_float(float_layer, "dynamic")
    x = torch.randn(8, 256)
    x[0] *= 1000.0  # one row far larger than the rest (one scale per call would zero the others)
    with kernels.use_kernel("fbgemm_u8s8"):
        got = layer(x)
        alone = torch.stack([layer(row) for row in x[1:]])
        packed = kernels._plan(layer).packed
    ref = float_layer(x).detach()
    row_err = (got - ref).norm(dim=1) / ref.norm(dim=1)
    assert float(row_err.max()) < 0.05
    per_call = torch.ops.quantized.linear_dynamic(x, packed, True)  # one scale per call (the bias is packed)
    assert float(((per_call - ref).norm(dim=1) / ref.norm(dim=1))[1:].min()) > 0.3  # what it avoids
    torch.testing.assert_close(alone, got[1:], rtol=0.05, atol=0.05)


@needs_fbgemm
@pytest.mark.parametrize("bias", [True, False])
def test_fbgemm_dynamic_gives_the_same_numbers_with_and_without_autograd(bias):
    # The rescale runs in place on the op's fresh output, except where the input requires grad
    # (`out=` has no autograd): both give the same numbers.
    torch.manual_seed(3)
    layer = Int8Linear.from_float(nn.Linear(64, 48, bias=bias), "dynamic")
    x = torch.randn(5, 64) * torch.logspace(-1, 1, 5)[:, None]
    with kernels.use_kernel("fbgemm_u8s8"):
        with torch.no_grad():
            plain = layer(x)
        tracked = layer(x.clone().requires_grad_())
    assert tracked.requires_grad and not plain.requires_grad
    assert torch.equal(tracked.detach(), plain)


@needs_fbgemm
def test_fbgemm_static_keeps_the_calibrated_range_and_saturates():
    scale = torch.tensor(2.0 / QMAX)  # covers [-2, 2]
    layer = _layer(64, 24, "static", scale=scale)
    x = torch.rand(6, 64) * 4 - 2
    with kernels.use_kernel("fbgemm_u8s8"):
        got = layer(x)
        qmax = kernels.activation_qmax()
        step = 2.0 / qmax
        q = torch.round(x / step).clamp(-qmax, qmax).long()
        expected = _int_reference(q, layer.int8_weight).double() * step * layer.weight_scale.double()
        torch.testing.assert_close(got.double(), expected + layer.bias.double(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(layer(x * 0 + 9.0), layer(x * 0 + 2.0))  # beyond the range: saturated
        assert torch.equal(layer(x * 0 - 9.0), layer(x * 0 - 2.0))  # on the negative side too: -qmax, not -qmax - 1
        # An input inside the range goes to the op unclamped, one beyond it is clamped first: both on the grid.
        beyond = x.clone()
        beyond[0, :5], beyond[1, :5] = -3.0, 3.0
        q = torch.round(beyond / step).clamp(-qmax, qmax).long()
        expected = _int_reference(q, layer.int8_weight).double() * step * layer.weight_scale.double()
        torch.testing.assert_close(layer(beyond).double(), expected + layer.bias.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel", ["float", "fbgemm_u8s8", "int_mm", None])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_nan_and_inf_inputs_propagate_like_float(kernel, mode):
    if kernel == "fbgemm_u8s8" and not kernels.fbgemm_available():
        pytest.skip("no fbgemm")
    float_layer = nn.Linear(32, 16)
    layer = Int8Linear.from_float(float_layer, mode, input_scale=torch.tensor(0.05))
    x = torch.randn(4, 32)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3, 0] = -float("inf")
    with kernels.use_kernel(kernel):
        out = layer(x)
    ref = float_layer(x)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    assert torch.isfinite(out[0]).all() and not torch.isfinite(out[1:]).any()


def test_float_kernel_caches_the_dequantized_weight_and_equals_weight_only():
    layer = _layer(40, 16)
    assert layer.kernel == "float" and kernels.MIN_TRANSPOSED_OUT == 16
    x = torch.randn(5, 40)
    expected = torch.nn.functional.linear(x, layer.dequantize_weight(), layer.bias)
    # The cached weight is the dequantized one transposed to [in, out] (one addmm, no transposed view).
    assert torch.equal(layer(x), torch.addmm(layer.bias, x, layer.dequantize_weight().t().contiguous()))
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)  # the weight-only result
    assert torch.equal(layer(x[None]), layer(x)[None])  # a batch of sequences: the same product
    assert set(layer.state_dict()) == {"weight", "weight_scale", "bias"}
    assert layer.state_dict()["weight"].dtype == torch.int8
    cached = layer.__dict__[kernels._ATTR].weight
    assert cached.shape == (40, 16) and cached.is_contiguous()


def test_float_kernel_keeps_f_linear_layout_for_fewer_than_16_outputs():
    layer = _layer(40, 15)
    assert layer.kernel == "float"
    x = torch.randn(5, 40)
    # F.linear's own product (a transposed view of the [out, in] weight), bit for bit
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.dequantize_weight(), layer.bias))
    assert torch.equal(layer(x[None]), layer(x)[None])
    cached = layer.__dict__[kernels._ATTR].weight
    assert cached.shape == (40, 15) and not cached.is_contiguous() and cached.t().is_contiguous()


@pytest.mark.parametrize("kernel", ["float", "fbgemm_u8s8"])
def test_cache_is_rebuilt_when_the_buffers_change(kernel):
    if kernel == "fbgemm_u8s8" and not kernels.fbgemm_available():
        pytest.skip("no fbgemm")
    a, b = _layer(48, 20, "static", scale=torch.tensor(0.03)), None
    torch.manual_seed(5)
    b = Int8Linear.from_float(nn.Linear(48, 20), "static", input_scale=torch.tensor(0.02))
    x = torch.randn(3, 48)
    with kernels.use_kernel(kernel):
        out_a, out_b = a(x), b(x)
        assert not torch.equal(out_a, out_b)
        a.load_state_dict(b.state_dict())  # in-place copies: versions change
        assert torch.equal(a(x), out_b)
        a.configure("dynamic", True)
        a.load_state_dict({k: v for k, v in b.state_dict().items() if k != "input_scale"})
        c = copy.deepcopy(b)
        c.configure("dynamic", True)
        c.load_state_dict({k: v for k, v in b.state_dict().items() if k != "input_scale"})
        assert torch.equal(a(x), c(x))
        with torch.no_grad():
            a.int8_weight.mul_(-1)  # an in-place edit of the int8 weight
        torch.testing.assert_close(a(x) - a.bias, -(c(x) - c.bias), rtol=1e-5, atol=1e-5)


def test_cache_never_reaches_state_dict_pickles_or_copies():
    model = nn.Sequential(_layer(64, 600), nn.ReLU(), _layer(600, 500))
    x = torch.randn(2, 64)
    kinds = kernels.prepare_kernels(model)
    assert kinds == {"0": "float", "2": model[2].kernel}
    out = model(x)
    assert all(v.dtype in (torch.int8, torch.float32) for v in model.state_dict().values())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"0.weight", "0.weight_scale", "0.bias", "2.weight", "2.weight_scale", "2.bias"}
    fresh = nn.Sequential(Int8Linear(64, 600), nn.ReLU(), Int8Linear(600, 500))
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), out)
    buf = io.BytesIO()
    torch.save(model, buf)  # a whole-module pickle drops the cache
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), out)
    assert torch.equal(copy.deepcopy(model)(x), out)
    assert (
        kernels._ATTR not in copy.deepcopy(model)[0].__dict__ or copy.deepcopy(model)[0].__dict__[kernels._ATTR] is None
    )


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_torch_export_keeps_working(mode):
    model = nn.Sequential(
        _layer(600, 500, mode, scale=torch.tensor(0.03)), nn.ReLU(), _layer(500, 8, mode, scale=torch.tensor(0.03))
    )
    x = torch.randn(3, 600)
    program = torch.export.export(model, (x,))
    with kernels.use_kernel("int_mm"):
        expected = model(x)
    torch.testing.assert_close(program.module()(x), expected)


@pytest.mark.slow
def test_torch_compile_runs_and_agrees_with_eager():
    torch._dynamo.reset()
    model = nn.Sequential(_layer(600, 500), nn.ReLU(), _layer(500, 10))
    x = torch.randn(4, 600)
    eager = model(x)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled(x * 2), model(x * 2), rtol=1e-4, atol=1e-4)


def test_jit_trace_records_the_portable_int_mm_graph():
    model = nn.Sequential(_layer(600, 500), nn.ReLU(), _layer(500, 8))
    x = torch.randn(3, 600)
    traced = torch.jit.trace(model, (x,), check_trace=False)
    with kernels.use_kernel("int_mm"):
        expected = model(x)
    torch.testing.assert_close(traced(x), expected)


@pytest.mark.parametrize("kernel", ["int_mm", "fbgemm_u8s8"])
def test_static_int8_kernels_compute_the_integer_product_and_the_int32_bias(kernel):
    if kernel == "fbgemm_u8s8" and (not kernels.fbgemm_available() or kernels.activation_qmax() < QMAX):
        pytest.skip("fbgemm here gives its activations 7 bits (no VNNI): another grid by design")
    s = torch.tensor(0.03)
    layer = _layer(48, 20, "static", scale=s)
    x = torch.randn(7, 48)
    with kernels.use_kernel(kernel):
        got = layer(x)
    # Written another way: int64 codes of the input and the weight, the bias as a count of s * s_w steps.
    w_scale = layer.weight_scale.double()
    q = torch.round(x.double() / 0.03).clamp(-QMAX, QMAX).long()
    counts = torch.round(layer.bias.detach().double() / (float(s) * w_scale))
    expected = (_int_reference(q, layer.int8_weight).double() + counts) * float(s) * w_scale
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    plain = nn.functional.linear(x, layer.dequantize_weight(), layer.bias)  # float input and bias
    assert float((got - plain).abs().max()) > 1e-3  # so the input rounding is really there
    with kernels.use_kernel("float"):  # a small layer's float kernel: the weight-only result, bias as it is
        # exactly its documented form (the dequantized weight transposed, one addmm), F.linear's up to rounding
        assert torch.equal(layer(x), torch.addmm(layer.bias, x, layer.dequantize_weight().t().contiguous()))
        torch.testing.assert_close(layer(x), plain, rtol=1e-6, atol=1e-6)


needs_onednn_linear = pytest.mark.skipif(
    not (kernels.fbgemm_available() and onednn_linear_available()),
    reason="oneDNN's exact u8 x s8 linear (VNNI / AMX) and fbgemm are needed",
)


def test_onednn_pays_rule():
    assert onednn_pays(32, 1 << 21) and onednn_pays(64, 1 << 20)
    assert not onednn_pays(31, (1 << 24) - 1)  # too few rows
    assert not onednn_pays(32, 1 << 20)  # 2^25 multiply-adds: too little work
    assert not onednn_pays(4096, (1 << 20) - 1)  # too small a layer
    # A layer whose weight streams from memory (2^24 weights, 4096 x 4096, or more) from 16 rows on.
    assert onednn_pays(16, 1 << 24) and onednn_pays(16, 1 << 26)
    assert not onednn_pays(15, 1 << 24) and not onednn_pays(16, (1 << 24) - 1)


@needs_onednn_linear
@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_route_is_bit_identical_to_int_mm(mode, bias):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(1024, 2048, bias=bias), nn.ReLU(), nn.Linear(2048, 1024, bias=bias)).eval()
    calibration = [torch.randn(64, 1024)] if mode == "static" else []
    quantize(base, mode, calibration=calibration)
    assert {m.kernel for m in base.modules() if isinstance(m, Int8Linear)} == {"onednn_u8s8"}
    x = torch.randn(2, 40, 1024) * 3  # 80 rows: oneDNN's route on both layers
    x[1, 7, 3] = float("nan")
    with torch.no_grad():
        got = base(x)
        with kernels.use_kernel("int_mm"):
            ref = base(x)
    assert got.shape == (2, 40, 1024)
    nan_rows = torch.isnan(got).any(-1)
    assert nan_rows.nonzero().tolist() == [[1, 7]]  # a NaN input row stays NaN, the others finite
    assert torch.equal(torch.isnan(ref).any(-1), nan_rows)
    assert torch.equal(got[~nan_rows], ref[~nan_rows])
    # The prepacked weight is a cache: never in the state_dict.
    assert all("onednn" not in k and "packed" not in k for k in base.state_dict())


@needs_onednn_linear
def test_onednn_route_takes_only_large_calls():
    torch.manual_seed(1)
    lin = Int8Linear.from_float(nn.Linear(1024, 1024), "dynamic")
    x = torch.randn(64, 1024)
    with torch.no_grad():
        small = lin(x[:16])  # fbgemm's route: its own rounding
        large = lin(x)
        with kernels.use_kernel("int_mm"):
            ref = lin(x)
    assert torch.equal(large, ref)  # 64 x 2^20 = 2^26 multiply-adds: oneDNN's route
    assert not torch.equal(small, ref[:16])
    torch.testing.assert_close(small, ref[:16], rtol=0.05, atol=0.05)


@needs_onednn_linear
def test_onednn_route_takes_16_rows_on_a_layer_that_streams_from_memory():
    torch.manual_seed(2)
    lin = Int8Linear.from_float(nn.Linear(4096, 4096), "dynamic")  # 2^24 weights: ONEDNN_LARGE_WEIGHTS
    x = torch.randn(16, 4096)
    with torch.no_grad():
        sixteen, fifteen = lin(x), lin(x[:15])
        with kernels.use_kernel("int_mm"):
            ref = lin(x)
    assert torch.equal(sixteen, ref)  # oneDNN's route: the int_mm path's numbers
    assert not torch.equal(fifteen, ref[:15])  # fbgemm's route: its own rounding
    torch.testing.assert_close(fifteen, ref[:15], rtol=0.05, atol=0.05)


@needs_onednn_linear
def test_onednn_linear_sums_are_exact_at_the_saturating_corner():
    from lightning_compress.core.quant.onednn_linear import OnednnLinearPack

    k = 4096
    w = torch.full((16, k), 127, dtype=torch.int8)
    w[1] = -127
    q = torch.full((3, k), 127, dtype=torch.int8)
    q[2] = -127
    got = OnednnLinearPack(w).sums(q.clone())
    ref = q.to(torch.int64) @ w.to(torch.int64).t()
    assert torch.equal(got, ref.to(torch.float32))
