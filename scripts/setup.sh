#!/usr/bin/env bash
# Creates .venv (if missing) and installs hf_txl with its dev tools.
# torch is pinned first to the CPU build so that pip never pulls a multi-GB CUDA wheel by accident;
# pyproject.toml states the supported range (torch>=2.4). Set TORCH_SPEC to install another build.
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
