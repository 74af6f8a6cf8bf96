"""The peers side by side at matched MACs (issue 18), in one command.

For each case (``tools/bench_quality.make_task``: the digits CNN, the depthwise/SE CNN on
MNIST, MiniLM) and each MACs target (kept fractions, default 0.5 and 0.3: 50 % and 70 %
removed), every method compresses the same model with the same calibration batches (and, with
``--finetune EPOCHS``, each compressed CNN is then fine-tuned the same way: ``finetuned``):

* ``idap-onnx``: ``optimize`` with its defaults (``idap`` score, mean compensation, the
  least-squares refit, ``--round-to auto``) at ``target_flops``, stage 1, with a budget only
  the MACs target can stop (matched MACs is the question; the budget is measured in
  BENCHMARKS' other sections);
* ``onnxsim-magnitude`` / ``onnxsim-wanda``: onnxsim 0.8's ``apply_structured_pruning`` (L2
  weight norm) and ``apply_structured_wanda_pruning`` (weight norm x activation norm on the
  calibration batches), both with ``global_sparsity=True``; their ``sparsity`` is bisected
  until the MACs (``idap_onnx.accounting``, the count ``optimize`` uses) land at or below the
  target; where even ``sparsity`` 0.95 does not reach it, the row gives the MACs reached;
* ``onnxsim-blocks`` (MiniLM): ``apply_transformer_block_pruning``, the fewest dropped
  sub-blocks that reach the target (or all it will drop);
* ``torch-pruning`` (digits, mnist_se: the cases with a torch twin): ``MetaPruner`` with
  ``GroupMagnitudeImportance(p=2)``, global, the classifier ignored, ``round_to=8``, its
  ratio bisected onto the target up to 0.85 (``tools/peer_torch_pruning.py``).

Per cell: validation and test metric (top-1 for the CNNs, cosine to the original's
embeddings for MiniLM), MACs and params kept, ONNX Runtime CPU latency at batch 1 and 8 (all
models of a case and target timed in turns in one call, speed-up against the original), the
compression's own wall time and its peak memory. The timed compression runs in a fresh
process at the parameter the bisection found (``--one``): wall time is that call alone,
memory is the process's peak RSS during the call (``VmHWM``, reset just before it) above its
RSS before it.

Usage::

    pip install -e ".[bench]"          # onnxsim 0.8 (torch-pruning comes with .[dev])
    python tools/bench_peers.py
    python tools/bench_peers.py --cases digits --targets 0.5 --plot docs/peers_digits.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CASES = ("digits", "mnist_se", "minilm", "resnet50", "mobilenet_v2")
#: The zoo's torchvision nets (random weights, no task data): MACs and latency only, the
#: output's relative error on generated images in the metric columns.
LATENCY_CASES = ("resnet50", "mobilenet_v2")
#: Cases whose models ``--finetune`` trains (MiniLM's round trip takes ~800 s a model on this
#: machine, BENCHMARKS "Fine-tuning recovery": ten of them would take over two hours).
FT_CASES = ("digits", "mnist_se")
METHODS = ("idap-onnx", "onnxsim-magnitude", "onnxsim-wanda", "onnxsim-blocks", "torch-pruning")
TWINS = ("digits", "mnist_se", *LATENCY_CASES)  # cases with a torch module for Torch-Pruning
LOOSE = 1e9  # a budget only the MACs target stops


def task_of(case: str):
    from tools import bench_quality as bq

    if case in LATENCY_CASES:
        return latency_task(case)
    return bq.make_task(case, 16 if case != "minilm" else 8)


def latency_task(case: str):
    """The zoo's torchvision net (its seeded random weights) exported at 224 x 224 by the
    exporter the Torch-Pruning rows use, with generated N(0, 1) images (32 calibration, 16
    validation, 16 test, seeded): what each method's widths cost in latency at matched MACs."""
    import numpy as np

    from tools import bench_quality as bq
    from tools import peer_torch_pruning as tpp

    rng = np.random.default_rng(0)

    def images(n: int):
        return bq._batches({"input": rng.standard_normal((n, 3, 224, 224), np.float32)}, 8)

    model = tpp._export(_twin(case)[0], (3, 224, 224), "input")
    return bq.Task(case, model, images(32), images(16), images(16), "rel-l2",
                   shapes={"input": [1, 3, 224, 224]},
                   data="generated N(0,1) images; the zoo's random weights")


