"""The public contract: names, argument kinds and defaults that users and configs rely on.

These signatures are promised to users (a LightningCLI config names them), so renaming one or
changing a default is a breaking change: this test pins each one. The list is the contract itself,
written out here; the user-facing pages (``docs/api.rst`` and the per-method pages) document the
same arguments.
"""

from __future__ import annotations

import inspect

import pytest

import lightning_compress

PUBLIC = {
    "PruningCallback",
    "SparseRegularizer",
    "QuantizeOnFitEnd",
    "DistillationModule",
    "CompressionConfigError",
    "compression_report",
    "save_compressed",
    "load_compressed",
    "sparse_penalty",
    "export_onnx",
    "remove_channels",
}

KW = inspect.Parameter.KEYWORD_ONLY
POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
REQUIRED = inspect.Parameter.empty

CONTRACT = {
    "PruningCallback": [
        ("target_sparsity", POS, REQUIRED),
        ("method", KW, "magnitude"),
        ("scope", KW, "global"),
        ("schedule", KW, "cubic"),
        ("initial_sparsity", KW, 0.0),
        ("start_epoch", KW, 0),
        ("end_epoch", KW, None),
        ("update_every_n_steps", KW, 10),
        ("include", KW, ["Linear", "Conv1d", "Conv2d", "Conv3d"]),
        ("exclude", KW, []),
        ("score", KW, "magnitude"),
        ("remove_channels", KW, False),
        ("verbose", KW, 1),
    ],
    "SparseRegularizer": [
        ("strength", POS, 1e-4),
        ("penalty", KW, "l1"),
        ("proximal", KW, False),
        ("include", KW, ["Linear", "Conv1d", "Conv2d", "Conv3d"]),
        ("exclude", KW, []),
    ],
    "QuantizeOnFitEnd": [
        ("mode", POS, "dynamic"),
        ("per_channel", KW, True),
        ("calibration_batches", KW, 32),
        ("include", KW, ["Linear", "Conv2d", "Embedding"]),
        ("exclude", KW, []),
        ("save_path", KW, None),
        ("qat_epochs", KW, 0),
        ("onnx_path", KW, None),
        ("verbose", KW, 1),
    ],
    "DistillationModule": [
        ("student", POS, REQUIRED),
        ("teacher", POS, REQUIRED),
        ("temperature", KW, 4.0),
        ("alpha", KW, 0.9),
        ("teacher_checkpoint", KW, None),
        ("num_classes", KW, None),
        ("lr", KW, 1e-3),
    ],
    "compression_report": [("module", POS, REQUIRED)],
    "save_compressed": [("module", POS, REQUIRED), ("path", POS, REQUIRED)],
    "load_compressed": [("path", POS, REQUIRED), ("module", POS, REQUIRED)],
    "export_onnx": [("module", POS, REQUIRED), ("path", POS, REQUIRED), ("example_inputs", POS, REQUIRED)],
    "remove_channels": [("module", POS, REQUIRED), ("example_inputs", POS, REQUIRED)],
    "sparse_penalty": [
        ("module", POS, REQUIRED),
        ("penalty", POS, "l1"),
        ("include", POS, ["Linear", "Conv1d", "Conv2d", "Conv3d"]),
        ("exclude", POS, []),
    ],
}


def test_all_lists_the_public_names():
    assert set(lightning_compress.__all__) >= PUBLIC
    for name in lightning_compress.__all__:
        assert getattr(lightning_compress, name) is not None


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_arguments_and_defaults_match_the_contract(name):
    parameters = inspect.signature(getattr(lightning_compress, name)).parameters
    for argument, kind, default in CONTRACT[name]:
        assert argument in parameters, f"{name} lost `{argument}`"
        parameter = parameters[argument]
        assert parameter.kind == kind, f"{name}({argument}) is {parameter.kind}, expected {kind}"
        assert parameter.default == default and type(parameter.default) is type(default), (
            f"{name}({argument}) defaults to {parameter.default!r}, expected {default!r}"
        )
    # Arguments beyond the contract are optional keywords, so no call written against it breaks.
    documented = {argument for argument, _, _ in CONTRACT[name]}
    for extra in set(parameters) - documented:
        assert parameters[extra].kind == KW and parameters[extra].default is not REQUIRED, extra


def test_configuration_error_is_a_value_error():
    assert issubclass(lightning_compress.CompressionConfigError, ValueError)


def _modules() -> list[tuple[str, bool]]:
    import pkgutil

    return [(m.name, m.ispkg) for m in pkgutil.walk_packages(lightning_compress.__path__, "lightning_compress.")]


@pytest.mark.parametrize(("module_name", "is_package"), _modules())
def test_every_module_lists_only_its_own_names_in_all(module_name, is_package):
    """``__all__`` names what the module defines: a name imported from elsewhere belongs to its own module's list.

    (``pipeline/result.py`` once listed ``atomic_write_text``, which lives in ``core/files.py``.) Packages
    may gather their rooms' names.
    """
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError as error:  # an optional dependency (onnx, transformers, ...) that is not installed
        pytest.skip(f"{module_name} needs {error.name}")
    for name in getattr(module, "__all__", ()):
        assert hasattr(module, name), f"{module_name}.__all__ lists {name!r}, which it does not define"
        obj = getattr(module, name)
        if not is_package and (inspect.isfunction(obj) or inspect.isclass(obj)):
            assert obj.__module__ == module_name, f"{module_name}.__all__ lists {name!r} from {obj.__module__}"
