"""Argument groups every subcommand reuses (Polygraphy style): model loading, output, logging.

Each ``add_*`` function adds one group to a subcommand's parser; the matching helpers turn the
parsed values into what ``idap_onnx.api`` takes, and write the outputs atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Mapping

from idap_onnx.errors import UsageError

#: ``--json`` value that sends the JSON report to stdout instead of a file.
STDOUT = "-"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and examples; flags' help is written by hand
    with its default."""


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Positional MODEL and repeatable ``--input-shape NAME:DIMS``."""
    group = parser.add_argument_group("model loading")
    group.add_argument(
        "model", metavar="MODEL",
        help="the .onnx file to read (never modified); external data is read from its folder",
    )
    group.add_argument(
        "--input-shape", metavar="NAME:DIMS", action="append", default=[],
        help="concrete shape of a graph input, dims joined by 'x', e.g. 'input:1x3x224x224'; "
             "repeat for each input. Default: the declared dims, a symbolic first dim as 1 and "
             "other symbolic dims as 32",
    )


def add_output_args(parser: argparse.ArgumentParser, *, model_output: bool) -> None:
    """``-o/--output`` (when the subcommand writes a model) and ``--json FILE``."""
    group = parser.add_argument_group("output")
    if model_output:
        group.add_argument(
            "-o", "--output", metavar="OUT", required=True,
            help="where to write the rewritten model (required; must differ from MODEL). "
                 "Written atomically: a temporary file renamed into place",
        )
    group.add_argument(
        "--json", metavar="FILE", default=None,
        help="also write the report as JSON (schema in docs/CLI.md) to FILE, atomically; "
             f"'{STDOUT}' prints the JSON to stdout instead of the text report. Default: none",
    )


def add_calib_args(
    parser: argparse.ArgumentParser,
    *,
    batch_size: int = 8,
    val_fraction: float = 0.0,
    calib_required: bool = True,
) -> None:
    """``--calib DATA`` and the data flags of ``docs/DATA.md`` (``calib.data.load_data``).

    Without ``calib_required`` (``optimize``), a missing ``--calib`` leaves ``args.calib``
    None: the command then calibrates on inputs generated from the model's input specs."""
    group = parser.add_argument_group("calibration data (docs/DATA.md)")
    sources = (
        "a .npz/.npy file or a folder of them (arrays keyed by input name, samples on "
        "axis 0), a folder of images, a .txt of sentences (with --tokenizer), or 'random' "
        "(synthetic, smoke tests only)"
    )
    group.add_argument(
        "--calib", metavar="DATA", required=calib_required, default=None,
        help=f"{sources} (required)" if calib_required else (
            f"{sources}. Default: inputs generated from the model's input specs (as 'random': "
            "symbolic dims from --input-shape or --seq-len, token ids below the embedding's "
            "row count, masks of ones), with one warning; pass real data for a real result"
        ),
    )
    group.add_argument(
        "--val-fraction", metavar="F", type=float, default=val_fraction,
        help="fraction of the samples split off as validation data, in [0, 1); never used for "
             f"calibration (default: {val_fraction:g})",
    )
    group.add_argument(
        "--batch-size", metavar="N", type=int, default=batch_size,
        help=f"samples per ONNX Runtime run (default: {batch_size})",
    )
    group.add_argument(
        "--seed", metavar="S", type=int, default=0,
        help="seed of the validation split and of --calib random (default: 0)",
    )
    group.add_argument(
        "--num-random", metavar="N", type=int, default=64,
        help="number of samples of generated inputs (--calib random, or optimize without "
             "--calib) (default: 64)",
    )
    group.add_argument(
        "--tokenizer", metavar="DIR", default=None,
        help="HuggingFace tokenizer folder (save_pretrained) for a .txt of sentences, loaded "
             "offline (default: none)",
    )
    group.add_argument(
        "--seq-len", metavar="N", type=int, default=128,
        help="token sequence length for text, and every symbolic non-batch dim of generated "
             "inputs (--calib random, or optimize without --calib) unless --input-shape gives "
             "it (default: 128)",
    )
    group.add_argument(
        "--image-size", metavar="N|HxW", type=_size, default=None,
        help="resize the shorter side to N, or exactly to HxW (default: crop * 256/224)",
    )
    group.add_argument(
        "--image-crop", metavar="HxW", type=_pair, default=None,
        help="center crop (default: the model input's H and W)",
    )
    group.add_argument(
        "--image-mean", metavar="a,b,c", type=_floats, default=None,
        help="per-channel mean in the model's channel order (default: ImageNet "
             "0.485,0.456,0.406)",
    )
    group.add_argument(
        "--image-std", metavar="a,b,c", type=_floats, default=None,
        help="per-channel std (default: ImageNet 0.229,0.224,0.225)",
    )
    group.add_argument(
        "--image-scale", metavar="X", type=float, default=None,
        help="pixel multiplier before normalizing (default: 1/255)",
    )
    group.add_argument(
        "--image-bgr", action="store_true",
        help="feed channels in BGR order (default: RGB)",
    )
    group.add_argument(
        "--image-layout", choices=("NCHW", "NHWC"), default=None,
        help="image input layout (default: inferred from the model input)",
    )


