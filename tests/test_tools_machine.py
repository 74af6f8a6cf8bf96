"""``tools/machine.py``: the one description of the machine that every benchmark report uses."""

from __future__ import annotations

import os

from tools_loader import load_tool

machine = load_tool("machine")


def test_the_machine_is_described_by_what_this_process_can_see():
    d = machine.describe()
    assert d["cpu"] and d["cpu"] != "unknown CPU"
    assert 1 <= d["cores"] <= (os.cpu_count() or 1)
    assert d["ram_gib"] > 0  # Linux: /proc/meminfo
    line = machine.line("onnxruntime 1.0")
    assert line.startswith(f"{d['cpu']}, {d['cores']} CPUs, {d['ram_gib']} GiB RAM")
    assert line.endswith(", onnxruntime 1.0")
