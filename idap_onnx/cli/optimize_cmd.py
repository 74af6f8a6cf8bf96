"""``idap-onnx optimize``: flags (mirrored by ``--config idap.toml``) and the run.

Every flag is a field of ``idap_onnx.optimize.OptimizeConfig`` or a data option; a TOML
config file sets the same names (dashes or underscores) and the command line wins over it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tomllib

from idap_onnx.cli import args as shared

# config-file key -> argparse dest, for every flag of this command
_KEYS = (
    "labels", "val_fraction", "batch_size", "seed", "num_random", "tokenizer",
    "seq_len", "target_flops", "target_params", "max_drop", "max_error", "metric", "score",
    "mean_compensation", "coherence", "refit", "p0", "alpha", "steps", "round_to",
    "max_group_ratio", "ignore", "retries", "stages", "max_blocks", "device", "report_dir",
    "dry_run", "output",
    "input_shape", "finetune", "finetune_epochs", "latency", "latency_batch", "latency_fp16",
    "precision", "target_latency", "latency_table", "require_faster",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shared.add_model_args(parser)
    shared.add_output_args(parser, model_output=False)
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        default=None,
        help="where to write the optimized model (must differ from MODEL); written "
        "atomically, with OUT.report.json, OUT.report.md and PNG plots beside it. Default: "
        "MODEL's name with .opt.onnx beside it (model.onnx -> model.opt.onnx), never over MODEL",
    )
    shared.add_calib_args(parser, batch_size=8, val_fraction=0.2, calib_required=False)
    data = parser.add_argument_group("labels and budget")
    data.add_argument(
        "--labels",
        metavar="FILE",
        default=None,
        help="class index per sample (.npy/.npz/.txt), aligned with --calib (needs it); "
        "enables --max-drop with top-1 accuracy; with --metric MODULE:FUNCTION any label "
        "per sample (e.g. a .npy of strings, or a .txt of one per line) that FUNCTION reads "
        "(default: none)",
    )
    data.add_argument(
        "--metric",
        default="auto",
        metavar="{auto,top1,agreement,rel-l2,cosine,MODULE:FUNCTION}",
        help="what the budget measures on the validation part: auto = top1 with "
        "--labels, else rel-l2 (default: auto); or your own function, MODULE:FUNCTION or "
        "file.py:FUNCTION, called as f(outputs, ref_outputs, labels) -> float (higher is "
        "better unless it sets f.higher_is_better = False; needs --max-drop in its units)",
    )
    data.add_argument(
        "--max-drop",
        metavar="D",
        type=float,
        default=None,
        help="budget: metric points lost at most (top-1 in percentage points; "
        "default 1.0 with labels)",
    )
    data.add_argument(
        "--max-error",
        metavar="E",
        type=float,
        default=None,
        help="budget: relative output error ||y - y0|| / ||y0|| at most "
        "(default 0.05 without labels)",
    )
    target = parser.add_argument_group("targets")
    target.add_argument(
        "--target-flops",
        metavar="F",
        type=float,
        default=None,
        help="stop once FLOPs <= F: a kept fraction (<= 1) or a count (default: none: "
        "stage 1 runs its --steps, each step kept only within the budget)",
    )
    target.add_argument(
        "--target-params",
        metavar="P",
        type=float,
        default=None,
        help="stop once params <= P: a kept fraction or a count (default: none)",
    )
    plan = parser.add_argument_group("stages and schedule (METHOD.md sections 4-5)")
    plan.add_argument(
        "--stages",
        default="1,2",
        help="stages to run: 1 (filters), 2 (blocks) or 1,2 (default: 1,2)",
    )
    plan.add_argument(
        "--score",
        default="idap",
        choices=("idap", "paper", "wanda", "l1", "l2", "random"),
        help="unit score for stage 1 (default: idap)",
    )
    plan.add_argument(
        "--no-mean-compensation",
        dest="mean_compensation",
        action="store_false",
        default=True,
        help="do not fold removed channels' means into consumer biases",
    )
    plan.add_argument(
        "--no-coherence",
        dest="coherence",
        action="store_false",
        default=True,
        help="idap without each consumer's coherence factor kappa (the measured damage of "
        "removing all its inputs over the sum of the per-channel estimates): the additive "
        "score, which lets a global ranking strip layers whose channels add up coherently; "
        "for ablations",
    )
    plan.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after every removal, re-solve the remaining input weights and bias of each "
        "pruned consumer (Gemm, MatMul, 1x1 and k x k convs) by least squares on the "
        "calibration part, so it reproduces its output in the model before the step; layer "
        "after layer, the graph run once per step in torch (one ONNX Runtime pass per layer "
        "without torch). Recovers most of a step's damage without training; its time is in "
        "the report. --no-refit: mean compensation only (default: --refit)",
    )
    plan.add_argument("--p0", type=float, default=0.05, help="first step fraction (0.05)")
    plan.add_argument("--alpha", type=float, default=1.5, help="schedule exponent (1.5)")
    plan.add_argument("--steps", type=int, default=10,
                      help="stage-1 iterations T (10); with a --target-* still unmet after "
                      "them, up to 3T more along the same schedule")
    plan.add_argument(
        "--retries",
        type=int,
        default=3,
        help="halvings of a step that breaks the budget before stage 1 ends (3)",
    )
    plan.add_argument(
        "--round-to",
        type=_round_to,
        default="auto",
        metavar="{auto,N}",
        help="kept channel counts: auto = the widths the runtime runs fast: each group's "
        "stair step in a latency table where one is measured (--target-latency) or given "
        "(--latency-table), else the runtime's known multiple (ONNX Runtime CPU: 16 channels "
        "with AVX-512, 8 with AVX2; TensorRT: 8, 32 for int8); N = multiples of N, 1 = exact "
        "widths, which can run slower than the original (default: auto)",
    )
    plan.add_argument(
        "--max-group-ratio",
        type=float,
        default=0.9,
        help="remove at most this fraction of any group's original units, over all steps "
        "(0.9)",
    )
    plan.add_argument(
        "--ignore",
        nargs="+",
        metavar="NODE",
        default=[],
        help="never prune groups these nodes produce or consume",
    )
    plan.add_argument(
        "--max-blocks",
        type=int,
        default=None,
        help="remove at most N blocks in stage 2 (default: no limit)",
    )
    plan.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="ONNX Runtime device for calibration (default: auto)",
    )
    plan.add_argument(
        "--finetune",
        action="store_true",
        help="distillation from the original on the calibration part: 1 epoch after "
        "each stage-1 step (before its budget check) and --finetune-epochs at the end",
    )
    plan.add_argument(
        "--finetune-epochs",
        metavar="N",
        type=int,
        default=1,
        help="epochs of the final fine-tuning with --finetune (1)",
    )
    lat = parser.add_argument_group(
        "latency (measured after the run: the original and the result, side by side)"
    )
    lat.add_argument(
        "--latency",
        choices=("onnxruntime", "tensorrt", "trtexec", "off"),
        default="onnxruntime",
        help="onnxruntime: default session optimizations on the --device provider; "
        "tensorrt: each model built into a strongly typed TensorRT engine on the GPU (needs "
        "the tensorrt package and CUDA); trtexec: TensorRT's trtexec from the PATH; off: skip "
        "(default: onnxruntime)",
    )
    lat.add_argument(
        "--latency-batch",
        metavar="N",
        type=int,
        default=1,
        help="samples per timed inference, taken from the calibration data (1)",
    )
    lat.add_argument(
        "--target-latency",
        metavar="T",
        default=None,
        help="stop stage 1 when the predicted latency reaches T: a fraction of the original's "
        "measured latency (0.5) or a time (12ms). Measures a latency table on the --latency "
        "backend at --latency-batch first (or reads --latency-table) and ranks units by "
        "score per millisecond saved; with --target-flops/--max-drop, whichever binds first "
        "stops the run",
    )
    lat.add_argument(
        "--latency-table",
        metavar="FILE",
        default=None,
        help="plan with this saved table (OUT.latency-table.json of an earlier run) instead "
        "of measuring one: the same table and seed give the same model",
    )
    lat.add_argument(
        "--require-faster",
        action="store_true",
        help="exit with an error, writing the reports but not the model, when the result "
        "measures slower than the original (report.json: latency.slower_than_original)",
    )
    lat.add_argument(
        "--latency-fp16",
        action="store_true",
        help="tensorrt/trtexec: convert each model to fp16 ONNX (fp32 I/O) before the "
        "strongly typed engine build",
    )
    prec = parser.add_argument_group("precision of the deployed model (docs/CLI.md, export)")
    prec.add_argument(
        "--precision",
        metavar="{fp32,fp16,int8}",
        default="fp32",
        help="export the result at this precision (as `idap-onnx export`; int8 in the form of "
        "the --latency backend's runtime, chosen by measurement at --latency-batch) and judge "
        "the budget on the exported model; where it breaks the budget, step back through the "
        "accepted steps to the last whose export holds it. Written beside OUT as "
        "OUT.<precision>.onnx; the report puts the original, the pruned fp32 and the exported "
        "model side by side (default: fp32, no export)",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="only the sensitivity report: each group pruned 25/50/75 %% alone "
        "and each block removed alone; no model written",
    )
    run.add_argument(
        "--report-dir",
        metavar="DIR",
        default=None,
        help="where report.json/report.md/plots go (default: beside -o)",
    )
    run.add_argument(
        "--config",
        metavar="TOML",
        default=None,
        help="read any of these settings from a TOML file; flags given on the command line win",
    )


def apply_config(args: argparse.Namespace) -> None:
    """Fill ``args`` from ``--config`` for every setting the command line left at its
    default (so a flag given on the command line wins)."""
    from idap_onnx.errors import UsageError

    if not args.config:
        return
    defaults = argparse.ArgumentParser(add_help=False)
    add_arguments(defaults)
    path = Path(args.config)
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read config {path}: {exc}") from exc
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in _KEYS:
            raise UsageError(
                f"config {path}: unknown setting '{key}'; settings are the "
                "optimize flags, e.g. max-drop = 1.0"
            )
        if getattr(args, dest, None) == defaults.get_default(dest):
            setattr(args, dest, value)


def _config(args: argparse.Namespace):
    from idap_onnx.errors import UsageError
    from idap_onnx.optimize import OptimizeConfig

    stages = (
        args.stages
        if isinstance(args.stages, (list, tuple))
        else [s for s in str(args.stages).split(",") if s.strip()]
    )
    try:
        stages = tuple(int(s) for s in stages)
    except ValueError as exc:
        raise UsageError(f"--stages {args.stages}: give 1, 2 or 1,2") from exc
    return OptimizeConfig(
        target_flops=args.target_flops,
        target_params=args.target_params,
        max_drop=args.max_drop,
        max_error=args.max_error,
        metric=args.metric,
        score=args.score,
        mean_compensation=args.mean_compensation,
        coherence=args.coherence,
        refit=args.refit,
        p0=args.p0,
        alpha=args.alpha,
        steps=args.steps,
        round_to=args.round_to,
        max_group_ratio=args.max_group_ratio,
        ignore=tuple(args.ignore),
        retries=args.retries,
        stages=stages,
        max_blocks=args.max_blocks,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        finetune=bool(args.finetune),
        finetune_epochs=args.finetune_epochs,
        latency=args.latency,
        latency_batch=args.latency_batch,
        latency_fp16=bool(args.latency_fp16),
        precision=args.precision,
        target_latency=args.target_latency,
        latency_table=args.latency_table,
    )


def _round_to(text: str) -> int | str:
    """``auto`` or a positive channel multiple."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not auto or a channel count") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; give auto or a count >= 1")
    return value


