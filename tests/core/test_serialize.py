import copy
import os
import pickle

import pytest
import torch
from torch import nn

from lightning_compress import load_compressed, save_compressed
from lightning_compress.core.quant.convert import int8_layers, quantizable_targets, quantize_model
from lightning_compress.core.quant.modules import Int8Linear
from lightning_compress.core.serialize import FORMAT, FORMAT_VERSION, pack_bits, unpack_bits
from lightning_compress.demo import MLP, SmallCNN


def _int8(model, mode="dynamic", per_channel=True):
    targets, _ = quantizable_targets(model)
    ranges = {t.name: (torch.tensor(-4.0), torch.tensor(4.0)) for t in targets}
    quantize_model(model, targets, mode=mode, per_channel=per_channel, input_ranges=ranges)
    return model.eval()


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_pack_bits_round_trips_against_a_reference(n):
    mask = torch.rand(n) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    bits = [(int(packed[i // 8]) >> (i % 8)) & 1 for i in range(n)]
    assert bits == mask.int().tolist()
    assert torch.equal(unpack_bits(packed, n), mask)


@pytest.mark.parametrize("mode", ["dynamic", "static", "weight_only"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_round_trip_into_a_fresh_float_model_is_exact(tmp_path, mode, per_channel):
    torch.manual_seed(0)
    for make, x in ((MLP, torch.rand(16, 1, 8, 8)), (SmallCNN, torch.rand(4, 1, 8, 8))):
        fresh = make()  # built before the trained one, so its weights differ
        model = _int8(make(), mode, per_channel)
        path = tmp_path / f"{make.__name__}.pt"
        save_compressed(model, path)
        loaded = load_compressed(path, fresh)
        assert loaded is fresh
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
        assert set(int8_layers(loaded)) == set(int8_layers(model))
        for name, layer in int8_layers(loaded).items():
            assert (layer.mode, layer.per_channel) == (int8_layers(model)[name].mode, per_channel)
        assert loaded.state_dict().keys() == model.state_dict().keys()


def test_round_trip_into_an_int8_model_of_another_configuration(tmp_path):
    model = _int8(MLP(), "static", per_channel=False)
    save_compressed(model, tmp_path / "a.pt")
    other = _int8(MLP(), "dynamic", per_channel=True)
    load_compressed(tmp_path / "a.pt", other)
    x = torch.rand(8, 64)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))
    assert other.net[1].mode == "static" and other.net[1].weight_scale.shape == (1,)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_transformer_round_trip(tmp_path):
    make = lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2)  # noqa: E731
    fresh = make().eval()
    model = _int8(make())
    save_compressed(model, tmp_path / "t.pt")
    load_compressed(tmp_path / "t.pt", fresh)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert not fresh.use_nested_tensor


def test_artifact_is_plain_data_loadable_with_weights_only(tmp_path):
    model = _int8(MLP())
    save_compressed(model, tmp_path / "m.pt")
    obj = torch.load(tmp_path / "m.pt", weights_only=True)
    assert obj["format"] == FORMAT and obj["format_version"] == FORMAT_VERSION
    assert obj["layers"]["net.1"] == {"kind": "Int8Linear", "mode": "dynamic", "per_channel": 1}
    assert obj["tensors"]["net.1.weight"].dtype == torch.int8
    assert obj["tensors"]["net.1.weight_scale"].dtype == torch.float32
    assert not obj["packed"]  # a dense model has nothing worth packing
    assert list(tmp_path.iterdir()) == [tmp_path / "m.pt"]  # no temporary file left behind


def _file_size(obj, path):
    torch.save(obj, path)
    return os.path.getsize(path)


def test_int8_artifact_is_about_a_quarter_and_sparse_ones_far_less(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    float_size = _file_size(model.state_dict(), tmp_path / "float.pt")
    dense = _int8(copy.deepcopy(model))
    save_compressed(dense, tmp_path / "dense.pt")
    assert os.path.getsize(tmp_path / "dense.pt") / float_size <= 0.26
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight[m.weight.abs() < m.weight.abs().quantile(0.9)] = 0.0
    sparse = _int8(copy.deepcopy(model))
    save_compressed(sparse, tmp_path / "sparse.pt")
    assert os.path.getsize(tmp_path / "sparse.pt") / float_size <= 0.07
    packed = torch.load(tmp_path / "sparse.pt", weights_only=True)["packed"]
    assert set(packed) == {"0.weight", "2.weight"}
    fresh = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    load_compressed(tmp_path / "sparse.pt", fresh)
    assert torch.equal(fresh[0].weight, sparse[0].weight)
    assert int((fresh[0].weight == 0).sum()) == int((model[0].weight == 0).sum())
    # A pruned float model is packed too.
    save_compressed(model, tmp_path / "sparse_float.pt")
    assert os.path.getsize(tmp_path / "sparse_float.pt") / float_size < 0.25


def test_negative_zero_is_packed_as_a_zero_and_loads_as_positive_zero(tmp_path):
    model = nn.Linear(100, 10, bias=False)
    with torch.no_grad():
        model.weight[:, :95] = 0.0
        model.weight[0, :5] = -0.0
    save_compressed(model, tmp_path / "z.pt")
    packed = torch.load(tmp_path / "z.pt", weights_only=True)["packed"]["weight"]
    assert packed["values"].numel() == 10 * 5  # the five -0.0 are zeros, not values (0.1 stored 55)
    fresh = load_compressed(tmp_path / "z.pt", nn.Linear(100, 10, bias=False))
    assert not bool((torch.signbit(fresh.weight) & (fresh.weight == 0)).any())  # no -0.0 left
    assert int((fresh.weight == 0).sum()) == 950
    assert torch.equal(fresh.weight, model.weight)  # -0.0 == +0.0, every other value exact


def test_an_artifact_that_kept_negative_zero_as_a_value_still_loads(tmp_path):
    weight = torch.zeros(10, 100)
    weight[:, 95:] = torch.randn(10, 5)
    weight[0, :5] = -0.0
    mask = (weight != 0) | torch.signbit(weight)  # what 0.1 wrote
    old = {
        "format": FORMAT,
        "format_version": 1,
        "torch_version": "2.5.0",
        "layers": {},
        "tensors": {},
        "packed": {"weight": {"mask": pack_bits(mask), "values": weight[mask].clone(), "shape": [10, 100]}},
    }
    torch.save(old, tmp_path / "old.pt")
    fresh = load_compressed(tmp_path / "old.pt", nn.Linear(100, 10, bias=False))
    assert torch.equal(torch.signbit(fresh.weight), torch.signbit(weight))
    assert torch.equal(fresh.weight, weight)


def test_a_model_that_does_not_match_is_refused_clearly(tmp_path):
    model = _int8(MLP())
    save_compressed(model, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"does not match the model: layers\['net.1'\]: the model has no such module"):
        load_compressed(tmp_path / "m.pt", nn.Sequential(nn.Linear(64, 10)))
    with pytest.raises(ValueError, match=r"layers\['net.1'\]: the artifact has an Int8Linear, the model a Conv2d"):
        load_compressed(tmp_path / "m.pt", _with_conv_at_net1())
    wider = MLP(hidden=(300, 120))
    with pytest.raises(
        ValueError,
        match=r"tensors\['net.3.weight'\]: another shape or dtype: artifact \(100, 300\) torch.int8, model \(120, 300",
    ):
        load_compressed(tmp_path / "m.pt", wider)
    deeper = MLP(hidden=(300, 100, 50))
    with pytest.raises(
        ValueError, match=r"tensors/packed: 2 key\(s\) missing in the artifact: \['net.7.bias', 'net.7.weight'"
    ):
        load_compressed(tmp_path / "m.pt", deeper)
    save_compressed(MLP(), tmp_path / "float.pt")
    with pytest.raises(
        ValueError, match=r"tensors\['net.1.weight'\]: another shape or dtype: artifact \(300, 64\) torch.float32"
    ):
        load_compressed(tmp_path / "float.pt", _int8(MLP()))  # a float artifact into an int8 model


def _with_conv_at_net1():
    model = MLP()
    model.net[1] = nn.Conv2d(1, 1, 1)
    return model


class _Exploit:
    def __reduce__(self):
        return (open, ("/tmp/lightning_compress_pwned", "w"))


def test_a_malicious_pickle_is_refused(tmp_path):
    target = "/tmp/lightning_compress_pwned"
    if os.path.exists(target):
        os.remove(target)
    bad = tmp_path / "bad.pt"
    torch.save({"format": FORMAT, "format_version": 1, "tensors": {}, "payload": _Exploit()}, bad)
    with pytest.raises(ValueError, match="Refused to load"):
        load_compressed(bad, MLP())
    assert not os.path.exists(target)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Exploit(), protocol=2))
    with pytest.raises(ValueError, match="Refused to load"):
        load_compressed(raw, MLP())
    assert not os.path.exists(target)


def test_other_files_and_newer_versions_are_refused(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="is not a lightning-compress artifact"):
        load_compressed(tmp_path / "sd.pt", MLP())
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION + 1}, tmp_path / "new.pt")
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}.*Upgrade"):
        load_compressed(tmp_path / "new.pt", MLP())
    bad = {"format": FORMAT, "format_version": 1, "layers": {}, "tensors": {}, "packed": {"weight": {"shape": [4]}}}
    torch.save(bad, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"packed\['weight'\]: expected a table with the keys 'mask', 'values'"):
        load_compressed(tmp_path / "broken.pt", nn.Linear(2, 2, bias=False))


