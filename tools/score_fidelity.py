"""How well a unit score predicts what removing that unit alone does to the model's output.

For each trained digits CNN (``tools/digits.py``, ``--model-seeds``), every prunable unit is
removed alone, with mean compensation (``passes.compensate.prune_with_compensation``), and the
relative output error ``||N0(x) - N(x)|| / ||N0(x)||`` on the validation images is measured
with ONNX Runtime. Each score (``--scores``) is then judged by the Spearman rank correlation
between its values and those errors, over all units of all groups (the global ranking stage 1
uses), and by how many of the ``--lowest`` units it ranks lowest are among the same number of
units that actually cost least. A score that ranks units by the damage their removal does
scores 1 and ``--lowest`` of ``--lowest``. A last table gives, per channel group, the
median over its units of error / ``idap`` score: where it differs between groups, the global
ranking rates one group's units cheaper than their damage next to another's.

Usage::

    python tools/score_fidelity.py --model-seeds 0 5 8
    python tools/score_fidelity.py --model-seeds 0 1 2 3 4 5 6 7 8 9 --json /tmp/fidelity.json

Removal of one unit changes little, so this measures the first-order regime the scores are
built for; it says nothing of what many removals together do (``tools/bench_quality.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SCORES = ("idap", "paper", "wanda", "l1")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(np.float64)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def fidelity(model_seed: int, scores, lowest: int, batch: int = 64, log=print) -> dict:
    """The single-unit errors and each score's agreement with them for one digits CNN; and,
    per group, the median of error / ``idap`` score (damage per unit of score: equal across
    groups when the score ranks them alike)."""
    from idap_onnx.calib.scores import unit_scores
    from idap_onnx.calib.stats import collect, plan_probes
    from idap_onnx.dependency import analyze_model
    from idap_onnx.metrics import Evaluator
    from idap_onnx.passes.compensate import means_from_stats, prune_with_compensation
    from tools.bench_quality import digits_task, short_name

    task = digits_task(batch, model_seed)
    model, shapes = task.model, task.shapes
    graph = analyze_model(model, shapes)
    stats = collect(model, plan_probes(graph, scores=tuple(scores)), task.calib)
    means = means_from_stats(stats)
    evaluator = Evaluator(model, task.val, labels=task.val_labels, metric=task.metric)
    units, errors = [], []
    for g in graph.groups:
        if g.frozen:
            continue
        for u in range(g.size):
            pruned = prune_with_compensation(model, {g.id: [u]}, means, input_shapes=shapes)
            errors.append(evaluator.evaluate(pruned).rel_error)
            units.append((g.id, u))
    errors = np.asarray(errors)
    cheapest = set(np.argsort(errors, kind="stable")[:lowest].tolist())
    out = {"model_seed": model_seed, "units": len(units), "scores": {}, "idap_ratio": {}}
    for kind in scores:
        per_group = unit_scores(graph, stats, kind, mean_compensation=True)
        values = np.asarray([per_group[gid][u] for gid, u in units])
        picked = set(np.argsort(values, kind="stable")[:lowest].tolist())
        out["scores"][kind] = {
            "spearman": _spearman(values, errors),
            "lowest_overlap": len(picked & cheapest),
        }
        log(f"model seed {model_seed} {kind}: spearman {out['scores'][kind]['spearman']:.3f}, "
            f"{len(picked & cheapest)} of the {lowest} cheapest")
        if kind == "idap":
            gids = np.asarray([gid for gid, _ in units])
            for g in graph.groups:
                sel = (gids == g.id) & (values > 0)
                if sel.any():
                    label = " + ".join(sorted(short_name(p) for p in g.producers))
                    out["idap_ratio"][label] = float(np.median(errors[sel] / values[sel]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--scores", nargs="+", default=list(SCORES), choices=SCORES)
    parser.add_argument("--lowest", type=int, default=40, help="units compared at the low end")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    rows = [fidelity(s, args.scores, args.lowest) for s in args.model_seeds]
    print()
    print(f"| score | Spearman (mean, min) | of the {args.lowest} cheapest units, "
          "found (mean) |")
    print("|---|---|---|")
    for kind in args.scores:
        rho = [r["scores"][kind]["spearman"] for r in rows]
        hit = [r["scores"][kind]["lowest_overlap"] for r in rows]
        print(f"| `{kind}` | {np.mean(rho):.3f} ({min(rho):.3f}) | {np.mean(hit):.1f} |")
    groups = list(dict.fromkeys(g for r in rows for g in r["idap_ratio"]))
    if groups:
        print()
        print("| group (producers) | error / `idap` score, median over units (mean, range "
              "over models) |")
        print("|---|---|")
        for g in groups:
            vals = [r["idap_ratio"][g] for r in rows if g in r["idap_ratio"]]
            print(f"| {g} | {np.mean(vals):.3f} ({min(vals):.3f}-{max(vals):.3f}) |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