def export_line(export: dict, metric: str) -> str:
    """One line on the exported model: what was written, its metric, any step back."""
    if export.get("applied") is None:
        return f"{export['precision']} export: {export['note']}"
    e = export["models"]["exported"]
    line = (
        f"{export['precision']} export ({export['applied']}): {metric} {e['metric']:.4f} "
        f"(drop {e['drop']:.4f}), {e['bytes'] / 1e6:.3f} MB"
    )
    return line + (f"; {export['note']}" if export["note"] else "")


def default_output(model: str) -> Path:
    """``<stem>.opt.onnx`` beside ``model``; raises UsageError where that path is the model
    itself (a link), since idap-onnx never overwrites its input."""
    from idap_onnx.errors import UsageError

    path = Path(model)
    output = path.with_name(f"{path.stem}.opt.onnx")
    if shared._same(output, path):
        raise UsageError(
            f"the default output '{output}' is the input model itself; idap-onnx never "
            "overwrites its input: give another path with -o OUT"
        )
    return output


def check_generated_inputs(model: str, data) -> None:
    """Fail before the warning, in one line naming the input and the flag, where inputs
    cannot be generated for ``model`` (reads the graph only, not its external data)."""
    import onnx

    from idap_onnx.calib.data import check_generatable, model_inputs, random_shapes

    try:
        graph_only = onnx.load(model, load_external_data=False)
    except Exception:  # noqa: BLE001 - the run's own loader reports an unreadable model
        return
    specs = model_inputs(graph_only)
    check_generatable(specs)
    random_shapes(specs, data.seq_len, data.input_shapes)


