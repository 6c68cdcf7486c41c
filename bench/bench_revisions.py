#!/usr/bin/env python
"""Two checkouts of hf_txl side by side: greedy generation and evaluation with memory, in fresh processes, alternating.

    git worktree add ../hf_txl_before <commit>                         # a second checkout beside this one
    .venv/bin/python bench/bench_revisions.py ../hf_txl_before .        # before, after
    .venv/bin/python bench/bench_revisions.py A B --rounds 5

``bench_speed.py`` compares hf_txl with transformers 4.35.2; comparing two of its own runs taken minutes apart mixes
the change with the machine's drift. This script alternates the two checkouts (each timing in a fresh process that
imports hf_txl from that checkout), ``--rounds`` times each, and prints medians and the ratio.

Rows (``--rows``, default all): ``generate``: the mid config of ``bench_speed.py`` with ``mem_len`` 512, greedy
``generate()`` after a 512-token prompt (ms per token: 96 new tokens minus 32 new tokens, over 64); ``evaluate``: the
small config, 40 segments of 64 tokens with memory and labels, batch 8 (tokens/s); ``train_small`` / ``train_mid``:
the training rows of ``bench_speed.py`` (dropout 0.1, memory carried, fused AdamW; ms per step, median of 8 after 3
warm-up steps). Not in the default: ``eval_long`` / ``eval_long_peak``: the mid config evaluated with the enwik8
evaluation memory (mem_len 2,100, clamp_len 820, same_length, tgt_len 80, batch 1; the memory passed as ``cache=``,
updated in place), tokens/s over the last 11 of 45 segments and the peak RSS above the process before it (sampled
after every segment); ``import_s`` / ``import_mib``: ``import hf_txl`` after torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, os, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import transformers

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

rows, result = sys.argv[2].split(","), {}
rss, start = rss_mib(), time.perf_counter()
import hf_txl
from hf_txl import TxlConfig, TxlForCausalLM
result["import_s"], result["import_mib"] = time.perf_counter() - start, rss_mib() - rss
from hf_txl.training import keep_freed_memory_in_process

assert hf_txl.__file__.startswith(sys.argv[1]), hf_txl.__file__
keep_freed_memory_in_process()
torch.manual_seed(0)
mid = TxlConfig(vocab_size=204, d_model=512, n_layer=6, n_head=8, d_head=64, d_inner=2048, mem_len=512, dropout=0.0)
model = TxlForCausalLM(mid).eval()
prompt = torch.randint(0, 204, (1, 512))
if "eval_long" in rows or "eval_long_peak" in rows:  # first: no freed buffers of other rows to reuse
    long = TxlConfig(vocab_size=204, d_model=512, n_layer=6, n_head=8, d_head=64, d_inner=2048, mem_len=2100,
                     clamp_len=820, same_length=True, dropout=0.0)
    long_model = TxlForCausalLM(long).eval()
    gen = torch.Generator().manual_seed(1)
    cache, base, peak, times = None, rss_mib(), 0.0, []
    with torch.inference_mode():
        for _ in range(45):  # the memory is full after 27 segments; the store moves every 6-7 after that
            ids = torch.randint(0, 204, (1, 80), generator=gen)
            start = time.perf_counter()
            out = long_model(ids, cache=cache, labels=ids)
            cache = out.cache
            float(out.loss)
            times.append(time.perf_counter() - start)
            peak = max(peak, rss_mib() - base)
    result["eval_long"], result["eval_long_peak"] = 80 / statistics.median(times[34:]), peak
    del long_model, cache, out
if "generate" in rows:
    model.generate(prompt, max_new_tokens=8, do_sample=False)  # warm-up
    generate = []
    for _ in range(3):
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=96, do_sample=False)
        middle = time.perf_counter()
        model.generate(prompt, max_new_tokens=32, do_sample=False)
        generate.append(((middle - start) - (time.perf_counter() - middle)) / 64 * 1000)
    result["generate"] = sorted(generate)[1]
small = TxlConfig(vocab_size=204, d_model=256, n_layer=4, n_head=4, d_head=64, d_inner=1024, mem_len=64, dropout=0.0)
if "evaluate" in rows:
    model = TxlForCausalLM(small).eval()
    text = torch.randint(0, 204, (8, 64 * 40))
    evaluate = []
    with torch.no_grad():
        for _ in range(3):
            mems, start = None, time.perf_counter()
            for segment in text.split(64, dim=1):
                mems = model(segment, mems=mems, labels=segment).mems
            evaluate.append(text.numel() / (time.perf_counter() - start))
    result["evaluate"] = sorted(evaluate)[1]
for name, config, tgt_len in (("train_small", small, 64), ("train_mid", mid, 128)):
    if name not in rows:
        continue
    config.dropout, config.mem_len = 0.1, tgt_len
    torch.manual_seed(0)
    model = TxlForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2.5e-4, fused=True)
    mems, times = None, []
    for step in range(11):
        ids = torch.randint(0, 204, (8, tgt_len))
        start = time.perf_counter()
        out = model(ids, mems=mems, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mems = out.mems
        times.append(time.perf_counter() - start)
    result[name] = statistics.median(times[3:]) * 1000
print(json.dumps(result))
"""


ROWS = {  # name: (label, unit)
    "generate": ("generate mid, 512 after 512", "ms/token"),
    "evaluate": ("eval small with memory", "tok/s"),
    "train_small": ("train small fp32 step", "ms/step"),
    "train_mid": ("train mid fp32 step", "ms/step"),
    "eval_long": ("eval mid, mem_len 2,100 (cache= in place)", "tok/s"),
    "eval_long_peak": ("the same: peak RSS above the process before it", "MiB"),
    "import_s": ("import hf_txl (after torch, transformers)", "s"),
    "import_mib": ("the same: RSS it adds", "MiB"),
}
DEFAULT_ROWS = ("generate", "evaluate", "train_small", "train_mid")


def measure(python: str, checkout: Path, rows: list[str]) -> dict:
    command = [python, "-c", WORKER, str(checkout), ",".join(rows)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path, help="checkout A (e.g. a worktree of the commit before a change)")
    p.add_argument("after", type=Path, help="checkout B")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per checkout, alternating (default 3)")
    p.add_argument(
        "--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, of {', '.join(ROWS)} (default: first four)"
    )
    args = p.parse_args(argv)
    rows = args.rows.split(",")
    if unknown := set(rows) - set(ROWS):
        p.error(f"--rows: unknown {sorted(unknown)}; choose from {', '.join(ROWS)}.")
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, path in sides.items():
        if not (path / "hf_txl" / "__init__.py").exists():
            p.error(f"{name}: {path} is not an hf_txl checkout (no hf_txl/__init__.py); pass a repository root.")
    results = {name: [] for name in sides}
    for round_ in range(args.rounds):
        order = list(sides) if round_ % 2 == 0 else list(reversed(sides))  # who goes first alternates too
        for name in order:
            results[name].append(measure(sys.executable, sides[name], rows))
            print(f"round {round_ + 1} {name}: {results[name][-1]}", flush=True)
    print("\n| row | before | after | unit | after / before |\n|---|---:|---:|---|---:|")
    for key in rows:
        label, unit = ROWS[key]
        before = statistics.median(r[key] for r in results["before"])
        after = statistics.median(r[key] for r in results["after"])
        print(f"| {label} | {before:,.2f} | {after:,.2f} | {unit} | {after / before:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
