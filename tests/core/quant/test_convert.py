import copy

import pytest
import torch
from torch import nn

from lightning_compress import CompressionConfigError
from lightning_compress.core.quant.convert import int8_layers, quantizable_targets, quantize_model, record_input_ranges
from lightning_compress.core.quant.modules import Int8Conv2d, Int8Linear
from lightning_compress.demo import MLP, SmallCNN


def _convert(model, **kwargs):
    targets, _ = quantizable_targets(model)
    return quantize_model(model, targets, **kwargs)


@torch.no_grad()
def _agreement(model, x, **kwargs):
    model.eval()
    ref = copy.deepcopy(model)
    _convert(model, **kwargs)
    out, want = model(x), ref(x)
    rel = float((out - want).norm() / want.norm())
    top1 = float((out.argmax(-1) == want.argmax(-1)).float().mean())
    return rel, top1


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_digits_mlp_and_cnn_agree_with_the_float_models(mode, per_channel):
    x = torch.rand(64, 1, 8, 8)
    for model in (MLP(), SmallCNN()):
        rel, top1 = _agreement(model, x, mode=mode, per_channel=per_channel)
        assert rel < (0.02 if per_channel else 0.04)
        assert top1 >= 0.95
        assert all(isinstance(m, (Int8Linear, Int8Conv2d)) for m in int8_layers(model).values())
        assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_agree(name):
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, name)(num_classes=10)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    grouped = sum(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())
    rel, top1 = _agreement(model, torch.randn(16, 3, 64, 64))
    # An untrained network has nearly tied logits, so top-1 is a weak signal here; the output error is not.
    assert rel < 0.05 and top1 >= 0.8
    layers = int8_layers(model)
    assert sum(isinstance(m, Int8Conv2d) for m in layers.values()) == n_convs
    assert sum(isinstance(m, Int8Conv2d) and m.groups > 1 for m in layers.values()) == grouped
    if name == "mobilenet_v3_small":
        assert grouped > 0  # depthwise convolutions are among those converted


def test_pruned_zeros_survive_conversion():
    model = MLP()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight[m.weight.abs() < m.weight.abs().quantile(0.9)] = 0.0
    zeros = {n: (m.weight == 0) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    _convert(model)
    for name, mask in zeros.items():
        q = model.get_submodule(name)
        assert torch.equal(q.weight == 0, mask)
        assert torch.equal(q.dequantize_weight() == 0, mask)


def test_static_scales_come_from_the_observed_ranges_and_missing_ones_fall_back():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Linear(2, 2))
    targets, _ = quantizable_targets(model)
    ranges = {"0": (torch.tensor(-2.0), torch.tensor(1.0)), "2": (torch.tensor(0.0), torch.tensor(0.0))}
    result = quantize_model(model, targets, mode="static", input_ranges=ranges)
    assert result.converted == {"0": "static", "2": "dynamic", "3": "dynamic"}
    assert set(result.fallbacks) == {"2", "3"}
    assert "all zeros" in result.fallbacks["2"] and "never observed" in result.fallbacks["3"]
    assert model[0].input_scale.item() == pytest.approx(2.0 / 127)
    assert model[2].input_scale is None


def test_record_input_ranges_observes_and_then_removes_its_hooks():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    with record_input_ranges({"0": model[0], "2": model[2]}) as obs:
        x = torch.tensor([[-1.0, 0.5, 2.0], [0.0, -3.0, 1.0]])
        hidden = torch.relu(model[0](x))
        model(x)
    assert (obs["0"].min_val.item(), obs["0"].max_val.item(), obs["0"].count) == (-3.0, 2.0, 2)
    assert obs["2"].max_val.item() == pytest.approx(hidden.max().item())
    assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks


def test_record_output_ranges_observes_outputs_and_removes_its_hooks_after_an_error():
    from lightning_compress.core.quant.convert import record_output_ranges

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    x = torch.tensor([[-1.0, 0.5, 2.0], [0.0, -3.0, 1.0]])
    with record_output_ranges({"0": model[0]}) as obs:
        out = model[0](x)
    assert (obs["0"].min_val.item(), obs["0"].max_val.item(), obs["0"].count) == (out.min().item(), out.max().item(), 1)
    with pytest.raises(RuntimeError, match="stop"), record_output_ranges({"0": model[0]}):
        raise RuntimeError("stop")
    assert not model[0]._forward_hooks


