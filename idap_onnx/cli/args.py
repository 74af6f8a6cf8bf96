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
import tempfile
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
    """Write via a temporary file in the same folder, then ``os.replace`` it into place."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
