#!/usr/bin/env python
"""What ``hf_txl.training.keep_freed_memory_in_process`` (called by scripts/train.py and scripts/evaluate.py) buys.

    .venv/bin/python bench/bench_allocator.py            # 5 alternations, about 2 minutes
    .venv/bin/python bench/bench_allocator.py --reps 2   # smoke run

The small configuration of bench_speed.py (4 layers, d_model 256, batch 8, tgt_len 64, mem_len 64, dropout 0.1,
random weights): a training step (forward, backward, fused AdamW, memory carried) and an evaluation step with
memory (inference mode). Each measurement runs in a fresh process, with glibc's default allocator ("default") or
with freed memory kept ("kept"); the two alternate, and the table shows medians, the ratio and the minor page
faults per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, resource, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[3])
from hf_txl import TxlConfig, TxlForCausalLM
from hf_txl.training import keep_freed_memory_in_process

if sys.argv[1] == "kept":
    keep_freed_memory_in_process()
mode = sys.argv[2]
torch.manual_seed(0)
config = TxlConfig(vocab_size=204, d_model=256, n_layer=4, n_head=4, d_head=64, d_inner=1024, mem_len=64,
                   dropout=0.1)
model = TxlForCausalLM(config).train(mode == "train")
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
state = {"mems": None}

def step():
    ids = torch.randint(0, 204, (8, 64))
    if mode == "train":
        out = model(ids, mems=state["mems"], labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        with torch.inference_mode():
            out = model(ids, mems=state["mems"], labels=ids)
            float(out.loss)
    state["mems"] = out.mems

for _ in range(5):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
times = []
for _ in range(30 if mode == "train" else 100):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / len(times)
print(json.dumps({"ms": 1000 * statistics.median(times), "faults": faults}))
"""


def measure(setting: str, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, setting, mode, str(ROOT)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="Alternations of the two settings per step kind.")
    args = p.parse_args(argv)
    print("| step (small config) | default ms | kept ms | speed-up | page faults/step default | kept |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in ("train", "eval"):
        runs = {"default": [], "kept": []}
        for rep in range(args.reps):
            order = ("default", "kept") if rep % 2 == 0 else ("kept", "default")
            for setting in order:
                runs[setting].append(measure(setting, mode))
        ms = {k: statistics.median(r["ms"] for r in v) for k, v in runs.items()}
        faults = {k: statistics.median(r["faults"] for r in v) for k, v in runs.items()}
        print(f"| {mode} | {ms['default']:.1f} | {ms['kept']:.1f} | {ms['default'] / ms['kept']:.2f}x "
              f"| {faults['default']:.0f} | {faults['kept']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