def applies(method: str, case: str) -> bool:
    if method == "torch-pruning":
        return case in TWINS
    if method == "onnxsim-blocks":
        return case == "minilm"
    return True


# --------------------------------------------------------------------------- one compression


def compress(method: str, task, target: float, param: float | None):
    """The compressed ONNX model; ``param`` is the method's knob (sparsity, ratio, blocks)."""
    if method == "idap-onnx":
        from idap_onnx.optimize import OptimizeConfig, optimize

        val_ev, _ = task.evaluators()
        config = OptimizeConfig(target_flops=target, max_drop=LOOSE, metric=task.metric,
                                stages=(1,))
        return optimize(task.model, task.calib, val_ev, config, input_shapes=task.shapes).model
    if method.startswith("onnxsim-"):
        import onnxsim.pruning as osp

        if method == "onnxsim-magnitude":
            return osp.apply_structured_pruning(task.model, sparsity=param, global_sparsity=True)
        if method == "onnxsim-wanda":
            return osp.apply_structured_wanda_pruning(
                task.model, calibration_data=task.calib, sparsity=param, global_sparsity=True,
                providers=["CPUExecutionProvider"])
        return osp.apply_transformer_block_pruning(
            task.model, calibration_data=task.calib, num_blocks_to_drop=int(param),
            providers=["CPUExecutionProvider"])
    from tools import peer_torch_pruning as tpp

    net, _ = _twin(task.name)
    name, dims = next(iter(task.shapes.items()))
    shape = tuple(dims[1:])
    return tpp._export(tpp.pruned(net, shape, param, round_to=8), shape, name)


_TWINS: dict = {}


def _twin(name: str):
    from tools import peer_torch_pruning as tpp

    if name not in _TWINS:
        if name in LATENCY_CASES:
            from tools import zoo

            _TWINS[name] = (zoo.torchvision_module(name), None)
        else:
            _TWINS[name] = tpp.twin(name)
    return _TWINS[name]


def macs_of(model, task) -> int:
    from idap_onnx.accounting import model_cost

    return model_cost(model, task.shapes).macs


