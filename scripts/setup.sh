#!/usr/bin/env bash
# Set up tropnnc on a fresh machine: a virtual environment in .venv with the CPU build of
# PyTorch, the package in editable mode with its dev tools, and the offline datasets.
#
# torch is installed FIRST, as the CPU wheel (TORCH_SPEC, default torch==2.13.0+cpu): the
# package itself only asks for a range (pyproject.toml), which that torch satisfies, so the
# editable install that follows leaves it alone and never pulls a CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0+cpu}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
echo "setup: installing $torch_spec"
"${pip[@]}" "$torch_spec"
echo "setup: installing tropnnc and its dependencies"
"${pip[@]}" -e ".[dev]"
.venv/bin/python - <<'PY'
import os
import sys

import torch

import tropnnc

print("setup: tropnnc", tropnnc.__version__, "torch", torch.__version__)
if torch.version.cuda is not None and os.environ.get("CI"):
    sys.exit(f"setup: torch {torch.__version__} is a CUDA build; CI must use the CPU wheel "
             "(set TORCH_SPEC)")
PY
bash scripts/fetch_data.sh
