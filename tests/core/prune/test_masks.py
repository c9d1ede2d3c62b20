from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_compress.core.prune.masks import (
    apply_masks_,
    channel_masks,
    compute_masks,
    magnitude_masks,
    mask_optimizer_state_,
    masks_sparsity,
    nm_masks,
)


def _weights() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "fc1.weight": torch.randn(30, 16, generator=g),
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g) * 0.1,
        "fc2.weight": torch.randn(5, 30, generator=g) * 3,
    }


def _pruned(masks: dict[str, Tensor]) -> int:
    return sum(int((~m).sum()) for m in masks.values())


# ---------------------------------------------------------------- magnitude


def test_global_magnitude_matches_a_sorted_reference() -> None:
    weights = _weights()
    masks = magnitude_masks(weights, 0.7, scope="global")
    # Reference: sort every |w| with its (layer, index) and prune the smallest 70%.
    entries = sorted(
        (float(v), li, j) for li, w in enumerate(weights.values()) for j, v in enumerate(w.abs().flatten())
    )
    total = len(entries)
    k = round(0.7 * total)
    expected = [torch.ones(w.numel(), dtype=torch.bool) for w in weights.values()]
    for _, li, j in entries[:k]:
        expected[li][j] = False
    for (name, w), exp in zip(weights.items(), expected, strict=True):
        assert masks[name].shape == w.shape and masks[name].dtype == torch.bool
        assert torch.equal(masks[name].flatten(), exp), name
    assert _pruned(masks) == k
    # one threshold: every kept |w| is >= every pruned |w|
    kept = torch.cat([w[m].abs() for w, m in zip(weights.values(), masks.values(), strict=True)])
    pruned = torch.cat([w[~m].abs() for w, m in zip(weights.values(), masks.values(), strict=True)])
    assert kept.min() >= pruned.max()
    # the small conv weights lose more than the large fc2 weights
    assert (~masks["conv.weight"]).float().mean() > (~masks["fc2.weight"]).float().mean()


def test_layer_magnitude_prunes_each_layer_to_the_target() -> None:
    weights = _weights()
    masks = magnitude_masks(weights, 0.6, scope="layer")
    for name, w in weights.items():
        k = math.floor(0.6 * w.numel() + 0.5)
        assert int((~masks[name]).sum()) == k
        threshold = w.abs().flatten().sort().values[k - 1]
        assert torch.equal(~masks[name], w.abs() <= threshold)  # no ties in random data


def test_magnitude_ties_are_broken_by_position_deterministically() -> None:
    weights = {"a": torch.ones(2, 3), "b": torch.ones(1, 4)}
    masks = magnitude_masks(weights, 0.5, scope="global")  # 5 of 10 equal values
    assert masks["a"].flatten().tolist() == [False] * 5 + [True]
    assert masks["b"].all()
    again = magnitude_masks({k: v.clone() for k, v in weights.items()}, 0.5)
    assert all(torch.equal(masks[k], again[k]) for k in masks)
    layer = magnitude_masks({"a": torch.zeros(2, 2)}, 0.5, scope="layer")["a"]
    assert layer.flatten().tolist() == [False, False, True, True]


@pytest.mark.parametrize("sparsity", [0.0, 1.0])
def test_magnitude_extremes(sparsity: float) -> None:
    masks = magnitude_masks(_weights(), sparsity)
    assert all(bool(m.all()) == (sparsity == 0.0) and bool((~m).all()) == (sparsity == 1.0) for m in masks.values())


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_with_previous_masks_is_monotone(scope: str) -> None:
    weights = _weights()
    first = magnitude_masks(weights, 0.5, scope=scope)
    # Scramble the weights so a fresh ranking would revive some pruned entries.
    scrambled = {k: torch.randn_like(w) for k, w in weights.items()}
    second = magnitude_masks(scrambled, 0.7, scope=scope, previous=first)
    for name in weights:
        assert not (second[name] & ~first[name]).any(), "a pruned weight came back"
    assert _pruned(second) == round(0.7 * sum(w.numel() for w in weights.values())) or scope == "layer"


def test_empty_weights() -> None:
    assert magnitude_masks({}, 0.5) == {} and channel_masks({}, 0.5) == {} and nm_masks({}, 2, 4) == {}


# ---------------------------------------------------------------- channel


def test_layer_channel_prunes_the_rows_of_least_l2_norm() -> None:
    weights = _weights()
    masks = channel_masks(weights, 0.5, scope="layer")
    for name, w in weights.items():
        rows = w.reshape(w.shape[0], -1)
        k = math.floor(0.5 * w.shape[0] + 0.5)
        expected_pruned = set(rows.norm(dim=1).argsort()[:k].tolist())
        pruned = {c for c in range(w.shape[0]) if not masks[name][c].any()}
        assert pruned == expected_pruned
        for c in range(w.shape[0]):  # whole channels only
            assert masks[name][c].all() or not masks[name][c].any()