def test_a_failed_write_leaves_the_existing_file_untouched(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    path.write_bytes(b"previous artifact")

    def broken_save(obj, f):
        f.write(b"half an artifact")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(MLP(), path)
    assert path.read_bytes() == b"previous artifact"
    assert list(tmp_path.iterdir()) == [path]


def test_save_accepts_views_without_writing_their_whole_storage(tmp_path):
    big = torch.randn(1000, 100)
    layer = Int8Linear(100, 10, bias=False)
    layer.weight_scale = big[:10, 0]  # a strided view into a large storage
    save_compressed(layer, tmp_path / "v.pt")
    assert os.path.getsize(tmp_path / "v.pt") < 20_000


def _static_cnn():
    from lightning_compress.core.quant.convert import quantize

    torch.manual_seed(0)
    model = SmallCNN().eval()
    result = quantize(model, "static", calibration=[torch.randn(16, 1, 8, 8) for _ in range(2)])
    assert set(result.converted.values()) == {"static"}
    return model


def test_a_static_cnn_round_trips_with_its_activation_scales(tmp_path):
    from lightning_compress.core.quant.conv2d import Int8Conv2d

    model = _static_cnn()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, Int8Conv2d)}
    assert convs and all(float(m.input_scale) > 0 and float(m.output_scale) > 0 for m in convs.values())
    path = tmp_path / "cnn.pt"
    save_compressed(model, path)
    torch.manual_seed(1)
    restored = load_compressed(path, SmallCNN().eval())
    x = torch.randn(8, 1, 8, 8)
    assert torch.equal(restored(x), model(x))
    for name, conv in convs.items():
        again = restored.get_submodule(name)
        assert torch.equal(again.input_scale, conv.input_scale) and torch.equal(again.output_scale, conv.output_scale)


