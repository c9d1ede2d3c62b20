import pytest
import torch
from torch import nn

from lightning_compress.core.penalties import (
    PENALTIES,
    group_lasso_penalty,
    group_shrink_,
    l1_penalty,
    penalty_gradient,
    penalty_named,
    penalty_of,
    proximal_step_,
    soft_threshold_,
    sparse_penalty,
    strength_at,
)
from lightning_compress.errors import CompressionConfigError


def _l1_reference(w: torch.Tensor) -> float:
    return sum(abs(v) for v in w.double().flatten().tolist())


def _group_reference(w: torch.Tensor) -> float:
    return sum(sum(v * v for v in row) ** 0.5 for row in w.double().reshape(len(w), -1).tolist())


@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 3, 3), (6, 2, 5), (7,)])
def test_values_match_a_reference_written_with_python_floats(shape):
    w = torch.randn(shape)
    assert l1_penalty(w).item() == pytest.approx(_l1_reference(w), rel=1e-6)
    assert group_lasso_penalty(w).item() == pytest.approx(_group_reference(w), rel=1e-6)


def test_group_lasso_groups_are_output_channels():
    w = torch.zeros(3, 2, 2, 2)
    w[0] = 1.0  # norm sqrt(8)
    w[2, 1, 0, 0] = -3.0  # norm 3
    assert group_lasso_penalty(w).item() == pytest.approx(8**0.5 + 3)


def test_low_precision_weights_accumulate_in_float32():
    w = torch.full((64, 64), 1.0, dtype=torch.bfloat16) / 3
    value = l1_penalty(w)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(4096 * w[0, 0].float().item())
    assert group_lasso_penalty(w).dtype == torch.float32
    assert l1_penalty(w.double()).dtype == torch.float64


@pytest.mark.parametrize("penalty", ["l1", "group_lasso"])
def test_closed_form_gradient_matches_autograd_including_zeros(penalty):
    w = torch.randn(6, 4)
    w[1] = 0.0  # a zero channel: group-lasso subgradient 0, not NaN
    w[3, 2] = 0.0  # a single zero: sign(0) = 0
    w.requires_grad_(True)
    value = l1_penalty(w) if penalty == "l1" else group_lasso_penalty(w)
    (grad,) = torch.autograd.grad(value, w)
    assert torch.isfinite(grad).all()
    assert (grad[1] == 0).all()
    torch.testing.assert_close(penalty_gradient(w.detach(), penalty), grad)
    if penalty == "l1":
        assert grad[3, 2] == 0


def test_penalty_of_sums_layers_and_skips_integer_weights():
    a, b = torch.randn(3, 4), torch.randn(2, 2)
    quantized = torch.ones(5, 5, dtype=torch.int8)
    assert penalty_of([a, b, quantized]).item() == pytest.approx(_l1_reference(a) + _l1_reference(b), rel=1e-6)
    assert penalty_of([quantized], "group_lasso").item() == 0.0


class Pair(nn.Module):
    compression_submodule = "student"

    def __init__(self):
        super().__init__()
        self.student = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        self.teacher = nn.Linear(4, 2)


def test_sparse_penalty_selects_like_the_callbacks_and_is_differentiable():
    model = Pair()
    s = model.student
    expected = _l1_reference(s[0].weight.detach()) + _l1_reference(s[2].weight.detach())
    value = sparse_penalty(model)
    assert value.item() == pytest.approx(expected, rel=1e-6)  # no teacher, no bias, no BatchNorm
    value.backward()
    torch.testing.assert_close(s[0].weight.grad, s[0].weight.detach().sign())
    assert s[0].bias.grad is None and s[1].weight.grad is None and model.teacher.weight.grad is None

    only_first = sparse_penalty(model, "group_lasso", exclude=["2"])
    assert only_first.item() == pytest.approx(_group_reference(s[0].weight.detach()), rel=1e-6)


def test_sparse_penalty_rejects_an_unknown_penalty():
    with pytest.raises(CompressionConfigError, match=r"Expected argument `penalty` to be one of 'l1' or 'group_lasso'"):
        sparse_penalty(nn.Linear(2, 2), "l2")


