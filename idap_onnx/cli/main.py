"""``idap-onnx``: the command-line front end (console script ``idap_onnx.cli.main:main``).

Exit codes: 0 success; 1 a user error (any ``IdapError``, an unreadable or unwritable file),
printed as one line ``idap-onnx: error: <message>`` on stderr (the traceback only with
``--verbose``); 2 a usage error argparse reports; 130 interrupted (Ctrl-C), with nothing written.
A run ends with ``PASSED (1.2s)`` or ``FAILED (1.2s)`` on stdout (on stderr when stdout
carries the JSON report; a failure there prints only the error line). When stdout is closed
early (``| head``) the run stops quietly with 141, after writing its files.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Sequence

from idap_onnx.cli import args as shared
from idap_onnx.cli.commands import COMMANDS

PROG = "idap-onnx"


def version() -> str:
    """The installed package version (``unknown`` when run from an uninstalled tree)."""
    from importlib import metadata

    try:
        return metadata.version("idap-onnx")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=shared.HelpFormatter,
        description="Prune ONNX graphs with IDAP++: channel and block surgery.\n\n"
        "examples:\n"
        "  idap-onnx inspect model.onnx\n"
        "  idap-onnx prune model.onnx -o pruned.onnx --ratio 0.3\n"
        "  idap-onnx remove-blocks model.onnx -o out.onnx --blocks res:/layer1/layer1.1/Add\n"
        "  idap-onnx score model.onnx --calib calib.npz --json scores.json\n"
        "  idap-onnx optimize model.onnx\n"
        "  idap-onnx optimize model.onnx --calib calib.npz -o small.onnx --max-error 0.05\n"
        "  idap-onnx latency model.onnx --compare small.onnx\n\n"
        "Run `idap-onnx COMMAND --help` for the flags of each command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}",
                        help="print the version and exit")
    shared.add_logging_args(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        child = sub.add_parser(
            command.name, help=command.summary, description=command.description,
            formatter_class=shared.HelpFormatter,
        )
        command.add_arguments(child)
        shared.add_logging_args(child)
        child.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``idap-onnx`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    _configure_logging(args.verbose)
    json_on_stdout = getattr(args, "json", None) == shared.STDOUT
    status = sys.stderr if json_on_stdout else sys.stdout
    started = time.perf_counter()
    try:
        with _one_line_warnings():
            args.run(args)
        print(f"PASSED ({time.perf_counter() - started:.1f}s)", file=status, flush=True)
    except BrokenPipeError:  # stdout closed early (`| head`): outputs are written; stop quietly
        _silence_stdout()
        return 141
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output written", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure ends as one line; bugs say so
        _report_error(exc, args.verbose)
        if not json_on_stdout:
            print(f"FAILED ({time.perf_counter() - started:.1f}s)", file=status, flush=True)
        return 1
    return 0


@contextlib.contextmanager
def _one_line_warnings():
    """Library warnings (synthetic data, skipped steps) print as ``idap-onnx: warning: ...``,
    one line each, not Python's two-line form with the source line that raised them."""
    saved = warnings.formatwarning
    warnings.formatwarning = lambda message, *_args, **_kw: (
        f"{PROG}: warning: {' '.join(str(message).split())}\n"
    )
    try:
        yield
    finally:
        warnings.formatwarning = saved


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests)
        pass


def _report_error(exc: Exception, verbose: bool) -> None:
    from idap_onnx.errors import IdapError

    sys.stdout.flush()
    if verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if isinstance(exc, IdapError):
        message = str(exc)
    elif isinstance(exc, OSError):
        where = f" '{exc.filename}'" if exc.filename else ""
        message = f"cannot access{where}: {exc.strerror or exc}"
    else:
        hint = "" if verbose else "; rerun with --verbose for the traceback"
        message = f"internal error ({type(exc).__name__}: {exc}){hint}; please report it"
    first = " ".join(message.split())  # one line, whatever the message holds
    print(f"{PROG}: error: {first}", file=sys.stderr, flush=True)


class _StderrHandler(logging.Handler):
    """Writes to the current ``sys.stderr`` (which tests and callers may swap)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


class _LowerLevelFormatter(logging.Formatter):
    """``idap-onnx: warning: ...``, lower case like ``error:`` and Python's own warnings."""

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord({**record.__dict__, "levelname": record.levelname.lower()})
        return super().format(record)


def _configure_logging(verbose: bool) -> None:
    logger = logging.getLogger("idap_onnx")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_LowerLevelFormatter(f"{PROG}: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
