"""``quantize``: select + calibrate + convert in one call, as QuantizeOnFitEnd does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_compress import CompressionConfigError
from lightning_compress.core.quant.convert import (
    observed_ranges,
    quantizable_targets,
    quantize,
    quantize_model,
    record_input_ranges,
)


class WithUnused(nn.Module):
    """A Linear that forward never calls: it gets no calibration input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_never_called_linear_falls_back_as_never_observed():
    model = WithUnused()
    result = quantize(model, "static", calibration=[torch.randn(5, 6), torch.randn(5, 6)])
    assert result.converted == {"fc1": "static", "fc2": "static", "unused": "dynamic"}
    assert result.fallbacks == {"unused": "dynamic (input never observed during calibration)"}


def test_quantize_equals_the_steps_done_by_hand():
    torch.manual_seed(0)
    model = WithUnused()
    batches = [torch.randn(5, 6) for _ in range(3)]
    by_hand = copy.deepcopy(model).eval()
    targets, _ = quantizable_targets(by_hand)
    with torch.no_grad(), record_input_ranges({t.name: t.module for t in targets}) as observers:
        for x in batches:
            by_hand(x)
    quantize_model(by_hand, targets, "static", True, observed_ranges(observers))
    model.train()
    quantize(model, "static", calibration=batches)
    assert model.training  # restored after the eval-mode calibration
    x = torch.randn(7, 6)
    assert torch.equal(model.eval()(x), by_hand(x))


def test_inputs_as_tuples_and_dicts_and_include_exclude():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    model = TwoInputs()
    calibration = [(torch.randn(2, 3), torch.randn(2, 3)), {"x": torch.randn(2, 3), "y": torch.randn(2, 3)}]
    result = quantize(model, "static", calibration=calibration, exclude=["b"])
    assert result.converted == {"a": "static"} and not result.fallbacks
    assert isinstance(model.b, nn.Linear) and type(model.b) is nn.Linear


def test_dynamic_needs_no_calibration_and_skipped_layers_are_listed():
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(4, 4), Custom(4, 2))
    result = quantize(model)
    assert result.converted == {"0": "dynamic"}
    assert list(result.skipped) == ["1"]


def test_bad_mode_is_a_config_error():
    with pytest.raises(CompressionConfigError, match="`mode` to be one of 'dynamic', 'static' or 'weight_only'"):
        quantize(nn.Linear(2, 2), "int4")
