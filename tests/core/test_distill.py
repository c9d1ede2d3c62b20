from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_compress.core.distill import (
    DistillationLoss,
    HintProjection,
    capture_outputs,
    distillation_loss,
    hint_loss,
    kd_loss,
)
from lightning_compress.errors import CompressionConfigError


def _softmax(row: list[float], t: float) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def _hand_kd(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    """T^2 * mean over rows of sum_c p_t log(p_t / p_s), in plain Python."""
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p_s, p_t = _softmax(s_row, t), _softmax(t_row, t)
        total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))
    return t * t * total / len(student)


def _hand_ce(student: list[list[float]], labels: list[int]) -> float:
    return -sum(math.log(_softmax(row, 1.0)[y]) for row, y in zip(student, labels, strict=True)) / len(student)


STUDENT = [[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]]
TEACHER = [[3.0, -2.0, 0.0], [-1.0, 0.5, 2.0]]
LABELS = [0, 2]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 10.0])
def test_kd_loss_matches_hand_computation(temperature: float) -> None:
    got = kd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), temperature)
    assert got.item() == pytest.approx(_hand_kd(STUDENT, TEACHER, temperature), rel=1e-5)


@pytest.mark.parametrize(("temperature", "alpha"), [(4.0, 0.9), (2.0, 0.5), (1.0, 0.0), (3.0, 1.0)])
def test_distillation_loss_matches_hand_computation(temperature: float, alpha: float) -> None:
    out = distillation_loss(
        torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS), temperature=temperature, alpha=alpha
    )
    kd, ce = _hand_kd(STUDENT, TEACHER, temperature), _hand_ce(STUDENT, LABELS)
    assert isinstance(out, DistillationLoss)
    assert out.kd.item() == pytest.approx(kd, rel=1e-5)
    assert out.ce is not None and out.ce.item() == pytest.approx(ce, rel=1e-5)
    assert out.loss.item() == pytest.approx(alpha * kd + (1 - alpha) * ce, rel=1e-5)


def test_kd_loss_equals_torch_kl_div_batchmean() -> None:
    s, t = torch.randn(16, 7), torch.randn(16, 7)
    reference = F.kl_div(F.log_softmax(s / 3, 1), F.softmax(t / 3, 1), reduction="batchmean") * 9
    torch.testing.assert_close(kd_loss(s, t, 3.0), reference)


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise() -> None:
    z = torch.randn(5, 4)
    assert kd_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_loss(z, z + torch.randn(5, 4)).item() > 0


def test_kd_loss_is_invariant_to_a_shift_of_the_logits() -> None:
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(kd_loss(s + 7.0, t - 3.0), kd_loss(s, t))


def test_kd_gradient_reaches_the_student_only() -> None:
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    with torch.no_grad():
        t_out = t * 1.0
    kd_loss(s, t_out).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_t_squared_keeps_the_gradient_scale() -> None:
    # For high T the gradient of KL(p_t||p_s) w.r.t. z_s is (z_s - z_t) / (C T^2) for zero-mean logits,
    # so the T^2 factor makes it independent of T.
    s = torch.tensor([[0.3, -0.1, -0.2]], requires_grad=True)
    t = torch.tensor([[0.2, 0.1, -0.3]])
    grads = []
    for temperature in (50.0, 100.0):
        s.grad = None
        kd_loss(s, t, temperature).backward()
        assert s.grad is not None
        grads.append(s.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(grads[1], (s.detach() - t) / 3, rtol=1e-2, atol=1e-6)


def test_segmentation_logits_average_over_positions() -> None:
    s, t = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    flat = kd_loss(s.permute(0, 2, 3, 1).reshape(-1, 4), t.permute(0, 2, 3, 1).reshape(-1, 4), 2.0)
    torch.testing.assert_close(kd_loss(s, t, 2.0), flat)


def test_half_precision_logits_are_computed_in_float32() -> None:
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    got = kd_loss(s.half(), t.half(), 4.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, kd_loss(s.half().float(), t.half().float(), 4.0))


def test_unlabelled_batches_need_alpha_one() -> None:
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    out = distillation_loss(s, t, None, alpha=1.0)
    assert out.ce is None
    torch.testing.assert_close(out.loss, kd_loss(s, t, 4.0))
    with pytest.raises(CompressionConfigError, match=r"Expected argument `alpha` to be 1\.0 when batches carry no"):
        distillation_loss(s, t, None, alpha=0.5)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_temperature_must_be_positive(temperature: float) -> None:
    with pytest.raises(CompressionConfigError, match=r"Expected argument `temperature` to be a number in \(0, inf\)"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_must_be_in_unit_interval(alpha: float) -> None:
    with pytest.raises(CompressionConfigError, match=r"Expected argument `alpha` to be a number in \[0, 1\]"):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), alpha=alpha)


def test_logit_shapes_must_agree() -> None:
    with pytest.raises(ValueError, match=r"same shape, but got \(2, 3\) and \(2, 4\)"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"Expected logits of shape \(N, C, \.\.\.\)"):
        kd_loss(torch.zeros(3), torch.zeros(3))