def _check_metric(args: argparse.Namespace) -> None:
    """A built-in metric name, or MODULE:FUNCTION that imports, with --max-drop."""
    from idap_onnx.errors import UsageError
    from idap_onnx.metrics import METRICS, load_metric

    if args.metric == "auto" or args.metric in METRICS:
        return
    load_metric(args.metric)  # a one-line UsageError when it does not import
    if args.max_drop is None:
        raise UsageError(f"--metric {args.metric} needs --max-drop D: the budget in the "
                         "metric's own units")


def generated_data_warning(args: argparse.Namespace, config) -> str:
    """The one warning of a run without ``--calib``: both assumptions (generated inputs, a
    budget on the output error) and how to pass real data."""
    if config.max_drop is not None:
        budget = f"a drop of at most {config.max_drop:g} in the {args.metric} metric"
    else:
        error = 0.05 if config.max_error is None else config.max_error
        budget = (
            f"the relative output error against the original, at most {error:g} "
            "(--max-error)"
        )
    return (
        "idap-onnx: warning: no --calib, so this run assumes two things: it calibrates on "
        f"synthetic inputs generated from the model's input specs ({args.num_random} samples, "
        f"symbolic dims {args.seq_len} unless --input-shape), and it judges the budget by "
        f"{budget}, not by a task metric; pass real data with --calib DATA, and --labels FILE "
        "--max-drop D to budget accuracy"
    )


