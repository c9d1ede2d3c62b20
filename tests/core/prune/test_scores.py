from __future__ import annotations

import pytest
import torch

from lightning_compress.core.prune.masks import compute_masks, magnitude_masks
from lightning_compress.core.prune.scores import (
    magnitude_score,
    register_score,
    score_named,
    score_names,
    score_weights,
    wanda_score,
)
from lightning_compress.errors import CompressionConfigError


def test_builtin_scores_are_registered_with_the_statistic_they_need() -> None:
    assert score_names()[:2] == ("magnitude", "wanda")
    assert score_named("magnitude").fn is magnitude_score and score_named("magnitude").statistic is None
    assert score_named("wanda").fn is wanda_score and score_named("wanda").statistic == "input_norm"


def test_magnitude_score_is_abs_in_float32() -> None:
    w = torch.tensor([[-2.0, 0.5], [0.0, 3.0]], dtype=torch.float64, requires_grad=True)
    s = magnitude_score(w)
    assert s.dtype == torch.float32 and not s.requires_grad
    assert s.tolist() == [[2.0, 0.5], [0.0, 3.0]]


def test_wanda_score_multiplies_each_input_column_by_its_norm() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g)
    x = torch.randn(32, 7, generator=g)
    norms = torch.linalg.vector_norm(x, dim=0)
    reference = torch.stack([w[:, j].abs() * norms[j] for j in range(7)], dim=1)
    torch.testing.assert_close(wanda_score(w, norms), reference)


def test_wanda_score_broadcasts_over_convolution_kernels() -> None:
    w = torch.randn(4, 3, 2, 2)
    norms = torch.tensor([1.0, 0.0, 2.0])
    s = wanda_score(w, norms)
    assert torch.equal(s[:, 1], torch.zeros(4, 2, 2))
    torch.testing.assert_close(s[:, 2], 2 * w[:, 2].abs())
    torch.testing.assert_close(s[:, 0], w[:, 0].abs())


def test_wanda_score_needs_one_norm_per_input_feature() -> None:
    with pytest.raises(ValueError, match=r"needs one input norm per input feature \(7 .*got none"):
        wanda_score(torch.ones(5, 7), None)
    with pytest.raises(ValueError, match=r"needs one input norm per input feature \(7 .*got 6"):
        wanda_score(torch.ones(5, 7), torch.ones(6))
    with pytest.raises(ValueError, match="needs a weight with an input axis"):
        wanda_score(torch.ones(5), torch.ones(5))


def test_wanda_masks_differ_from_magnitude_where_inputs_differ() -> None:
    # Column 0 has the larger weights but sees no input: Wanda prunes it, magnitude keeps it.
    w = {"fc": torch.tensor([[4.0, 1.0], [3.0, 2.0]])}
    stats = {"fc": torch.tensor([0.0, 1.0])}
    wanda = compute_masks(w, 0.5, score="wanda", statistics=stats, scope="layer")["fc"]
    assert wanda.tolist() == [[False, True], [False, True]]
    assert magnitude_masks(w, 0.5, "layer")["fc"].tolist() == [[True, False], [True, False]]


def test_a_user_score_is_one_entry() -> None:
    register_score("test_negated", lambda w, s: -w.detach().abs().float())
    w = {"fc": torch.tensor([[1.0, -5.0, 0.5, 3.0]])}
    got = compute_masks(w, 0.5, score="test_negated", scope="layer")["fc"]
    assert got.tolist() == [[True, False, True, False]]  # the smallest magnitudes are the best scores
    # a callable works without registering
    assert torch.equal(compute_masks(w, 0.5, score=lambda w, s: -w.abs(), scope="layer")["fc"], got)


def test_user_score_with_negative_values_keeps_previously_pruned_entries_pruned() -> None:
    w = {"fc": torch.tensor([[1.0, 2.0, 3.0, 4.0]])}
    previous = {"fc": torch.tensor([[True, True, True, False]])}
    got = compute_masks(w, 0.25, score=lambda w, s: -w - 100.0, previous=previous, scope="layer")["fc"]
    assert got.tolist() == [[True, True, True, False]]


def test_register_score_errors() -> None:
    with pytest.raises(CompressionConfigError, match="`name` to be a name not registered yet"):
        register_score("magnitude", magnitude_score)
    with pytest.raises(CompressionConfigError, match="`name` to be a non-empty string"):
        register_score("", magnitude_score)
    with pytest.raises(CompressionConfigError, match="`fn` to be a callable"):
        register_score("test_bad", 3)  # type: ignore[arg-type]
    with pytest.raises(CompressionConfigError, match="`statistic` to be one of 'input_norm', but got 'grad'"):
        register_score("test_bad", magnitude_score, statistic="grad")
    assert "test_bad" not in score_names()
    with pytest.raises(CompressionConfigError, match="`score` to be one of 'magnitude' or 'wanda', but got 'nope'"):
        score_named("nope")


def test_score_weights_rejects_a_score_of_another_shape() -> None:
    with pytest.raises(ValueError, match=r"gave \(4,\) for 'fc', expected a tensor of the weight's shape \(2, 2\)"):
        score_weights({"fc": torch.ones(2, 2)}, lambda w, s: w.flatten())