def find_param(method: str, task, target: float, macs0: int, log) -> float | None:
    """The knob that lands the MACs at or below ``target`` (bisected); None for idap-onnx."""
    if method == "idap-onnx":
        return None
    if method == "onnxsim-blocks":
        import onnxsim.pruning as osp

        best = 0
        for n in range(1, 13):
            try:
                m = osp.apply_transformer_block_pruning(
                    task.model, calibration_data=task.calib, num_blocks_to_drop=n,
                    providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 (the peer declines: keep what it did)
                log(f"    onnxsim-blocks declines {n} blocks: {exc}")
                break
            macs = macs_of(m, task)
            best = n
            if macs <= target * macs0 or macs >= macs0:
                break
        return float(best)
    # Torch-Pruning with round_to=8 leaves a layer whole where its kept width would round to
    # 0, so its MACs rise again near ratio 1: its bisection stops at 0.85
    lo, hi = 0.0, 0.85 if method == "torch-pruning" else 0.95
    top = macs_of(compress(method, task, target, hi), task)
    if top > target * macs0:
        log(f"    {method}: knob {hi} keeps {top / macs0:.1%} of the MACs; "
            "the target is out of its reach")
        return hi
    for _ in range(12):
        mid = (lo + hi) / 2
        if macs_of(compress(method, task, target, mid), task) <= target * macs0:
            hi = mid
        else:
            lo = mid
    return hi


def one(method: str, case: str, target: float, param: float | None, out: Path) -> None:
    """``--one``: the timed compression in this fresh process; the model and the figures."""
    task = task_of(case)
    if method == "torch-pruning":
        _twin(case)  # the retraining of the twin is setup, not compression
    import importlib

    for module in {"idap-onnx": ("idap_onnx.optimize", "idap_onnx.calib.refit", "torch",
                                 "onnx_graphsurgeon"),
                   "torch-pruning": ("torch_pruning",)}.get(method, ("onnxsim.pruning",)):
        importlib.import_module(module)  # imports are setup too
    before = _reset_peak()
    t0 = time.perf_counter()
    model = compress(method, task, target, param)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    import onnx

    onnx.save(model, str(out))
    out.with_suffix(".json").write_text(json.dumps(
        {"seconds": seconds, "peak_mb": max(peak - before, 0) / 1024}))


def _status_kb(field: str) -> int:
    """A ``/proc/self/status`` figure in kB (Linux)."""
    for row in Path("/proc/self/status").read_text().splitlines():
        if row.startswith(field + ":"):
            return int(row.split()[1])
    raise SystemExit(f"/proc/self/status has no {field}: peak memory needs Linux")


def _reset_peak() -> int:
    """Reset this process's peak RSS (``VmHWM``; writing 5 to ``clear_refs``, Linux >= 4.0)
    and return its RSS now (kB): the call's peak is then ``VmHWM`` after it, less this."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def timed_in_child(method: str, case: str, target: float, param, tmp: Path):
    out = tmp / f"{case}.{method}.{target}.onnx"
    cmd = [sys.executable, __file__, "--one", method, case, str(target),
           "none" if param is None else repr(param), str(out)]
    subprocess.run(cmd, check=True)
    import onnx

    return onnx.load(str(out)), json.loads(out.with_suffix(".json").read_text())


def _samples(batches) -> list[dict]:
    return [{k: v[i] for k, v in b.items()} for b in batches
            for i in range(len(next(iter(b.values()))))]


def finetuned(model, task, epochs: int):
    """``model`` after the fine-tuning every method gets: ``idap_onnx.finetune`` distilling
    from the original on the calibration samples, ``epochs`` epochs, the best state on the
    validation part (top-1 with its labels); the model and the wall time."""
    from idap_onnx.finetune import FinetuneConfig, finetune

    result = finetune(model, task.model, _samples(task.calib), val=_samples(task.val),
                      val_labels=task.val_labels,
                      config=FinetuneConfig(epochs=epochs, device="cpu", seed=0))
    return result.model, result.seconds


# ------------------------------------------------------------------------------------ the table


def run_case(case: str, targets, methods, tmp: Path, log, epochs: int = 0) -> list[dict]:
    from idap_onnx.accounting import model_cost
    from idap_onnx.deploy.latency import example_feed, measure

    task = task_of(case)
    val_ev, test_ev = task.evaluators()
    cost0 = model_cost(task.model, task.shapes)
    rows = []
    for target in targets:
        models = {"original": task.model}
        cells = {}
        for method in methods:
            if not applies(method, case):
                continue
            log(f"{case} {target}: {method}")
            param = find_param(method, task, target, cost0.macs, log)
            model, figs = timed_in_child(method, case, target, param, tmp)
            models[method] = model
            cells[method] = {"param": param, **figs}
        lat = {b: measure(models, example_feed(task.test, b), rounds=5, per_round=10, warmup=3,
                          max_seconds=60) for b in (1, 8)}
        for name, model in models.items():
            cost = model_cost(model, task.shapes)
            row = {
                "case": case, "target": target, "method": name,
                "macs": cost.macs / cost0.macs, "params": cost.params / cost0.params,
                "val": val_ev.evaluate(model).metric, "test": test_ev.evaluate(model).metric,
                **{f"ms_b{b}": lat[b].timings[name].median_ms for b in lat},
                **{f"speedup_b{b}": lat[b].speedup[name] for b in lat},
                **cells.get(name, {}),
            }
            if epochs and case in FT_CASES and name != "original":
                tuned, row["ft_seconds"] = finetuned(model, task, epochs)
                row["val_ft"] = val_ev.evaluate(tuned).metric
                row["test_ft"] = test_ev.evaluate(tuned).metric
            rows.append(row)
            log(f"  {name}: MACs {row['macs']:.1%}, test {row['test']:.4f}"
                + (f" (fine-tuned {row['test_ft']:.4f})" if "test_ft" in row else "")
                + f", b1 {row['speedup_b1']:.2f}x")
    return rows


def render(rows: list[dict], metric_of: dict[str, str]) -> str:
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        ft = any("test_ft" in r for r in rows if r["case"] == case)
        out.append(f"\n{case} ({metric_of[case]}):\n")
        out.append("| MACs target | method | MACs kept | params kept | val | test | "
                   + ("test fine-tuned | " if ft else "")
                   + "batch 1 ms (speed-up) | batch 8 ms (speed-up) | compress s | peak MB "
                   "| knob |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if ft else ""))
        for r in rows:
            if r["case"] != case:
                continue
            knob = "" if r.get("param") is None else f"{r['param']:.4g}"
            tuned = (f"{r['test_ft']:.4f} | " if "test_ft" in r else "- | ") if ft else ""
            out.append(
                f"| {r['target']:.0%} | {r['method']} | {r['macs']:.1%} | {r['params']:.1%} | "
                f"{r['val']:.4f} | {r['test']:.4f} | {tuned}"
                f"{r['ms_b1']:.3f} ({r['speedup_b1']:.2f}x) | "
                f"{r['ms_b8']:.3f} ({r['speedup_b8']:.2f}x) | "
                + (f"{r['seconds']:.1f} | {r['peak_mb']:.0f} | {knob} |" if "seconds" in r
                   else "- | - | - |"))
        out += ["", *winners(rows, case)]
    return "\n".join(out)


#: How close to the target a method's MACs must land to compete in a cell (a point).
REACHED = 0.01


def winners(rows: list[dict], case: str) -> list[str]:
    """Per target, who leads among the methods that reached it (MACs kept at most the target
    plus :data:`REACHED`): the best test metric (fine-tuned too, where run) for the task
    cases; the fastest at batch 1 for the latency cases (their metric is only the output's
    drift on generated images). A method that missed the target is named as such."""
    lines = []
    for target in dict.fromkeys(r["target"] for r in rows if r["case"] == case):
        cell = [r for r in rows if r["case"] == case and r["target"] == target
                and r["method"] != "original"]
        reached = [r for r in cell if r["macs"] <= target + REACHED]
        missed = ", ".join(f"{r['method']} ({r['macs']:.1%})" for r in cell if r not in reached)
        keys = ([("speedup_b1", True, "batch-1 speed-up")] if case in LATENCY_CASES else
                [("test", True, "test"), ("test_ft", True, "test fine-tuned")])
        said = []
        for key, higher, name in keys:
            have = [r for r in reached if key in r]
            if have:
                best = (max if higher else min)(have, key=lambda r, k=key: r[k])
                said.append(f"{name}: **{best['method']}** ({best[key]:.4g})")
        lines.append(f"- {target:.0%} of the MACs: best {'; '.join(said) or 'none reached it'}"
                     + (f"; missed the target: {missed}" if missed else ""))
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """Test metric against MACs kept, one line per method, one panel per case (for the
    latency cases: batch-1 speed-up against MACs kept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(4.5 * len(cases), 3.6), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        key = "speedup_b1" if case in LATENCY_CASES else "test"
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "original"):
            pts = sorted((r["macs"], r[key]) for r in rows
                         if r["case"] == case and r["method"] == method)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method,
                        color=f"C{METHODS.index(method)}")
            tuned = sorted((r["macs"], r["test_ft"]) for r in rows if r["case"] == case
                           and r["method"] == method and "test_ft" in r)
            if tuned:
                ax.plot(*zip(*tuned, strict=True), marker="s", ls="--", lw=1,
                        label=f"{method}, fine-tuned", color=f"C{METHODS.index(method)}")
        orig = [r[key] for r in rows if r["case"] == case and r["method"] == "original"]
        ax.axhline(orig[0], color="grey", ls=":", label="original")
        ax.set(title=case, xlabel="MACs kept",
               ylabel="speed-up, batch 1" if key == "speedup_b1" else "test metric")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _metric_name(case: str) -> str:
    return ("cosine to the original" if case == "minilm" else
            "relative output error on generated images, random weights: for MACs and latency"
            if case in LATENCY_CASES else "top-1")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--one":
        _, method, case, target, param, out = argv
        one(method, case, float(target), None if param == "none" else float(param), Path(out))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3],
                    help="MACs kept (0.5: half removed)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--finetune", type=int, default=0, metavar="EPOCHS",
                    help="also fine-tune every compressed model of the CNN cases the same way "
                         f"({', '.join(FT_CASES)}; default 0: no fine-tuning)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--keep", metavar="JSON",
                    help="an earlier run's --json: its rows of the cases not run now join this "
                         "run's table, JSON and plot (a rerun of one case keeps the others)")
    ap.add_argument("--plot", help="write the metric-against-MACs plot here (PNG)")
    args = ap.parse_args(argv)

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    from tools.machine import line

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            rows += run_case(case, args.targets, args.methods, Path(tmp), log, args.finetune)
    if args.keep:
        kept = [r for r in json.loads(Path(args.keep).read_text()) if r["case"] not in args.cases]
        rows = sorted(kept + rows, key=lambda r: CASES.index(r["case"]))  # stable: order kept
    print(line())
    print(render(rows, {r["case"]: _metric_name(r["case"]) for r in rows}))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