def run(args: argparse.Namespace) -> None:
    from idap_onnx import optimize_api
    from idap_onnx.accounting import format_count
    from idap_onnx.errors import UsageError
    from idap_onnx.optimize_report import slower_hint

    apply_config(args)
    config = _config(args)
    config.check()
    _check_metric(args)
    if args.require_faster and (config.latency == "off" or args.dry_run):
        raise UsageError("--require-faster needs the latency measurement of a run "
                         "(not --latency off, not --dry-run)")
    generated = args.calib is None
    if generated and args.labels is not None:
        raise UsageError(
            "--labels FILE needs --calib DATA: labels are aligned with real samples"
        )
    if not args.dry_run and not args.output:
        args.output = str(default_output(args.model))
    shared.check_paths(args)
    data = optimize_api.DataOptions(
        image=shared.image_spec(args),
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        num_random=args.num_random,
        input_shapes=shared.input_shapes(args),
        warn_random=not generated,
    )
    calib = "random" if generated else args.calib

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if generated:
        check_generated_inputs(args.model, data)
        say(generated_data_warning(args, config))

    if args.dry_run:
        prep = optimize_api.prepare(
            args.model,
            calib,
            labels=args.labels,
            val_fraction=args.val_fraction,
            metric=config.metric,
            batch_size=config.batch_size,
            data=data,
            seed=config.seed,
        )
        report = optimize_api.sensitivity(prep, score=config.score, progress=say)
        text = shared.to_json(report)
        if args.json and args.json != shared.STDOUT:
            shared.write_text_atomic(Path(args.json), text)
        print(
            text
            if args.json == shared.STDOUT
            else f"sensitivity of {len(report['groups'])} "
            f"groups and {len(report['blocks'])} blocks"
            + (f" written to {args.json}" if args.json else "")
        )
        return
    result = optimize_api.run_optimize(
        args.model,
        calib,
        config,
        labels=args.labels,
        val_fraction=args.val_fraction,
        data=data,
        progress=say,
    )
    slower = bool(result.latency and result.latency.get("slower_than_original"))
    paths = optimize_api.write_outputs(
        result, args.output, input_path=args.model, report_dir=args.report_dir,
        models=not (args.require_faster and slower),
    )
    if args.json:
        text = json.dumps(result.to_dict(), indent=2, sort_keys=True)
        if args.json == shared.STDOUT:
            print(text)
        else:
            shared.write_text_atomic(Path(args.json), text)
    o, f = result.original, result.final
    print(
        f"params {format_count(o['params'])} -> {format_count(f['params'])} "
        f"({100 * f['params'] / max(o['params'], 1):.1f} %), MACs {format_count(o['macs'])} "
        f"-> {format_count(f['macs'])} ({100 * f['macs'] / max(o['macs'], 1):.1f} %) per sample"
    )
    print(
        f"{result.metric_name}: {o['metric']:.4f} -> {f['metric']:.4f} "
        f"(drop {f['drop']:.4f}); blocks removed: {len(result.removed_blocks)}"
    )
    if result.target_note:
        print(result.target_note)
    if result.latency:
        lat = result.latency
        t0, t1 = lat["timings"]["original"], lat["timings"]["optimized"]
        print(
            f"latency ({lat['device']}, batch {lat['batch']}): {t0['median_ms']:.3f} ms -> "
            f"{t1['median_ms']:.3f} ms ({lat['speedup']['optimized']:.2f}x), median of "
            f"{t1['runs']} runs each, measured in turns"
            + (f"; latency saved / MACs saved {lat['saved_per_mac_saved']:.2f}"
               if lat.get("saved_per_mac_saved") is not None else "")
        )
        if "exported" in lat["timings"]:
            t2 = lat["timings"]["exported"]
            print(
                f"latency of the {config.precision} export: {t0['median_ms']:.3f} ms -> "
                f"{t2['median_ms']:.3f} ms ({lat['speedup']['exported']:.2f}x over the "
                "original), in the same turns"
            )
        plan = result.latency_plan or {}
        if plan.get("predicted_ms") is not None:
            print(f"latency predicted by the table: {plan['table']['original_ms']:.3f} ms -> "
                  f"{plan['predicted_ms']:.3f} ms"
                  + (f" (target {plan['target_ms']:.3f} ms)" if plan.get("target_ms") else ""))
        hint = slower_hint(lat, config.round_to)
        if hint:
            say(f"warning: {hint}")
    if result.export:
        print(export_line(result.export, result.metric_name))
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    if args.require_faster and slower:
        from idap_onnx.errors import IdapError

        raise IdapError(
            "the result measured slower than the original "
            f"({result.latency['speedup']['optimized']:.2f}x) and --require-faster is set: "
            "model not written, reports written")
