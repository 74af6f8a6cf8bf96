"""Check: do the pooled calibration probes agree with the row-wise ones on real CNNs?

For each zoo model, ``calib.stats.collect`` runs twice on the same random images: as it runs
(pooled probes in the NCHWc layout, where the image sizes are static) and with pooling off
(row-wise ``ReduceSum`` probes at the extended level). Printed per model: the largest relative
difference of the channel statistics (sums and sums of squares, L2 over channels), of the
energies and of D_l; the largest unit-score difference relative to the largest score of the
model; and the rank correlation of all unit scores.

Usage::

    python tools/calib_pooled_check.py resnet18 mobilenet_v2 efficientnet_b0
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zoo  # noqa: E402
from machine import line  # noqa: E402

from idap_onnx.blocks import find_blocks  # noqa: E402
from idap_onnx.calib import stats as S  # noqa: E402
from idap_onnx.calib.scores import block_divergence, unit_scores  # noqa: E402
from idap_onnx.dependency import analyze_model  # noqa: E402
from idap_onnx.model_io import load_model  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "googlenet",
          "mnasnet0_5", "regnet_y_400mf")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) or 1.0))


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def check(name: str, images: int, batch: int) -> str:
    model = load_model(zoo.build(name))
    value = model.graph.input[0]
    dims = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
    graph = analyze_model(model)
    plan = S.plan_probes(graph, find_blocks(model, graph.index), scores=("idap",))
    rng = np.random.default_rng(0)
    feeds = [{value.name: rng.standard_normal([batch, *dims[1:]]).astype(np.float32)}
             for _ in range(max(images // batch, 1))]
    a = S.collect(model, plan, feeds, device="cpu")
    b = S.collect(model, dataclasses.replace(plan, pooled=False), feeds, device="cpu")
    stats = max([_rel(a.channel_sum[t], b.channel_sum[t]) for t in plan.channels]
                + [_rel(a.channel_sumsq[t], b.channel_sumsq[t]) for t in plan.channels],
                default=0.0)
    energy = max((abs(a.energy[y] - b.energy[y]) / (abs(b.energy[y]) or 1.0)
                  for y in plan.energies), default=0.0)
    da, db = block_divergence(a), block_divergence(b)
    d_l = max((abs(da[k] - db[k]) / (abs(db[k]) or 1.0) for k in db), default=0.0)
    sa, sb = unit_scores(graph, a, "idap"), unit_scores(graph, b, "idap")
    ids = [g for g in sb if not np.all(np.isnan(sb[g]))]
    ua, ub = np.concatenate([sa[g] for g in ids]), np.concatenate([sb[g] for g in ids])
    score = float(np.max(np.abs(ua - ub)) / (np.max(np.abs(ub)) or 1.0))
    rank = float(np.corrcoef(_ranks(ua), _ranks(ub))[0, 1])
    return (f"| {name} | {a.nchwc_nodes} | {stats:.1e} | {energy:.1e} | {d_l:.1e} | "
            f"{score:.1e} | {rank:.5f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=list(MODELS))
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"Machine: {line()}; {args.images} N(0, 1) images per model.\n")
    print("| model | NCHWc nodes | channel stats | energies | D_l | unit scores (of the largest) "
          "| rank correlation |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        print(check(name, args.images, args.batch), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
