"""Where a default ``optimize`` cut goes, against where the time is.

For one model at batch 1: the latency table (``build_table``, the disk cache used) gives each
group's sub-graph time at full width; ``optimize`` with the defaults and ``target_flops=0.5``
(as ``bench_latency_table.py`` runs it: stage 1, no refit, no accuracy budget) gives the
kept widths. One row per group, ordered by sub-graph time: its units, the units kept, its
share of the model's MACs (``group_macs``: the nodes touching it) and its sub-graph time and
share of the sub-graphs' total. A cut that keeps the groups whose time per MAC is high saves
less time per MAC than the model's average (latency saved / MACs saved under 1).

Usage::

    python tools/latency_cut_map.py efficientnet_b0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_latency_table import feed_of, load_case, optimized  # noqa: E402
from machine import line  # noqa: E402

from idap_onnx.accounting import model_cost  # noqa: E402
from idap_onnx.dependency import analyze_model  # noqa: E402
from idap_onnx.deploy.latency_table import build_table, local_target  # noqa: E402
from idap_onnx.group_costs import group_macs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a zoo name or minilm")
    args = ap.parse_args()
    model, batches = load_case(args.model)
    feed = feed_of(batches, 1)
    shapes = {k: list(v.shape) for k, v in feed.items()}
    table = build_table(model, local_target(batch=1), feed)
    kept = {g.key: g.size for g in analyze_model(
        optimized(model, batches, target_flops=0.5).model, shapes).groups}
    graph = analyze_model(model, shapes)
    cost = model_cost(model, shapes)
    macs = group_macs(graph, cost)
    total = sum(c.points[c.size] for c in table.groups.values())
    print(line())
    print(f"{args.model}, batch 1: model {table.model_ms:.3f} ms, sub-graphs {total:.3f} ms in "
          "all (a node shared by two groups counts in both)")
    print("| group | units | kept | MACs share | sub-graph ms | time share |\n"
          "|---|---|---|---|---|---|")
    rows = []
    for g in graph.groups:
        c = table.groups.get(g.key)
        if c is not None:
            rows.append((c.points[c.size], g, kept.get(g.key)))
    for t, g, k in sorted(rows, key=lambda r: (-r[0], r[1].id)):
        print(f"| {g.id} | {g.size} | {k} | {100 * macs[g.id] / cost.macs:.1f} % | {t:.3f} | "
              f"{100 * t / total:.1f} % |")


if __name__ == "__main__":
    main()
