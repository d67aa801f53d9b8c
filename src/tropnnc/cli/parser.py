"""The argument parser: the global flags, then one sub-command per module of this package."""

from __future__ import annotations

import argparse
from typing import Any

from . import compress, demo, evaluate, export, info, sweep, train
from .common import PROG

#: the sub-commands in the order ``tropnnc --help`` lists them
COMMANDS = (
    ("compress", compress),
    ("info", info),
    ("evaluate", evaluate),
    ("export", export),
    ("train", train),
    ("sweep", sweep),
    ("demo", demo),
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tropnnc`` command."""
    from .. import __version__

    common = argparse.ArgumentParser(add_help=False)
    _add_global(common, suppress=True)
    parser = argparse.ArgumentParser(
        prog=PROG, description="Data-free structured compression of trained ReLU networks."
    )
    _add_global(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS:
        p = sub.add_parser(name, parents=[common], help=command.HELP, description=command.HELP)
        p.set_defaults(handler=command.run, parser=p)
        command.add_arguments(p)
    return parser


def _add_global(p: argparse.ArgumentParser, suppress: bool) -> None:
    """--json/--quiet/--verbose, accepted before and after the subcommand (the subcommand's
    copies default to SUPPRESS so they do not reset what was given before it)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    p.add_argument(
        "--json", action="store_true", default=default(False), help="print machine-readable JSON"
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default(False),
        help="print nothing but errors",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="more logging (-vv: debug); tracebacks on errors",
    )
