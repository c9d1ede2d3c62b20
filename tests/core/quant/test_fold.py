"""Folding BatchNorm2d into the convolution before int8 (core/quant/fold.py): the math, which pairs fold, artifacts."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_compress import load_compressed, save_compressed
from lightning_compress.core.quant.convert import int8_layers, quantize
from lightning_compress.core.quant.fold import (
    FoldedBatchNorm,
    fold_batch_norms,
    foldable_pairs,
    folded_batch_norms,
)


def _trained_bn(bn: nn.BatchNorm2d, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 2 + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
    return bn


def _convs(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


class Block(nn.Module):
    """conv -> bn -> relu, conv -> bn, plus a residual: a parent that is traced, not a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = _trained_bn(nn.BatchNorm2d(4), 1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = _trained_bn(nn.BatchNorm2d(4, affine=False), 2)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


@pytest.mark.parametrize("bias", [True, False])
def test_folded_conv_equals_the_batch_norm_formula(bias: bool) -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3, bias=bias), _trained_bn(nn.BatchNorm2d(5, eps=1e-3), 0)
    model = nn.Sequential(conv, bn).eval()
    x = torch.randn(2, 3, 6, 6)
    # the reference written another way: batch norm by its eval-mode formula, on the float convolution
    y = conv(x)
    ref = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-3)
    ref = ref * bn.weight[:, None, None] + bn.bias[:, None, None]
    assert fold_batch_norms(model, {"0": conv}) == {"1": "0"}
    assert isinstance(model[1], FoldedBatchNorm) and model[1].into == "0"
    assert conv.bias is not None and conv.bias.shape == (5,)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == {"0.weight", "0.bias"}  # the batch norm's entries are gone


def test_traced_parent_folds_both_pairs_and_keeps_the_output() -> None:
    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(2, 4, 5, 5)
    before = block(x)
    assert fold_batch_norms(block, _convs(block)) == {"bn1": "conv1", "bn2": "conv2"}
    torch.testing.assert_close(block(x), before, atol=1e-5, rtol=1e-5)
    assert folded_batch_norms(block) == {"bn1": "conv1", "bn2": "conv2"}


class ConvBn(nn.Module):
    """A convolution and a batch norm that its subclasses' forward wires in ways that must not fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)


class SharedOutput(ConvBn):
    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the convolution's output has a second reader


class CalledTwice(ConvBn):
    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


class ValueBranch(ConvBn):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: fx cannot trace it
            return self.bn(self.conv(x))
        return x


class BatchNormRelu(nn.BatchNorm2d):
    """A batch norm with its own forward (as timm's BatchNormAct2d): more than the affine map."""

    def forward(self, x):
        return F.relu(super().forward(x))


@pytest.mark.parametrize(
    "model",
    [
        SharedOutput(),
        CalledTwice(),
        ValueBranch(),
        nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1)),  # the batch norm comes first
        nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU(), nn.BatchNorm2d(2)),  # not neighbours
        nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)),  # batch statistics only
        nn.Sequential(nn.Conv2d(2, 2, 1), BatchNormRelu(2)),
    ],
    ids=[
        "output-read-twice",
        "conv-called-twice",
        "untraceable",
        "bn-first",
        "not-neighbours",
        "no-running-stats",
        "bn-with-own-forward",
    ],
)
def test_pairs_that_must_not_fold(model: nn.Module) -> None:
    model.eval()
    x = torch.randn(1, 2, 3, 3).abs()
    before = model(x)
    assert fold_batch_norms(model, _convs(model)) == {}
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)
    assert not any(isinstance(m, FoldedBatchNorm) for m in model.modules())


def test_a_conv_that_is_not_a_target_keeps_its_batch_norm() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    assert foldable_pairs(model, {"2": model[2]}) == {"3": "2"}


def test_a_shared_batch_norm_module_is_not_folded() -> None:
    bn = nn.BatchNorm2d(2)
    model = nn.Sequential(nn.Conv2d(2, 2, 1), bn, nn.Conv2d(2, 2, 1), bn)
    assert foldable_pairs(model, _convs(model)) == {}


