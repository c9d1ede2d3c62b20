"""Pruned weights are +0.0, never -0.0 (a negative weight times 0 is -0.0)."""

import torch

from lightning_compress.core.prune.keeper import MaskKeeper, apply_masks_


def test_apply_masks_gives_positive_zeros_and_keeps_every_other_value() -> None:
    w = torch.tensor([-1.5, 2.0, -0.0, -3.0, 0.0, float("-inf")])
    before = w.clone()
    apply_masks_([w], [torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])])
    assert w[:3].eq(0).all() and not torch.signbit(w[:3]).any()
    assert torch.equal(w[3:4], before[3:4]) and w[5] == float("-inf")


def test_keeper_zeros_are_positive_after_adamw_steps() -> None:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(8, 8))
    optimizer = torch.optim.AdamW([param], lr=0.1, weight_decay=0.1)
    keeper = MaskKeeper({"w": param}, [optimizer], guard_all=False)
    mask = param.detach().abs() > 0.7
    assert (param.detach()[~mask] < 0).any()  # there are negative weights to prune
    keeper.set_masks({"w": mask})
    for _ in range(3):
        optimizer.zero_grad()
        (param * torch.randn(8, 8)).sum().backward()
        keeper.mask_gradients(optimizer)
        optimizer.step()
    pruned = param.detach()[~mask]
    assert pruned.eq(0).all() and not torch.signbit(pruned).any()
