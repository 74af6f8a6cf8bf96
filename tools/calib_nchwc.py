"""Diagnostic: could the calibration pass use ONNX Runtime's NCHWc convolutions?

``calib.stats.collect`` runs at ``ORT_ENABLE_EXTENDED``: at ``ORT_ENABLE_ALL`` ONNX Runtime
converts convolutions to its blocked NCHWc layout and copies every probed tensor back to NCHW
(``ReorderOutput``) for the reductions. This tool times, on ResNet-50 (zoo, random weights,
N(0, 1) images, batches of 8), side by side in one process, round robin:

* ``plain-all``: the unmodified model at the default level (what a user deploys);
* ``collect-ext``: the row-wise probes ``collect`` appended for ``idap`` before it pooled
  (commit 7f2ef15), at the extended level, as it ran them;
* ``gap-all``: the same statistics written with ops the NCHWc transformer keeps in its layout
  (per-channel sums as ``GlobalAveragePool(x)``, sums of squares as
  ``GlobalAveragePool(Mul(x, x))``), at ``ORT_ENABLE_ALL``: only the small pooled outputs are
  reordered;
* ``gap-saved``: ``gap-all``'s optimized graph saved by ONNX Runtime
  (``optimized_model_filepath``), its nodes re-ordered so every probe runs right after what it
  reads, and loaded with optimizations off (ONNX Runtime appends the nodes it creates, so with
  priority-based order they ran last and held their inputs: the memory column shows it).

Session build time (including the optimization and the save) is reported apart from the loop.
The channel sums of ``gap-saved`` are compared with ``collect-ext``'s (largest relative
difference). Findings are in docs/BENCHMARKS.md (calibration cost).

Usage::

    python tools/calib_nchwc.py --samples 64 --repeat 3
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zoo  # noqa: E402
from machine import line  # noqa: E402

from idap_onnx.blocks import find_blocks  # noqa: E402
from idap_onnx.calib import stats as S  # noqa: E402
from idap_onnx.dependency import analyze_model  # noqa: E402
from idap_onnx.model_io import load_offloaded, write_variant  # noqa: E402

MODES = ("plain-all", "collect-ext", "gap-saved", "gap-all")  # gap-all last: its peak
LEVEL = ort.GraphOptimizationLevel


def _gap_probes(plan: S.ProbePlan) -> tuple[list[onnx.NodeProto], list[str]]:
    """GlobalAveragePool probes for the 4-D tensors of ``plan``."""
    nodes, outs, squares = [], [], {}

    def square(t: str) -> str:
        if t not in squares:
            squares[t] = f"g::sq::{t}"
            nodes.append(helper.make_node("Mul", [t, t], [squares[t]], name=squares[t]))
        return squares[t]

    def gap(t: str, name: str) -> None:
        nodes.append(helper.make_node("GlobalAveragePool", [t], [name], name=name))
        outs.append(name)

    for t, p in plan.channels.items():
        if p.rank == 4:
            gap(t, f"g::sum::{t}")
            gap(square(t), f"g::sumsq::{t}")
    for y, shape in plan.energies.items():
        if len(shape) == 4:
            gap(square(y), f"g::energy::{y}")
    for name, block in plan.blocks.items():
        for src in (block.branch if block.kind == "residual" else block.input, block.output):
            gap(square(src), f"g::block::{name}::{src}")
    return nodes, outs


def _session(path: Path, level, save: Path | None = None) -> ort.InferenceSession:
    """A session with ``collect``'s options (``calib.stats._options``), saving its optimized
    graph to ``save`` when given."""
    opts = S._options(level)
    if save is not None:
        opts.optimized_model_filepath = str(save)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    path = zoo.build("resnet50")
    tmp = Path(tempfile.mkdtemp(prefix="idap-nchwc-"))
    with load_offloaded(path) as light:
        graph = analyze_model(light, {"input": [1, 3, 224, 224]})
        plan = S.plan_probes(graph, find_blocks(graph.model, graph.index), scores=("idap",))
        # collect-ext: the row-wise probes ``collect`` used before pooling (commit 7f2ef15)
        nodes, inits, names = S.augment(light, dataclasses.replace(plan, pooled=False))
        aug = write_variant(light, tmp / "aug.onnx", nodes=nodes, initializers=inits,
                            outputs=names)
        gnodes, gout = _gap_probes(plan)
        gpath = write_variant(light, tmp / "gap.onnx",
                              nodes=S._interleave(light.graph, gnodes, set()), outputs=gout)
        model_outputs = [o.name for o in light.graph.output]

    def feeds():
        for s in range(0, args.samples, 8):
            rng = np.random.default_rng([0, s])
            yield {"input": rng.standard_normal((8, 3, 224, 224)).astype(np.float32)}

    best: dict[str, tuple[float, float]] = {}
    sums: dict[str, dict[str, np.ndarray]] = {}
    for _ in range(args.repeat):
        for mode in MODES:
            t0 = time.perf_counter()
            if mode == "plain-all":
                opts = ort.SessionOptions()
                opts.log_severity_level = 3
                sess, outs = ort.InferenceSession(str(path), opts), None
            elif mode == "collect-ext":
                sess, outs = _session(aug, LEVEL.ORT_ENABLE_EXTENDED), names
            elif mode == "gap-all":
                sess, outs = _session(gpath, LEVEL.ORT_ENABLE_ALL), gout
            else:
                del_me = _session(gpath, LEVEL.ORT_ENABLE_ALL, save=tmp / "opt.onnx")
                del del_me
                ordered, _ = S._reordered(tmp / "opt.onnx", model_outputs)
                sess, outs = _session(ordered, LEVEL.ORT_DISABLE_ALL), gout
            t1 = time.perf_counter()
            acc: dict[str, np.ndarray] = {}
            for feed in feeds():
                values = sess.run(outs, feed)
                for name, v in zip(outs or [], values, strict=False):
                    v = np.asarray(v, np.float64)
                    v = v.sum(0).ravel() if name.startswith("g::") else v.ravel()
                    acc[name] = acc.get(name, 0) + v
            t2 = time.perf_counter()
            del sess
            sums[mode] = acc
            old = best.get(mode)
            if old is None or t1 - t0 + t2 - t1 < sum(old):
                best[mode] = (t1 - t0, t2 - t1)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
            print(f"{mode}: session {t1 - t0:.2f} s, loop {t2 - t1:.2f} s, "
                  f"process peak so far {rss} MiB", file=sys.stderr, flush=True)
    worst = 0.0
    for t, p in plan.channels.items():
        if p.rank != 4:
            continue
        hw = p.shape[2] * p.shape[3]
        for key in ("sum", "sumsq"):
            a = sums["gap-saved"][f"g::{key}::{t}"] * hw
            b = sums["collect-ext"][f"idap::{key}::{t}"]
            worst = max(worst, float(np.max(np.abs(a - b)) / np.max(np.abs(b))))
    plain = sum(best["plain-all"])
    print(f"Machine: {line()}; ResNet-50, N = {args.samples}, best of {args.repeat}.\n")
    print("| mode | session s | loop s | total s | total vs plain-all | loop vs plain-all loop |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        s, loop = best[mode]
        print(f"| {mode} | {s:.2f} | {loop:.2f} | {s + loop:.2f} | {(s + loop) / plain:.2f} | "
              f"{loop / best['plain-all'][1]:.2f} |")
    print(f"\nchannel sums, gap-saved vs collect-ext: largest relative difference {worst:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
