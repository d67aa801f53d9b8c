#!/usr/bin/env bash
# Set up tropnnc on a fresh machine: a virtual environment in .venv with the CPU build of
# PyTorch, the package in editable mode with its dev tools, and the offline datasets.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$python" -m venv .venv
fi
echo "setup: installing tropnnc and its dependencies"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
.venv/bin/python -c "import tropnnc, torch; print('setup: tropnnc', tropnnc.__version__, 'torch', torch.__version__)"
bash scripts/fetch_data.sh
