"""Precision export measured: fp32 against int8, original against pruned, on ONNX Runtime CPU.

Table 1 (``--models``), per model and batch size (``--batches``): the original fp32, the
pruned fp32, the pruned int8 and the original int8, timed in turns in ONE
``deploy.latency.measure`` call per batch (ONNX Runtime's CPU provider, default
optimizations). Each int8 model is ``deploy.int8.quantize_int8`` at that batch: the form
(QOperator or QDQ, U8S8) and the op classes left fp32 are chosen by timing on this machine,
and where no int8 form beat its fp32 source the int8 row *is* the fp32 model (``applied``
says fp32). Models:

- ``digits``: the quick start's model (``tools/digits.py``, real handwritten digits) and its
  ``optimize --max-drop 1 --target-flops 0.5 --round-to 8`` result; metric: test top-1 (%).
- ``resnet50``, ``mobilenet_v2``: ``tools/zoo.py`` (torchvision, random weights; 224x224 and
  96x96 inputs); pruned by ``idap_onnx.api.prune`` at ``--ratio`` (l1, ``round_to=16``), not by
  ``optimize`` (random weights have no accuracy to keep); metric: relative output error
  against the original fp32 on 8 N(0, 1) samples (not an accuracy).
- ``minilm``: all-MiniLM-L6-v2 (``tools/minilm.py``, real sentences) and its ``optimize
  --metric cosine --target-flops 0.5`` result (stage 1, a budget that does not bind); metric:
  mean cosine to the original's embeddings on the 256 test sentences.

Table 2 (``--zoo``): fp16 (``deploy.fp16.to_fp16``) and two pinned int8 forms (U8S8 QDQ for
ONNX Runtime CPU, symmetric S8S8 QDQ for TensorRT, all Conv/Gemm/MatMul) over the light zoo:
whether each converts and runs in ONNX Runtime with fp32 inputs and outputs (or the reason it
was declined), and its max relative output error against fp32 on 4 held-out samples.

Usage::

    python tools/bench_precision.py                      # both tables, batches 1 and 8
    python tools/bench_precision.py --models digits --batches 1 8 64 --no-zoo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zoo  # noqa: E402
from machine import line  # noqa: E402

from idap_onnx.accounting import model_cost  # noqa: E402
from idap_onnx.deploy.export import verify  # noqa: E402
from idap_onnx.deploy.int8 import Int8Form, quantize_int8  # noqa: E402
from idap_onnx.deploy.latency import measure  # noqa: E402
from idap_onnx.model_io import load_model  # noqa: E402

MODELS = ("digits", "resnet50", "mobilenet_v2", "minilm")


def _run(model: onnx.ModelProto, feeds: list[dict]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [s.run(None, f)[0] for f in feeds]


def _batched(x: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(x.values())))
    return [{k: v[i : i + size] for k, v in x.items()} for i in range(0, n - size + 1, size)]


class Task:
    """One model: original and pruned fp32, calibration batches, timing samples, a metric."""

    def __init__(self, name: str, ratio: float) -> None:
        self.name = name
        getattr(self, f"_{name}")(ratio)

    def _digits(self, _ratio: float) -> None:
        import digits

        from idap_onnx.optimize import OptimizeConfig
        from idap_onnx.optimize_api import run_optimize

        a = digits.build()
        folder = a.model_path.parent
        self.original = load_model(a.model_path)
        cfg = OptimizeConfig(max_drop=1.0, target_flops=0.5, round_to=8, latency="off")
        self.pruned = run_optimize(a.model_path, folder / "x_train.npz", cfg,
                                   labels=folder / "labels_train.npy", val_fraction=0.3).model
        x_train = np.load(folder / "x_train.npz")["x"]
        self.calib = _batched({"x": x_train[:64]}, 8)
        self.samples = {"x": x_train[64:128]}
        x_test = np.load(folder / "x_test.npz")["x"]
        y_test = np.load(folder / "labels_test.npy")
        self.metric_name = "test top-1 %"
        self.metric = lambda m: float(
            100 * (np.concatenate(_run(m, _batched({"x": x_test}, 40))).argmax(1)
                   == y_test[: len(x_test) // 40 * 40]).mean())
        self.pruned_by = "optimize --max-drop 1 --target-flops 0.5 --round-to 8"

    def _zoo(self, name: str, ratio: float) -> None:
        from idap_onnx.api import prune

        path = zoo.build(name)
        self.original = load_model(path)
        self.pruned, _ = prune(self.original, ratio, score="l1", round_to=16, verify=False)
        shape = zoo.ZOO[name].input_shapes["input"]
        rng = np.random.default_rng(0)
        x = rng.standard_normal((80, *shape[1:])).astype(np.float32)
        batch = shape[0] if isinstance(shape[0], int) else 8
        self.calib = _batched({"input": x[:16]}, batch)
        self.samples = {"input": x[16:80]}
        check = _batched({"input": x[16:24]}, batch)
        ref = np.concatenate(_run(self.original, check))
        self.metric_name = "rel. error vs original fp32"
        self.metric = lambda m: float(
            np.linalg.norm(np.concatenate(_run(m, check)) - ref) / np.linalg.norm(ref))
        self.pruned_by = f"api.prune ratio {ratio}, l1, round_to 16"

    def _resnet50(self, ratio: float) -> None:
        self._zoo("resnet50", ratio)

    def _mobilenet_v2(self, ratio: float) -> None:
        self._zoo("mobilenet_v2", ratio)

    def _minilm(self, _ratio: float) -> None:
        import minilm

        from idap_onnx.optimize import OptimizeConfig
        from idap_onnx.optimize_api import run_optimize

        a = minilm.build()
        self.original = load_model(a.model_path)
        cfg = OptimizeConfig(metric="cosine", max_drop=100.0, target_flops=0.5, stages=(1,),
                             latency="off")
        self.pruned = run_optimize(a.model_path, a.calib_npz, cfg, val_fraction=0.2).model
        calib, test = a.load("calib"), a.load("test")
        self.calib = _batched({k: v[:64] for k, v in calib.items()}, 8)
        self.samples = {k: v[64:128] for k, v in calib.items()}
        tests = _batched(test, 32)
        ref = np.concatenate(_run(self.original, tests))
        self.metric_name = "test cosine to original"
        self.metric = lambda m: float(minilm.cosines(np.concatenate(_run(m, tests)), ref).mean())
        self.pruned_by = "optimize --metric cosine --target-flops 0.5 --stages 1 (refit on)"


def table1(task: Task, batches: list[int], log) -> list[dict]:
    """Rows of table 1 for one model: four models per batch, timed in one measure call."""
    shapes = {k: [1, *v.shape[1:]] for k, v in task.calib[0].items()}
    cost = {"original": model_cost(task.original, shapes), "pruned": model_cost(task.pruned,
                                                                                 shapes)}
    rows = []
    for b in batches:
        feed = {k: v[:b] for k, v in task.samples.items()}
        t0 = time.perf_counter()
        q = {src: quantize_int8(m, task.calib, feed=feed)
             for src, m in (("pruned", task.pruned), ("original", task.original))}
        log(f"{task.name} batch {b}: int8 searches {time.perf_counter() - t0:.1f} s")
        models = {"original fp32": task.original, "pruned fp32": task.pruned,
                  "pruned int8": q["pruned"].model, "original int8": q["original"].model}
        rep = measure(models, feed, device="cpu", rounds=5, per_round=10, max_seconds=60)
        for label, m in models.items():
            src, prec = label.split()
            res = q[src] if prec == "int8" else None
            t = rep.timings[label]
            fp32_label = f"{src} fp32"
            rows.append({
                "model": task.name, "batch": b, "row": label,
                "applied": "fp32" if res is None or res.form is None else "int8",
                "form": "-" if res is None else (
                    res.form.label() if res.form else "no int8 form ran faster: fp32 kept"),
                "macs": cost[src].macs, "bytes": m.ByteSize(),
                "metric": task.metric(m), "median_ms": t.median_ms, "p10_ms": t.p10_ms,
                "p90_ms": t.p90_ms, "speedup": rep.speedup[label],
                "vs_fp32_source": round(rep.timings[fp32_label].median_ms / t.median_ms, 3),
            })
        log(f"{task.name} batch {b}: " + ", ".join(
            f"{r['row']} {r['median_ms']:.3f} ms" for r in rows[-4:]))
    return rows


def table2(names: list[str], log) -> list[dict]:
    """fp16 and two int8 forms per light-zoo model: converts and runs, or declined, and the
    max relative error against fp32 on 4 held-out samples."""
    from idap_onnx.deploy.fp16 import to_fp16

    rows = []
    for name in names:
        model = load_model(zoo.build(name))
        calib = [zoo.make_inputs(name, seed=s) for s in range(8)]
        held = [zoo.make_inputs(name, seed=100 + s) for s in range(4)]
        row = {"model": name}
        convs = {
            "fp16": lambda m, c: to_fp16(m, c).model,
            "int8 U8S8 QDQ (ORT CPU)": lambda m, c: quantize_int8(
                m, c, form=Int8Form("onnxruntime-cpu", "QDQ")).model,
            "int8 S8S8 QDQ (TensorRT)": lambda m, c: quantize_int8(
                m, c, target="tensorrt", form=Int8Form("tensorrt", "QDQ")).model,
        }
        for col, conv in convs.items():
            try:
                out = conv(model, calib)
                io_ok = _fp32_io(model, out)
                err, _ = verify(model, out, held)
                row[col] = f"{err:.2g}" + ("" if io_ok else " (I/O types changed)")
            except Exception as exc:  # a decline: the reason, in one line
                row[col] = f"declined: {type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
        log(f"zoo {name}: {row}")
        rows.append(row)
    return rows


def _fp32_io(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    def types(m):
        return [v.type.tensor_type.elem_type for v in (*m.graph.input, *m.graph.output)]

    return types(a) == types(b)


def _md1(rows: list[dict], metric_names: dict[str, str]) -> str:
    out = ["| model | batch | row | applied (int8 form) | MACs | MB | metric | median ms "
           "(p10-p90) | speed-up vs original fp32 | vs its fp32 source |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        applied = r["applied"] if r["form"] == "-" else f"{r['applied']} ({r['form']})"
        out.append(
            f"| {r['model']} | {r['batch']} | {r['row']} | {applied} | "
            f"{r['macs'] / 1e6:.1f} M | {r['bytes'] / 1e6:.2f} | "
            f"{r['metric']:.4f} ({metric_names[r['model']]}) | {r['median_ms']:.3f} "
            f"({r['p10_ms']:.3f}-{r['p90_ms']:.3f}) | {r['speedup']:.2f}x | "
            f"{r['vs_fp32_source']:.2f}x |"
        )
    return "\n".join(out)


def _md2(rows: list[dict]) -> str:
    cols = [c for c in rows[0] if c != "model"] if rows else []
    out = ["| model | " + " | ".join(f"{c}: max rel. error" for c in cols) + " |",
           "|---" * (len(cols) + 1) + "|"]
    out += ["| " + " | ".join([r["model"], *(r[c] for c in cols)]) + " |" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--ratio", type=float, default=0.5, help="zoo models' prune ratio (0.5)")
    p.add_argument("--no-zoo", dest="zoo", action="store_false", help="skip table 2")
    p.add_argument("--json", type=Path, default=None, help="also write every row as JSON")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import onnxruntime

    started = time.perf_counter()
    rows, names = [], {}
    for name in args.models:
        task = Task(name, args.ratio)
        names[name] = task.metric_name
        log(f"{name}: pruned by {task.pruned_by}")
        rows += table1(task, args.batches, log)
        if args.json:  # kept as it goes: a later failure loses nothing measured
            args.json.write_text(json.dumps({"table1": rows}, indent=2))
    zoo_rows = table2(zoo.light_names(), log) if args.zoo else []
    print(f"Machine: {line(f'ONNX Runtime {onnxruntime.__version__}')}")
    print(f"Command: python tools/bench_precision.py {' '.join(argv or sys.argv[1:])}")
    print(f"Total time: {time.perf_counter() - started:.0f} s\n")
    if rows:
        print(_md1(rows, names) + "\n")
    if zoo_rows:
        print(_md2(zoo_rows))
    if args.json:
        args.json.write_text(json.dumps({"table1": rows, "table2": zoo_rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
