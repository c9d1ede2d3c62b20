"""Fake quantization: the STE functions, the moving observer, and FakeQuantSession's hooks."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from lightning_compress.core.quant.convert import quantizable_targets, quantize_model
from lightning_compress.core.quant.fake import (
    FakeQuantSession,
    MovingMinMaxObserver,
    fake_quantize_input,
    fake_quantize_weight,
)
from lightning_compress.core.quant.kernels import use_kernel
from lightning_compress.core.quant.modules import Int8Conv2d, Int8Linear
from lightning_compress.core.quant.primitives import QMAX, weight_scales


@pytest.mark.parametrize("per_channel", [True, False])
def test_fake_weight_is_bit_identical_to_the_int8_layers_dequantized_weight(per_channel: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(17, 9)
    with torch.no_grad():
        layer.weight[2, 3] = 0.0
    fq = fake_quantize_weight(layer.weight, per_channel)
    int8 = Int8Linear.from_float(layer, "weight_only", per_channel)
    assert torch.equal(fq, int8.dequantize_weight())
    assert fq[2, 3].item() == 0.0
    scale = weight_scales(layer.weight, per_channel).reshape(-1, 1)
    steps = fq / scale
    assert torch.allclose(steps, steps.round(), atol=1e-4)  # on the grid
    assert not torch.equal(fq, layer.weight)


def test_weight_ste_passes_the_gradient_unchanged() -> None:
    w = torch.randn(4, 5, requires_grad=True)
    g = torch.randn(4, 5)
    fake_quantize_weight(w, True).backward(g)
    assert w.grad is not None and torch.equal(w.grad, g)


def test_input_fake_quant_saturates_and_clips_the_gradient() -> None:
    scale = torch.tensor(0.01)
    x = torch.tensor([0.004, 0.006, -0.5, 1.27, 2.0, -3.0], requires_grad=True)
    out = fake_quantize_input(x, scale)
    expected = torch.tensor([0.0, 1.0, -50.0, 127.0, 127.0, -127.0]) * 0.01
    assert torch.allclose(out, expected)
    out.sum().backward()
    assert x.grad is not None and x.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    untouched = torch.randn(3)
    assert fake_quantize_input(untouched, torch.tensor(0.0)) is untouched


def test_moving_observer_first_batch_sets_then_moves_and_ignores_nonfinite() -> None:
    obs = MovingMinMaxObserver(averaging=0.1)
    assert obs.scale().item() == 0.0
    obs.update(torch.tensor([-2.0, 4.0, float("nan")]))
    assert (obs.min_val.item(), obs.max_val.item(), obs.count) == (-2.0, 4.0, 1)
    obs.update(torch.tensor([0.0, 14.0, float("inf")]))
    assert obs.min_val.item() == pytest.approx(-1.8)
    assert obs.max_val.item() == pytest.approx(5.0)
    assert obs.scale().item() == pytest.approx(5.0 / QMAX)
    obs.update(torch.tensor([float("nan")]))
    assert obs.count == 2


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=4),  # depthwise
        nn.Conv2d(4, 6, 1, groups=2),  # grouped
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 10),
        nn.ReLU(),
        nn.Linear(10, 3),
    )


def _session(model: nn.Module, mode: str, per_channel: bool) -> FakeQuantSession:
    targets, _ = quantizable_targets(model)
    return FakeQuantSession({t.name: t.module for t in targets}, mode, per_channel)


def test_session_keeps_state_dict_keys_and_parameters_and_pickles() -> None:
    torch.manual_seed(0)
    model = _cnn()
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    session = _session(model, "static", per_channel=False)
    # Every layer's input is quantized; the convolutions' outputs too (QLinearConv's form).
    assert set(session.observers) == {"0", "2", "3", "5", "7"}
    assert set(session.output_observers) == {"0", "2", "3"}
    session.attach()
    session.attach()  # idempotent
    model.train()
    out = model(torch.randn(3, 2, 6, 6))
    out.sum().backward()
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    assert all(p.grad is not None for p in model.parameters())
    plain = _cnn()
    plain.load_state_dict(model.state_dict(), strict=True)
    clone = pickle.loads(pickle.dumps(model))
    deep = copy.deepcopy(model)
    x = torch.randn(2, 2, 6, 6)
    model.eval()
    clone.eval()
    deep.eval()
    assert torch.equal(model(x), clone(x)) and torch.equal(model(x), deep(x))
    buffer = io.BytesIO()
    torch.save(session.state(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert set(loaded) == {"0", "2", "3", "5", "7"}
    assert sorted(loaded["0"]) == ["count", "max", "min", "output"] and sorted(loaded["5"]) == ["count", "max", "min"]
    assert loaded["0"]["output"]["count"] == 1 and float(loaded["0"]["output"]["max"]) > 0
    session.detach()
    session.detach()
    assert not session.attached
    assert torch.equal(model(x), plain.eval()(x))  # the plain float model again


def test_session_restores_the_weight_after_an_exception() -> None:
    layer = nn.Linear(3, 2)
    weight = layer.weight
    session = FakeQuantSession({"fc": layer}, "weight_only")
    session.attach()
    with pytest.raises(RuntimeError):
        layer(torch.randn(2, 5))  # wrong width
    assert layer._parameters["weight"] is weight
    session.detach()


def test_observers_update_only_in_training_and_pruned_zeros_stay_zero() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight[0] = 0.0
    session = FakeQuantSession({"fc": layer}, "static", per_channel=True)
    session.attach()
    layer.eval()
    layer(torch.randn(5, 4))
    assert session.observers["fc"].count == 0
    layer.train()
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(m.weight.detach().clone()))
    layer(torch.randn(5, 4))
    handle.remove()
    assert session.observers["fc"].count == 1
    assert torch.equal(seen[0][0], torch.zeros(4))
    session.detach()


@pytest.mark.parametrize("mode", ["static", "weight_only", "dynamic"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_model_computes_what_the_last_fake_quant_forward_computed(mode: str, per_channel: bool) -> None:
    torch.manual_seed(0)
    model = _cnn()
    session = _session(model, mode, per_channel)
    session.attach()
    model.train()
    for _ in range(5):
        model(torch.randn(8, 2, 6, 6))
    model.eval()
    x = torch.randn(16, 2, 6, 6)
    with torch.no_grad():
        fake = model(x)
    ranges, output_ranges = session.input_ranges(), session.output_ranges()
    session.detach()
    with torch.no_grad():
        plain = model(x)
    targets, _ = quantizable_targets(model)
    result = quantize_model(model, targets, mode, per_channel, ranges, output_ranges)
    assert set(result.converted.values()) == {mode}
    assert isinstance(model[0], Int8Conv2d) and isinstance(model[7], Int8Linear)
    # The int8 grid itself (int_mm: what CUDA runs); on the CPU a small Linear may pick the float kernel,
    # which does not quantize its input at all (see core/quant/kernels.py).
    with torch.no_grad(), use_kernel("int_mm"):
        int8 = model(x)
    if mode == "dynamic":  # the int8 model also quantizes each input row; QAT did not (weights only)
        assert (int8 - fake).norm() / fake.norm() < 2e-2
    elif mode == "weight_only":  # the same float ops on the same dequantized weights
        assert torch.equal(int8, fake)
    else:  # the same integers; only the float accumulation order differs
        torch.testing.assert_close(int8, fake, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fake, plain, rtol=1e-6, atol=1e-6)  # fake quantization did change the output


def test_embedding_is_fake_quantized_per_row() -> None:
    from lightning_compress.core.quant.embedding import Int8Embedding

    torch.manual_seed(0)
    emb = nn.Embedding(7, 5)
    session = FakeQuantSession({"emb": emb}, "static", per_channel=True)
    assert session.observers == {}  # an embedding's input is an index
    session.attach()
    ids = torch.tensor([[0, 3, 6]])
    fake = emb(ids)
    session.detach()
    assert torch.equal(fake, Int8Embedding.from_float(emb, "static", True)(ids))


def test_reduce_ranges_takes_the_widest_range_of_any_process() -> None:
    layer = nn.Linear(2, 2)
    session = FakeQuantSession({"fc": layer}, "static")
    session.load_state({"fc": {"min": torch.tensor(-1.0), "max": torch.tensor(2.0), "count": 3}})
    other = torch.tensor([[-4.0, 1.0, 3.0]])
    session.reduce_ranges(lambda t: torch.stack([t, other]))
    obs = session.observers["fc"]
    assert (obs.min_val.item(), obs.max_val.item(), obs.count) == (-4.0, 2.0, 3)
    session.reduce_ranges(lambda t: t)  # one process: nothing changes
    assert obs.min_val.item() == -4.0
    unseen = FakeQuantSession({"fc": nn.Linear(2, 2)}, "static")
    unseen.reduce_ranges(lambda t: torch.stack([t, other]))
    assert unseen.observers["fc"].max_val.item() == 1.0 and unseen.observers["fc"].count == 3


def test_session_rejects_a_bad_mode_and_a_layer_without_weight() -> None:
    from lightning_compress.errors import CompressionConfigError

    with pytest.raises(CompressionConfigError, match="mode"):
        FakeQuantSession({"fc": nn.Linear(2, 2)}, "int4")
    with pytest.raises(TypeError, match="no `weight` parameter"):
        FakeQuantSession({"relu": nn.ReLU()}, "static")


@pytest.mark.parametrize("per_channel", [True, False])
def test_hf_conv1d_is_fake_quantized_per_output_column(per_channel: bool) -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    from lightning_compress.core.quant.conv1d import Int8Conv1D

    torch.manual_seed(0)
    layer = pytorch_utils.Conv1D(6, 4)  # weight [4 inputs, 6 outputs]
    with torch.no_grad():
        layer.weight[:, 0] *= 50.0  # one output channel much wider than the others
    seen: list[torch.Tensor] = []
    layer.register_forward_hook(lambda m, a, o: seen.append(m.weight.detach().clone()))  # before the QAT post-hook
    session = FakeQuantSession({"c": layer}, "weight_only", per_channel)
    session.attach()
    x = torch.randn(3, 4)
    fake = layer(x)
    session.detach()
    int8 = Int8Conv1D.from_float(layer, "weight_only", per_channel)
    assert torch.equal(seen[0], int8.dequantize_weight().t())  # [in, out], scaled per output column
    torch.testing.assert_close(fake, int8(x), rtol=1e-6, atol=1e-6)  # addmm vs linear: summation order only
