#!/usr/bin/env bash
# One command from a clean clone: set up .venv, then train the default preset on the bundled
# Tiny Shakespeare and write the model directory runs/txl-shakespeare (extra flags go to train.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
exec .venv/bin/accelerate launch scripts/train.py "$@"
