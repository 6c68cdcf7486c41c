#!/usr/bin/env python
"""The mission's literal command, timed: ``accelerate launch scripts/train.py`` on this machine.

    .venv/bin/python bench/bench_launch.py                 # both parts
    .venv/bin/python bench/bench_launch.py --part threads  # launch variants only (a few minutes)
    .venv/bin/python bench/bench_launch.py --part main_job # the default run, start to exported model

Part ``threads``: training throughput of the default preset (``--max_train_steps`` steps, the first
``--warmup_steps`` logged window discarded) under three launches, alternating ``--rounds`` times:

* ``accelerate launch scripts/train.py``: no flags, no Accelerate config (a temporary ``HF_HOME`` hides any
  ``accelerate config`` file). On a CPU-only machine Accelerate sets ``OMP_NUM_THREADS=1``; hf_txl.train replaces
  that default with physical cores / local processes.
* ``accelerate launch --cpu --num_processes 1 scripts/train.py``: Accelerate's own CPU thread choice (physical
  cores / processes; it makes it only when ``--num_processes`` is given, else it too passes one thread).
* ``OMP_NUM_THREADS=1 accelerate launch scripts/train.py``: one thread, chosen explicitly (kept as chosen); this
  is what the plain command ran at before hf_txl chose the thread count.

Part ``main_job``: ``accelerate launch scripts/train.py`` exactly as the README's quickstart runs it (set-up
excluded), the wall time from start to the exported model, and the final validation loss (whole split, in order,
with memory) from its ``eval_results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
QUALITY_TARGET = 1.60  # nats per character
TIME_TARGET = 330.0  # seconds


def environment(home: str, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "OMP_", "MKL_"))}
    env.update(HF_HOME=home, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra or {})
    return env


def launch(launcher_flags: list[str], train_flags: list[str], env: dict) -> tuple[float, str]:
    command = [ACCELERATE, "launch", *launcher_flags, "scripts/train.py", *train_flags]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return seconds, result.stdout + result.stderr


def throughput(output_dir: Path, warmup_steps: int) -> float:
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > warmup_steps]
    return statistics.median(rates)


def threads_line(log: str) -> str:
    return next((line.strip() for line in log.splitlines() if line.startswith("Using ")), "?")


def part_threads(args, home: str) -> None:
    variants = {
        "accelerate launch scripts/train.py": ([], {}),
        "accelerate launch --cpu --num_processes 1 scripts/train.py": (["--cpu", "--num_processes", "1"], {}),
        "OMP_NUM_THREADS=1 accelerate launch scripts/train.py": ([], {"OMP_NUM_THREADS": "1"}),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    said: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, (flags, extra) in variants.items():
            with tempfile.TemporaryDirectory() as out:
                train_flags = ["--max_train_steps", str(args.max_train_steps), "--logging_steps", "10"]
                train_flags += ["--output_dir", out, "--max_eval_steps", "1", "--eval_steps", "0"]
                _, log = launch(flags, train_flags, environment(home, extra))
                rates[name].append(throughput(Path(out), args.warmup_steps))
                said[name] = threads_line(log)
    base = statistics.median(rates["OMP_NUM_THREADS=1 accelerate launch scripts/train.py"])
    print(f"\nTraining throughput, default preset, median of {args.rounds} round(s) (tokens/s, steps > warm-up):")
    print(f"{'launch':<60} {'tokens/s':>9} {'vs 1 thread':>11}  threads (as logged)")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:<60} {median:>9,.0f} {median / base:>10.2f}x  {said[name]}")


def part_main_job(args, home: str) -> None:
    out = ROOT / "runs" / "bench-main-job"
    shutil.rmtree(out, ignore_errors=True)
    seconds, log = launch([], ["--output_dir", str(out)], environment(home))
    results = json.loads((out / "eval_results.json").read_text())
    print("\nThe main job: accelerate launch scripts/train.py (default preset, bundled corpus, set-up excluded)")
    print(f"  {threads_line(log)}")
    print(f"  wall time        {seconds:8.1f} s   (target <= {TIME_TARGET:.0f} s)")
    print(f"  validation loss  {results['loss']:8.4f} nats/char ({results['bpc']:.4f} bpc; target <= {QUALITY_TARGET})")
    print(f"  steps {results['step']}, {results['tokens']:,} validation tokens, eval mem_len {results['eval_mem_len']}")
    met = seconds <= TIME_TARGET and results["loss"] <= QUALITY_TARGET
    print(f"  both targets met: {'yes' if met else 'NO'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["threads", "main_job", "all"], default="all")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max_train_steps", type=int, default=60)
    p.add_argument("--warmup_steps", type=int, default=10)
    args = p.parse_args()
    import psutil
    import torch

    print(f"{platform.processor() or platform.machine()}, {psutil.cpu_count(logical=False)} physical cores, "
          f"{os.cpu_count()} logical; torch {torch.__version__}; python {platform.python_version()}")  # fmt: skip
    with tempfile.TemporaryDirectory() as home:
        if args.part in ("threads", "all"):
            part_threads(args, home)
        if args.part in ("main_job", "all"):
            part_main_job(args, home)


if __name__ == "__main__":
    main()
