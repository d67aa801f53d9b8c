"""The ``tropnnc`` command line: compress, inspect, evaluate, export, train, sweep, demo.

Exit status: 0 on success, 2 on usage errors (argparse), 1 on any other failure with one line
``tropnnc: error: ...`` on stderr (the traceback too with ``--verbose``). ``--json`` prints one
JSON object on stdout instead of the human-readable text; ``--quiet`` prints nothing but errors.

One module per command (:mod:`.compress`, :mod:`.info`, :mod:`.evaluate`, :mod:`.export`,
:mod:`.train`, :mod:`.sweep`, :mod:`.demo`), each with its ``HELP``, ``add_arguments(parser)``
and ``run(args)``; :mod:`.parser` puts them together, :mod:`.main` runs one, :mod:`.arguments`
holds the argument types and :mod:`.common` what the commands share.
"""

from .arguments import parse_keep, parse_option, parse_value
from .common import CLIError, UsageError
from .main import main
from .parser import build_parser

__all__ = [
    "CLIError",
    "UsageError",
    "build_parser",
    "main",
    "parse_keep",
    "parse_option",
    "parse_value",
]
