"""Group lasso along the true output channels of a weight stored [in, out] (Hugging Face Conv1D)."""

import pytest
import torch

from lightning_compress.core.layout import WeightLayout
from lightning_compress.core.penalties import group_shrink_, penalty_gradient, penalty_of, proximal_step_

CONV1D = WeightLayout(out_axis=1)


def _weight() -> torch.Tensor:
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))  # [in=6, out=10]
    w[:, ::3] *= 1e-3
    return w


@pytest.mark.parametrize("penalty", ["l1", "group_lasso"])
def test_value_and_gradient_equal_those_of_the_transposed_weight(penalty: str) -> None:
    w = _weight().requires_grad_()
    value = penalty_of([w], penalty, [CONV1D])
    # the same sum, in another order for l1: rounding only
    assert torch.allclose(value.detach(), penalty_of([w.detach().T.contiguous()], penalty), rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(value, w)
    closed = penalty_gradient(w.detach(), penalty, CONV1D)
    assert torch.allclose(grad, closed, atol=1e-7)
    assert torch.equal(closed, penalty_gradient(w.detach().T.contiguous(), penalty).T)


def test_proximal_step_shrinks_output_columns_in_place_to_positive_zeros() -> None:
    w = _weight()
    reference = w.T.contiguous()
    group_shrink_(reference, 0.01)
    out = proximal_step_(w, "group_lasso", 0.01, CONV1D)
    assert out is w and torch.equal(w, reference.T)
    zero = w == 0
    assert torch.equal(zero.all(dim=0), torch.arange(10) % 3 == 0) and zero.sum() == 6 * 4
    assert not torch.signbit(w[zero]).any()
