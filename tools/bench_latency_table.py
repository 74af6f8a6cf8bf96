"""Latency as the target (issue 16): the width rules side by side, the table's predictions
against measurements, and ``--target-latency`` landing on its target.

For each model, at each batch:

1. a latency table is measured on ONNX Runtime's CPU provider (``build_table``; its build
   time is reported);
2. ``run_optimize`` prunes the model to about half its MACs (``target_flops=0.5``) with the
   widths exact (``round_to=1``), with the default (``round_to="auto"`` and no table: the
   runtime's known multiple) and with the table's stairs (``latency_table=``), and to half its
   latency (``target_latency="0.5"`` as a user runs it: ``optimize`` measures its own table,
   then times its result and plans again where it is more than 5 % off, the "landing"; the
   row's prediction is from that table, its last column the measured passes);
3. the original and the four results are timed in turns (``latency.measure``), and each row
   gives the MACs kept, the measured speed-up, the ratio *latency saved / MACs saved*
   (``(1 - t/t0) / (1 - m/m0)``) and the table's prediction against the measured time.

Pruning runs with the default ``idap`` score and mean compensation, stage 1 only, without
the refit (it changes weights, not widths) and without an accuracy budget (``max_error``
1e9: the question here is speed; the budget is measured elsewhere), on generated inputs for
the vision models (``zoo.make_inputs`` shapes) and on MiniLM's real calibration sentences.
At batch 8 the exact and default models are those of batch 1, timed at batch 8, and the
target row is planned with a batch-8 table.

Usage::

    python tools/bench_latency_table.py                               # the four issue models
    python tools/bench_latency_table.py --models resnet18 --batches 1
    python tools/bench_latency_table.py --rows "target 0.5"          # the target rows only
    python tools/bench_latency_table.py --predict-only --models resnet18 mobilenet_v2 ...

``--predict-only`` skips optimize: each model is pruned by weight norm to half its units on
the table's stairs (``api``-free, ``plan_removal``) and at exact widths, and only the
prediction and the table's build time are reported (the zoo-wide prediction check).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zoo  # noqa: E402
from machine import line  # noqa: E402

from idap_onnx.accounting import model_cost  # noqa: E402
from idap_onnx.dependency import analyze_model  # noqa: E402
from idap_onnx.deploy.latency import measure  # noqa: E402
from idap_onnx.deploy.latency_table import build_table, local_target  # noqa: E402
from idap_onnx.model_io import load_model  # noqa: E402
from idap_onnx.optimize_report import saved_per_mac_saved  # noqa: E402

DEFAULT_MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "minilm")
ROWS = ("exact", "default", "table stairs", "target 0.5")


def load_case(name: str):
    """(model, calibration batches of 8, full-resolution feed of one sample)."""
    if name == "minilm":
        import minilm

        built = minilm.build()
        model = load_model(built.model_path)
        data = dict(np.load(built.model_path.parent / "calib.npz"))
        n = len(next(iter(data.values())))
        batches = [{k: v[i:i + 8] for k, v in data.items()} for i in range(0, min(n, 64), 8)]
        return model, batches
    model = load_model(zoo.build(name))
    sample = zoo.make_inputs(name)
    rng = np.random.default_rng(0)
    batches = [{k: rng.standard_normal((8, *v.shape[1:])).astype(v.dtype)
                if v.dtype.kind == "f" else np.repeat(v[:1], 8, axis=0)
                for k, v in sample.items()} for _ in range(4)]
    return model, batches


def feed_of(batches, batch: int) -> dict[str, np.ndarray]:
    from idap_onnx.deploy.latency import example_feed

    return example_feed(batches, batch)


def optimized(model, batches, **kw):
    """``optimize``'s result with defaults except the given settings (module docstring)."""
    from idap_onnx.metrics import Evaluator
    from idap_onnx.optimize import OptimizeConfig, optimize

    config = OptimizeConfig(max_error=1e9, stages=(1,), latency="onnxruntime", refit=False,
                            **kw)
    evaluator = Evaluator(model, batches[-1:], metric="rel-l2")
    t0 = time.perf_counter()
    result = optimize(model, batches[:-1], evaluator, config)
    print(f"optimize {kw}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return result


def bench(name: str, batches_wanted: list[int], predict_only: bool, tmp: Path,
          wanted_rows: tuple[str, ...] = ROWS) -> list[str]:
    model, batches = load_case(name)
    shapes1 = {k: [1, *v.shape[1:]] for k, v in batches[0].items()}
    macs0 = model_cost(model, shapes1).macs
    rows = []
    planned: dict[str, object] = {}
    for b in batches_wanted:
        t0 = time.perf_counter()
        table = build_table(model, local_target(batch=b), feed_of(batches, b), cache_dir=False)
        build_s = time.perf_counter() - t0
        print(f"{name} batch {b}: table in {build_s:.0f} s", file=sys.stderr, flush=True)
        path = tmp / f"{name}.b{b}.json"
        table.save(path)
        models = {"original": model}
        tables, notes = {}, {}
        if predict_only:
            models.update(_weight_norm_models(model, table))
        else:
            if not planned:
                for label, kw in (("exact", {"round_to": 1}), ("default", {})):
                    if label in wanted_rows:
                        planned[label] = optimized(model, batches, target_flops=0.5,
                                                   **kw).model
            models.update(planned)
            if b == batches_wanted[0] and "table stairs" in wanted_rows:
                models["table stairs"] = optimized(model, batches, target_flops=0.5,
                                                   latency_table=str(path),
                                                   latency_batch=b).model
            if "target 0.5" in wanted_rows:  # as a user runs it: its own table, landing
                res = optimized(model, batches, target_latency="0.5", latency_batch=b)
                models["target 0.5"], tables["target 0.5"] = res.model, res.table
                passes = res.latency_plan["landing"]
                notes["target 0.5"] = (f"own table {res.table.seconds:.0f} s; measured "
                                       + ", ".join(f"{p['fraction']:.2f}" for p in passes)
                                       + f" ({len(passes)} pass(es) timed)")
        report = measure(models, feed_of(batches, b), rounds=15, per_round=10, warmup=3,
                         max_seconds=120)
        t_orig = report.timings["original"].median_ms
        for label, m in models.items():
            macs = model_cost(m, shapes1).macs
            t = report.timings[label].median_ms
            used = tables.get(label, table)  # the target row: the table its run measured
            pred = used.predict(analyze_model(m, shapes1)) if label != "original" else (
                used.model_ms)
            pred_rel = pred / used.model_ms  # the table's own original as the reference
            saved = saved_per_mac_saved(t_orig / t, macs / macs0)  # the report's figure
            ratio = "" if label == "original" or saved is None else f"{saved:.2f}"
            rows.append(
                f"| {name} | {b} | {label} | {100 * macs / macs0:.1f} % | {t:.3f} | "
                f"{t_orig / t:.2f}x | {ratio} | {pred_rel * t_orig:.3f} | "
                f"{100 * (pred_rel * t_orig / t - 1):+.1f} % | "
                + (f"{build_s:.0f} s, k {table.scale:.2f}, b {table.ms_per_mb:.3f}"
                   if label == "original" else notes.get(label, ""))
                + " |")
        print("\n".join(rows[-len(models):]), flush=True)
    return rows


def _weight_norm_models(model, table) -> dict:
    from idap_onnx.passes.prune_channels import prune_channels
    from idap_onnx.planner import PlanConfig, plan_removal, weight_scores

    graph = analyze_model(model)
    scores = weight_scores(graph, "l1")
    out = {}
    for label, cfg in (("exact 0.5", PlanConfig(0.5)),
                       ("stairs 0.5", PlanConfig(0.5, multiples=table.multiples(graph))),
                       ("stairs 0.3", PlanConfig(0.3, multiples=table.multiples(graph)))):
        removal = plan_removal(graph, scores, cfg)
        out[label] = prune_channels(model, removal, graph=graph)
    return out


HEADER = (
    "| model | batch | widths | MACs kept | median ms | speed-up | latency saved / MACs saved "
    "| table's prediction ms | prediction error | table build |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--predict-only", action="store_true")
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                    help="the results to time beside the original (default: all)")
    args = ap.parse_args()
    print(line())
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            bench(name, args.batches, args.predict_only, Path(tmp), tuple(args.rows))


if __name__ == "__main__":
    main()