def test_a_static_conv_artifact_without_activation_scales_loads_with_float_activations(tmp_path):
    """Artifacts written before static convolutions had activation scales: both load as 0 (float, as then)."""
    from lightning_compress.core.quant.conv2d import Int8Conv2d

    model = _static_cnn()
    path = tmp_path / "cnn.pt"
    save_compressed(model, path)
    artifact = torch.load(path, weights_only=True)
    names = [n for n, m in model.named_modules() if isinstance(m, Int8Conv2d)]
    for name in names:
        del artifact["tensors"][f"{name}.input_scale"], artifact["tensors"][f"{name}.output_scale"]
    torch.save(artifact, path)
    restored = load_compressed(path, SmallCNN().eval())
    for name in names:
        conv = restored.get_submodule(name)
        assert conv.mode == "static" and float(conv.input_scale) == 0.0 and float(conv.output_scale) == 0.0
        model.get_submodule(name).input_scale.zero_()
        model.get_submodule(name).output_scale.zero_()
    x = torch.randn(8, 1, 8, 8)
    assert torch.equal(restored(x), model(x))
    # A static Linear's input scale is no such case: without it the artifact is refused.
    del artifact["tensors"][next(k for k in artifact["tensors"] if k.endswith("input_scale"))]
    torch.save(artifact, path)
    with pytest.raises(ValueError, match=r"missing in the artifact: \['.*input_scale'\]"):
        load_compressed(path, SmallCNN().eval())
