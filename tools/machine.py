"""The machine a benchmark ran on, for every ``tools/`` report: one place that asks
``lscpu`` (or ``/proc/cpuinfo``) for the CPU model, counts the usable CPUs and reads the RAM.

Use as ``from machine import describe, line`` with ``tools/`` on ``sys.path`` (each tool puts
it there).
"""

from __future__ import annotations

import os
import platform
import subprocess


def cpu_model() -> str:
    """``lscpu``'s "Model name", else ``/proc/cpuinfo``'s "model name", else the platform's."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for row in out.splitlines():
            key, _, value = row.partition(":")
            if key.strip() == "Model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            for row in fh:
                if row.startswith("model name"):
                    return row.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def ram_gib() -> float:
    """Total RAM in GiB (0.0 where ``/proc/meminfo`` is missing)."""
    try:
        with open("/proc/meminfo") as fh:
            for row in fh:
                if row.startswith("MemTotal:"):
                    return round(int(row.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def describe() -> dict:
    """``cpu``, ``cores`` (usable), ``ram_gib``, ``system``, ``python``."""
    return {
        "cpu": cpu_model(),
        "cores": usable_cpus(),
        "ram_gib": ram_gib(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def line(*extra: str) -> str:
    """``"<cpu>, <n> CPUs, <r> GiB RAM, <system>, Python <v>"`` and any ``extra`` parts."""
    d = describe()
    parts = [d["cpu"], f"{d['cores']} CPUs", f"{d['ram_gib']} GiB RAM", d["system"],
             f"Python {d['python']}", *extra]
    return ", ".join(parts)