def test_sparse_penalty_rejects_a_selection_of_nothing():
    with pytest.raises(CompressionConfigError, match=r"to select at least one weight.*\['Linear'\]"):
        sparse_penalty(nn.Sequential(nn.Linear(2, 2)), include=["Conv2d"])


def test_soft_threshold_is_in_place_and_reaches_exact_zeros():
    w = torch.tensor([0.5, -0.05, -0.3, 0.1, 0.0, -0.1000001])
    out = soft_threshold_(w, 0.1)
    assert out.data_ptr() == w.data_ptr()
    expected = torch.tensor([0.4, 0.0, -0.2, 0.0, 0.0, -0.0000001])
    torch.testing.assert_close(w, expected)
    assert (w[[1, 3, 4]] == 0).all()
    # A tensor threshold (an optimizer's lr may be a tensor) gives the same result.
    v = torch.tensor([0.5, -0.05, -0.3])
    soft_threshold_(v, torch.tensor(0.1))
    torch.testing.assert_close(v, expected[:3])


def test_group_shrink_zeroes_whole_channels_and_scales_the_rest():
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    group_shrink_(w, 1.0)
    torch.testing.assert_close(w, torch.tensor([[2.4, 3.2], [0.0, 0.0], [0.0, 0.0]]))
    zero = torch.zeros(2, 3)
    group_shrink_(zero, 0.0)  # 0/0 must not produce NaN
    assert (zero == 0).all()


def test_group_shrink_changes_non_contiguous_weights_in_place():
    w = torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last)
    norms = w.flatten(1).norm(dim=1)
    threshold = norms.sort().values[1].item()  # the two weakest filters go to zero
    group_shrink_(w, threshold)
    new_norms = w.flatten(1).norm(dim=1)
    assert int((new_norms == 0).sum()) == 2
    kept = norms > threshold
    torch.testing.assert_close(new_norms[kept], norms[kept] - threshold)


@pytest.mark.parametrize("penalty", ["l1", "group_lasso"])
def test_proximal_step_minimizes_its_objective(penalty):
    """prox_t(w) = argmin_v 0.5 ||v - w||^2 + t * penalty(v): no random perturbation does better."""
    torch.manual_seed(3)
    w = torch.randn(6, 5) * 0.5
    w[2] *= 0.1  # a weak channel, which group shrinkage zeroes
    t = 0.4
    v = proximal_step_(w.clone(), penalty, t)
    value = l1_penalty if penalty == "l1" else group_lasso_penalty

    def objective(x):
        return 0.5 * (x - w).pow(2).sum() + t * value(x)

    best = objective(v)
    for _ in range(200):
        assert objective(v + 1e-2 * torch.randn_like(v)) >= best - 1e-6
    assert (v == 0).any()


def test_strength_ramp():
    assert strength_at(0.5, 3.0) == 0.5
    assert strength_at(0.5, 0.1) == 0.5
    assert strength_at(0.5, 2.0, start_epoch=2) == 0.0
    assert strength_at(0.5, 2.25, start_epoch=2) == 0.5
    assert strength_at(0.5, 2.25, start_epoch=2, warmup_epochs=1) == pytest.approx(0.125)
    assert strength_at(0.5, 4.0, start_epoch=2, warmup_epochs=2) == 0.5
    assert strength_at(0.5, 4.5, start_epoch=2, warmup_epochs=2) == 0.5


def test_a_weight_shared_by_two_layers_counts_once():
    first, second = nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)
    second.weight = first.weight
    tied = nn.Sequential(first, second)
    assert sparse_penalty(tied).item() == pytest.approx(_l1_reference(first.weight.detach()), rel=1e-6)


@pytest.mark.parametrize("name", PENALTIES)
def test_the_penalty_table_holds_value_gradient_and_proximal_step(name):
    entry = penalty_named(name)
    w = torch.tensor([[3.0, -4.0], [0.0, 0.5]])
    assert entry.name == name
    assert torch.equal(entry.value(w), penalty_of([w], name))
    assert torch.equal(entry.gradient(w), penalty_gradient(w, name))
    assert torch.equal(entry.proximal(w.clone(), 0.6), proximal_step_(w.clone(), name, 0.6))


def test_unknown_penalty_names_the_table():
    with pytest.raises(CompressionConfigError, match="`penalty` to be one of 'l1' or 'group_lasso', but got 'l2'"):
        penalty_named("l2")