def test_linear_subclasses_count_but_overridden_forwards_stay_float():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    attn = nn.MultiheadAttention(8, 2)
    model = nn.ModuleDict({"attn": attn, "scaled": Scaled(8, 8), "lazy": nn.LazyLinear(3)})
    targets, skipped = quantizable_targets(model)
    # "Linear" covers the packed in_proj_weight of the attention and its NonDynamicallyQuantizableLinear out_proj.
    assert [t.name for t in targets] == ["attn", "attn.out_proj"]
    assert skipped == {"scaled": "Scaled overrides Linear.forward", "lazy": "LazyLinear is not initialized yet"}


def test_the_tied_owners_of_a_weight_that_stays_float_are_named_with_the_reason():
    class ScaledEmbedding(nn.Embedding):  # Gemma's and BART's scaled word embeddings
        def forward(self, ids):
            return super().forward(ids) * 4.0

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = ScaledEmbedding(20, 8)
            self.body = nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.body(self.embed(ids)))

    model = TiedLM()
    targets, skipped = quantizable_targets(model)
    assert [t.name for t in targets] == ["body"]
    why = "ScaledEmbedding overrides Embedding.forward"
    assert skipped == {"embed": why, "head": f"tied to `embed`, which stays float: {why}"}
    result = quantize_model(model, targets)
    assert set(result.converted) == {"body"} and type(model.head) is nn.Linear
    assert model.head.weight is model.embed.weight  # still one float tensor


def test_a_subclass_named_like_its_base_is_told_apart_by_its_module():
    class Linear(nn.Linear):  # timm's `timm.layers.Linear` has the same name as `nn.Linear`
        def forward(self, x):
            return 2 * super().forward(x)

    _, skipped = quantizable_targets(nn.Sequential(Linear(4, 4)))
    assert skipped == {"0": f"{__name__}.Linear overrides torch.nn.modules.linear.Linear.forward"}


def test_linear_subclasses_of_other_libraries_that_compute_linear_are_converted():
    from lightning_compress.core.linear_forwards import LINEAR_FORWARDS

    found = 0
    for module_name, cls_name in (
        ("timm.layers", "Linear"),
        ("transformers.models.falcon.modeling_falcon", "FalconLinear"),
    ):
        try:
            cls = getattr(__import__(module_name, fromlist=[cls_name]), cls_name)
        except ImportError:
            continue
        found += 1
        assert f"{cls.forward.__module__}.{cls.forward.__qualname__}" in LINEAR_FORWARDS
        torch.manual_seed(0)
        model = nn.Sequential(cls(16, 8), nn.ReLU(), cls(8, 4, bias=False))
        x = torch.randn(5, 16)
        want = model(x)
        targets, skipped = quantizable_targets(model)
        assert [t.name for t in targets] == ["0", "2"] and skipped == {}
        quantize_model(model, targets)
        assert isinstance(model[0], Int8Linear) and isinstance(model[2], Int8Linear)
        assert (model(x) - want).norm() / want.norm() < 0.02

        class Overridden(cls):  # overridden again: not the listed forward, so it stays float
            def forward(self, x):
                return super().forward(x) + 1

        assert quantizable_targets(nn.Sequential(Overridden(4, 4)))[0] == []
    if not found:
        pytest.skip("neither timm nor transformers is installed")


def test_types_without_an_int8_version_and_empty_selections_are_rejected():
    model = nn.Sequential(nn.Conv1d(2, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(CompressionConfigError, match=r"`include` to select only layers with an int8 version.*Conv1d"):
        quantizable_targets(model, include=["Conv1d", "Linear"])
    with pytest.raises(CompressionConfigError, match="selected none"):
        quantizable_targets(model, include=["Conv2d"])
    assert quantizable_targets(model, include=["Conv2d"], allow_empty=True) == ([], {})
    targets, _ = quantizable_targets(model, exclude=["2"], include=["Linear"], allow_empty=True)
    assert targets == []
    with pytest.raises(CompressionConfigError, match="Expected argument `mode`"):
        quantize_model(model, [], mode="int4")


def test_compression_submodule_is_honoured():
    class Distill(nn.Module):
        compression_submodule = "student"

        def __init__(self):
            super().__init__()
            self.student = MLP()
            self.teacher = MLP()

    model = Distill()
    targets, _ = quantizable_targets(model)
    quantize_model(model, targets)
    assert set(int8_layers(model)) == {"student.net.1", "student.net.3", "student.net.5"}
    assert all(isinstance(m, nn.Linear) for m in (model.teacher.net[1], model.teacher.net[5]))


def test_train_mode_is_kept():
    model = MLP().train()
    _convert(model)
    assert all(m.training for m in int8_layers(model).values())