def test_channel_never_removes_a_whole_layer() -> None:
    weights = {"a": torch.randn(3, 4), "b": torch.randn(1, 4)}
    for scope in ("layer", "global"):
        masks = channel_masks(weights, 0.99, scope=scope)
        assert all(m.any(dim=1).sum() >= 1 for m in masks.values()), scope
    layer = channel_masks(weights, 0.99, scope="layer")
    assert int(layer["a"].any(dim=1).sum()) == 1 and bool(layer["b"].all())


def test_global_channel_ranks_by_rms_and_lands_near_the_target() -> None:
    weights = _weights()
    masks = channel_masks(weights, 0.5, scope="global")
    total = sum(w.numel() for w in weights.values())
    pruned = _pruned(masks)
    biggest_channel = max(w[0].numel() for w in weights.values())
    assert abs(pruned - 0.5 * total) <= biggest_channel / 2
    # Reference: rank every non-protected channel by RMS; the pruned ones are a prefix of that ranking.
    ranking = []
    for name, w in weights.items():
        rms = w.reshape(w.shape[0], -1).norm(dim=1) / math.sqrt(w[0].numel())
        best = int(rms.argmax())
        ranking += [(float(r), name, c) for c, r in enumerate(rms) if c != best]
    ranking.sort()
    flags = [not masks[name][c].any() for _, name, c in ranking]
    n = sum(flags)
    assert flags == [True] * n + [False] * (len(flags) - n)


def test_channel_on_depthwise_and_grouped_convs() -> None:
    depthwise = nn.Conv2d(8, 8, 3, groups=8)
    grouped = nn.Conv2d(8, 16, 3, groups=4)
    weights = {"dw.weight": depthwise.weight.detach(), "g.weight": grouped.weight.detach()}
    masks = channel_masks(weights, 0.5, scope="layer")
    assert masks["dw.weight"].shape == (8, 1, 3, 3)
    assert int(masks["dw.weight"].flatten(1).all(dim=1).sum()) == 4
    assert int(masks["g.weight"].flatten(1).all(dim=1).sum()) == 8
    assert int((~masks["g.weight"].flatten(1).any(dim=1)).sum()) == 8


def test_channel_previous_masks_are_kept() -> None:
    weights = _weights()
    first = channel_masks(weights, 0.3, scope="global")
    second = channel_masks({k: torch.randn_like(w) for k, w in weights.items()}, 0.5, previous=first)
    assert all(not (second[k] & ~first[k]).any() for k in weights)


# ---------------------------------------------------------------- dispatch and application


def test_compute_masks_dispatches() -> None:
    weights = _weights()
    for method, reference in (
        ("magnitude", magnitude_masks(weights, 0.4, "layer")),
        ("channel", channel_masks(weights, 0.4, "layer")),
    ):
        got = compute_masks(weights, 0.4, method=method, scope="layer")
        assert all(torch.equal(got[k], reference[k]) for k in weights)
    nm = compute_masks(weights, 0.5, method="2:4", scope="layer")
    assert all(torch.equal(nm[k], nm_masks(weights, 2, 4)[k]) for k in weights)
    with pytest.raises(ValueError, match="unknown pruning method 'random'"):
        compute_masks(weights, 0.5, method="random")


def test_masks_sparsity() -> None:
    masks = magnitude_masks(_weights(), 0.3)
    total = sum(m.numel() for m in masks.values())
    assert masks_sparsity(masks.values()) == round(0.3 * total) / total
    assert masks_sparsity([]) == 0.0


def test_apply_masks_zeroes_exactly_and_keeps_the_rest() -> None:
    weights = [w.clone() for w in _weights().values()]
    originals = [w.clone() for w in weights]
    masks = list(magnitude_masks({str(i): w for i, w in enumerate(weights)}, 0.5).values())
    apply_masks_(weights, [m.float() for m in masks])
    for w, o, m in zip(weights, originals, masks, strict=True):
        assert (w[~m] == 0).all()
        assert torch.equal(w[m], o[m])
    apply_masks_([], [])


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True),
        lambda p: torch.optim.AdamW(p, lr=0.1),
        lambda p: torch.optim.Adagrad(p, lr=0.1),
    ],
    ids=["sgd", "adam-amsgrad", "adamw", "adagrad"],
)
def test_mask_optimizer_state_zeroes_every_per_weight_buffer(make) -> None:  # type: ignore[no-untyped-def]
    layer = nn.Linear(6, 4)
    optimizer = make(layer.parameters())
    for _ in range(2):
        layer(torch.randn(3, 6)).square().sum().backward()
        optimizer.step()
    mask = magnitude_masks({"w": layer.weight.detach()}, 0.5)["w"]
    bias_state = {k: v.clone() for k, v in optimizer.state[layer.bias].items()}
    count = mask_optimizer_state_(optimizer, {layer.weight: mask.float()})
    state = optimizer.state[layer.weight]
    buffers = [v for v in state.values() if isinstance(v, Tensor) and v.shape == layer.weight.shape]
    assert count == len(buffers) >= 1
    for value in buffers:
        assert (value[~mask] == 0).all() and (value[mask] != 0).any()
    assert all(torch.equal(bias_state[k], v) for k, v in optimizer.state[layer.bias].items())  # untouched
