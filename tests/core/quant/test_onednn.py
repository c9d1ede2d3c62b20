"""oneDNN's u8 x s8 convolution gives a static Int8Conv2d the same numbers as its F.conv2d integer form."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor, nn

from lightning_compress.core.quant import onednn
from lightning_compress.core.quant.conv2d import Int8Conv2d
from lightning_compress.core.quant.onednn import CONV_KERNELS, conv_sums, onednn_conv_available, use_onednn_conv

needs_onednn = pytest.mark.skipif(
    not onednn_conv_available(), reason="oneDNN's int8 convolution is not exact on this CPU (needs VNNI or AMX)"
)

LAYERS = {
    "plain": {},
    "stride2": {"stride": 2},
    "grouped": {"groups": 4},
    "depthwise": {"groups": 16},
    "dilated": {"dilation": 2, "padding": 2},
    "no_bias": {"bias": False},
    "1x1": {"kernel_size": 1, "padding": 0},
}


@pytest.fixture(autouse=True)
def _every_size(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small layers take the oneDNN path too here (fast tests), except in the tests of the thresholds."""
    if "real_thresholds" not in request.keywords:
        monkeypatch.setattr(onednn, "MIN_DEPTH", 1)
        monkeypatch.setattr(onednn, "MIN_POSITIONS", 1)


def _static(seed: int = 0, output_scale: float = 0.05, channels: int = 16, **kwargs: object) -> Int8Conv2d:
    torch.manual_seed(seed)
    args: dict = {"kernel_size": 3, "padding": 1, **kwargs}
    conv = nn.Conv2d(channels, channels, **args)
    q = Int8Conv2d.from_float(conv, "static", input_scale=torch.tensor(0.02))
    q.set_output_scale(torch.tensor(output_scale))
    return q


def _fallback(layer: nn.Module, x: Tensor) -> Tensor:
    with use_onednn_conv(False):
        return layer(x)


