"""``optimize`` as a function a pipeline calls: data in, smaller model and reports out.

``run_optimize`` loads the model and the data, splits the data into disjoint calibration and
validation parts (labels are split alike), builds the evaluator (the original model judged on
the validation part) and runs ``optimize.optimize``, then times the result against the original
(``latency.measure``). ``write_outputs`` writes the model and
``report.json`` atomically, then ``report.md`` and its plots. ``sensitivity`` is the
``--dry-run``: each group pruned 25/50/75 % alone and each block removed alone.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from idap_onnx.blocks import find_blocks
from idap_onnx.calib.data import DataError, ImageSpec, batches, load_data, require, split
from idap_onnx.calib.scores import unit_scores
from idap_onnx.calib.stats import collect, plan_probes
from idap_onnx.dependency import analyze_model
from idap_onnx.deploy.latency import LatencyUnavailable, example_feed, measure, tensorrt_available
from idap_onnx.errors import UsageError
from idap_onnx.metrics import Evaluator
from idap_onnx.model_io import load_model, save_model
from idap_onnx.optimize import OptimizeConfig, OptimizeResult, optimize
from idap_onnx.optimize_report import render_markdown, write_plots
from idap_onnx.passes.prune_channels import prune_channels
from idap_onnx.passes.remove_blocks import remove_blocks


@dataclass(frozen=True)
class DataOptions:
    """How to read ``--calib`` data (see docs/DATA.md)."""

    image: ImageSpec | None = None
    tokenizer: str | None = None
    seq_len: int = 128
    num_random: int = 64


@dataclass
class Prepared:
    """The model and its calibration/validation batches, ready for optimize or dry-run."""

    model: onnx.ModelProto
    calib: list[dict[str, np.ndarray]]
    evaluator: Evaluator
    description: str


def _labels_for(labels: np.ndarray | None, part) -> np.ndarray | None:
    if labels is None:
        return None
    return np.asarray(labels)[part.indices]


def prepare(
    model_or_path,
    calib,
    *,
    labels: np.ndarray | str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    metric: str | Callable = "auto",
    batch_size: int = 8,
    data: DataOptions | None = None,
    seed: int = 0,
) -> Prepared:
    """Load, split and batch; the evaluator judges on the validation part only."""
    data = data or DataOptions()
    model = (
        model_or_path if isinstance(model_or_path, onnx.ModelProto) else load_model(model_or_path)
    )
    ds = load_data(
        calib,
        model,
        image=data.image,
        tokenizer=data.tokenizer,
        seq_len=data.seq_len,
        num_random=data.num_random,
        seed=seed,
    )
    if isinstance(labels, (str, os.PathLike)):
        labels = _read_labels(labels)
    if labels is not None and len(labels) != len(ds):
        raise DataError(
            f"labels have {len(labels)} entries but the data has {len(ds)} "
            "samples; give one class index per sample, in order"
        )
    if val_fraction <= 0:
        raise UsageError("optimize needs a validation part for its budget: --val-fraction > 0")
    cal, val = split(ds, val_fraction, seed)
    require(cal, batch_size, "one batch", fix=f"--batch-size {len(cal)}")
    if metric == "auto":
        metric = "top1" if labels is not None else "rel-l2"
    evaluator = Evaluator(
        model, list(batches(val, batch_size)), labels=_labels_for(labels, val), metric=metric
    )
    return Prepared(model, list(batches(cal, batch_size)), evaluator, ds.description)


def _read_labels(path) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise DataError(f"labels file {path} does not exist")
    try:
        if path.suffix == ".npy":
            arr = np.load(path)
        elif path.suffix == ".npz":
            with np.load(path) as z:
                arr = z[next(iter(z.files))]
        else:
            arr = np.loadtxt(path, dtype=np.int64)
    except Exception as exc:  # numpy raises several types for bad files
        raise DataError(
            f"cannot read labels {path}: {exc}; give a .npy/.npz/.txt of class indices"
        ) from exc
    arr = np.asarray(arr).reshape(-1)
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"labels {path} hold {arr.dtype} values; give integer class indices")
    return arr.astype(np.int64)


def run_optimize(
    model_or_path,
    calib,
    config: OptimizeConfig | None = None,
    *,
    labels=None,
    val_fraction: float = 0.2,
    data: DataOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> OptimizeResult:
    """Prepare the data, run the two stages (``optimize.optimize``), then time the
    optimized model against the original side by side (``latency.measure``, on real input
    samples; ``config.latency = "off"`` skips it)."""
    config = config or OptimizeConfig()
    data = data or DataOptions()
    config.check()
    prep = prepare(
        model_or_path,
        calib,
        labels=labels,
        val_fraction=val_fraction,
        metric=config.metric,
        batch_size=config.batch_size,
        data=data,
        seed=config.seed,
    )
    if config.latency == "tensorrt":  # fail before the run, not after it
        ok, why = tensorrt_available()
        if not ok:
            raise LatencyUnavailable(why)
    result = optimize(prep.model, prep.calib, prep.evaluator, config, progress=progress)
    if config.latency != "off":
        result.latency = measure(
            {"original": prep.model, "optimized": result.model},
            example_feed(prep.calib, config.latency_batch),
            backend=config.latency,
            device=config.device,
            fp16=config.latency_fp16,
            progress=progress,
        ).to_dict()
    return result


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(
    result: OptimizeResult,
    output: str | os.PathLike,
    *,
    input_path=None,
    report_dir: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Write the model and ``report.json`` atomically, then ``report.md`` and the plots."""
    output = Path(output)
    report_dir = Path(report_dir) if report_dir else output.parent
    report_dir.mkdir(parents=True, exist_ok=True)
    stem = output.stem
    save_model(result.model, output, input_path=input_path)
    report = result.to_dict()
    paths = {"model": output, "json": report_dir / f"{stem}.report.json"}
    _atomic_text(paths["json"], json.dumps(report, indent=2, sort_keys=True))
    plots = write_plots(report, report_dir, stem)
    paths["markdown"] = report_dir / f"{stem}.report.md"
    _atomic_text(paths["markdown"], render_markdown(report, plots))
    paths.update({k: report_dir / v for k, v in plots.items()})
    return paths


