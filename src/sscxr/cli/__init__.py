"""The `sscxr` command line: one subcommand per job, each parse -> config -> build -> run."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from sscxr import __version__
from sscxr.cli import (
    check_cmds,
    classify_cmds,
    data_cmds,
    demo,
    evaluate_cmds,
    model_cmds,
    predict_cmds,
    probe_cmds,
    segment_cmds,
    serve_cmds,
    study_cmds,
    train_cmds,
)
from sscxr.errors import SSCXRError

log = logging.getLogger("sscxr")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="sscxr",
        description="Self-supervised (GMML) representation learning on chest X-rays.",
    )
    parser.add_argument("--version", action="version", version=f"sscxr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data_cmds.register(sub)
    check_cmds.register(sub)
    train_cmds.register(sub)
    classify_cmds.register(sub)
    segment_cmds.register(sub)
    evaluate_cmds.register(sub)
    predict_cmds.register(sub)
    model_cmds.register(sub)
    serve_cmds.register(sub)
    probe_cmds.register(sub)
    study_cmds.register(sub)
    demo.register(sub)
    return parser


def _console_logging(level: int) -> None:
    """One root console handler (on the current stderr), whatever ran before in this process."""
    from sscxr.console import StderrHandler

    root = logging.getLogger()
    if not any(isinstance(h, StderrHandler) for h in root.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sscxr` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _console_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except SSCXRError as e:
        # Errors we raise on purpose carry a message a user can act on: no traceback needed.
        print(f"sscxr {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if args.verbose:
            raise
        print(f"sscxr {args.command}: error: {_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"sscxr {args.command}: interrupted; finished work is kept (re-run to resume).", file=sys.stderr
        )
        return 130


def _os_error(e: OSError) -> str:
    """One line for a file-system error: which file, what happened, what to do (finished work is kept)."""
    import errno

    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"the disk is full{where}; free some space and re-run: finished work is kept and resumed"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}; choose a folder you can write to, or fix its permissions"
    if e.errno == errno.ENOENT:
        return f"no such file or folder{where}; check the path"
    return f"{e.strerror or e}{where} (run with -v for the traceback)"
