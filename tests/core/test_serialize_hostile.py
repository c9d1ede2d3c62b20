"""Damaged and hostile artifacts (issue 18): every refusal is a ValueError naming the file and the entry,
raised before anything is allocated at the size the file declares, with the model left exactly as it was."""

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_compress
from lightning_compress import load_compressed, save_compressed
from lightning_compress.core.quant.convert import int8_layers, quantizable_targets, quantize_model
from lightning_compress.core.serialize import FORMAT, pack_bits
from lightning_compress.demo import MLP


def _int8(model):
    targets, _ = quantizable_targets(model)
    quantize_model(model, targets, mode="dynamic")
    return model.eval()


def _pruned_int8_mlp():
    torch.manual_seed(0)
    model = MLP(hidden=(64, 32))
    with torch.no_grad():
        for layer in (model.net[1], model.net[3]):
            layer.weight[layer.weight.abs() < layer.weight.abs().quantile(0.9)] = 0.0
    return _int8(model)


def _fingerprint(model):
    """Everything a refused load must leave alone: module types, the state (values and dtypes), int8 configuration."""
    types = [(name, type(m)) for name, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    configs = {name: (layer.mode, layer.per_channel) for name, layer in int8_layers(model).items()}
    return types, state, configs


def _assert_same(model, fingerprint):
    types, state, configs = fingerprint
    assert [(name, type(m)) for name, m in model.named_modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert now[key].dtype == value.dtype and torch.equal(now[key], value), key
    assert {name: (layer.mode, layer.per_channel) for name, layer in int8_layers(model).items()} == configs


def _refused(path, model, match):
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=match) as info:
        load_compressed(path, model)
    assert str(path) in str(info.value)
    _assert_same(model, before)
    return str(info.value)


@pytest.fixture
def artifact(tmp_path):
    model = _pruned_int8_mlp()
    path = tmp_path / "m.pt"
    save_compressed(model, path)
    obj = torch.load(path, weights_only=True)
    assert set(obj["packed"]) == {"net.1.weight", "net.3.weight"}
    return model, obj


def _write(tmp_path, obj, name="bad.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_a_truncated_or_empty_file_is_a_value_error_naming_the_file(tmp_path, artifact):
    _, obj = artifact
    data = _write(tmp_path, obj, "whole.pt").read_bytes()
    for cut in (10, len(data) // 2, len(data) - 30):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        _refused(tmp_path / "cut.pt", MLP(hidden=(64, 32)), r"cut\.pt': the file is damaged or truncated")
    (tmp_path / "empty.pt").write_bytes(b"")
    _refused(tmp_path / "empty.pt", MLP(hidden=(64, 32)), r"empty\.pt': the file is empty \(0 bytes\)")
    with pytest.raises(FileNotFoundError):
        load_compressed(tmp_path / "missing.pt", MLP())


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("a string", r"layers\['net.1'\]: expected a table with the keys 'kind', 'mode' and 'per_channel', got 'a str"),
        (["Int8Linear", "dynamic", 1], r"layers\['net.1'\]: expected a table .* got \['Int8Linear'"),
        ({"kind": "Int8Linear", "mode": "dynamic"}, r"layers\['net.1'\]: expected a table with the keys"),
        ({"kind": 7, "mode": "dynamic", "per_channel": 1}, r"layers\['net.1'\]: unknown layer kind 7"),
        ({"kind": "Int8Linear", "mode": ["x"], "per_channel": 1}, r"layers\['net.1'\]: unknown mode \['x'\]"),
        ({"kind": "Int8Linear", "mode": "dynamic", "per_channel": 2}, r"'per_channel' must be 0 or 1, got 2"),
        ({"kind": "Int8Linear", "mode": "dynamic", "per_channel": True}, r"'per_channel' must be 0 or 1, got True"),
    ],
)
def test_malformed_layer_tables_are_refused_by_entry(tmp_path, artifact, entry, match):
    _, obj = artifact
    obj["layers"]["net.1"] = entry
    _refused(_write(tmp_path, obj), MLP(hidden=(64, 32)), match)


@pytest.mark.parametrize(
    ("top", "match"),
    [
        ({"layers": "abc"}, r"entry 'layers': expected a table \(dict\), got 'abc'"),
        ({"tensors": [1, 2]}, r"entry 'tensors': expected a table \(dict\), got \[1, 2\]"),
        ({"packed": {3: {}}}, r"entry 'packed': expected names \(strings\) as keys, got 3"),
        ({"extra": 1}, r"entry 'extra': not part of format version 1"),
        ({"torch_version": 2}, r"entry 'torch_version': expected a string, got 2"),
    ],
)
def test_malformed_top_level_entries_are_refused(tmp_path, artifact, top, match):
    _, obj = artifact
    obj.update(top)
    _refused(_write(tmp_path, obj), MLP(hidden=(64, 32)), r"the artifact is malformed: " + match)


def test_a_missing_top_level_entry_is_refused(tmp_path, artifact):
    _, obj = artifact
    del obj["packed"]
    _refused(_write(tmp_path, obj), MLP(hidden=(64, 32)), r"entry 'packed': missing")


@pytest.mark.parametrize("version", [0, -1, True, 1.0, "1", None])
def test_format_versions_never_written_are_refused(tmp_path, artifact, version):
    _, obj = artifact
    obj["format_version"] = version
    _refused(
        _write(tmp_path, obj),
        MLP(hidden=(64, 32)),
        r"entry 'format_version' is .*which no lightning-compress ever wrote",
    )


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        (
            [-32, -64],
            r"packed\['net.1.weight'\]\['shape'\]: expected a list of non-negative integers, got \[-32, -64\]",
        ),
        ("abc", r"packed\['net.1.weight'\]\['shape'\]: expected a list of non-negative integers, got 'abc'"),
        ([64, 64.0], r"\['shape'\]: expected a list of non-negative integers, got \[64, 64.0\]"),
        ([True, 64], r"\['shape'\]: expected a list of non-negative integers"),
        ([64, 32], r"packed\['net.1.weight'\]\['shape'\]: \(64, 32\), the model's tensor is \(64, 64\)"),
    ],
)
def test_bad_declared_shapes_get_our_message_not_torchs(tmp_path, artifact, shape, match):
    _, obj = artifact
    obj["packed"]["net.1.weight"]["shape"] = shape
    _refused(_write(tmp_path, obj), MLP(hidden=(64, 32)), match)


