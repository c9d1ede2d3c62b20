"""The example of docs/transformers.rst runs as written (in a temporary folder)."""

import os
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "transformers.rst"


def _python_blocks(text):
    blocks = []
    for match in re.finditer(r"^\.\. code-block:: python\n\n((?:(?: {4}.*)?\n)+)", text, re.MULTILINE):
        lines = match.group(1).splitlines()
        blocks.append("\n".join(line[4:] for line in lines))
    return blocks


@pytest.mark.slow
def test_the_lightning_module_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (code,) = _python_blocks(DOC.read_text())
    namespace = {"__name__": "__doc_example__"}
    exec(compile(code, str(DOC), "exec"), namespace)
    assert os.path.getsize(tmp_path / "bert.int8.pt") > 0
    report = namespace["quantize"].report
    assert report["layers_converted"] >= 14 and report["relative_error"] < 0.05
