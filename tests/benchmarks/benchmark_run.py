"""How the smoke tests run a benchmark script: in a child process, or its ``main`` loaded in this one."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_benchmark(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python benchmarks/<script> *args`` in a child process; fail with its stderr's tail unless it exits 0."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def load_benchmark(script: str) -> ModuleType:
    """``benchmarks/<script>`` loaded as a module named ``_bench_<stem>`` (its ``main`` not run)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{Path(script).stem}", BENCHMARKS / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
