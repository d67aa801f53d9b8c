"""``python -m tropnnc``: the command line (see :mod:`tropnnc.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
