"""Property test of load_compressed (issue 18): a mutated artifact gives a ValueError naming the file with the
model untouched, or loads exactly what the file holds. Bounded and derandomized: the same examples on every run."""

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_compress import load_compressed, save_compressed
from lightning_compress.core.quant.convert import int8_layers, quantizable_targets, quantize_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 4))


def _valid_artifact():
    model = _model()
    with torch.no_grad():
        model[0].weight[model[0].weight.abs() < 0.2] = 0.0  # sparse enough to be packed
    targets, _ = quantizable_targets(model)
    quantize_model(model, targets[:2], mode="dynamic")  # two int8 layers, one float
    return model.eval()


_REFERENCE = _valid_artifact()
_FOLDER = Path(tempfile.mkdtemp())
save_compressed(_REFERENCE, _FOLDER / "valid.pt")
_VALID_BYTES = (_FOLDER / "valid.pt").read_bytes()
_VALID = torch.load(_FOLDER / "valid.pt", weights_only=True)
assert _VALID["packed"] and _VALID["layers"] and _VALID["tensors"]


def _paths(obj, prefix=()):
    """Every (path, value) inside the nested dicts and lists of an artifact."""
    yield prefix, obj
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _paths(value, (*prefix, i))


_ALL_PATHS = [p for p, _ in _paths(_VALID) if p]

_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.sampled_from([0, -1, 1, 2, 15000, float("nan"), float("inf"), -0.0]),
    st.text(max_size=5),
    st.lists(st.integers(-3, 70), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.builds(
        lambda n, dtype: torch.zeros(n, dtype=dtype),
        st.integers(0, 80),
        st.sampled_from([torch.float32, torch.float16, torch.int8, torch.uint8, torch.bool, torch.int64]),
    ),
)


def _copy(obj):
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    return obj


def _set(obj, path, value, delete=False):
    for key in path[:-1]:
        obj = obj[key]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


@st.composite
def _mutated_files(draw):
    """Bytes of a damaged artifact: entries dropped, replaced or retyped, or the file's bytes cut or flipped."""
    how = draw(st.sampled_from(["drop", "replace", "retype", "reshape", "truncate", "flip"]))
    if how in ("truncate", "flip"):
        data = bytearray(_VALID_BYTES)
        at = draw(st.integers(0, len(data) - 1))
        if how == "truncate":
            return bytes(data[:at])
        data[at] ^= draw(st.integers(1, 255))
        return bytes(data)
    obj = _copy(_VALID)
    path = draw(st.sampled_from(_ALL_PATHS))
    if how == "drop":
        _set(obj, path, None, delete=True)
    elif how == "replace":
        _set(obj, path, draw(_junk))
    else:
        tensors = [p for p, v in _paths(obj) if isinstance(v, torch.Tensor)]
        path = draw(st.sampled_from(tensors))
        value = obj
        for key in path:
            value = value[key]
        if how == "retype":
            dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.int8, torch.uint8, torch.int32]))
            _set(obj, path, value.to(dtype))
        else:
            _set(obj, path, value.reshape(-1)[: draw(st.integers(0, max(value.numel() - 1, 0)))].clone())
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _fingerprint(model):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: (m.mode, m.per_channel) for n, m in int8_layers(model).items()},
    )


def _same(a, b):
    assert a[0] == b[0] and a[2] == b[2] and a[1].keys() == b[1].keys()
    for key in a[1]:
        assert a[1][key].dtype == b[1][key].dtype and torch.equal(a[1][key], b[1][key]), key


def _reference_state(path):
    """What the file holds, decoded another way (numpy's bit unpacking), or None when torch cannot read it."""
    obj = torch.load(path, weights_only=True)
    state = dict(obj["tensors"])
    for key, entry in obj["packed"].items():
        numel = int(np.prod(entry["shape"]))
        bits = np.unpackbits(entry["mask"].numpy(), bitorder="little")[:numel].astype(bool)
        out = np.zeros(numel, dtype=entry["values"].numpy().dtype)
        out[bits] = entry["values"].numpy()
        state[key] = torch.from_numpy(out.reshape(entry["shape"]))
    return state


@settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_mutated_files())
def test_a_mutated_artifact_is_refused_clearly_or_loads_exactly_what_it_holds(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mutated.pt"
        path.write_bytes(data)
        model = _model()
        before = _fingerprint(model)
        try:
            load_compressed(path, model)
        except ValueError as err:
            assert str(path) in str(err)
            _same(_fingerprint(model), before)
            return
        expected = _reference_state(path)
        loaded = model.state_dict()
        assert loaded.keys() == expected.keys()
        for key, value in expected.items():
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
        if data == _VALID_BYTES:
            x = torch.randn(5, 16)
            with torch.no_grad():
                assert torch.equal(model(x), _REFERENCE(x))