def sensitivity(
    prep: Prepared,
    *,
    score: str = "idap",
    fractions=(0.25, 0.5, 0.75),
    input_shapes: Mapping[str, list[int]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """The dry-run report: per group, the metric/error after removing 25/50/75 % of its
    units (lowest score first) alone; per block, after removing it alone. No model written."""
    say = progress or (lambda _line: None)
    model = prep.model
    shapes = dict(input_shapes or {k: list(v.shape) for k, v in prep.calib[0].items()})
    graph = analyze_model(model, shapes)
    blocks = find_blocks(model, graph.index)
    stats = collect(model, plan_probes(graph, blocks, scores=(score,)), prep.calib)
    scores = unit_scores(graph, stats, score)
    ev = prep.evaluator
    groups = []
    for g in graph.groups:
        if g.frozen:
            continue
        row = {"group": g.id, "units": g.size, "producers": list(g.producers[:3]), "results": []}
        order = sorted(g.prunable_units, key=lambda u: (scores[g.id][u], u))
        for f in fractions:
            k = min(int(round(f * g.size)), len(order), g.size - 1)
            if k <= 0:
                continue
            e = ev.evaluate(prune_channels(model, {g.id: order[:k]}, graph=graph))
            row["results"].append(
                {
                    "fraction": f,
                    "removed": k,
                    "metric": e.metric,
                    "error": e.rel_error,
                    "drop": ev.drop(e),
                }
            )
        say(
            f"group {g.id}: "
            + ", ".join(f"{r['fraction']:.0%} -> {r['metric']:.4f}" for r in row["results"])
        )
        groups.append(row)
    block_rows = []
    for b in blocks:
        e = ev.evaluate(remove_blocks(model, [b.name], blocks=blocks))
        block_rows.append(
            {
                "block": b.name,
                "kind": b.kind,
                "metric": e.metric,
                "error": e.rel_error,
                "drop": ev.drop(e),
            }
        )
        say(f"block {b.name}: {e.metric:.4f}")
    return {
        "schema_version": 1,
        "command": "optimize --dry-run",
        "metric": ev.metric_name,
        "groups": groups,
        "blocks": block_rows,
    }