def test_hint_loss_is_the_mean_squared_error() -> None:
    a, b = torch.randn(4, 6, 2, 2), torch.randn(4, 6, 2, 2)
    assert hint_loss(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        hint_loss(a, b[:, :3])


def test_hint_loss_does_not_backpropagate_into_the_teacher_feature() -> None:
    a, b = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    hint_loss(a, b).backward()
    assert a.grad is not None and b.grad is None


# ---------------------------------------------------------------------------------------------- projections


def test_projection_of_vectors_is_a_linear_layer() -> None:
    proj = HintProjection()
    proj.configure((5, 8), (5, 3))
    x = torch.randn(5, 8)
    torch.testing.assert_close(proj(x), x @ proj.weight.T + proj.bias)
    assert tuple(proj.weight.shape) == (3, 8) and tuple(proj.bias.shape) == (3,)


def test_projection_of_feature_maps_is_a_1x1_convolution() -> None:
    proj = HintProjection()
    proj.configure((2, 4, 5, 5), (2, 6, 5, 5))
    x = torch.randn(2, 4, 5, 5)
    expected = F.conv2d(x, proj.weight[:, :, None, None], proj.bias)
    torch.testing.assert_close(proj(x), expected)


def test_projection_pools_to_the_teachers_spatial_size() -> None:
    proj = HintProjection()
    proj.configure((2, 4, 8, 8), (2, 6, 4, 4))
    x = torch.randn(2, 4, 8, 8)
    expected = F.avg_pool2d(F.conv2d(x, proj.weight[:, :, None, None], proj.bias), 2)
    torch.testing.assert_close(proj(x), expected)


def test_projection_of_tokens_acts_on_the_last_dimension() -> None:
    proj = HintProjection()
    proj.configure((2, 7, 16), (2, 7, 32))
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(proj(x), x @ proj.weight.T + proj.bias)
    conv1d = HintProjection()
    conv1d.configure((2, 16, 7), (2, 32, 7))
    torch.testing.assert_close(
        conv1d(x.transpose(1, 2)), F.conv1d(x.transpose(1, 2), conv1d.weight[..., None], conv1d.bias)
    )


def test_projection_starts_as_the_identity_when_widths_agree() -> None:
    proj = HintProjection()
    proj.configure((3, 4, 2, 2), (3, 4, 2, 2))
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(proj(x), x)


@pytest.mark.parametrize(
    ("student", "teacher", "match"),
    [
        ((2, 4), (2, 4, 1, 1), "same number of dimensions and batch size"),
        ((2, 4), (3, 4), "same number of dimensions and batch size"),
        ((2, 4, 5), (2, 6, 7), "differ in one dimension only"),
        ((1, 2, 2, 2, 2, 2), (1, 2, 2, 2, 2, 2), "at most 5 dimensions"),
    ],
)
def test_projection_rejects_shapes_it_cannot_map(
    student: tuple[int, ...], teacher: tuple[int, ...], match: str
) -> None:
    with pytest.raises(CompressionConfigError, match=match):
        HintProjection().configure(student, teacher)


def test_projection_is_created_from_a_state_dict_and_checked_at_configure() -> None:
    trained = HintProjection()
    trained.configure((2, 4, 3, 3), (2, 8, 3, 3))
    fresh = HintProjection()
    assert not fresh.is_materialized()
    fresh.load_state_dict(trained.state_dict(), strict=True)
    fresh.configure((2, 4, 3, 3), (2, 8, 3, 3))  # keeps the loaded weights
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(fresh(x), trained(x))
    wrong = HintProjection()
    wrong.load_state_dict(trained.state_dict())
    with pytest.raises(CompressionConfigError, match=r"map 4 to 16 channels .* weight has shape \(8, 4\)"):
        wrong.configure((2, 4, 3, 3), (2, 16, 3, 3))


def test_an_optimizer_built_before_configure_trains_the_projection() -> None:
    proj = HintProjection()
    optimizer = torch.optim.SGD(proj.parameters(), lr=0.1)
    proj.configure((4, 3), (4, 2))
    before = proj.weight.detach().clone()
    hint_loss(proj(torch.randn(4, 3)), torch.randn(4, 2)).backward()
    optimizer.step()
    assert not torch.equal(before, proj.weight.detach())


def test_projection_must_be_configured_before_use() -> None:
    with pytest.raises(RuntimeError, match="configure"):
        HintProjection()(torch.randn(2, 3))
    assert "uninitialized" in repr(HintProjection())


# ---------------------------------------------------------------------------------------------- capture


class _TupleOut(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x * 3


class _DictOut(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x": x}


def test_capture_outputs_records_and_removes_its_hooks() -> None:
    net = nn.Sequential(nn.Linear(3, 4), _TupleOut(), nn.Identity())
    x = torch.randn(2, 3)
    with capture_outputs({"a": net[0], "b": net[1]}) as outputs:
        net[1](net[0](x))
    torch.testing.assert_close(outputs["a"], net[0](x))
    torch.testing.assert_close(outputs["b"], net[0](x) * 2)  # first element of the tuple
    assert all(not m._forward_hooks for m in net.modules())


class _NamesOut(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, str]:
        return {"name": "no tensor here"}


def test_capture_outputs_removes_hooks_on_error_and_rejects_non_tensors() -> None:
    module = _NamesOut()
    with (
        pytest.raises(TypeError, match=r"feature module `d` \(_NamesOut\) to return a tensor"),
        capture_outputs({"d": module}),
    ):
        module(torch.zeros(1))
    assert not module._forward_hooks
    dict_out = _DictOut()  # a mapping output (a Hugging Face ModelOutput is one) gives its tensor
    with capture_outputs({"d": dict_out}) as outputs:
        dict_out(torch.ones(2))
    assert torch.equal(outputs["d"], torch.ones(2))
