"""The least-squares refit's cost and gain: ``optimize`` with and without it, side by side.

For each model, two pairs of ``idap_onnx.optimize.optimize`` runs, in turns in one process
(the refit run right after the run without it, so both see the same machine state):

* **matched** (the time ratio): stage 1 only, a budget so loose that only the MACs target
  stops it, ``--target`` of the MACs kept; both runs take the same schedule, so their times
  compare the same work with and without the refit. Per-step seconds are reported too.
* **budget** (what a user gets): the default stages and ``max_drop`` points of top-1 (models
  with labels) or ``max_error`` relative output error (others), the same MACs target.

torch is imported before the first run (as the CLI's first refit does: about 2 s once per
process, left out of the ratio); ``--repeats N`` runs each matched pair N times in turns
and gives the medians (these machines are noisy).

Each row: MACs kept, validation and test metric, relative output error on test, steps
evaluated and accepted, seconds. Models: ``digits`` (``tools/digits.py``), ``mnist_se``
(``tools/mnist_se.py``: depthwise, squeeze-excitation, residual) and ``minilm``
(``tools/minilm.py``, all-MiniLM-L6-v2, cosine to the original's embeddings).

Usage::

    python tools/bench_refit.py                       # all three models, markdown to stdout
    python tools/bench_refit.py --models digits --json runs.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.bench_quality import LOOSE, digits_task, minilm_task, mnist_se_task  # noqa: E402

MODELS = ("digits", "mnist_se", "minilm")
P0 = {"digits": 0.05, "mnist_se": 0.05, "minilm": 0.1}


def task_for(name: str, batch: int):
    if name == "digits":
        return digits_task(batch)
    if name == "mnist_se":
        return mnist_se_task(batch)
    return minilm_task(batch, 128, 256, 256)


def run(task, mode: str, refit: bool, target: float, max_drop: float, max_error: float,
        log) -> dict:
    """One optimize run; its row."""
    from idap_onnx.optimize import OptimizeConfig, optimize

    val_ev, test_ev = task.evaluators()
    labelled = task.val_labels is not None
    budget = {"max_drop": LOOSE} if mode == "matched" else (
        {"max_drop": max_drop} if labelled else {"max_error": max_error})
    config = OptimizeConfig(target_flops=target, metric=task.metric, p0=P0[task.name],
                            stages=(1,) if mode == "matched" else (1, 2), refit=refit,
                            latency="off", **budget)
    t0 = time.perf_counter()
    result = optimize(task.model, task.calib, val_ev, config, input_shapes=task.shapes,
                      progress=lambda line: log(f"    {line}"))
    seconds = time.perf_counter() - t0
    test = test_ev.evaluate(result.model)
    stage1 = [s for s in result.steps if s.stage == 1]
    return {
        "model": task.name, "mode": mode, "refit": refit, "target": target,
        "budget": budget, "kept": result.final["macs"] / result.original["macs"],
        "val": result.final["metric"], "val0": result.original["metric"], "test": test.metric,
        "test_error": test.rel_error, "steps": len(result.steps),
        "accepted": sum(s.accepted for s in result.steps), "seconds": seconds,
        "step_seconds": sum(s.seconds for s in stage1) / max(1, len(stage1)),
    }


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Machine: {meta['machine']}. Command: `{meta['command']}`.",
        "",
        "| model | run | refit | MACs kept | val | test | test rel. error | steps (accepted) "
        "| seconds (median of runs) | s / stage-1 step | time ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["mode"] == r["mode"]
                     and not b["refit"]), None)
        ratio = f"{r['seconds'] / base['seconds']:.2f}x" if r["refit"] and base else ""
        run_name = "matched, stage 1" if r["mode"] == "matched" else (
            "budget " + ", ".join(f"{k} {v:g}" for k, v in r["budget"].items()))
        lines.append(
            f"| {r['model']} | {run_name} | {'on' if r['refit'] else 'off'} | "
            f"{100 * r['kept']:.1f} % | {r['val']:.4f} | {r['test']:.4f} | "
            f"{r['test_error']:.4f} | {r['steps']} ({r['accepted']}) | {r['seconds']:.1f} "
            f"({', '.join(f'{v:.1f}' for v in r['repeats'])}) | "
            f"{r['step_seconds']:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--modes", nargs="+", default=["matched", "budget"],
                    choices=["matched", "budget"])
    ap.add_argument("--target", type=float, default=0.5, help="MACs kept (0.5)")
    ap.add_argument("--max-drop", type=float, default=1.0, help="budget, labelled models")
    ap.add_argument("--max-error", type=float, default=0.2, help="budget, the others")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each pair this many times in turns; the table gives medians")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    import torch  # noqa: F401  (imported once, as a CLI run would: about 2 s, outside the timing)

    rows = []
    for name in args.models:
        task = task_for(name, args.batch)
        for mode in args.modes:
            runs: dict[bool, list[dict]] = {False: [], True: []}
            for _ in range(args.repeats if mode == "matched" else 1):
                for refit in (False, True):
                    log(f"{name} {mode} refit={'on' if refit else 'off'}")
                    runs[refit].append(run(task, mode, refit, args.target, args.max_drop,
                                           args.max_error, log))
                    log(f"  {runs[refit][-1]['seconds']:.1f} s, kept "
                        f"{runs[refit][-1]['kept']:.3f}, test {runs[refit][-1]['test']:.4f}")
            for refit in (False, True):
                row = dict(runs[refit][0])
                row["seconds"] = float(np.median([r["seconds"] for r in runs[refit]]))
                row["step_seconds"] = float(np.median([r["step_seconds"] for r in runs[refit]]))
                row["repeats"] = [round(r["seconds"], 2) for r in runs[refit]]
                rows.append(row)
    import onnxruntime

    from tools.machine import line

    meta = {"machine": line(f"ONNX Runtime {onnxruntime.__version__}"),
            "command": "python tools/bench_refit.py " + " ".join(argv or sys.argv[1:])}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(render(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
