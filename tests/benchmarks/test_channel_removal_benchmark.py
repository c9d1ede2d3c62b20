"""benchmarks/channel_removal.py runs end to end (``--smoke``) and its printed table parses. No timing is asserted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "channel_removal.py"


@pytest.mark.slow
def test_channel_removal_smoke(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the latency child too is killed on timeout
    )
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("benchmarks/channel_removal.py --smoke ran past 600 s")
    assert proc.returncode == 0, out[-4000:]
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 1 |")]
    variants = {(r[1].strip(), r[2].strip()) for r in rows}
    assert {("resnet18", "dense"), ("resnet18", "slim_0.5"), ("resnet18", "hand_cut")} <= variants
    assert {("digits MLP", "slim_50%"), ("digits MLP", "slim_75%")} <= variants
    for r in rows:
        if r[1].strip() == "resnet18" and r[2].strip() != "dense":
            ratio = float(r[4].split("(")[1].rstrip("x) "))
            assert 0 < ratio < 1  # the slim model has fewer parameters
            assert float(r[6]) <= 1e-5  # outputs equal the masked model's
    data = json.loads((tmp_path / "channel_removal_smoke.json").read_text())
    hidden = {row["fraction"]: row["hidden"] for row in data["digits"]["rows"]}
    assert hidden == {0.0: [300, 100], 0.5: [150, 50], 0.75: [75, 25]}
    assert (tmp_path / "channel_removal_smoke.md").read_text().startswith("# Channel removal")
