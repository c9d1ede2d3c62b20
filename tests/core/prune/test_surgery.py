"""remove_channels: exact removal on the models the docs list, folding, and still a plain model."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_compress import load_compressed, remove_channels, save_compressed
from lightning_compress.core.prune.groups import ChannelGroup, find_groups
from lightning_compress.demo import MLP, SmallCNN

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _kill(model: nn.Module, groups: list[ChannelGroup], every: int = 2, affine: bool = False) -> int:
    """Zero the producers of every `every`-th unit (and, with `affine`, their bias / norm entries)."""
    killed = 0
    with torch.no_grad():
        for group in groups:
            for unit in group.units[::every]:
                killed += 1
                cuts = unit.cuts if affine else unit.producers
                for cut in cuts:
                    if cut.axis != 0 or cut.tensor.startswith("running"):
                        continue
                    t = getattr(model.get_submodule(cut.module), cut.tensor, None)
                    if isinstance(t, Tensor):
                        t.index_fill_(0, torch.tensor(cut.indices), 0.0)
    return killed


def _randomize_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.uniform_(-0.2, 0.2)


def _output(model: nn.Module, x: Any) -> Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, tuple):
        out = out[0]
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _bert() -> tuple[nn.Module, Any]:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=16,
    )  # fmt: skip
    x = {"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])}
    return transformers.BertModel(config), x


def _tv(name: str) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        tv = pytest.importorskip("torchvision")
        return getattr(tv.models, name)(num_classes=10), torch.randn(2, 3, 32, 32)

    return build


def _timm(name: str, **kw: Any) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        timm = pytest.importorskip("timm")
        model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
        return model, torch.randn(2, 3, 32, 32)

    return build


def _encoder() -> tuple[nn.Module, Any]:
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), torch.randn(2, 5, 32)


MODELS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "mlp": lambda: (MLP(), torch.randn(8, 64)),
    "cnn": lambda: (SmallCNN(), torch.randn(4, 1, 8, 8)),
    "encoder": _encoder,
    "bert": _bert,
    "resnet18": _tv("resnet18"),
    "mobilenet_v3_small": _tv("mobilenet_v3_small"),
}
SLOW: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "resnet50": _tv("resnet50"),
    "timm_resnet18": _timm("resnet18"),
    "timm_vit": _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2),
    # BatchNormAct2d (batch norm + activation in one module) and squeeze-excitation in every block.
    "timm_efficientnet_b0": _timm("efficientnet_b0"),
    "timm_mobilenetv3_small": _timm("mobilenetv3_small_100"),
}


def _check_exact(build: Callable[[], tuple[nn.Module, Any]], affine: bool) -> None:
    model, x = build()
    model.eval()
    _randomize_norms(model)
    groups = find_groups(model, x).groups
    assert _kill(model, groups, affine=affine) > 0
    keys = list(model.state_dict())
    before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        ref = _output(model, x)
        shapes = remove_channels(model, x)
        out = _output(model, x)
    after = sum(p.numel() for p in model.parameters())
    assert shapes and after < before
    assert list(model.state_dict()) == keys
    for name, shape in shapes.items():
        m = model.get_submodule(name)
        weight = getattr(m, "weight", None)
        assert tuple(weight.shape if weight is not None else m.in_proj_weight.shape) == shape
    assert float((out - ref).norm() / ref.norm()) <= 1e-5
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("affine", [False, True], ids=["masked-weights", "zeroed-affine"])
@pytest.mark.parametrize("name", list(MODELS))
def test_removal_is_exact(name: str, affine: bool) -> None:
    _check_exact(MODELS[name], affine)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW))
def test_removal_is_exact_larger_models(name: str) -> None:
    _check_exact(SLOW[name], affine=False)


def test_nothing_removable_returns_empty_and_changes_nothing() -> None:
    model, x = MLP(), torch.randn(4, 64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert remove_channels(model, x) == {}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_attributes_follow_the_tensors() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                          nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 16, 2))  # fmt: skip
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        model[0].weight[[1, 5]] = 0.0
        model[3].weight[[1, 5]] = 0.0
        model[5].weight[2] = 0.0
    model.eval()
    ref = model(x)
    shapes = remove_channels(model, x)
    assert shapes == {"0": (6, 3, 1, 1), "1": (6,), "3": (6, 1, 3, 3), "5": (3, 6, 1, 1), "7": (2, 48)}
    assert (model[0].out_channels, model[1].num_features) == (6, 6)
    assert (model[3].in_channels, model[3].out_channels, model[3].groups) == (6, 6, 6)
    assert (model[5].in_channels, model[7].in_features) == (6, 48)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


def test_timm_norm_with_activation_is_a_batch_norm_for_the_channels() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10).eval()
    groups = find_groups(model, torch.randn(2, 3, 32, 32)).groups
    assert isinstance(model.bn1, timm.layers.BatchNormAct2d)
    assert [g.name for g in groups if not g.removable] == ["classifier"]  # only the model output stays
    stem = next(g for g in groups if g.name == "conv_stem")
    assert "bn1" in {c.module for u in stem.units for c in u.cuts}
    # MobileNetV3's classifier is timm's `Linear`, whose forward computes nn.Linear's: a consumer.
    model = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=10).eval()
    assert type(model.classifier) is timm.layers.Linear
    groups = find_groups(model, torch.randn(2, 3, 32, 32)).groups
    head = next(g for g in groups if g.name == "conv_head")
    assert head.removable and "classifier" in {c.module for u in head.units for c in u.consumers}


def test_a_prelu_with_a_weight_per_channel_keeps_its_channels() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 10)
    for prelu, removed in ((nn.PReLU(8), False), (nn.PReLU(), True)):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), prelu, nn.Conv2d(8, 4, 3)).eval()
        with torch.no_grad():
            model[0].weight[2:4] = 0
            model[0].bias[2:4] = 0
            want = model(x)
            shapes = remove_channels(model, x)
            assert (shapes == {"0": (6, 3, 3, 3), "2": (4, 6, 3, 3)}) is removed and (shapes == {}) is not removed
            assert float((model(x) - want).abs().max()) <= 1e-5


def test_batchnorm_shift_is_folded_into_an_unpadded_consumer() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1))
    _randomize_norms(model)
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[1].bias[1] = 0.7  # the dead channel sends relu(0.7 - ...) > 0 downstream
        model[1].running_mean[1] = -0.2
    model.eval()
    x = torch.randn(2, 2, 5, 5)
    ref = model(x)
    assert remove_channels(model, x)["3"] == (3, 3, 1, 1)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


def test_constant_into_a_zero_padded_convolution_stays() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[0].bias[1] = 0.5  # not exact to fold at the border: the channel must stay
        model[0].weight[2] = 0.0
        model[0].bias[2] = -0.5  # relu(-0.5) = 0: nothing to fold, removable
    x = torch.randn(2, 2, 5, 5)
    ref = model(x)
    assert remove_channels(model, x) == {"0": (3, 2, 3, 3), "2": (3, 3, 3, 3)}
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


def test_residual_channels_go_only_when_every_branch_is_dead() -> None:
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model.conv1.weight[3] = 0.0  # the stem alone: layer1's blocks still add to channel 3
    assert "conv1" not in remove_channels(model, x)
    with torch.no_grad():
        for conv in (model.layer1[0].conv2, model.layer1[1].conv2):
            conv.weight[3] = 0.0
        ref = model(x)
    shapes = remove_channels(model, x)
    assert shapes["conv1"] == (63, 3, 7, 7) and shapes["layer1.0.conv1"] == (64, 63, 3, 3)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_heads_of_multihead_attention() -> None:
    model, x = _encoder()
    model.eval()
    with torch.no_grad():
        attn = model.layers[0].self_attn
        attn.in_proj_weight[2 * 32 + 8 : 2 * 32 + 16] = 0.0  # the value rows of head 1
    ref = model(x)
    shapes = remove_channels(model, x)
    assert shapes["layers.0.self_attn"] == (72, 32) and attn.num_heads == 3
    assert shapes["layers.0.self_attn.out_proj"] == (32, 24)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_hf_bert_attributes() -> None:
    model, x = _bert()
    model.eval()
    sa = model.encoder.layer[0].attention.self
    with torch.no_grad():
        sa.value.weight[:8] = 0.0
        ref = _output(model, x)
    remove_channels(model, x)
    assert (sa.num_attention_heads, sa.all_head_size, sa.query.out_features) == (3, 24, 24)
    torch.testing.assert_close(_output(model, x), ref, rtol=1e-5, atol=1e-5)


def _slim_cnn() -> tuple[nn.Module, Tensor, Tensor]:
    model, x = SmallCNN(), torch.randn(3, 1, 8, 8)
    groups = find_groups(model, x).groups
    _kill(model, groups, affine=True)
    remove_channels(model, x)
    return model.eval(), x, model(x)


def test_save_load_into_a_fresh_full_model(tmp_path: Any) -> None:
    model, x, out = _slim_cnn()
    path = tmp_path / "slim.pt"
    save_compressed(model, path)
    assert torch.load(path, weights_only=True)["shapes"]["features.0"] == [8, 1, 3, 3]
    fresh = load_compressed(path, SmallCNN().eval())
    assert torch.equal(fresh(x), out)
    assert fresh.features[0].out_channels == 8


def test_bad_shapes_entry_leaves_the_model_untouched(tmp_path: Any) -> None:
    model, _, _ = _slim_cnn()
    path = tmp_path / "slim.pt"
    save_compressed(model, path)
    artifact = torch.load(path, weights_only=True)
    artifact["shapes"]["features.0"] = [99, 1, 3, 3]
    torch.save(artifact, tmp_path / "bad.pt")
    fresh = SmallCNN()
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="shapes"):
        load_compressed(tmp_path / "bad.pt", fresh)
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())
    assert fresh.features[0].out_channels == 16


def test_slim_model_exports_and_compiles() -> None:
    model, x, out = _slim_cnn()
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), out)


@pytest.mark.slow
def test_slim_model_compiles() -> None:
    model, x, out = _slim_cnn()
    torch.testing.assert_close(torch.compile(model)(x), out, rtol=1e-5, atol=1e-5)
