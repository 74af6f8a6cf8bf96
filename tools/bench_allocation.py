"""How much each layer gives (issue 19): idap with and without its coherence factor against
the baselines and Torch-Pruning, at matched MACs, stage 1 only, without and with the refit.

Every run is ``tools/bench_quality.run_variant`` (``optimize`` stage 1, the schedule
``p_t = p0 (1 + t/T)^alpha``, ``round_to=1``, ``max_group_ratio=0.9``, mean compensation on,
a budget only the MACs target stops), so the rows differ only in the unit score and in the
refit. Variants:

* ``idap``: the default score, with each consumer's coherence ``kappa_k`` (``calib.scores``);
* ``idap-additive``: the same without ``kappa_k`` (``--no-coherence``): the score before
  issue 19;
* ``l2``, ``paper``, ``wanda``, ``random`` (``--seeds``, averaged);
* ``idap-linear`` (rows of an earlier ``--json`` only, not runnable): every unit scaled by its
  consumer's ``kappa_k``, the first form measured and not kept;
* ``torch-pruning`` rows read from ``tools/peer_torch_pruning.py --json`` (``--peer-json``):
  Torch-Pruning's group magnitude on the torch twin, one shot, no refit.

Each row gives the MACs reached, validation and test metric, and ``idap``'s lead over the row
on test with the 95 % t-interval of the paired per-sample differences, and the kept widths.

Usage::

    python tools/bench_allocation.py --models digits mnist_se --json alloc.json
    python tools/bench_allocation.py --models minilm --targets 0.5 --json minilm.json
    python tools/bench_allocation.py --from-json alloc.json minilm.json --peer-json tp.json
    python tools/bench_allocation.py --coherence --models mnist_se   # kappa per consumer
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools import bench_quality as bq  # noqa: E402

VARIANTS = ("idap", "idap-additive", "l2", "paper", "wanda", "random")


def run_one(task, target, variant, seed, refit, evaluators, log, p0: float) -> dict:
    """One stage-1 run (``bench_quality.run_variant``, which knows ``idap-additive``)."""
    row = bq.run_variant(task, target, variant, True, seed, p0, evaluators, log, refit=refit)
    row.update(refit=refit)
    return row


def coherence_table(name: str, batch: int) -> str:
    """Diagnostic: per weighted consumer of the original model, kappa_k and the additive
    estimate ``sum_c e_kc / E||T_k||^2`` (mean compensation on), on the calibration data."""
    from idap_onnx.calib.scores import coherence
    from idap_onnx.calib.stats import collect, plan_probes
    from idap_onnx.dependency import analyze_model

    task = bq.make_task(name, batch)
    graph = analyze_model(task.model, task.shapes)
    stats = collect(task.model, plan_probes(graph, scores=("idap",)), task.calib)
    lines = [f"{name}: consumer | kappa | additive estimate of removing all its inputs",
             "|---|---|---|"]
    for node, (kappa, additive) in coherence(graph, stats).items():
        lines.append(f"| `{bq.short_name(node)}` ({node}) | {kappa:.2f} | {additive:.4f} |")
    return "\n".join(lines)


def _err(g: dict) -> str:
    value = g.get("val_error", float("nan"))
    return "" if value != value else f"{value:.3f}"  # NaN: a peer row, not measured


def summary(rows: list[dict]) -> list[str]:
    """One line per (model, target, refit): each variant's test metric x 100 (random: the
    mean of its seeds), a run that missed the MACs target in brackets."""
    order = ("idap", "idap-linear", *VARIANTS[1:], "torch-pruning")
    names = [v for v in order if any(r["score"] == v for r in rows)]
    lines = ["| model | MACs removed | refit | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    keys = dict.fromkeys((r["model"], r["target"], bool(r.get("refit"))) for r in rows)
    for model, target, refit in keys:
        cells = []
        for n in names:
            runs = [r for r in rows if (r["model"], r["target"], bool(r.get("refit")),
                                        r["score"]) == (model, target, refit, n)]
            if not runs:
                cells.append("")
                continue
            text = f"{100 * sum(r['test'] for r in runs) / len(runs):.2f}"
            cells.append(text if all(r["target_met"] for r in runs) else f"({text})")
        lines.append(f"| {model} | {100 * (1 - target):.0f} % | {'yes' if refit else 'no'} | "
                     + " | ".join(cells) + " |")
    return lines


def render(rows: list[dict], meta: dict) -> str:
    lines = summary(rows) + [""]
    for model in dict.fromkeys(r["model"] for r in rows):
        for refit in (False, True):
            for target in sorted({r["target"] for r in rows if r["model"] == model}, reverse=True):
                at = [r for r in rows if r["model"] == model and r["target"] == target
                      and bool(r.get("refit")) == refit]
                if not at:
                    continue
                group = bq._group(at)
                ref = next((g for g in group if g["score"] == "idap"), None)
                lines += [
                    f"#### {model}, {100 * (1 - target):.0f} % of MACs removed, "
                    f"{'with the refit' if refit else 'no refit'}",
                    "",
                    "| score | MACs % | val % | test % | val err | idap lead, test (95 % CI) |",
                    "|---|---|---|---|---|---|",
                ]
                for g in sorted(group, key=lambda g: -g["test"]):
                    lead = "" if ref is None or g is ref else bq._lead(ref, g)
                    if lead and not (ref["target_met"] and g["target_met"]):
                        lead += " (not matched)"
                    label = bq._label(g).replace("`idap`", "`idap` (coherence)")
                    lines.append(
                        f"| {label} | {100 * g['macs'] / g['macs0']:.1f}"
                        f"{'' if g['target_met'] else ' (missed)'} | "
                        f"{bq._fmt_metric(g['val'], g['val_range'], g['n'])} | "
                        f"{bq._fmt_metric(g['test'], g['test_range'], g['n'])} | "
                        f"{_err(g)} | {lead} |"
                    )
                lines += ["", "Kept widths (after/before):", ""]
                lines += [f"- `{g['score']}`: {g['kept']}" for g in group
                          if g["score"] in ("idap", "idap-linear", "idap-additive",
                                            "torch-pruning")]
                lines.append("")
    lines += [f"Commands: {'; '.join(f'`{c}`' for c in meta['commands'])}  ",
              f"Machine: {meta['machine']}; {meta['date']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits", "mnist_se", "minilm"],
                        choices=["digits", "mnist_se", "minilm"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.8, 0.5, 0.3],
                        help="kept MACs fractions without the refit")
    parser.add_argument("--refit-targets", nargs="*", type=float, default=[0.5, 0.3],
                        help="kept MACs fractions with the refit")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--refit-variants", nargs="*", default=["idap", "idap-additive", "l2",
                                                               "paper"], choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--p0", nargs="*", default=[], metavar="TARGET=P0",
                        help="first-step fraction per target, e.g. 0.3=0.3 (default: "
                        "bench_quality's per model, 0.05 for mnist_se)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--coherence", action="store_true",
                        help="diagnostic instead: print each consumer's kappa for --models")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--from-json", nargs="*", default=[], help="render these, run nothing")
    parser.add_argument("--peer-json", nargs="*", default=[],
                        help="tools/peer_torch_pruning.py --json files to add (no-refit tables)")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    if args.coherence:
        for name in args.models:
            print(coherence_table(name, args.batch) + "\n")
        return 0
    rows: list[dict] = []
    commands = []
    if args.from_json:
        for path in args.from_json:
            saved = json.loads(Path(path).read_text())
            rows += saved["rows"]
            commands += saved["meta"]["commands"]
        meta = {**saved["meta"], "commands": commands}
    else:
        m = bq.machine()
        meta = {"commands": ["python tools/bench_allocation.py "
                             + shlex.join(argv if argv is not None else sys.argv[1:])],
                "machine": f"{m['cpu']}, {m['cores']} cores, ONNX Runtime {m['onnxruntime']}",
                "date": time.strftime("%Y-%m-%d")}
        for name in args.models:
            task = bq.make_task(name, args.batch)
            evaluators = task.evaluators()
            plan = [(t, False, v) for t in args.targets for v in args.variants]
            plan += [(t, True, v) for t in args.refit_targets for v in args.refit_variants]
            for target, refit, variant in plan:
                for seed in args.seeds if variant == "random" else (0,):
                    log(f"{name} {target} refit={refit} {variant} seed={seed}")
                    p0 = dict(p.split("=") for p in args.p0).get(
                        f"{target:g}", bq.DEFAULT_P0.get(name, 0.05))
                    row = run_one(task, target, variant, seed, refit, evaluators,
                                  lambda _line: None, float(p0))
                    log(f"  -> MACs {row['macs'] / row['macs0']:.3f} test {row['test']:.4f} "
                        f"({row['seconds']:.0f} s)")
                    rows.append(row)
                    if args.json:
                        Path(args.json).write_text(json.dumps({"rows": rows, "meta": meta}))
    for path in args.peer_json:
        peer = json.loads(Path(path).read_text())
        ran = {(x["model"], x["target"]) for x in rows if not x.get("refit")}
        rows += [{**r, "refit": False, "val_error": float("nan"), "steps": 1,
                  "params": 0, "test_error": float("nan"), "target_met": True}
                 for r in peer["rows"] if (r["model"], r["target"]) in ran]
        meta["commands"].append(peer.get("command", f"python tools/peer_torch_pruning.py "
                                         f"--json {Path(path).name}"))
    print(render(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
