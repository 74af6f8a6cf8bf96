"""``idap-onnx export``: a model at fp32, fp16 or int8 for its runtime, and a TensorRT engine.

A thin layer over ``idap_onnx.deploy.export.export``: flags in, the text of what it did out
(sizes, error against the source, nodes kept fp32, latency against the source).
"""

from __future__ import annotations

import argparse
import sys

from idap_onnx.cli import args as shared

TARGETS = ("onnxruntime-cpu", "tensorrt")
CALIB_METHODS = ("minmax", "entropy", "percentile")
INT8_CLASSES = ("depthwise-conv", "grouped-conv", "matmul", "gemm", "conv")  # deploy.int8.CLASSES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shared.add_model_args(parser)
    parser.add_argument(
        "-o", "--output", metavar="OUT", required=True,
        help="where to write the exported .onnx (must differ from MODEL); written atomically",
    )
    shared.add_output_args(parser, model_output=False)
    prec = parser.add_argument_group("precision")
    prec.add_argument(
        "--precision", required=True, metavar="{fp32,fp16,int8}",
        help="fp32: the model as is; fp16: ONNX Runtime's converter, fp32 inputs/outputs, "
             "unsafe ops kept fp32 (for GPUs: ONNX Runtime's CPU has few fp16 kernels); "
             "int8: ONNX Runtime's static quantization on --calib, in the --target's form, "
             "nodes chosen by measurement, fp32 kept where no int8 form runs faster (required)",
    )
    prec.add_argument(
        "--target", choices=TARGETS, default=None,
        help="the runtime of the int8 form: onnxruntime-cpu (U8S8, QOperator or QDQ, "
             "whichever measures faster) or tensorrt (QDQ, symmetric signed int8, per-channel "
             "weights) (default: tensorrt with --engine, else onnxruntime-cpu)",
    )
    prec.add_argument(
        "--calib-method", choices=CALIB_METHODS, default="minmax",
        help="how int8 activation ranges are calibrated (default: minmax)",
    )
    prec.add_argument(
        "--keep-fp32", metavar="NODE", nargs="+", action="extend", default=[],
        help="nodes never converted, as `idap-onnx inspect` names them (default: none)",
    )
    prec.add_argument(
        "--int8-format", choices=("auto", "QOperator", "QDQ"), default="auto",
        help="auto: time the int8 forms on this machine and keep the fastest (a measurement: "
             "on a busy machine another run can pick another form); QOperator/QDQ: this form, "
             "untimed, with --int8-exclude classes in fp32: byte-identical output for the same "
             "inputs (the report's int8 form says what auto chose) (default: auto)",
    )
    prec.add_argument(
        "--int8-exclude", metavar="CLASS", nargs="+", action="extend", default=[],
        choices=INT8_CLASSES,
        help="with --int8-format: op classes left fp32: " + ", ".join(INT8_CLASSES),
    )
    prec.add_argument(
        "--labels", metavar="FILE", default=None,
        help="class index per --calib sample (.npy/.npz/.txt): top-1 of MODEL and of the "
             "export on the checked samples is reported (default: none)",
    )
    prec.add_argument(
        "--samples", metavar="N", type=int, default=64,
        help="calibration samples read from --calib: int8 ranges and the check against the "
             "source (default: 64)",
    )
    shared.add_calib_args(parser, batch_size=8, val_fraction=0.0)
    for action in parser._actions:  # --calib is optional here: fp32/fp16 verify on random data
        if action.dest == "calib":
            action.required = False
            action.default = None
            action.help = ("samples of the inputs (any source of docs/DATA.md); required for "
                           "int8. Without it fp32/fp16 are checked on random inputs")
        if action.dest == "val_fraction":
            action.help = argparse.SUPPRESS
    eng = parser.add_argument_group("TensorRT engine (needs the tensorrt package and a GPU)")
    eng.add_argument(
        "--engine", metavar="OUT.plan", default=None,
        help="also build a serialized TensorRT engine from the exported ONNX (strongly typed: "
             "precision from the file), written atomically (default: none)",
    )
    for flag, what in (("--min-shape", "smallest"), ("--opt-shape", "tuned-for"),
                       ("--max-shape", "largest")):
        eng.add_argument(
            flag, metavar="NAME:DIMS", action="append", default=[],
            help=f"the {what} shape of a dynamic input in the engine's optimization profile; "
                 "repeat per input (default: --input-shape)",
        )
    eng.add_argument(
        "--timing-cache", metavar="FILE", default=None,
        help="TensorRT timing cache, read when it exists and updated after the build "
             "(default: none)",
    )
    lat = parser.add_argument_group("latency (the exported model timed against MODEL)")
    lat.add_argument(
        "--latency-batch", metavar="N", type=int, default=1,
        help="samples per timed inference; int8 forms are also chosen at this batch "
             "(default: 1)",
    )
    lat.add_argument("--no-latency", dest="latency", action="store_false",
                     help="skip the final timing (int8 forms are timed still)")


