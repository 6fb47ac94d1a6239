#!/usr/bin/env bash
# Create .venv and install the project with its dev extra. torch is installed first at the
# pinned release so pip takes the local CPU wheel where one exists and never pulls a CUDA
# build on a CPU-only machine (set TORCH_SPEC to choose another build, e.g. on a GPU host).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  .venv/bin/pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/pip install --quiet -e ".[dev]"