def test_a_value_count_that_disagrees_with_the_mask_is_refused(tmp_path, artifact):
    _, obj = artifact
    entry = obj["packed"]["net.1.weight"]
    kept = int(entry["values"].numel())
    entry["values"] = entry["values"][:1].clone()  # 0.1 broadcast this one value into every kept weight
    _refused(
        _write(tmp_path, obj),
        MLP(hidden=(64, 32)),
        rf"packed\['net.1.weight'\]\['values'\]: the mask marks {kept} nonzero entries, but there are 1 values",
    )
    entry["values"] = torch.zeros(kept + 1, dtype=torch.int8)
    _refused(
        _write(tmp_path, obj), MLP(hidden=(64, 32)), rf"the mask marks {kept} nonzero entries, but there are {kept + 1}"
    )


def test_masks_and_values_of_the_wrong_kind_are_refused(tmp_path, artifact):
    _, obj = artifact
    entry = obj["packed"]["net.1.weight"]
    good_mask, good_values = entry["mask"], entry["values"]
    entry["mask"] = good_mask.to(torch.int32)
    _refused(
        _write(tmp_path, obj),
        MLP(hidden=(64, 32)),
        r"\['mask'\]: expected a 1-d uint8 tensor of 512 bytes, got a torch.int32",
    )
    entry["mask"] = good_mask[:-1].clone()
    _refused(_write(tmp_path, obj), MLP(hidden=(64, 32)), r"\['mask'\]: expected a 1-d uint8 tensor of 512 bytes")
    entry["mask"] = good_mask
    entry["values"] = good_values.float()
    _refused(
        _write(tmp_path, obj),
        MLP(hidden=(64, 32)),
        r"\['values'\]: expected a 1-d torch.int8 tensor, got a torch.float32",
    )
    entry["values"] = good_values.reshape(1, -1)
    _refused(_write(tmp_path, obj), MLP(hidden=(64, 32)), r"\['values'\]: expected a 1-d torch.int8 tensor")


def test_mask_bits_beyond_the_tensor_are_refused(tmp_path):
    layer = nn.Linear(99, 1, bias=False)  # 99 entries: 13 bytes, 5 padding bits
    with torch.no_grad():
        layer.weight[:, 5:] = 0.0
    save_compressed(layer, tmp_path / "m.pt")
    obj = torch.load(tmp_path / "m.pt", weights_only=True)
    mask = obj["packed"]["weight"]["mask"]
    mask[-1] |= 0b10000000
    obj["packed"]["weight"]["values"] = torch.cat([obj["packed"]["weight"]["values"], torch.ones(1)])
    _refused(
        _write(tmp_path, obj), nn.Linear(99, 1, bias=False), r"\['mask'\]: bits set beyond the tensor's 99 entries"
    )


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_stored_tensors_that_are_not_plain_dense_tensors_are_refused(tmp_path, artifact):
    _, obj = artifact
    obj["tensors"]["net.1.bias"] = [0.0] * 64
    _refused(
        _write(tmp_path, obj),
        MLP(hidden=(64, 32)),
        r"tensors\['net.1.bias'\]: expected a dense CPU tensor, got \[0.0, 0.0",
    )
    obj["tensors"]["net.1.bias"] = torch.zeros(64).to_sparse()
    _refused(_write(tmp_path, obj), MLP(hidden=(64, 32)), r"tensors\['net.1.bias'\]: expected a dense CPU tensor")


