"""Residual inputs on one int8 grid (core/quant/residual.py): which blocks, what they compute, what artifacts keep."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_compress.core.quant.convert import quantize
from lightning_compress.core.quant.primitives import on_grid
from lightning_compress.core.quant.residual import InputGrid, input_grids, put_input_grids, residual_grids
from lightning_compress.core.serialize import load_compressed, save_compressed


class Residual(nn.Module):
    """``relu(bn(conv(x)) + x)``: the identity is read in float."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x)


class InPlaceAdd(Residual):
    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x
        return out


class TorchAdd(Residual):
    def forward(self, x):
        return torch.add(self.bn(self.conv(x)), x)


class Downsample(nn.Module):
    """Both readers of ``x`` are static convolutions (torchvision's first block of a stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, stride=2)
        self.down = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2), nn.BatchNorm2d(6))

    def forward(self, x):
        return F.relu(self.conv(x) + self.down(x))


class FloatReader(Residual):
    """``x`` is also read by a float function: rounding it would change that too."""

    def forward(self, x):
        return self.bn(self.conv(x)) + x + torch.sigmoid(x)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, y):
        return self.conv(x) + x + y


def _stack(block: type[nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), block(), block())


def _static_stack() -> nn.Module:
    """Two static residual blocks after a convolution (seed 0)."""
    torch.manual_seed(0)
    model = _stack(Residual)
    _static(model, torch.randn(16, 3, 8, 8))
    return model


def _static(model: nn.Module, calib: torch.Tensor):
    with torch.no_grad():
        model.train()(calib)  # batch-norm statistics that are not the identity
    model.eval()
    return quantize(model, "static", calibration=[calib])


@pytest.mark.parametrize("block", [Residual, InPlaceAdd, TorchAdd])
def test_residual_blocks_put_their_input_on_their_convolutions_grid(block) -> None:
    torch.manual_seed(0)
    model = _stack(block)
    result = _static(model, torch.randn(16, 3, 8, 8))
    assert result.input_grids == {"2": "conv", "3": "conv"}
    assert input_grids(model) == {"2": "conv", "3": "conv"}
    assert residual_grids(model) == result.input_grids


def test_a_residual_block_computes_its_convolution_plus_the_identity_on_the_same_grid() -> None:
    model = _static_stack()
    block = model[2]
    x = torch.randn(5, 4, 8, 8) * 2
    scale = block.conv.input_scale
    with torch.no_grad():
        got = block(x)
        xq = on_grid(x, scale)
        assert not torch.equal(xq, x)
        want = F.relu(block.bn(block.conv(xq)) + xq)  # the identity on the conv's grid, and the conv unchanged
        assert torch.equal(got, want)
        assert not torch.equal(got, F.relu(block.bn(block.conv(x)) + x))  # really a rounding more


def test_a_block_whose_input_only_static_convolutions_read_computes_exactly_as_before() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Downsample())
    result = _static(model, torch.randn(16, 3, 8, 8))
    assert result.input_grids == {"2": "conv"}
    assert torch.equal(model[2].conv.input_scale, model[2].down[0].input_scale)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        got = model(x)
        put_input_grids(model, {}, only=True)
        assert input_grids(model) == {}
        assert torch.equal(model(x), got)  # both convolutions rounded x on this grid already


def test_a_block_whose_input_a_float_function_also_reads_is_left_alone() -> None:
    torch.manual_seed(0)
    model = FloatReader()
    result = _static(model, torch.randn(16, 4, 8, 8))
    assert result.input_grids == {} and input_grids(model) == {}


def test_two_input_block_rounds_only_its_first_input() -> None:
    torch.manual_seed(0)
    model = TwoInputs().eval()

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = model

        def forward(self, x):
            return self.block(x, x * 0.5)

    wrapped = Wrap()
    result = quantize(wrapped, "static", calibration=[torch.randn(16, 4, 8, 8)])
    assert result.input_grids == {"block": "conv"}
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        xq = on_grid(x, model.conv.input_scale)
        assert torch.equal(model(x, y), model.conv(xq) + xq + y)


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_only_static_conversions_round_residual_inputs(mode: str) -> None:
    model = _stack(Residual).eval()
    result = quantize(model, mode)
    assert result.input_grids == {} and input_grids(model) == {} and residual_grids(model) == {}


def test_different_input_scales_on_two_readers_leave_the_block_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Downsample())
    _static(model, torch.randn(16, 3, 8, 8))
    model[2].down[0].input_scale = model[2].down[0].input_scale * 2
    assert residual_grids(model) == {}


def test_torchvision_residual_blocks() -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    resnet = tv.models.resnet18(num_classes=4)
    result = _static(resnet, torch.randn(4, 3, 32, 32))
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert result.input_grids == dict.fromkeys(blocks, "conv1")
    mobilenet = tv.models.mobilenet_v3_small(num_classes=4)
    result = _static(mobilenet, torch.randn(4, 3, 32, 32))
    with_residual = [n for n, m in mobilenet.named_modules() if getattr(m, "use_res_connect", False)]
    assert with_residual and set(result.input_grids) == set(with_residual)
    assert set(result.input_grids.values()) == {"block.0.0"}  # the expansion convolution computes first


def test_the_hooks_survive_deepcopy_and_pickle() -> None:
    model = _static_stack()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
        for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert input_grids(other) == {"2": "conv", "3": "conv"}
            assert torch.equal(other(x), want)
    assert repr(InputGrid("conv")) == "InputGrid('conv')"


def test_put_input_grids_is_idempotent() -> None:
    model = _static_stack()
    put_input_grids(model, {"2": "conv", "3": "conv"})
    assert sum(isinstance(h, InputGrid) for h in model[2]._forward_pre_hooks.values()) == 1


def test_an_artifact_keeps_the_input_grids(tmp_path) -> None:
    model = _static_stack()
    path = tmp_path / "model.pt"
    save_compressed(model, path)
    assert torch.load(path, weights_only=True)["input_grids"] == {"2": "conv", "3": "conv"}
    fresh = _stack(Residual).eval()
    load_compressed(path, fresh)
    assert input_grids(fresh) == {"2": "conv", "3": "conv"}
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_an_artifact_without_input_grids_takes_them_off(tmp_path) -> None:
    model = _static_stack()
    other = copy.deepcopy(model)
    put_input_grids(other, {}, only=True)
    path = tmp_path / "plain.pt"
    save_compressed(other, path)
    assert "input_grids" not in torch.load(path, weights_only=True)
    load_compressed(path, model)
    assert input_grids(model) == {}


@pytest.mark.parametrize(
    ("grids", "message"),
    [
        ({"2": "nope"}, "'2': 'nope' is not a static Int8Conv2d of the artifact"),
        ({"9": "conv"}, "'9': the model has no such module"),
        ({"2": 3}, "expected module names (strings), got '2': 3"),
        (["2"], "expected a table (dict) of names, got a list"),
    ],
)
def test_a_damaged_input_grids_entry_is_refused_and_leaves_the_model_untouched(tmp_path, grids, message) -> None:
    model = _static_stack()
    path = tmp_path / "model.pt"
    save_compressed(model, path)
    artifact = torch.load(path, weights_only=True)
    artifact["input_grids"] = grids
    torch.save(artifact, path)
    fresh = _stack(Residual).eval()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="entry 'input_grids' does not match the model") as err:
        load_compressed(path, fresh)
    assert message in str(err.value)
    assert input_grids(fresh) == {} and isinstance(fresh[2].conv, nn.Conv2d)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_torch_export_traces_the_input_grid() -> None:
    model = _static_stack()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
        exported = torch.export.export(model, (x,)).module()
        torch.testing.assert_close(exported(x), want, atol=1e-5, rtol=0)
        put_input_grids(model, {}, only=True)
        assert float((model(x) - want).abs().max()) > 1e-3  # without the hooks the output differs