def _resnet():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10)
    for i, m in enumerate(model.modules()):
        if isinstance(m, nn.BatchNorm2d):
            _trained_bn(m, i)
    return model.eval()


def test_resnet18_folds_every_batch_norm_and_computes_the_same() -> None:
    model, reference = _resnet(), _resnet()
    x = torch.randn(2, 3, 32, 32)
    folded = fold_batch_norms(model, _convs(model))
    assert len(folded) == 20 and folded["layer2.0.downsample.1"] == "layer2.0.downsample.0"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["dynamic", "static", "weight_only"])
def test_quantize_folds_per_channel_only(mode: str) -> None:
    model = _resnet()
    x = torch.randn(4, 3, 32, 32)
    result = quantize(model, mode, calibration=[x])
    assert len(result.folded) == 20
    per_tensor = _resnet()
    assert quantize(per_tensor, mode, per_channel=False, calibration=[x]).folded == {}
    assert sum(isinstance(m, nn.BatchNorm2d) for m in per_tensor.modules()) == 20
    kept = _resnet()
    assert quantize(kept, mode, calibration=[x], fold_batch_norm=False).folded == {}


def test_static_conv_output_grid_is_after_the_batch_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _trained_bn(nn.BatchNorm2d(4), 3), nn.ReLU()).eval()
    x = torch.randn(8, 3, 6, 6)
    reference = copy.deepcopy(model)
    quantize(model, "static", calibration=[x])
    conv = model[0]
    # the output scale covers the batch norm's output range (the convolution's own range is another one)
    bn_out = reference[1](reference[0](x))
    assert conv.output_scale.item() == pytest.approx(bn_out.abs().max().item() / 127, rel=1e-5)
    rel = (model(x) - reference(x)).norm() / reference(x).norm()
    assert rel < 0.03


def test_artifact_of_a_folded_model_loads_into_a_fresh_one(tmp_path) -> None:
    model = _resnet()
    x = torch.randn(2, 3, 32, 32)
    quantize(model, "static", calibration=[x])
    path = tmp_path / "r18.pt"
    save_compressed(model, path)
    raw = torch.load(path, weights_only=True)
    assert raw["folded"] == folded_batch_norms(model) and len(raw["folded"]) == 20
    fresh = _resnet()
    load_compressed(path, fresh)
    assert torch.equal(fresh(x), model(x))
    assert isinstance(fresh.layer1[0].bn2, FoldedBatchNorm) and len(int8_layers(fresh)) == 21
    load_compressed(path, fresh)  # into the int8, folded model itself
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize(
    ("folded", "message"),
    [
        (["bn"], "expected a table"),
        ({"0.1": "1"}, "not two children of one module"),
        ({"1": "2"}, "'2': the model has no such convolution"),
        ({"2": "0"}, "'2': the model has no such BatchNorm2d"),
        ({"3": "0"}, "'3': the model has no such BatchNorm2d"),
        ({"": "0"}, "non-empty strings"),
    ],
)
def test_damaged_folded_entry_is_refused_and_the_model_untouched(tmp_path, folded, message: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU()).eval()
    quantize(model, "dynamic")
    path = tmp_path / "m.pt"
    save_compressed(model, path)
    raw = torch.load(path, weights_only=True)
    raw["folded"] = folded
    torch.save(raw, path)
    fresh = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU()).eval()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="entry 'folded' does not match the model") as err:
        load_compressed(path, fresh)
    assert message in str(err.value)
    assert isinstance(fresh[1], nn.BatchNorm2d) and fresh[0].bias is not None
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_folding_a_conv_without_bias_into_a_fresh_model_adds_it(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), _trained_bn(nn.BatchNorm2d(3), 0)).eval()
    x = torch.randn(1, 2, 4, 4)
    quantize(model, "weight_only")
    save_compressed(model, tmp_path / "m.pt")
    fresh = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3)).eval()
    load_compressed(tmp_path / "m.pt", fresh)
    assert torch.equal(fresh(x), model(x)) and fresh[0].bias is not None
