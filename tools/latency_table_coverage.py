"""Which prunable groups a latency table can time, per zoo model (nothing is timed).

For every group the analysis leaves prunable, ``latency_table.extract_group`` cuts out the
nodes touching its channels and ``latency_table.sub_group`` finds it again, still prunable,
in the sub-graph's own analysis: only then does ``build_table`` give it a curve. A group
without one is ranked last under ``--target-latency`` and counted as saving nothing in the
prediction. One row per model: its prunable groups, those the table can time, and the first
reasons for the others.

Usage::

    python tools/latency_table_coverage.py                 # the light zoo
    python tools/latency_table_coverage.py bert_tiny@dynamo mobilevit_xxs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zoo  # noqa: E402
from machine import line  # noqa: E402

from idap_onnx.dependency import analyze_model  # noqa: E402
from idap_onnx.deploy.latency_table import elem_types, extract_group, sub_group  # noqa: E402
from idap_onnx.model_io import load_model  # noqa: E402


def untimed(name: str) -> tuple[int, dict[str, str]]:
    """(prunable groups, group id -> why the table cannot time it) of zoo model ``name``
    at batch 1."""
    model = load_model(zoo.build(name))
    shapes = {k: [1, *np.asarray(v).shape[1:]] for k, v in zoo.make_inputs(name).items()}
    graph = analyze_model(model, shapes)
    types = elem_types(model)
    live = [g for g in graph.groups if not g.frozen]
    why = {}
    for g in live:
        found = sub_group(extract_group(model, graph, g, types), g)
        if isinstance(found, str):
            why[g.id] = found
    return len(live), why


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="zoo names (default: the light zoo)")
    names = ap.parse_args().models or [n for n, e in zoo.ZOO.items() if e.light]
    print(line())
    print("| model | prunable groups | timed by a table | why not (first two) |\n|---|---|---|---|")
    for name in names:
        live, why = untimed(name)
        reasons = "; ".join(f"{g}: {r}" for g, r in list(why.items())[:2])
        print(f"| {name} | {live} | {live - len(why)} | {reasons} |", flush=True)


if __name__ == "__main__":
    main()
