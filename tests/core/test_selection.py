import pytest
from torch import nn

from lightning_compress.core.selection import DEFAULT_PRUNE_TYPES, compression_root, matches_type, select_targets
from lightning_compress.errors import CompressionConfigError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.attn = nn.MultiheadAttention(8, 2)
        self.classifier = nn.Linear(8, 2)
        self.nobias = nn.Linear(2, 2, bias=False)


def test_default_selects_linear_and_conv_weights_including_subclasses():
    names = [t.param_name for t in select_targets(Net())]
    # out_proj is a NonDynamicallyQuantizableLinear, which is a Linear; the attention's packed input
    # projection counts as a Linear too; the BatchNorm is never selected.
    assert names == ["conv.weight", "attn.in_proj_weight", "attn.out_proj.weight", "classifier.weight", "nobias.weight"]


def test_param_name_matches_state_dict_keys():
    model = Net()
    keys = set(model.state_dict())
    for t in select_targets(model):
        assert t.param_name in keys
        assert t.weight is getattr(t.module, t.attr) is model.get_parameter(t.param_name)


def test_exclude_globs_and_qualified_type_names():
    model = Net()
    names = [t.name for t in select_targets(model, include=["torch.nn.modules.linear.Linear"], exclude=["attn.*"])]
    assert names == ["classifier", "nobias"]


def test_matches_type_uses_mro():
    assert matches_type(nn.MultiheadAttention(4, 1).out_proj, ["Linear"])
    assert not matches_type(nn.BatchNorm1d(3), DEFAULT_PRUNE_TYPES)


class Wrapper(nn.Module):
    compression_submodule = "student"

    def __init__(self):
        super().__init__()
        self.student = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        self.teacher = nn.Linear(4, 2)


def test_compression_submodule_narrows_selection_and_keeps_full_names():
    model = Wrapper()
    assert compression_root(model) == ("student", model.student)
    assert [t.name for t in select_targets(model)] == ["student.0", "student.2"]
    # Globs match the name relative to the root and the full name.
    assert [t.name for t in select_targets(model, exclude=["2"])] == ["student.0"]
    assert [t.name for t in select_targets(model, exclude=["student.0"])] == ["student.2"]
    assert [t.name for t in select_targets(model, use_root=False)] == ["student.0", "student.2", "teacher"]


def test_bad_compression_submodule_lists_close_matches():
    model = Wrapper()
    model.compression_submodule = "studnet"
    with pytest.raises(
        CompressionConfigError,
        match=r"`compression_submodule` of Wrapper to name a submodule, but got 'studnet'.*'student'",
    ):
        select_targets(model)


def test_nothing_selected_lists_module_types():
    with pytest.raises(
        CompressionConfigError,
        match=r"`include`=\['Conv2d'\] and `exclude`=\[\] to select at least one weight, but they selected none\."
        r" The model has these module types with a weight: \['Linear'\]",
    ):
        select_targets(nn.Sequential(nn.Linear(2, 2)), include=["Conv2d"])
    assert select_targets(nn.Sequential(nn.Linear(2, 2)), include=["Conv2d"], allow_empty=True) == []


def test_include_must_be_a_list_of_strings():
    with pytest.raises(CompressionConfigError, match=r"`include` to be a list of strings, but got 'Linear'"):
        select_targets(nn.Linear(2, 2), include="Linear")  # type: ignore[arg-type]
    with pytest.raises(CompressionConfigError, match=r"`exclude` to be a list of strings, but got \[1\]"):
        select_targets(nn.Linear(2, 2), exclude=[1])  # type: ignore[list-item]


def test_an_exclude_glob_that_matches_nothing_is_an_error_listing_close_names():
    from torch import nn as _nn

    model = _nn.Module()
    model.features = _nn.Sequential(_nn.Linear(4, 4))
    model.classifier = _nn.Linear(4, 2)
    with pytest.raises(
        CompressionConfigError,
        match=r"every glob of argument `exclude` to match a module name, but 'classifer.\*' matches none\."
        r" The closest module names: \['classifier'",
    ):
        select_targets(model, exclude=["classifer.*"])
    assert [t.name for t in select_targets(model, exclude=["classifier"])] == ["features.0"]
    assert [t.name for t in select_targets(model, exclude=["features.*"])] == ["classifier"]
