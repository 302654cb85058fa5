"""``capnet`` command line: ``main(argv) -> exit code``; each sub-command lives in its own module.

Sub-commands: data, train, eval, predict, export, demo, reproduce. Library functions never see argparse objects;
each command module turns its namespace into explicit arguments.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import logging
import sys
from typing import List, Optional

# module name under capnet.cli -> it defines register(subparsers) and sets func on its parser
COMMANDS = ("data", "train", "evaluate", "predict", "export", "demo", "reproduce")  # module names; "evaluate" adds `eval`


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="capnet",
        description="CAPNET (correlation adaptation prompt network) for long-tailed multi-label "
                    "image recognition with vision-language models.",
        epilog="Start with `capnet demo` (offline, no download). `capnet COMMAND -h` for details.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"capnet.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"capnet.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    for command in sub.choices.values():  # spelt after the command too: `capnet train ... -q`
        add_verbosity_args(command, argparse.SUPPRESS)
    add_verbosity_args(parser, 0)
    return parser


def add_verbosity_args(parser: argparse.ArgumentParser, default) -> None:
    """-v (debug messages) / -q (warnings and errors only); default: progress lines such as each epoch."""
    parser.add_argument("-v", "--verbose", action="count", default=default, help="show debug messages too")
    parser.add_argument("-q", "--quiet", action="count", default=default,
                        help="only warnings and errors (no per-epoch lines)")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (tests and notebooks swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


_HANDLER = _StderrHandler()
_HANDLER.setFormatter(logging.Formatter("capnet: %(message)s"))


def configure_logging(verbose: int = 0, quiet: int = 0) -> None:
    """The CLI's logging: capnet's INFO lines (epochs, resume, cache) on stderr; the library itself
    only ever calls ``logging.getLogger(__name__)``."""
    level = logging.DEBUG if verbose > quiet else logging.WARNING if quiet > verbose else logging.INFO
    logger = logging.getLogger("capnet")
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)
    logger.setLevel(level)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``capnet`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args.verbose, args.quiet)
    from capnet.errors import CapnetError, one_line

    try:
        return int(args.func(args) or 0)
    except CapnetError as err:
        print(f"capnet: error: {one_line(err)}", file=sys.stderr)
        # Free the failed frames now: a DataLoader iterator caught in them (torch's worker re-raise
        # makes a reference cycle) would otherwise stop its workers at some later gc, 5 s each.
        err.__traceback__ = None
        return 1


def entry_point() -> None:
    """The ``capnet`` console script and ``python -m capnet``: ``main`` as a process.

    Python's cyclic garbage collector is tuned for the process: importing torch, transformers
    and timm leaves ~500,000 tracked objects, and with the default thresholds the collector
    walks all of them several times while they load and again in the interpreter's final sweep
    at exit. A first generation of 100,000 allocations instead of 700 (garbage cycles, rare in
    tensor code, wait longer: a few MB) and a frozen heap at exit took the demo's repeated run
    from 20.4-21.4 s to 17.5-17.9 s on 2 cores (1.1-1.3 s of it the final sweep). atexit handlers and
    stream flushing run as usual. In-process callers use ``main`` and keep their own settings.
    """
    gc.set_threshold(100_000, 20, 20)
    code = main()
    gc.freeze()
    sys.exit(code)