def test_a_key_stored_twice_is_refused(tmp_path, artifact):
    _, obj = artifact
    obj["tensors"]["net.1.weight"] = torch.zeros(64, 64, dtype=torch.int8)
    _refused(
        _write(tmp_path, obj), MLP(hidden=(64, 32)), r"tensors/packed: 1 key\(s\) stored twice: \['net.1.weight'\]"
    )


def test_a_failed_int8_load_into_a_model_of_another_width_leaves_it_float(tmp_path, artifact):
    _, obj = artifact
    path = _write(tmp_path, obj, "m.pt")
    wider = MLP(hidden=(128, 32))
    message = _refused(path, wider, r"the artifact does not match the model: .*packed\['net.1.weight'\]\['shape'\]")
    assert "The model was not changed." in message
    assert not int8_layers(wider)
    assert wider.net[1].weight.abs().sum() > 0  # 0.1 left zeroed int8 weights here
    already_int8 = _int8(MLP(hidden=(128, 32)))  # and an int8 model of another configuration keeps its own
    for layer in int8_layers(already_int8).values():
        layer.configure("static", False)
    _refused(path, already_int8, r"does not match the model")


def test_a_failed_load_after_the_checks_puts_the_model_back(tmp_path, artifact, monkeypatch):
    _, obj = artifact
    path = _write(tmp_path, obj, "m.pt")
    model = MLP(hidden=(64, 32))
    before = _fingerprint(model)

    def broken(self, *args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(nn.Module, "load_state_dict", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        load_compressed(path, model)
    _assert_same(model, before)


def test_a_valid_artifact_still_loads_exactly(tmp_path, artifact):
    model, obj = artifact
    fresh = MLP(hidden=(64, 32))
    load_compressed(_write(tmp_path, obj, "m.pt"), fresh)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))


_BIG_SHAPE_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from torch import nn
    from lightning_compress import load_compressed
    from lightning_compress.core.serialize import FORMAT, pack_bits
    path = sys.argv[1]
    mask = pack_bits(torch.ones(64, dtype=torch.bool))
    torch.save({"format": FORMAT, "format_version": 1, "torch_version": "2.5", "layers": {}, "tensors": {},
                "packed": {"weight": {"mask": mask, "values": torch.ones(64), "shape": [15000, 15000]}}}, path)
    model = nn.Linear(8, 8, bias=False)
    torch.ones(1) + 1  # warm up the allocator
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_compressed(path, model)
    except ValueError as err:
        print("REFUSED", err)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("GROWTH_KB", after - before)
    """
)


def test_a_small_file_declaring_a_huge_tensor_allocates_nothing_big(tmp_path):
    script = tmp_path / "big.py"
    script.write_text(_BIG_SHAPE_SCRIPT)
    package_root = Path(lightning_compress.__file__).parent.parent  # the subprocess imports this same copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "big.pt")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
    ).stdout
    assert (tmp_path / "big.pt").stat().st_size < 10_000
    assert "REFUSED" in out and "packed['weight']['shape']: (15000, 15000), the model's tensor is (8, 8)" in out
    growth_kb = int(out.split("GROWTH_KB")[1])
    assert growth_kb < 50_000  # 0.1 allocated 900 MB (a float32 15000 x 15000) before refusing


def test_a_hostile_huge_shape_is_refused_by_the_plan_not_by_memory(tmp_path, monkeypatch):
    """The same without a subprocess: no tensor larger than the model's is ever created."""
    torch.save(
        {
            "format": FORMAT,
            "format_version": 1,
            "layers": {},
            "tensors": {},
            "packed": {
                "weight": {
                    "mask": pack_bits(torch.ones(64, dtype=torch.bool)),
                    "values": torch.ones(64),
                    "shape": [15000, 15000],
                }
            },
        },
        tmp_path / "big.pt",
    )
    sizes = []
    real_zeros = torch.zeros

    def spy(*args, **kwargs):
        out = real_zeros(*args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "zeros", spy)
    _refused(tmp_path / "big.pt", nn.Linear(8, 8, bias=False), r"\(15000, 15000\), the model's tensor is \(8, 8\)")
    assert max(sizes, default=0) <= 64


def test_the_loader_only_mutates_after_every_check(tmp_path, artifact):
    """An artifact right in every layer but wrong in its last tensor: nothing is converted."""
    _, obj = artifact
    obj["tensors"]["net.5.bias"] = torch.zeros(11)
    model = MLP(hidden=(64, 32))
    _refused(
        _write(tmp_path, obj), model, r"tensors\['net.5.bias'\]: another shape or dtype: artifact \(11,\) torch.float32"
    )
    assert not int8_layers(model)
    copy.deepcopy(model)  # still an ordinary, copyable model
