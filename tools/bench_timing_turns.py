"""Timing in turns: does a model measure the same beside other sessions as alone?

``latency.measure`` keeps one ONNX Runtime session per model and lets them take turns. With
ONNX Runtime's default thread-pool spinning, an idle session's workers go on spinning after
its run returns, on the same CPUs the next model is timed on. This tool times each model:

1. alone: one session (ONNX Runtime's defaults, spinning on), the only one in the process;
2. in turns, spinning on: the model four times over (four sessions), taking turns as
   ``measure`` does (``ROUNDS`` rounds of ``PER_ROUND`` runs each), the median of all runs;
3. in turns, spinning stopped when a run returns (``session.force_spinning_stop``, what
   ``measure`` sets since this finding).

Medians in ms; the ratio columns are against "alone". Each model's three figures come from
one call, one after the other; the whole is repeated ``--repeat`` times.

Usage::

    python tools/bench_timing_turns.py                       # resnet18, mobilenet_v2, minilm
    python tools/bench_timing_turns.py --models resnet50 --repeat 1
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_latency_table import feed_of, load_case  # noqa: E402
from machine import line  # noqa: E402

from idap_onnx.deploy.latency import SPIN_STOP  # noqa: E402

ROUNDS, PER_ROUND, WARMUP, COPIES = 7, 10, 3, 4


def _session(data: bytes, stop: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if stop:
        opts.add_session_config_entry(SPIN_STOP, "1")
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _runs(session: ort.InferenceSession, feed: dict, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        session.run(None, feed)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def alone(data: bytes, feed: dict) -> float:
    s = _session(data, stop=False)
    _runs(s, feed, WARMUP)
    ms = float(np.median(_runs(s, feed, ROUNDS * PER_ROUND)))
    del s
    gc.collect()
    return ms


def in_turns(data: bytes, feed: dict, stop: bool) -> float:
    sessions = [_session(data, stop) for _ in range(COPIES)]
    for s in sessions:
        _runs(s, feed, WARMUP)
    samples: list[float] = []
    for _ in range(ROUNDS):
        for s in sessions:
            samples += _runs(s, feed, PER_ROUND)
    del sessions
    gc.collect()
    return float(np.median(samples))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "minilm"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    print(line())
    print(f"ONNX Runtime {ort.__version__}, CPU provider, default threads, batch {args.batch}")
    print("| model | repeat | alone ms | in turns, spinning ms | ratio | in turns, "
          "spinning stopped ms | ratio |\n|---|---|---|---|---|---|---|")
    for name in args.models:
        model, batches = load_case(name)
        data, feed = model.SerializeToString(), feed_of(batches, args.batch)
        for r in range(args.repeat):
            a = alone(data, feed)
            spin = in_turns(data, feed, stop=False)
            stop = in_turns(data, feed, stop=True)
            print(f"| {name} | {r + 1} | {a:.3f} | {spin:.3f} | {spin / a:.2f} | {stop:.3f} | "
                  f"{stop / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
