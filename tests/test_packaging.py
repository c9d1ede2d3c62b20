"""The package as users install it: optional dependencies stay optional, metadata is complete.

The sdist and wheel themselves are built, checked with ``twine check --strict`` and installed into a
fresh environment by ``.ci/run``; these tests check what can be checked without a build.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

HIDE = """
import importlib.machinery, importlib.metadata, sys

class WithoutMetadata:
    # `import torchvision` fails as if it were not installed, `importlib.util.find_spec("torchvision")` is None
    # (as transformers asks), and so is `importlib.metadata.version("torchvision")`, which torchmetrics and
    # Lightning ask first.
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, fullname, *args, **kwargs):
        if fullname.split(".")[0] in HIDDEN:
            return None
        return self.inner.find_spec(fullname, *args, **kwargs)

    def invalidate_caches(self):
        return self.inner.invalidate_caches()

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        for dist in self.inner.find_distributions(context):
            if (dist.metadata["Name"] or "").lower().replace("-", "_") not in HIDDEN:
                yield dist

for name in list(sys.modules):
    if name.split(".")[0] in HIDDEN:
        del sys.modules[name]
sys.meta_path[:] = [WithoutMetadata(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""


def _run_hidden(hidden: list[str], code: str) -> subprocess.CompletedProcess[str]:
    program = f"HIDDEN = {hidden!r}\n{HIDE}\n{textwrap.dedent(code)}"
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.slow
def test_everything_but_the_vision_demos_imports_without_torchvision():
    done = _run_hidden(
        ["torchvision"],
        """
        import lightning_compress
        from lightning_compress import (
            CompressionConfigError, DistillationModule, PruningCallback, QuantizeOnFitEnd, SparseRegularizer,
            compression_report, load_compressed, save_compressed, sparse_penalty,
        )
        import lightning_compress.cli, lightning_compress.demo, lightning_compress.pipeline
        from lightning_compress.demo import MNISTDataModule
        try:
            MNISTDataModule().prepare_data()
        except ImportError as err:
            print("MNIST:", err)
        assert not any(name.split(".")[0] == "torchvision" for name in sys.modules)
        print("ok", lightning_compress.__version__)
        """,
    )
    assert done.returncode == 0, done.stderr
    assert "MNIST: MNISTDataModule reads MNIST with torchvision, which is not installed." in done.stdout
    assert 'pip install "lightning-compress[demo]"' in done.stdout
    assert done.stdout.strip().endswith("ok " + _version())


def test_core_imports_and_runs_without_lightning():
    done = _run_hidden(
        ["lightning", "lightning_fabric", "pytorch_lightning", "torchmetrics"],
        """
        import pkgutil, importlib
        import torch
        import lightning_compress, lightning_compress.core
        modules = [m.name for m in pkgutil.iter_modules(lightning_compress.core.__path__, "lightning_compress.core.")]
        for name in modules:
            importlib.import_module(name)
        from lightning_compress.core.report import compression_report
        layer = torch.nn.Linear(4, 2)
        error = lightning_compress.CompressionConfigError("x")
        print(len(modules), compression_report(layer).weight_params, isinstance(error, ValueError))
        """,
    )
    assert done.returncode == 0, done.stderr
    count, params, is_value_error = done.stdout.split()
    assert int(count) >= 2 and params == "8" and is_value_error == "True"


def test_hiding_works():
    """The finder really hides a module and its metadata (else the two tests above could not fail)."""
    done = _run_hidden(["lightning"], "import lightning_compress.cli")
    assert done.returncode == 1 and "No module named 'lightning'" in done.stderr
    done = _run_hidden(["torchvision"], "import importlib.metadata as m; m.version('torchvision')")
    assert done.returncode == 1 and "PackageNotFoundError" in done.stderr


def _version() -> str:
    about: dict[str, str] = {}
    exec((ROOT / "lightning_compress" / "__about__.py").read_text(), about)
    return about["__version__"]


def test_version_is_kept_in_one_place_and_is_pep440():
    import lightning_compress

    assert PROJECT["dynamic"] == ["version"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "lightning_compress.__about__.__version__"
    assert lightning_compress.__version__ == _version()
    pep440 = r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?"
    assert re.fullmatch(pep440, _version())


def test_metadata_is_complete_for_pypi():
    assert PROJECT["name"] == "lightning-compress"
    assert len(PROJECT["description"]) < 200 and "\n" not in PROJECT["description"]
    assert PROJECT["readme"] == "README.md" and (ROOT / "README.md").is_file()
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])  # PEP 639: the expression says it
    assert set(PROJECT["urls"]) >= {"Homepage", "Documentation", "Repository", "Issues", "Changelog"}
    assert PROJECT["authors"] and PROJECT["keywords"]
    assert PROJECT["scripts"] == {"lightning-compress": "lightning_compress.cli:main"}
    assert set(PROJECT["optional-dependencies"]) >= {"vision", "plot", "demo", "test", "docs", "dev"}
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["lightning_compress"]
    assert (ROOT / "lightning_compress" / "py.typed").is_file()


def test_supported_versions_are_stated_and_consistent():
    import lightning

    minimum = tuple(int(x) for x in re.fullmatch(r">=3\.(\d+)", PROJECT["requires-python"]).groups())
    listed = {
        int(c.rsplit(".", 1)[1])
        for c in PROJECT["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    assert min(listed) == minimum[0] and sys.version_info[:2] >= (3, min(listed))
    requirements = {re.split(r"[\[<>=!~ ;]", d)[0]: d for d in PROJECT["dependencies"]}
    assert set(requirements) >= {"torch", "lightning", "torchmetrics", "jsonargparse"}
    lower = re.search(r">=([\d.]+)", requirements["lightning"]).group(1)
    assert tuple(map(int, lower.split("."))) <= tuple(map(int, lightning.__version__.split(".")[:2]))


def test_readme_holds_the_two_fresh_machine_commands():
    text = (ROOT / "README.md").read_text()

    def command_after(marker: str) -> str:  # the same extraction as .ci/run
        after = text.split(f"<!-- {marker} -->\n", 1)[1]
        fence, rest = after.split("\n", 1)
        assert fence.startswith("```")
        return rest.split("\n", 1)[0]

    main_command, test_command = command_after("main-command"), command_after("test-command")
    assert text.index("<!-- main-command -->") < text.index("<!-- test-command -->")
    assert main_command.startswith("python3 -m venv .venv && .venv/bin/pip install")
    assert main_command.endswith(".venv/bin/lightning-compress compress") and '".[demo]"' in main_command
    assert test_command == (
        'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest'
        " -n 2 --dist loadfile --no-loadscope-reorder"
    )
