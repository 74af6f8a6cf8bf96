"""Latency of pruned models next to their original, and what ``--round-to`` does to it.

For each zoo model (random weights; real torchvision architectures), the same share of
channel units is removed by weight norm (``idap_onnx.api.prune``, ``l1``) with kept counts
rounded to multiples of 1, 8 and 16, and the original and the three pruned models are timed
in turns by ``idap_onnx.deploy.latency.measure`` (ONNX Runtime, default optimizations, batch 1,
N(0, 1) inputs). Unit scores do not matter for speed, only the kept widths do, so the weight
norm stands in for ``idap`` here (no calibration data needed).

With ``--fp16``, instead: each model's fp16 export (``idap_onnx.deploy.fp16.to_fp16``, fp32
inputs and outputs) against its fp32 source on ONNX Runtime's CPU provider: the nodes kept
fp32 and why, the max relative L2 output error on the calibration samples (``make_inputs``
seeds 0-1, which also find the overflowing nodes) and on held-out ones (seeds 2-5), and the
two models timed in turns at batch 1. ``digits`` is the digits CNN on its real test images.

Usage::

    python tools/bench_latency.py                         # resnet50 and mobilenet_v2, ratio 0.5
    python tools/bench_latency.py --models resnet18 --ratio 0.3 --rounds 3
    python tools/bench_latency.py --fp16 --models digits resnet18 mobilenet_v2 ...

Prints a markdown table: MACs kept, median latency and speed-up over the original, each
measured in the same call (the speed-ups are comparable, the absolute figures only within
one run).
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

from idap_onnx.accounting import model_cost  # noqa: E402
from idap_onnx.api import prune  # noqa: E402
from idap_onnx.deploy.latency import measure  # noqa: E402
from idap_onnx.model_io import load_model  # noqa: E402

ROUNDINGS = (1, 8, 16)


def bench(name: str, ratio: float, rounds: int, runs: int, device: str) -> list[str]:
    """Markdown rows for one zoo model."""
    path = zoo.build(name)
    original = load_model(path)
    shape = [d.dim_value or 1 for d in original.graph.input[0].type.tensor_type.shape.dim]
    feed = {original.graph.input[0].name:
            np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    macs0 = model_cost(original).macs
    models = {"original": original}
    macs = {"original": macs0}
    for r in ROUNDINGS:
        pruned, _ = prune(original, ratio, score="l1", round_to=r, verify=False)
        models[f"round_to {r}"] = pruned
        macs[f"round_to {r}"] = model_cost(pruned).macs
    report = measure(models, feed, rounds=rounds, per_round=runs, warmup=3, device=device,
                     max_seconds=600)
    rows = []
    for label, t in report.timings.items():
        rows.append(
            f"| {name} | {label} | {100 * macs[label] / macs0:.1f} % | {t.median_ms:.2f} "
            f"({t.p10_ms:.2f}-{t.p90_ms:.2f}) | {t.runs} | {report.speedup[label]:.2f}x |"
        )
    print(f"{name}: {report.device}, {report.rounds} rounds", file=sys.stderr)
    return rows


def fp16_row(name: str, rounds: int, runs: int) -> str:
    """One markdown row: ``name``'s fp16 export against its fp32 source (module docstring)."""
    from idap_onnx.deploy.fp16 import to_fp16
    from idap_onnx.verify import rel_l2, run_model

    if name == "digits":
        import digits

        original = load_model(digits.build().model_path)
        x = digits.load_splits()["test"][0]
        key = original.graph.input[0].name
        feeds = [{key: x[i * 16:(i + 1) * 16]} for i in range(6)]
    else:
        original = load_model(zoo.build(name))
        feeds = [zoo.make_inputs(name, seed=s) for s in range(6)]
    calib, held_out = feeds[:2], feeds[2:]
    result = to_fp16(original, calib)
    held = max(rel_l2(g, w) for f in held_out for g, w in
               zip(run_model(result.model, f), run_model(original, f), strict=True)
               if np.issubdtype(w.dtype, np.floating))
    labels = {"weight": "read a weight over 65504", "input": "read a tensor over 65504",
              "output": "write a tensor over 65504"}
    reasons: dict[str, int] = {}
    for why in result.kept_fp32.values():
        kind = labels.get(why.split(" ")[0], why) if "reaches" in why else why
        reasons[kind] = reasons.get(kind, 0) + 1
    kept = ", ".join(f"{n} ({k})" for k, n in sorted(reasons.items())) or "none"
    one = {k: v[:1] for k, v in held_out[0].items()}
    report = measure({"fp32": original, "fp16": result.model}, one, rounds=rounds,
                     per_round=runs, warmup=3, device="cpu", max_seconds=120)
    t = report.timings
    return (f"| {name} | {len(original.graph.node)} | {kept} | {result.max_rel_error:.1e} | "
            f"{held:.1e} | {t['fp32'].median_ms:.2f} | {t['fp16'].median_ms:.2f} | "
            f"{report.speedup['fp16']:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    parser.add_argument("--ratio", type=float, default=0.5, help="share of units removed (0.5)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model per round")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--fp16", action="store_true",
                        help="fp16 export error and CPU latency instead (module docstring)")
    args = parser.parse_args(argv)
    if args.fp16:
        print(f"Machine: {line()}; ONNX Runtime CPU provider, batch 1, {args.rounds} rounds of "
              f"{args.runs} runs per model, in turns.\n")
        print("| model | nodes | kept fp32 (why) | max rel. error, calibration | held-out | "
              "fp32 ms | fp16 ms | fp16 speed-up |")
        print("|---|---|---|---|---|---|---|---|")
        for name in args.models:
            print(fp16_row(name, args.rounds, args.runs), flush=True)
        return 0
    print(f"Machine: {line()}; ratio {args.ratio}, batch 1, {args.rounds} rounds of "
          f"{args.runs} runs per model, in turns.\n")
    print("| model | pruned | MACs kept | median ms (p10-p90) | runs | speed-up |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        for row in bench(name, args.ratio, args.rounds, args.runs, args.device):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
