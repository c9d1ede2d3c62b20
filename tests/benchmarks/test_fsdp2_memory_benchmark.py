"""Smoke test of benchmarks/fsdp2_memory.py at its smallest size (two CPU processes, gloo, hard timeout)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fsdp2_memory.py"


@pytest.mark.ddp
def test_fsdp2_memory_benchmark_prints_a_ratio_per_rank() -> None:
    cmd = [sys.executable, str(SCRIPT), "--width", "64", "--layers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"ran past 300 s and was killed:\n{out[-2000:]}{err[-2000:]}") from None
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    lines = [line for line in out.splitlines() if line.startswith("rank ")]
    assert sorted(line.split(":")[0] for line in lines) == ["rank 0", "rank 1"]
    assert all("ratio" in line for line in lines) and "sparsity reached 0.800" in out
