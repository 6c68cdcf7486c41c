#!/usr/bin/env bash
# One command from a clean clone: set up .venv, then train the default preset on the bundled
# Tiny Shakespeare and write the model directory runs/txl-shakespeare (extra flags go to train.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
LAUNCH=()
if ! .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  # CPU only: without --cpu, `accelerate launch` pins the process to a single thread (OMP_NUM_THREADS=1).
  LAUNCH=(--cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
fi
exec .venv/bin/accelerate launch "${LAUNCH[@]}" scripts/train.py "$@"
