#!/usr/bin/env bash
# One command from a clean clone: set up .venv, lint (ruff, transformers-mlinter), run every test (slow ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check hf_txl scripts tests bench
.venv/bin/python scripts/lint_model.py  # transformers-mlinter on the Hub files
# Two tests at a time (pytest-xdist): most of a test's time is a launched process starting up. Each worker, and each
# process a test launches, computes on one thread (OMP_NUM_THREADS=1): two workers of two threads each on 2 cores
# wait on each other (18 minutes instead of 14). TEST_WORKERS=0 runs the tests one after another, threads as usual.
WORKERS="${TEST_WORKERS:-2}"
if [ "$WORKERS" != 0 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
.venv/bin/python -m pytest -q -n "$WORKERS" "$@"
