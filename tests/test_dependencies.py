from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_the_compromised_lightning_releases_are_excluded():
    """lightning 2.6.2 and 2.6.3 were compromised on PyPI (GHSA-w37p-236h-pfx3)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (lightning,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "lightning"]
    assert not lightning.specifier.contains("2.6.2") and not lightning.specifier.contains("2.6.3")
    assert all(lightning.specifier.contains(v) for v in ("2.4.0", "2.6.1", "2.6.4", "2.7.0"))
