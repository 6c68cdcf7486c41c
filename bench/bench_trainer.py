#!/usr/bin/env python
"""The cost of transformers' Trainer: ``TxlTrainer`` (scripts/train_with_trainer.py) against ``hf_txl.train``
(scripts/train.py), the same preset, flags and machine, alternating runs.

    .venv/bin/python bench/bench_trainer.py                          # shakespeare preset (the main job's model)
    .venv/bin/python bench/bench_trainer.py --preset tiny --steps 200 --rounds 3

Both scripts train the same model on the same data (their losses and weights are equal: tests/test_trainer.py).
Each run trains ``--steps`` optimizer steps with a loss logged every step; its training time is the sum of the
steps' times after the first ``--skip`` (start-up, first-call allocations): from ``log.jsonl``'s per-step tokens/s
for hf_txl.train, and from a callback's step timestamps for TxlTrainer. Prints the median tokens/s of each and the
ratio; set-up, tokenization, evaluation and export are excluded from both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import cpu_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# TxlTrainer with a callback that stamps every optimizer step (the script itself has none).
TRAINER_RUN = """
import json, sys, time
sys.path.insert(0, {scripts!r})
import train_with_trainer
from transformers import TrainerCallback
from hf_txl.training.trainer import TxlTrainer

stamps = []
class Stamp(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        stamps.append(time.perf_counter())

init = TxlTrainer.__init__
def init_with_stamps(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.add_callback(Stamp())
TxlTrainer.__init__ = init_with_stamps
train_with_trainer.main(sys.argv[1:])
with open({stamps_file!r}, "w") as f:
    json.dump(stamps, f)
"""


def tokens_per_step(preset: str) -> int:
    from hf_txl.training.presets import get_preset

    train = get_preset(preset)["train"]
    return train["per_device_train_batch_size"] * train["tgt_len"]


def run_hf_txl_train(flags: list[str], out: Path, skip: int, tokens: int) -> float:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *flags, "--output_dir", str(out)],
                   check=True, env=ENV, cwd=ROOT, capture_output=True)  # fmt: skip
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "loss" in r][skip:]
    return len(rates) * tokens / sum(tokens / rate for rate in rates)


def run_txl_trainer(flags: list[str], out: Path, skip: int, tokens: int) -> float:
    stamps_file = out.parent / f"{out.name}_stamps.json"
    script = TRAINER_RUN.format(scripts=str(ROOT / "scripts"), stamps_file=str(stamps_file))
    subprocess.run([sys.executable, "-c", script, *flags, "--output_dir", str(out)],
                   check=True, env=ENV, cwd=ROOT, capture_output=True)  # fmt: skip
    stamps = json.loads(stamps_file.read_text())[skip:]
    return (len(stamps) - 1) * tokens / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="shakespeare")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=5, help="First steps left out of the timing.")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    flags = ["--preset", args.preset, "--max_train_steps", str(args.steps), "--logging_steps", "1", "--eval_steps", "0"]
    tokens = tokens_per_step(args.preset)
    print("machine:", json.dumps(cpu_info()))
    rates = {"hf_txl.train": [], "TxlTrainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            rates["hf_txl.train"].append(run_hf_txl_train(flags, Path(tmp) / f"a{round_}", args.skip, tokens))
            rates["TxlTrainer"].append(run_txl_trainer(flags, Path(tmp) / f"b{round_}", args.skip, tokens))
    print(f"preset {args.preset}, {args.steps} steps ({args.skip} skipped), {tokens} tokens/step, {args.rounds} rounds")
    print(f"{'loop':<14}{'tokens/s (median)':>20}{'runs':>40}")
    for name, values in rates.items():
        print(f"{name:<14}{statistics.median(values):>20,.0f}{', '.join(f'{v:,.0f}' for v in values):>40}")
    ratio = statistics.median(rates["TxlTrainer"]) / statistics.median(rates["hf_txl.train"])
    print(f"TxlTrainer / hf_txl.train: {ratio:.3f}")


if __name__ == "__main__":
    main()
