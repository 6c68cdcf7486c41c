#!/usr/bin/env bash
# Creates .venv (if missing) and installs hf_txl (editable) with its dev tools (pytest, pytest-xdist, ruff,
# transformers-mlinter, lm_eval, peft, torchao).
# torch is installed first, and only when .venv has none: TORCH_SPEC (default torch==2.13.0) from pip's configured
# index. On Linux, PyPI's torch is the CUDA build (several GB); for the CPU build, or a given CUDA build, put torch
# into .venv before running this script, which keeps it:
#   python3 -m venv .venv && .venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
# pyproject.toml states the supported range (torch>=2.4).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
