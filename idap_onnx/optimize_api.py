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
from idap_onnx.deploy.latency import LatencyUnavailable, backend_available, example_feed, measure
from idap_onnx.errors import UsageError
from idap_onnx.metrics import Evaluator, load_metric
from idap_onnx.model_io import load_model, normalized, save_model, write_text_atomic
from idap_onnx.optimize import OptimizeConfig, OptimizeResult, optimize
from idap_onnx.optimize_report import render_markdown, saved_per_mac_saved, write_plots
from idap_onnx.passes.prune_channels import prune_channels
from idap_onnx.passes.remove_blocks import remove_blocks
from idap_onnx.shapes import shapes_as_input


@dataclass(frozen=True)
class DataOptions:
    """How to read ``--calib`` data (see docs/DATA.md)."""

    image: ImageSpec | None = None
    tokenizer: str | None = None
    seq_len: int = 128
    num_random: int = 64
    #: full shapes (batch first) of inputs for ``"random"`` data; other dims from ``seq_len``
    input_shapes: Mapping[str, list[int]] | None = None
    #: warn that ``"random"`` data is synthetic (the CLI's one-liner says it in its own words)
    warn_random: bool = True


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
        normalized(model_or_path) if isinstance(model_or_path, onnx.ModelProto)
        else load_model(model_or_path)
    )
    ds = load_data(
        calib,
        model,
        image=data.image,
        tokenizer=data.tokenizer,
        seq_len=data.seq_len,
        num_random=data.num_random,
        seed=seed,
        input_shapes=data.input_shapes,
        warn_random=data.warn_random,
    )
    custom = callable(metric) or (isinstance(metric, str) and ":" in metric)
    if isinstance(labels, (str, os.PathLike)):
        labels = _read_labels(labels, custom=custom)
    if labels is not None and len(labels) != len(ds):
        raise DataError(
            f"labels have {len(labels)} entries but the data has {len(ds)} samples; give one "
            f"{'label' if custom else 'class index'} per sample, in order"
        )
    if val_fraction <= 0:
        raise UsageError("optimize needs a validation part for its budget: --val-fraction > 0")
    cal, val = split(ds, val_fraction, seed)
    require(cal, batch_size, "one batch", fix=f"--batch-size {len(cal)}")
    if metric == "auto":
        metric = "top1" if labels is not None else "rel-l2"
    elif isinstance(metric, str) and ":" in metric:
        metric = load_metric(metric)
    evaluator = Evaluator(
        model, list(batches(val, batch_size)), labels=_labels_for(labels, val), metric=metric
    )
    return Prepared(model, list(batches(cal, batch_size)), evaluator, ds.description)


