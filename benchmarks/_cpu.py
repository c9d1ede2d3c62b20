"""The CPU line every benchmark prints with its results: a figure measured on one CPU is not a claim about another.

Imports nothing but the standard library, so that a script can print it before torch loads.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

SIMD_PREFIXES = ("avx", "fma", "vnni", "amx", "f16c", "sse4")


def cpu_header() -> str:
    """The CPU's model name, its logical CPU count and SIMD flags (from ``/proc/cpuinfo``, lscpu's source)."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name
    for line in text.splitlines():
        if line.startswith("model name") and name == (platform.processor() or platform.machine()):
            name = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = " ".join(f for f in line.split(":", 1)[1].split() if f.startswith(SIMD_PREFIXES) or "vnni" in f)
    return f"{name}; {os.cpu_count()} logical CPUs; SIMD flags: {flags}"
