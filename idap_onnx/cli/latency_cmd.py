"""``idap-onnx latency``: time a model and the models it is compared with, side by side.

A thin layer over ``idap_onnx.deploy.latency.measure``: MODEL is the reference, each ``--compare``
model is timed in turns with it on the same input samples (real data with ``--data``, else
random values of the input shapes), and the report gives each median and its speed-up.
Models are ONNX files of any precision or, on the tensorrt and trtexec backends, serialized
TensorRT engines (``.plan``/``.engine``); the first ONNX file among them gives the inputs.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from idap_onnx.cli import args as shared
from idap_onnx.deploy.latency import BACKENDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL",
        help="the reference .onnx file, e.g. the original (never modified), or a .plan "
             "TensorRT engine (tensorrt/trtexec backends)",
    )
    shared.add_output_args(parser, model_output=False)
    group = parser.add_argument_group("what to time")
    group.add_argument(
        "--compare", metavar="OTHER", nargs="+", default=[],
        help="models timed in turns with MODEL on the same samples, e.g. the optimized one "
             "(default: MODEL alone)",
    )
    group.add_argument(
        "--data", metavar="DATA", default="random",
        help="input samples, as --calib of optimize (docs/DATA.md); 'random' draws values "
             "for the input shapes (default: random)",
    )
    group.add_argument(
        "--batch", metavar="N", type=int, default=1, help="samples per inference (default: 1)",
    )
    group.add_argument(
        "--seq-len", metavar="N", type=int, default=128,
        help="sequence length for text, and the size of every symbolic non-batch dim of "
             "random data (default: 128)",
    )
    group.add_argument(
        "--tokenizer", metavar="DIR", default=None,
        help="tokenizer folder for a .txt of sentences (default: none)",
    )
    run = parser.add_argument_group("backend and rounds")
    run.add_argument(
        "--backend", choices=BACKENDS, default="onnxruntime",
        help="onnxruntime: default session optimizations on the --device provider; "
             "tensorrt: a strongly typed engine built per ONNX file (.plan files loaded), "
             "timed on the GPU with CUDA events (needs the tensorrt package and CUDA); "
             "trtexec: TensorRT's trtexec from the PATH times each engine "
             "(default: onnxruntime)",
    )
    run.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="ONNX Runtime provider: auto takes CUDA when available (default: auto)",
    )
    run.add_argument(
        "--fp16", action="store_true",
        help="tensorrt/trtexec: convert each ONNX file to fp16 (fp32 I/O) before the build; "
             ".plan files are timed as built",
    )
    run.add_argument(
        "--rounds", metavar="R", type=int, default=5,
        help="turns of the models (default: 5)",
    )
    run.add_argument(
        "--runs", metavar="N", type=int, default=20,
        help="timed inferences per model per turn (default: 20)",
    )
    run.add_argument(
        "--warmup", metavar="N", type=int, default=5,
        help="untimed inferences per model before its first turn (default: 5)",
    )
    run.add_argument(
        "--max-seconds", metavar="S", type=float, default=60.0,
        help="stop after the turn that passes S seconds (default: 60)",
    )


def run(args: argparse.Namespace) -> None:
    from idap_onnx.calib.data import batches, load_data
    from idap_onnx.deploy.latency import example_feed, measure
    from idap_onnx.deploy.tensorrt import is_engine
    from idap_onnx.errors import UsageError
    from idap_onnx.model_io import load_model

    shared.check_paths(args)
    if args.batch < 1:
        raise UsageError(f"--batch {args.batch} must be >= 1")
    paths = [args.model, *args.compare]
    models = dict(zip(_labels(paths), paths, strict=True))
    onnx_files = [p for p in paths if not is_engine(p)]
    for path in set(paths) - set(onnx_files):
        if not Path(path).is_file():
            raise UsageError(f"latency: engine '{path}' does not exist")
    if not onnx_files:
        raise UsageError("latency: every model is a TensorRT engine; add an .onnx file "
                         "(its inputs give the samples' shapes)")
    reference = load_model(onnx_files[0])
    with warnings.catch_warnings():  # random values are fine for timing (not for scores)
        warnings.filterwarnings("ignore", "random calibration data is synthetic")
        ds = load_data(
            args.data, reference, tokenizer=args.tokenizer, seq_len=args.seq_len,
            num_random=args.batch, seed=0,
        )
    feed = example_feed(list(batches(ds, args.batch)), args.batch)
    del reference, ds
    for path in onnx_files[1:]:
        load_model(path)  # a clear error for a bad file before any timing
    report = measure(
        models, feed, backend=args.backend, device=args.device,
        rounds=args.rounds, per_round=args.runs, warmup=args.warmup,
        max_seconds=args.max_seconds, fp16=args.fp16,
    )
    data = {"schema_version": 1, "command": "latency", "models": models, **report.to_dict()}
    shared.emit_report(args, data, _text(report))


def _labels(paths: list[str]) -> list[str]:
    """File names, made unique with their position when two are equal."""
    names = [Path(p).name for p in paths]
    return [n if names.count(n) == 1 else f"{i}:{n}" for i, n in enumerate(names)]


def _text(report) -> str:
    shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in report.inputs.items())
    lines = [f"{report.device}; batch {report.batch} ({shapes}); {report.rounds} rounds",
             f"{'model':<40} {'median ms':>10} {'p10':>9} {'p90':>9} {'runs':>5} {'speed-up':>9}"]
    for name, t in report.timings.items():
        lines.append(f"{name:<40} {t.median_ms:>10.3f} {t.p10_ms:>9.3f} {t.p90_ms:>9.3f} "
                     f"{t.runs:>5} {report.speedup[name]:>8.2f}x")
    return "\n".join(lines)
