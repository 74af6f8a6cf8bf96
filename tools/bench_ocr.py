"""The OCR case (issue 18): rapidocr's PP-OCRv4 recognizer and detector, each optimized with
``idap-onnx``'s defaults under a 1-point budget on the pipeline's own measure, then run inside
the real RapidOCR pipeline on test pages no step has seen.

Data and metrics are ``tools/ocr.py``'s (text rendered with PIL from disjoint string lists):

* recognizer: calibrated on the 256 ``calib`` lines, budget = character accuracy of its greedy
  CTC decoding on the 96 ``val`` lines (``ocr.rec_char_accuracy``, points);
* detector: calibrated on the ``calib`` pages, budget = its boxes scored against the
  original's on the ``val`` pages (``ocr.det_box_agreement``: hmean at IoU 0.5, points).

Each optimization is ``optimize`` with its defaults (both stages, ``idap`` score, refit,
``--round-to auto``) and ``max_drop`` (default 1 point), called through the Python API with
the metric function (``OptimizeConfig(metric=fn)``; the CLI takes the same functions as
``--metric tools/ocr.py:rec_char_accuracy``). Then, on the ``test`` split:

* each part alone: the recognizer's character accuracy on the test lines, the detector's box
  hmean against the original's on the test pages;
* the pipeline (detector, the original angle classifier, recognizer) with the original parts,
  each optimized part alone and both: character accuracy of the page text
  (``ocr.pipeline_accuracy``) and wall time per page, the pipelines run in turns;
* each part's ONNX Runtime CPU latency against its original, timed in turns
  (``latency.measure``): the detector on one page ``[1, 3, 736, 992]``, the recognizer on
  rapidocr's batch of 6 lines ``[6, 3, 48, 320]`` and on one line.

Usage::

    python tools/bench_ocr.py                          # both parts (~40 min on 2 cores)
    python tools/bench_ocr.py --parts rec --out-dir ocr_out --json ocr.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools import ocr  # noqa: E402

PARTS = ("rec", "det")
BATCH = {"rec": 16, "det": 4}


def part_data(part: str):
    """``(calib batches, val batches, val labels, metric, test batches, test labels)``."""
    if part == "rec":
        def lines(split):
            return ocr.rec_inputs(ocr.line_images(split)), np.array(ocr.strings()[split])
        (cx, _), (vx, vy), (tx, ty) = lines("calib"), lines("val"), lines("test")
        fn = ocr.rec_char_accuracy
    else:
        cx, vx, tx = (ocr.det_inputs(ocr.pages(s)[0]) for s in ("calib", "val", "test"))
        vy = ty = None
        fn = ocr.det_box_agreement
    bs = BATCH[part]

    def cut(x):
        return [{"x": x[i:i + bs]} for i in range(0, len(x), bs)]

    return cut(cx), cut(vx), vy, fn, cut(tx), ty


def optimize_part(part: str, max_drop: float, out_dir: Path, log, reuse: bool = False) -> dict:
    """Optimizes ``part``; writes ``out_dir/<part>.opt.onnx`` and its row
    (``<part>.row.json``) and returns the row. ``reuse``: a part already written there (at
    the same budget) is read back instead (its row keeps the optimization's own time)."""
    saved = out_dir / f"{part}.row.json"
    if reuse and saved.exists() and (out_dir / f"{part}.opt.onnx").exists():
        row = json.loads(saved.read_text())
        if row.get("max_drop") == max_drop:
            log(f"{part}: reusing {out_dir / f'{part}.opt.onnx'} ({row['seconds']:.0f} s then)")
            return row
    from idap_onnx.metrics import Evaluator
    from idap_onnx.model_io import load_model, save_model
    from idap_onnx.optimize import OptimizeConfig, optimize

    path = ocr.rapidocr_models()[part]
    model = load_model(path)
    calib, val, val_labels, fn, test, test_labels = part_data(part)
    evaluator = Evaluator(model, val, labels=val_labels, metric=fn)
    config = OptimizeConfig(max_drop=max_drop, metric=fn, latency="off")
    start = time.perf_counter()
    result = optimize(model, calib, evaluator, config, progress=lambda s: log(f"  {part}: {s}"))
    seconds = time.perf_counter() - start
    out = out_dir / f"{part}.opt.onnx"
    save_model(result.model, out)
    tester = Evaluator(model, test, labels=test_labels, metric=fn)
    row = {
        "part": part, "model": path.name, "out": str(out), "seconds": seconds,
        "macs": result.original["macs"],
        "macs_kept": result.final["macs"] / result.original["macs"],
        "params_kept": result.final["params"] / result.original["params"],
        "val": {"original": evaluator.original_metric, "optimized": result.final["metric"]},
        "test": {"original": tester.original_metric,
                 "optimized": tester.evaluate(result.model).metric},
        "stop": result.stop, "blocks": len(result.removed_blocks), "max_drop": max_drop,
    }
    saved.write_text(json.dumps(row, indent=1))
    log(f"{part}: MACs kept {row['macs_kept']:.1%} in {seconds:.0f} s, val "
        f"{row['val']['original']:.2f} -> {row['val']['optimized']:.2f}, test "
        f"{row['test']['original']:.2f} -> {row['test']['optimized']:.2f}")
    return row


def pipelines(opt: dict[str, Path], rounds: int, log) -> list[dict]:
    """Page character accuracy and wall time per page of the pipeline with the original
    parts, each optimized part alone, and all optimized parts; timed in turns."""
    images, texts = ocr.pages("test")
    configs = {"original": {}}
    for part, path in opt.items():
        configs[f"optimized {part}"] = {part: path}
    if len(opt) > 1:
        configs["optimized " + " + ".join(opt)] = dict(opt)
    runners = {name: ocr.pipeline(**kw) for name, kw in configs.items()}
    for r in runners.values():  # warm-up: sessions built, first-run allocations made
        r(images[0])
    accuracy = {name: ocr.pipeline_accuracy(r, images, texts) for name, r in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for img in images:
            for name, r in runners.items():
                t = time.perf_counter()
                r(img)
                times[name].append(time.perf_counter() - t)
    base = float(np.median(times["original"]))
    rows = []
    for name in runners:
        ms = 1000 * float(np.median(times[name]))
        rows.append({"pipeline": name, "char_accuracy": accuracy[name], "ms_per_page": ms,
                     "speedup": 1000 * base / ms})
        log(f"pipeline {name}: char accuracy {accuracy[name]:.2f}, {ms:.1f} ms/page")
    return rows


def latencies(opt: dict[str, Path], log) -> list[dict]:
    """Each part against its original, timed in turns, at the pipeline's shapes."""
    from idap_onnx.deploy.latency import measure

    feeds = {"det": [[1, 3, ocr.PAGE_H, ocr.PAGE_W]],
             "rec": [[6, 3, ocr.REC_H, ocr.REC_W], [1, 3, ocr.REC_H, ocr.REC_W]]}
    rng = np.random.default_rng(0)
    rows = []
    for part, path in opt.items():
        for shape in feeds[part]:
            feed = {"x": rng.uniform(-1, 1, shape).astype(np.float32)}
            rep = measure({"original": ocr.rapidocr_models()[part], "optimized": path}, feed)
            d = rep.to_dict()
            rows.append({"part": part, "shape": "x".join(map(str, shape)),
                         "original_ms": d["timings"]["original"]["median_ms"],
                         "optimized_ms": d["timings"]["optimized"]["median_ms"],
                         "speedup": d["speedup"]["optimized"]})
            log(f"latency {part} {rows[-1]['shape']}: {rows[-1]['original_ms']:.2f} -> "
                f"{rows[-1]['optimized_ms']:.2f} ms ({rows[-1]['speedup']:.2f}x)")
    return rows


def render(parts: list[dict], pipes: list[dict], lat: list[dict], max_drop: float) -> str:
    unit = {"rec": "char accuracy (lines)", "det": "box hmean (pages)"}
    out = ["| part | budget | MACs kept | params kept | measure | val original | val optimized "
           "| test original | test optimized | stages | time |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in parts:
        out.append(
            f"| {r['model']} | {max_drop:g} point | {r['macs_kept']:.1%} | {r['params_kept']:.1%} "
            f"| {unit[r['part']]} | {r['val']['original']:.2f} | {r['val']['optimized']:.2f} "
            f"| {r['test']['original']:.2f} | {r['test']['optimized']:.2f} "
            f"| {r['stop']}, {r['blocks']} blocks | {r['seconds']:.0f} s |")
    out += ["", "| pipeline (test pages) | char accuracy | ms / page | speed-up |",
            "|---|---|---|---|"]
    for r in pipes:
        out.append(f"| {r['pipeline']} | {r['char_accuracy']:.2f} | {r['ms_per_page']:.1f} "
                   f"| {r['speedup']:.2f}x |")
    out += ["", "| part | input | original ms | optimized ms | speed-up |", "|---|---|---|---|---|"]
    for r in lat:
        out.append(f"| {r['part']} | {r['shape']} | {r['original_ms']:.2f} "
                   f"| {r['optimized_ms']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--max-drop", type=float, default=1.0, help="budget in points (default 1)")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where the optimized models go (default: a temporary folder)")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds over the test pages")
    ap.add_argument("--reuse", action="store_true",
                    help="read back parts already optimized into --out-dir at this budget")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="idap-ocr-") as tmp:
        out_dir = args.out_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        parts = [optimize_part(p, args.max_drop, out_dir, log, args.reuse) for p in args.parts]
        opt = {r["part"]: Path(r["out"]) for r in parts}
        lat = latencies(opt, log)
        pipes = pipelines(opt, args.rounds, log)
    from tools.machine import line

    print(line())
    print(render(parts, pipes, lat, args.max_drop))
    if args.json:
        from idap_onnx.model_io import write_text_atomic

        write_text_atomic(args.json, json.dumps(
            {"parts": parts, "pipelines": pipes, "latency": lat}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
