"""Shared activation grids (core/quant/grids.py): which convolutions link, and that the second one's input is exact."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_compress.core.quant.convert import quantize
from lightning_compress.core.quant.grids import relu_links, share_grids
from lightning_compress.core.quant.primitives import on_grid


def _convs(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


class FunctionalRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


class ResidualReadsRelu(FunctionalRelu):
    def forward(self, x):
        r = F.relu(self.a(x))
        return self.b(r) + r  # the ReLU's output has a second reader


class PoolBetween(FunctionalRelu):
    def forward(self, x):
        return self.b(F.max_pool2d(F.relu(self.a(x)), 2))


class AvgPoolBetween(FunctionalRelu):
    def forward(self, x):
        return self.b(F.avg_pool2d(F.relu(self.a(x)), 2))  # an average is not on the grid


class Block(nn.Module):
    """A residual block: its input is read by its first convolution and the addition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x


class Stem(nn.Module):
    """resnet's stem: conv -> bn -> relu -> maxpool -> a stage of residual blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.stage = nn.Sequential(Block(), Block())

    def forward(self, x):
        return self.stage(self.pool(F.relu(self.bn(self.conv(x)))))


@pytest.mark.parametrize(
    ("model", "links"),
    [
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3)), {"0": "3"}),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1)), {"0": "2"}),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3)), {}),  # no ReLU
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Conv2d(4, 4, 3)), {}),  # not a ReLU
        (FunctionalRelu(), {"a": "b"}),
        (ResidualReadsRelu(), {}),
        (PoolBetween(), {"a": "b"}),
        (AvgPoolBetween(), {}),
        (Stem(), {"conv": "stage.0.conv"}),
        (
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Sequential(nn.Conv2d(4, 4, 3))),
            {"0": "3.0"},
        ),
    ],
    ids=[
        "conv-bn-relu-conv",
        "conv-relu-conv",
        "no-relu",
        "gelu",
        "functional-relu",
        "relu-read-twice",
        "max-pool",
        "avg-pool",
        "stem",
        "into-a-sequential",
    ],
)
def test_which_convolutions_link(model: nn.Module, links: dict[str, str]) -> None:
    assert relu_links(model, _convs(model)) == links


def test_torchvision_basic_blocks_link_conv1_to_conv2() -> None:
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18()
    links = relu_links(model, _convs(model))
    want = {f"layer{i}.{j}.conv1": f"layer{i}.{j}.conv2" for i in range(1, 5) for j in range(2)}
    assert links == {"conv1": "layer1.0.conv1", **want}  # the stem, through its max pool


def test_a_second_convolution_never_reached_keeps_the_first_ones_range() -> None:
    own = (torch.tensor(-1.0), torch.tensor(2.0))
    assert share_grids({"a": "b"}, {}, {"a": own}) == {"a": own}
    theirs = (torch.tensor(0.0), torch.tensor(3.0))
    assert share_grids({"a": "b"}, {"b": theirs}, {"a": own}) == {"a": theirs}


def _second_input_and_first_float_output(model, first, second, x):
    """What ``second`` reads in one call of ``model``, and ``first``'s output written another way.

    The reference: the first convolution in float, on its input grid (its bias on the int32 product
    grid), no output grid.
    """
    seen = []
    handle = second.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
        weight = first.int8_weight.float() * first.weight_scale.reshape(-1, 1, 1, 1)
        step = first.input_scale * first.weight_scale
        y = F.conv2d(on_grid(x, first.input_scale), weight, torch.round(first.bias / step) * step, padding=1)
    handle.remove()
    return seen, y


def test_the_second_convolution_reads_the_relu_of_the_float_output_on_its_own_grid() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        model.train()(x)
        model[1].bias.fill_(-0.5)  # outputs mostly negative: their own grid would be wider than the ReLU's
    model.eval()
    with torch.no_grad():
        own = model[1](model[0](x)).abs().max() / 127
    quantize(model, "static", calibration=[x])
    first, second = model[0], model[3]
    assert first.output_scale.item() == second.input_scale.item() > 0
    assert own.item() > 1.2 * second.input_scale.item()  # so the shared grid is not a coincidence
    seen, y = _second_input_and_first_float_output(model, first, second, x)
    s = second.input_scale
    torch.testing.assert_close(on_grid(seen[0], s), on_grid(F.relu(y), s), atol=1e-6, rtol=0)
    assert torch.equal(on_grid(seen[0], s), seen[0])  # already on the grid: the second quantization is exact


def test_through_a_max_pool_the_next_block_reads_the_pooled_relu_of_the_float_output_on_its_grid() -> None:
    torch.manual_seed(0)
    model = Stem()
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        model.train()(x)
    model.eval()
    quantize(model, "static", calibration=[x])
    first, second = model.conv, model.stage[0].conv
    assert first.output_scale.item() == second.input_scale.item() > 0
    seen, y = _second_input_and_first_float_output(model, first, second, x)
    s = second.input_scale
    want = on_grid(F.max_pool2d(F.relu(y), 3, 2, 1), s)
    torch.testing.assert_close(seen[0], want, atol=1e-6, rtol=0)
    assert torch.equal(on_grid(seen[0], s), seen[0])