def run(args: argparse.Namespace) -> None:
    from idap_onnx.deploy.export import export
    from idap_onnx.errors import UsageError
    from idap_onnx.optimize_api import DataOptions

    shared.check_paths(args)
    form = None
    if args.int8_format != "auto":
        from idap_onnx.deploy.int8 import Int8Form

        target = args.target or ("tensorrt" if args.engine else "onnxruntime-cpu")
        form = Int8Form(target, args.int8_format, tuple(args.int8_exclude))
    elif args.int8_exclude:
        raise UsageError("--int8-exclude needs --int8-format QOperator or QDQ")
    if args.val_fraction:
        raise UsageError("export checks on the --calib samples; --val-fraction is not used")
    result = export(
        args.model, args.output, args.precision, calib=args.calib, labels=args.labels,
        target=args.target,
        engine=args.engine, input_shapes=args.input_shape, min_shapes=args.min_shape,
        opt_shapes=args.opt_shape, max_shapes=args.max_shape, timing_cache=args.timing_cache,
        calib_method=args.calib_method, keep_fp32=args.keep_fp32, int8_form=form,
        samples=args.samples, batch_size=args.batch_size, latency_batch=args.latency_batch,
        latency=args.latency, seed=args.seed,
        data=DataOptions(image=shared.image_spec(args), tokenizer=args.tokenizer,
                         seq_len=args.seq_len, num_random=args.num_random),
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    shared.emit_report(args, result.to_dict(), render(result.to_dict()))


def render(report: dict) -> str:
    """The text of an export report (``ExportResult.to_dict()``)."""
    b = report["bytes"]
    lines = [
        f"exported {report['source']} -> {report['output']} as {report['applied']}"
        + (f" (asked {report['precision']})" if report["applied"] != report["precision"] else "")
        + f", target {report['target']}",
        f"size: {b['source'] / 1e6:.3f} MB -> {b['exported'] / 1e6:.3f} MB "
        f"({b['exported'] / max(b['source'], 1):.2f}x)",
        f"max relative output error vs the source on {report['samples']} samples: "
        f"{report['max_rel_error']:.3g}",
    ]
    m = report["metric"]
    if m:
        lines.append(f"top-1 on {m['samples']} samples: {m['source']:.2f} % -> "
                     f"{m['exported']:.2f} %")
    q = report["int8"]
    if q:
        lines.append(f"int8: {q['note']}")
        if q["form"]:
            lines.append(f"int8 form: {q['form']}; {q['quantized_nodes']} nodes quantized")
    kept = report["kept_fp32"]
    if kept:
        shown = ", ".join(f"{n} ({why})" for n, why in list(kept.items())[:8])
        more = f" and {len(kept) - 8} more" if len(kept) > 8 else ""
        lines.append(f"kept fp32: {len(kept)} nodes: {shown}{more}")
    lat = report["latency"]
    if lat:
        t0, t1 = lat["timings"]["source"], lat["timings"]["exported"]
        lines.append(
            f"latency ({lat['device']}, batch {lat['batch']}): {t0['median_ms']:.3f} ms -> "
            f"{t1['median_ms']:.3f} ms ({lat['speedup']['exported']:.2f}x), measured in turns"
        )
    if report["engine"]:
        lines.append(f"wrote engine: {report['engine']}")
    lines.append(f"wrote model: {report['output']}")
    return "\n".join(lines)
