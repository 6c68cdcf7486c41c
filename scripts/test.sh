#!/usr/bin/env bash
# One command from a clean clone: set up .venv, lint (ruff, transformers-mlinter), run every test (slow ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check hf_txl scripts tests bench
.venv/bin/python scripts/lint_model.py  # transformers-mlinter on the Hub files
# Two tests at a time (pytest-xdist): most of a test's time is a launched process starting up, so 2 workers finish
# the suite in about 16 minutes on 2 cores instead of 21. TEST_WORKERS=0 runs them one after another.
.venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" "$@"
