import math

import pytest
import torch

from lightning_compress.core.quant.primitives import (
    QMAX,
    MinMaxObserver,
    bias_on_grid,
    dequantize,
    quantize,
    quantize_rows,
    scale_from_range,
    weight_scales,
)


def test_weight_scales_per_channel_and_per_tensor_match_a_loop():
    w = torch.randn(5, 3, 2, 2)
    w[2] = 0.0
    per_channel = weight_scales(w)
    expected = torch.tensor([max(abs(v) for v in w[i].flatten().tolist()) / 127 for i in range(5)])
    assert per_channel.dtype == torch.float32 and per_channel.shape == (5,)
    torch.testing.assert_close(per_channel, expected)
    assert per_channel[2] == 0.0
    per_tensor = weight_scales(w, per_channel=False)
    assert per_tensor.shape == (1,)
    assert per_tensor.item() == pytest.approx(w.abs().max().item() / 127)


def test_quantize_round_trip_error_is_at_most_half_a_step():
    w = torch.randn(64, 33)
    s = weight_scales(w)
    q = quantize(w, s)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert int(q.min()) >= -QMAX and int(q.max()) <= QMAX
    # The largest magnitude of each row lands exactly on +-127.
    assert torch.equal(q.abs().amax(dim=1), torch.full((64,), 127, dtype=torch.int8))
    err = (dequantize(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())


def test_zeros_stay_exactly_zero_and_an_all_zero_channel_is_safe():
    w = torch.randn(4, 10)
    w[w.abs() < 0.7] = 0.0
    w[1] = 0.0
    s = weight_scales(w)
    q = quantize(w, s)
    assert torch.equal(q == 0, w == 0)
    back = dequantize(q, s)
    assert not torch.isnan(back).any()
    assert torch.equal(back == 0, w == 0)


def test_quantize_with_one_scale_and_along_another_axis():
    x = torch.tensor([[0.5, -1.0], [0.25, 2.0]])
    assert quantize(x, torch.tensor(1.0 / 127)).tolist() == [[64, -127], [32, 127]]  # 254 saturates
    cols = quantize(x, torch.tensor([0.5 / 127, 2.0 / 127]), axis=1)
    assert cols.tolist() == [[127, -64], [64, 127]]


def test_dequantize_casts_to_the_requested_dtype():
    q = torch.tensor([[1, -2]], dtype=torch.int8)
    out = dequantize(q, torch.tensor([0.5]), dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.tolist() == [[0.5, -1.0]]


def test_quantize_rows_matches_a_per_row_reference():
    x = torch.randn(7, 20)
    x[3] = 0.0
    q, s = quantize_rows(x)
    assert q.dtype == torch.int8 and q.is_contiguous() and s.shape == (7, 1) and s.dtype == torch.float32
    for i in range(7):
        amax = x[i].abs().max()
        assert s[i].item() == pytest.approx(amax.item() / 127, rel=1e-6)
        if amax == 0:
            assert q[i].abs().sum() == 0
        else:
            inv = 127 / amax  # float32, as the kernel computes it
            expected = [max(-127, min(127, round(v))) for v in (x[i] * inv).tolist()]
            assert q[i].tolist() == expected
    assert quantize_rows(x.bfloat16())[0].dtype == torch.int8
    torch.testing.assert_close(quantize_rows(x.double())[0], q)


def test_scale_from_range_is_symmetric():
    assert scale_from_range(-2.54, 1.0).item() == pytest.approx(0.02)
    assert scale_from_range(torch.tensor(0.0), torch.tensor(1.27)).item() == pytest.approx(0.01)
    assert scale_from_range(0.0, 0.0).item() == 0.0


def test_min_max_observer_widens_ignores_non_finite_and_contains_zero():
    obs = MinMaxObserver()
    obs.update(torch.tensor([1.0, 2.0]))
    assert (obs.min_val.item(), obs.max_val.item()) == (0.0, 2.0)  # the range always holds zero
    obs.update(torch.tensor([-3.0, float("nan"), float("inf")]))
    obs.update(torch.tensor([]))
    assert (obs.min_val.item(), obs.max_val.item(), obs.count) == (-3.0, 2.0, 3)
    assert obs.scale().item() == pytest.approx(3.0 / 127)
    assert math.isfinite(obs.scale().item())


def test_on_grid_equals_the_int8_round_trip_and_keeps_nan():
    from lightning_compress.core.quant.primitives import on_grid

    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5) * 3
    s = torch.tensor(0.02)
    want = dequantize(quantize(x, s.reshape(1)), s.reshape(1))
    assert torch.equal(on_grid(x, s), want)
    assert torch.equal(
        on_grid(x.half(), s), dequantize(quantize(x.half(), s.reshape(1)), s.reshape(1), dtype=torch.half)
    )
    y = x.clone()
    assert on_grid(y, s, inplace=True) is y and torch.equal(y, want)
    z = torch.tensor([float("nan"), float("inf"), -1e9, 0.0])
    got = on_grid(z, s)
    assert torch.isnan(got[0]) and got[1:].tolist() == pytest.approx([127 * 0.02, -127 * 0.02, 0.0])


def test_bias_on_grid_counts_product_steps_and_keeps_what_int32_cannot_count():
    bias = torch.tensor([0.26, -0.0131, 0.5, 3.0e6], requires_grad=True)
    x_scale, w_scale = torch.tensor(0.1), torch.tensor([0.5, 0.02, 0.0, 1e-6])
    got = bias_on_grid(bias, x_scale, w_scale)
    # steps 0.05, 0.002, 0 (a zero channel: kept), 1e-7 (3e13 steps > 2**31 - 1: kept)
    torch.testing.assert_close(got.detach(), torch.tensor([0.25, -0.014, 0.5, 3.0e6]))
    got.sum().backward()
    assert torch.equal(bias.grad, torch.ones(4))  # straight through
    one = bias_on_grid(torch.tensor([0.26, 0.31]), torch.tensor(0.1), torch.tensor([0.5]))  # one weight scale
    torch.testing.assert_close(one, torch.tensor([0.25, 0.30]))
    assert torch.equal(bias_on_grid(bias.detach(), torch.tensor(0.0), w_scale), bias.detach())  # no input grid
