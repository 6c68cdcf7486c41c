#!/usr/bin/env bash
# One command from a clean clone: set up .venv, then run the main job, the literal
# `accelerate launch scripts/train.py` (default preset on the bundled Tiny Shakespeare), which writes the model
# directory runs/txl-shakespeare. Extra flags go to train.py, e.g. `--preset tiny`, `--dataset_name wikitext
# --dataset_config_name wikitext-2-raw-v1`, `--push_to_hub --hub_model_id you/name`. The default run reads only
# local files (the corpus ships with hf_txl), so it needs no network; the Hub flags do, so HF_HUB_OFFLINE is left
# as your shell has it. On a CPU-only machine hf_txl.train uses the physical cores (accelerate launch alone would
# pin it to one thread); --num_threads N chooses.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
exec .venv/bin/accelerate launch scripts/train.py "$@"