def _pair(text: str) -> tuple[int, int]:
    """``HxW`` (or ``N`` for ``NxN``) as two positive ints."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not HxW with positive ints, e.g. 224x224")
    return values


def _size(text: str) -> int | tuple[int, int]:
    if "x" in text.lower():
        return _pair(text)
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive int or HxW, e.g. 256")
    return value


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not comma-separated numbers, e.g. 0.5,0.5,0.5"
        ) from None


def image_spec(args: argparse.Namespace):
    """The ``calib.data.ImageSpec`` of the ``--image-*`` flags (its defaults where not given;
    raises UsageError on inconsistent values)."""
    from idap_onnx.calib.data import ImageSpec

    given = {
        "size": args.image_size, "crop": args.image_crop, "mean": args.image_mean,
        "std": args.image_std, "scale": args.image_scale, "layout": args.image_layout,
    }
    return ImageSpec(bgr=args.image_bgr, **{k: v for k, v in given.items() if v is not None})


def add_logging_args(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """``--verbose``; on subcommands its default is suppressed so a top-level flag survives."""
    group = parser.add_argument_group("logging")
    group.add_argument(
        "-v", "--verbose", action="store_true",
        default=False if top_level else argparse.SUPPRESS,
        help="log each step and show the traceback of errors (default: off)",
    )


def input_shapes(args: argparse.Namespace) -> dict[str, list[int]]:
    """The parsed ``--input-shape`` values (raises UsageError on a malformed one)."""
    from idap_onnx.shapes import parse_input_shapes

    return parse_input_shapes(args.input_shape)


def check_paths(args: argparse.Namespace) -> None:
    """Reject, before any work, outputs that would overwrite the input or each other."""
    model = pathlib.Path(args.model)
    output = getattr(args, "output", None)
    json_path = None if args.json in (None, STDOUT) else pathlib.Path(args.json)
    if output is not None:
        _check_destination(pathlib.Path(output), "output path", model)
    if json_path is not None:
        _check_destination(json_path, "--json path", model)
        if output is not None and _same(json_path, pathlib.Path(output)):
            raise UsageError(
                f"--json path '{json_path}' is the output model path; choose another JSON file"
            )


def _check_destination(path: pathlib.Path, what: str, model: pathlib.Path) -> None:
    if _same(path, model):
        raise UsageError(
            f"{what} '{path}' is the input model '{model}'; idap-onnx never overwrites its "
            "input, choose another path"
        )
    if path.is_dir():
        raise UsageError(f"{what} '{path}' is a directory; give a file name")
    if not path.parent.is_dir():
        raise UsageError(
            f"{what} '{path}': directory '{path.parent}' does not exist; create it first"
        )


def _same(a: pathlib.Path, b: pathlib.Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def to_json(data: Mapping) -> str:
    """Deterministic JSON: sorted keys, two-space indent; NaN is refused (``to_dict`` writes a
    non-finite error as null)."""
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"


def emit_report(args: argparse.Namespace, data: Mapping, text: str) -> None:
    """Print the text report (or the JSON with ``--json -``) and write ``--json FILE``."""
    if args.json == STDOUT:
        sys.stdout.write(to_json(data))
        return
    if args.json is not None:  # before printing: a closed stdout pipe must not lose the file
        write_text_atomic(pathlib.Path(args.json), to_json(data))
    print(text)


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    """Write via a temporary file in the same folder, then rename it into place
    (``model_io.write_text_atomic``)."""
    from idap_onnx.model_io import write_text_atomic as write

    write(path, text)