@needs_onednn
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("output_scale", [0.05, 0.0], ids=["int8_out", "float_out"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_the_int8_convolution_gives_the_float_forms_numbers_and_memory_format(
    name: str, output_scale: float, channels_last: bool
) -> None:
    layer = _static(output_scale=output_scale, **LAYERS[name])
    x = torch.randn(3, 16, 9, 9) * 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        codes = torch.div(x, layer.input_scale).round_().clamp_(-127, 127)
        assert conv_sums(layer, codes) is not None  # the oneDNN path is the one under test
        got, want = layer(x), _fallback(layer, x)
    assert torch.equal(got, want)
    assert got.stride() == want.stride()  # the layout F.conv2d gives
    if output_scale > 0:  # on the output grid: integer codes times the scale
        scale = layer.output_scale
        assert torch.equal((got / scale).round() * scale, got)


@needs_onednn
def test_the_sums_are_the_exact_integer_products() -> None:
    layer = _static(bias=False)
    torch.manual_seed(1)
    codes = torch.randint(-127, 128, (2, 16, 7, 7)).to(torch.float32)
    with torch.no_grad():
        got = conv_sums(layer, codes)
    want = torch.nn.functional.conv2d(
        codes.to(torch.float64), layer.int8_weight.to(torch.float64), None, layer.stride, layer.padding
    )
    assert got is not None and torch.equal(got.to(torch.float64), want)


@needs_onednn
def test_the_prepacked_weight_follows_edits_and_replacements_of_the_weight() -> None:
    layer = _static()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        before = layer(x)
        layer.int8_weight.neg_()  # in place: a new version of the same tensor
        edited = layer(x)
        assert torch.equal(edited, _fallback(layer, x)) and not torch.equal(edited, before)
        other = _static(seed=5)
        layer.load_state_dict(other.state_dict())  # copies into the buffers
        assert torch.equal(layer(x), other(x))
        layer.register_buffer("weight", other.int8_weight.clone())  # a new tensor
        assert torch.equal(layer(x), _fallback(layer, x))
        layer.stride = (2, 2)  # a shape attribute
        assert torch.equal(layer(x), _fallback(layer, x))


@needs_onednn
def test_copies_pickles_and_state_dicts_carry_no_packed_weight() -> None:
    layer = _static()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        want = layer(x)
    assert layer.__dict__.get(onednn._ATTR) is not None
    keys = set(layer.state_dict())
    clone = copy.deepcopy(layer)
    assert clone.__dict__.get(onednn._ATTR) is None
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.__dict__.get(onednn._ATTR) is None
    with torch.no_grad():
        assert torch.equal(clone(x), want) and torch.equal(loaded(x), want)
    assert set(layer.state_dict()) == keys


@needs_onednn
def test_a_static_resnet_computes_the_same_numbers_faster_path_or_not() -> None:
    tv = pytest.importorskip("torchvision")
    from lightning_compress.core.quant.convert import quantize

    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval()
    quantize(model, "static", calibration=[torch.randn(2, 3, 48, 48) for _ in range(2)])
    x = torch.randn(2, 3, 48, 48)
    with torch.inference_mode():
        assert torch.equal(model(x), _fallback(model, x))


def test_it_stays_out_where_it_does_not_apply() -> None:
    layer = _static()
    codes = torch.randint(-127, 128, (2, 16, 6, 6)).to(torch.float32)
    with use_onednn_conv(False):
        assert conv_sums(layer, codes) is None
    assert conv_sums(layer, codes[0]) is None  # unbatched (3-d)
    assert conv_sums(layer, codes.requires_grad_()) is None  # a gradient asked for: F.conv2d's graph
    reflect = _static(padding_mode="reflect")
    assert conv_sums(reflect, codes.detach()) is None
    same = _static(padding="same")
    assert conv_sums(same, codes.detach()) is None
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():  # and those layers compute as before
        assert torch.equal(reflect(x), _fallback(reflect, x))
        assert torch.equal(same(x), _fallback(same, x))


def test_the_probe_answers_once_and_the_switch_restores_it() -> None:
    first = onednn_conv_available()
    with use_onednn_conv(False):
        assert not onednn_conv_available()
    assert onednn_conv_available() == first
    assert onednn._PROBED["ok"] in (True, False)


def test_the_kernel_says_which_path_a_layer_takes() -> None:
    static = _static()
    assert static.kernel == ("onednn_u8s8" if onednn_conv_available() else "conv_codes")
    with use_onednn_conv(False):
        assert static.kernel == "conv_codes"
    assert _static(padding_mode="reflect").kernel == "conv_codes"
    assert _static(padding="same").kernel == "conv_codes"
    dynamic = Int8Conv2d.from_float(nn.Conv2d(4, 4, 3), "dynamic")
    assert dynamic.kernel == "dequant"
    assert Int8Conv2d.from_float(nn.Conv2d(4, 4, 3), "weight_only").kernel == "dequant"
    assert {static.kernel, dynamic.kernel} <= set(CONV_KERNELS)


@needs_onednn
def test_a_layer_built_under_inference_mode_computes_the_same_numbers() -> None:
    # Its weight is an inference tensor, which has no version counter to check the cache against.
    x = torch.randn(2, 16, 8, 8)
    with torch.inference_mode():
        layer = _static()
        assert layer.kernel == "onednn_u8s8"
        first, again = layer(x), layer(x)
        assert torch.equal(first, again) and torch.equal(first, _fallback(layer, x))
    with torch.no_grad():  # and outside it, later
        assert torch.equal(layer(x), first)


@needs_onednn
@pytest.mark.parametrize(
    "shape",
    [
        {"in_channels": 6, "out_channels": 9, "groups": 3, "kernel_size": (5, 3), "stride": (1, 2), "padding": (2, 0)},
        {"in_channels": 3, "out_channels": 64, "kernel_size": 7, "stride": 2, "padding": 3},
        {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "dilation": (2, 1), "padding": (2, 1)},
    ],
    ids=["asymmetric_grouped", "stem", "asymmetric_dilation"],
)
def test_uneven_shapes_give_the_same_numbers(shape: dict) -> None:
    torch.manual_seed(3)
    layer = Int8Conv2d.from_float(nn.Conv2d(**shape), "static", input_scale=torch.tensor(0.03))
    layer.set_output_scale(torch.tensor(0.04))
    x = torch.randn(3, shape["in_channels"], 17, 9)
    with torch.no_grad():
        codes = torch.div(x, layer.input_scale).round_().clamp_(-127, 127)
        assert conv_sums(layer, codes) is not None
        assert torch.equal(layer(x), _fallback(layer, x))


@needs_onednn
@pytest.mark.real_thresholds
def test_shallow_layers_and_small_calls_keep_the_float_form() -> None:
    assert (onednn.MIN_DEPTH, onednn.MIN_POSITIONS) == (512, 64)
    deep = _static(channels=64)  # depth 64 * 3 * 3 = 576
    shallow = _static(channels=32, kernel_size=1, padding=0)  # depth 32
    assert deep.kernel == "onednn_u8s8" and shallow.kernel == "conv_codes"

    def taken(layer: Int8Conv2d, shape: tuple[int, ...]) -> bool:
        with torch.no_grad():
            return conv_sums(layer, torch.zeros(shape)) is not None

    assert taken(deep, (1, 64, 8, 8))  # 64 output positions
    assert not taken(deep, (1, 64, 7, 7))  # 49
    assert taken(deep, (2, 64, 6, 6))  # 72
    assert not taken(_static(channels=64, stride=2), (1, 64, 8, 8))  # 4 x 4 = 16
    assert not taken(shallow, (8, 32, 16, 16))
    x = torch.randn(1, 64, 7, 7)
    with torch.no_grad():  # a small call computes the same numbers through F.conv2d
        assert torch.equal(deep(x), _fallback(deep, x))