def _read_labels(path, *, custom: bool = False) -> np.ndarray:
    """Class indices (int64, one per sample) from a .npy/.npz/.txt. With ``custom`` (a user
    metric reads them, ``--metric module:function``) any dtype and per-sample shape is kept
    (``[N, ...]``: rendered strings, boxes, regression targets), and a .txt gives one string
    per line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"labels file {path} does not exist")
    what = ("labels, one per sample" if custom else
            "class indices (labels of another kind need --metric MODULE:FUNCTION)")
    try:
        if path.suffix == ".npy":
            arr = np.load(path)
        elif path.suffix == ".npz":
            with np.load(path) as z:
                arr = z[next(iter(z.files))]
        elif custom:
            arr = np.array(path.read_text(encoding="utf-8").splitlines())
        else:
            arr = np.loadtxt(path, dtype=np.int64)
    except Exception as exc:  # numpy raises several types for bad files
        raise DataError(f"cannot read labels {path}: {exc}; give a .npy/.npz/.txt of {what}"
                        ) from exc
    arr = np.asarray(arr)
    if custom:
        if arr.ndim == 0:
            raise DataError(f"labels {path} hold one value; give {what}")
        return arr
    arr = arr.reshape(-1)
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"labels {path} hold {arr.dtype} values; give integer {what}")
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
    if config.latency in ("tensorrt", "trtexec"):  # fail before the run, not after it
        ok, why = backend_available(config.latency)
        if not ok:
            raise LatencyUnavailable(why)
    result = optimize(prep.model, prep.calib, prep.evaluator, config, progress=progress)
    if config.precision != "fp32":
        export_within_budget(prep, result, progress=progress)
    if config.latency != "off":
        models = {"original": prep.model, "optimized": result.model}
        if result.exported is not None:
            models["exported"] = result.exported
        result.latency = measure(
            models,
            example_feed(prep.calib, config.latency_batch),
            backend=config.latency,
            device=config.device,
            fp16=config.latency_fp16,
            progress=progress,
        ).to_dict()
        result.latency["slower_than_original"] = bool(
            result.latency["speedup"]["optimized"] < 1.0)
        ratio = saved_per_mac_saved(result.latency["speedup"]["optimized"],
                                    result.final["macs"] / result.original["macs"])
        result.latency["saved_per_mac_saved"] = None if ratio is None else round(ratio, 4)
    return result


def export_within_budget(
    prep: Prepared, result: OptimizeResult, *, progress: Callable[[str], None] | None = None
) -> None:
    """Judge the budget on the model at ``result.config.precision``: export the result, and
    while its export breaks the budget step back through the accepted models (then the
    original) to the last whose export holds it. Int8 ranges come from the first
    ``export.CALIB_SAMPLES`` calibration samples. Sets ``result.exported`` (None where no
    export holds, or where int8 kept fp32 because no int8 form paid) and ``result.export``;
    ``result.model``/``final``/``kept`` follow a step back. Int8 forms are chosen on the
    calibration part at ``config.latency_batch``."""
    from idap_onnx.accounting import model_cost
    from idap_onnx.deploy.export import CALIB_SAMPLES, convert
    from idap_onnx.deploy.latency import example_feed
    from idap_onnx.optimize import _budget, _kept_counts, _within

    say = progress or (lambda _line: None)
    config, ev = result.config, prep.evaluator
    budget = _budget(config, ev)
    target = "tensorrt" if config.latency in ("tensorrt", "trtexec") else "onnxruntime-cpu"
    feed = example_feed(prep.calib, config.latency_batch)
    calib = _first_samples(prep.calib, CALIB_SAMPLES)
    chain = [result.model, *[m for m in reversed(result.accepted) if m is not result.model]]
    if chain[-1] is not prep.model:
        chain.append(prep.model)
    tried, chosen = [], None
    for back, fp32 in enumerate(chain):
        conv = convert(fp32, config.precision, calib, target=target, feed=feed, progress=say)
        e = ev.evaluate(conv.model)
        ok, drop = _within(e, ev, budget)
        tried.append({"stepped_back": back, "applied": conv.applied, "metric": e.metric,
                      "error": e.rel_error, "drop": drop, "holds": ok})
        say(f"export {config.precision} ({conv.applied}) of the model {back} accepted step(s) "
            f"back: {ev.metric_name} {e.metric:.4f}, drop {drop:.4f} -> "
            f"{'holds the budget' if ok else 'breaks the budget'}")
        if ok:
            chosen = (back, fp32, conv, e, drop)
            break
    shapes = {k: [1, *v.shape[1:]] for k, v in prep.calib[0].items()}
    note = ""
    if chosen is None:
        note = (f"no {config.precision} export holds the budget, not even the original's; "
                "the fp32 result is the deliverable")
        result.export = {"precision": config.precision, "applied": None, "note": note,
                         "tried": tried, "stepped_back": 0}
        return
    back, fp32, conv, e, drop = chosen
    if back:
        cost = model_cost(fp32, shapes)
        f = ev.evaluate(fp32)
        result.model = shapes_as_input(fp32, prep.model)  # as optimize returns its result
        result.final = {"params": cost.params, "macs": cost.macs, "metric": f.metric,
                        "error": f.rel_error, "drop": ev.drop(f)}
        result.kept = _kept_counts(prep.model, fp32)
        result.removed_blocks = result.removed_blocks[: max(
            0, len(result.removed_blocks) - back)]
        note = f"stepped back {back} accepted step(s): the later ones' exports broke the budget"
    if conv.applied != config.precision:
        note = "; ".join(x for x in (note, conv.note) if x)
    result.exported = conv.model if conv.applied == config.precision else None
    o, fin = result.original, result.final
    result.export = {
        "precision": config.precision,
        "applied": conv.applied,
        "target": target,
        "path": None,
        "stepped_back": back,
        "tried": tried,
        "note": note,
        "kept_fp32": conv.kept_fp32,
        "int8": conv.int8.to_dict() if conv.int8 else None,
        "models": {
            "original": {"metric": o["metric"], "params": o["params"], "macs": o["macs"],
                         "bytes": prep.model.ByteSize()},
            "optimized": {"metric": fin["metric"], "params": fin["params"], "macs": fin["macs"],
                          "bytes": result.model.ByteSize()},
            "exported": {"metric": e.metric, "error": e.rel_error, "drop": drop,
                         "params": fin["params"], "macs": fin["macs"],
                         "bytes": conv.model.ByteSize()},
        },
    }


def _first_samples(batches: list[dict], n: int) -> list[dict]:
    """The first batches holding ``n`` samples (at least one batch)."""
    out, count = [], 0
    for b in batches:
        if out and count >= n:
            break
        out.append(b)
        count += len(next(iter(b.values())))
    return out


def write_outputs(
    result: OptimizeResult,
    output: str | os.PathLike,
    *,
    input_path=None,
    report_dir: str | os.PathLike | None = None,
    models: bool = True,
) -> dict[str, Path]:
    """Write the model and ``report.json`` atomically, then ``report.md``, the plots and the
    latency table where one was used; ``models=False`` writes the reports only."""
    output = Path(output)
    report_dir = Path(report_dir) if report_dir else output.parent
    report_dir.mkdir(parents=True, exist_ok=True)
    stem = output.stem
    paths = {}
    if models:
        paths["model"] = save_model(result.model, output, input_path=input_path)
    if models and result.exported is not None and result.export:
        exported = output.with_name(f"{stem}.{result.export['applied']}.onnx")
        paths["exported"] = save_model(result.exported, exported, input_path=input_path)
        result.export["path"] = str(exported)
    if result.table is not None and result.latency_plan and result.latency_plan["table"]:
        paths["latency_table"] = result.table.save(report_dir / f"{stem}.latency-table.json")
        result.latency_plan["table"]["path"] = str(paths["latency_table"])
    report = result.to_dict()
    paths["json"] = report_dir / f"{stem}.report.json"
    write_text_atomic(paths["json"], json.dumps(report, indent=2, sort_keys=True))
    plots = write_plots(report, report_dir, stem)
    paths["markdown"] = report_dir / f"{stem}.report.md"
    write_text_atomic(paths["markdown"], render_markdown(report, plots))
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
