#!/usr/bin/env bash
# One command from a clean clone: set up .venv, then run the main job, the literal
# `accelerate launch scripts/train.py` (default preset on the bundled Tiny Shakespeare), which writes the model
# directory runs/txl-shakespeare. Extra flags go to train.py. On a CPU-only machine hf_txl.train uses the
# physical cores (accelerate launch alone would pin it to one thread); --num_threads N chooses.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
exec .venv/bin/accelerate launch scripts/train.py "$@"
