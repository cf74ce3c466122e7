"""What machine a benchmark ran on: CPU, memory and package versions, for the result files.

Shared by the pytest-benchmark suite (``conftest.py``) and the script benchmarks.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata

_LSCPU_KEYS = ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache")


def lscpu() -> dict:
    """The lines of ``lscpu`` the reports quote (empty where lscpu is missing)."""
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return info
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in _LSCPU_KEYS:
            info[key.strip()] = value.strip()
    return info


def cpu_model() -> str | None:
    """The CPU's model name."""
    return lscpu().get("Model name") or platform.processor() or None


def mem_total_gib() -> float | None:
    """Installed memory in GiB, from /proc/meminfo (None elsewhere)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def versions(dists) -> dict:
    """``{distribution: version}`` for the installed ones among `dists`."""
    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
