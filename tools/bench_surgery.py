"""Time the channel surgery on ResNet-50 on one core: analysis + planning + prune_channels.

Usage: ``python tools/bench_surgery.py [--model resnet50] [--repeats 3]``. Pins the process
to one CPU core (``os.sched_setaffinity``) and prints the median of each phase; the result
is recorded in ``docs/BENCHMARKS.md`` with the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402

from idap_onnx.dependency import analyze_model  # noqa: E402
from idap_onnx.model_io import load_model  # noqa: E402
from idap_onnx.passes.prune_channels import prune_channels  # noqa: E402
from idap_onnx.planner import PlanConfig, plan_removal, weight_scores  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    model = load_model(zoo.build(args.model))
    phases: dict[str, list[float]] = {"analyze": [], "plan": [], "prune": [], "total": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        graph = analyze_model(model)
        t1 = time.perf_counter()
        removal = plan_removal(graph, weight_scores(graph, "l1"), PlanConfig(0.5, round_to=8))
        t2 = time.perf_counter()
        prune_channels(model, removal, graph=graph)
        t3 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
            phases[k].append(v)
    print(
        f"{args.model} on one core of {platform.machine()} ({os.cpu_count()} cores), "
        f"median of {args.repeats}:"
    )
    for k, v in phases.items():
        print(f"  {k:8s} {statistics.median(v):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
