#!/usr/bin/env python
"""One prepared run of the accelerator paths: fast path == eager reference, cache == recomputation, bf16 training
follows fp32, ``scripts/train.py`` under bf16, and hf_txl's own speed ratios, on a GPU (or any device).

    .venv/bin/python bench/device_check.py                  # cuda when available, else cpu
    .venv/bin/python bench/device_check.py --device cpu --quick

Each check prints PASS or FAIL with its measured numbers; the exit status is the number of failures. Results go
to ``$OUT/device_check.json`` when ``$OUT`` is set (the device tool's output folder), else ``bench/results/``.
Nothing is downloaded: the models are random, the corpus is the bundled Tiny Shakespeare, and 4.35.2 is not
needed (the speed rows compare hf_txl's fast path with its eager reference and with recomputation).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hf_txl import TxlConfig, TxlForCausalLM  # noqa: E402

RESULTS: dict = {"checks": {}, "timings": {}}
FAILURES: list[str] = []


def check(name: str, ok: bool, **numbers) -> None:
    RESULTS["checks"][name] = {"ok": bool(ok), **numbers}
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {shown}", flush=True)
    if not ok:
        FAILURES.append(name)


def config(size: str, **overrides) -> TxlConfig:
    sizes = {
        "tiny": dict(d_model=64, n_layer=2, n_head=4, d_head=12, d_inner=128, mem_len=32),  # 1/sqrt(12): inexact scale
        "small": dict(d_model=256, n_layer=4, n_head=4, d_head=64, d_inner=1024, mem_len=64),
        "mid": dict(d_model=512, n_layer=6, n_head=8, d_head=64, d_inner=2048, mem_len=128),
    }
    values = dict(vocab_size=204, dropout=0.0, dropatt=0.0, pad_token_id=0, **sizes[size])
    values.update(overrides)
    return TxlConfig(**values)


def pair(cfg: TxlConfig, device):
    """The same weights with the eager reference and the fast path."""
    torch.manual_seed(0)
    eager = TxlForCausalLM(copy.deepcopy(cfg)).to(device)  # own configs: the implementation lives in the config
    eager.set_attn_implementation("eager")
    fast = TxlForCausalLM(copy.deepcopy(cfg)).to(device)
    fast.load_state_dict(eager.state_dict())
    fast.set_attn_implementation("sdpa")
    return eager, fast


def autocast(device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


# ----------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------


def check_fast_path_equals_eager(device) -> None:
    """Outputs and gradients of two segments (the second with memory and left padding in the first), fp32 and bf16."""
    for pre_lnorm in (False, True):
        eager, fast = pair(config("tiny", pre_lnorm=pre_lnorm, clamp_len=20), device)
        ids = torch.randint(1, 204, (3, 48), device=device)
        mask = torch.ones(3, 24, dtype=torch.long, device=device)
        mask[0, :5] = 0
        for bf16, tol in ((False, 1e-4), (True, 6e-2)):
            grads, logits = [], []
            for model in (eager, fast):
                model.zero_grad()
                with autocast(device, bf16):
                    first = model(ids[:, :24], attention_mask=mask)
                    second = model(ids[:, 24:], mems=first.mems, labels=ids[:, 24:])
                second.loss.backward()
                logits.append(second.logits.detach())
                grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            scale = float(grads[0].abs().max())
            check(f"sdpa == eager, pre_lnorm={pre_lnorm}, bf16={bf16}", max_diff(*logits) < tol
                  and max_diff(*grads) < tol * max(1.0, scale),
                  logits_max_diff=max_diff(*logits), grad_max_diff=max_diff(*grads), grad_scale=scale)  # fmt: skip


def check_cached_generation(device) -> None:
    """Greedy generation with the memory (store + caches) == without any cache (full recomputation)."""
    torch.manual_seed(1)
    model = TxlForCausalLM(config("tiny", mem_len=24)).to(device).eval()
    prompt = torch.randint(1, 204, (2, 10), device=device)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    for bf16 in (False, True):
        with autocast(device, bf16):
            cached = model.generate(prompt, attention_mask=mask, max_new_tokens=40, do_sample=False)
            plain = model.generate(prompt, attention_mask=mask, max_new_tokens=40, do_sample=False, use_cache=False)
        same = int((cached == plain).all(dim=1).sum())
        # bf16 rounding may flip a near-tie; fp32 must agree exactly
        check(f"cached generation == recomputation, bf16={bf16}", same == 2 if not bf16 else same >= 1,
              rows_identical=same)  # fmt: skip


def check_bf16_training_follows_fp32(device, steps: int) -> None:
    text = (ROOT / "hf_txl" / "data" / "tiny_shakespeare.txt").read_text()[:200_000]
    vocab = {c: i + 1 for i, c in enumerate(sorted(set(text)))}
    stream = torch.tensor([vocab[c] for c in text], device=device)
    batch, tgt = 16, 64
    rows = stream[: (len(stream) // batch) * batch].view(batch, -1)
    curves = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = TxlForCausalLM(config("small", vocab_size=len(vocab) + 1, dropout=0.1)).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mems, losses = None, []
        for step in range(steps):
            ids = rows[:, step * tgt : (step + 1) * tgt + 1]
            with autocast(device, bf16):
                out = model(ids[:, :-1], mems=mems, shift_labels=ids[:, 1:])
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mems = out.mems
            losses.append(out.loss.item())
        curves[bf16] = losses
    window = 10
    mean = {k: [statistics.mean(v[max(0, i - window + 1) : i + 1]) for i in range(len(v))] for k, v in curves.items()}
    gap = max(abs(a - b) for a, b in zip(mean[False], mean[True]))
    learned = mean[False][-1] < mean[False][window - 1] - 0.5
    check("bf16 training follows fp32", gap < 0.1 and learned, max_gap_10_step_mean=gap,
          fp32_final=mean[False][-1], bf16_final=mean[True][-1])  # fmt: skip
    RESULTS["bf16_curves"] = {"fp32": curves[False], "bf16": curves[True]}


def check_train_script(device) -> None:
    """scripts/train.py, tiny preset, a few steps under bf16 on the device, then the export loads and generates."""
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", ACCELERATE_MIXED_PRECISION="bf16")
        if device.type == "cpu":
            env["ACCELERATE_USE_CPU"] = "true"
        command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--preset", "tiny", "--max_train_steps", "20",
                   "--output_dir", out]  # fmt: skip
        t0 = time.time()
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        seconds = time.time() - t0
        ok = result.returncode == 0 and (Path(out) / "model.safetensors").exists()
        if ok:
            model = TxlForCausalLM.from_pretrained(out).to(device).eval()
            ok = model.generate(torch.tensor([[1, 2, 3]], device=device), max_new_tokens=5).shape == (1, 8)
        check("scripts/train.py --mixed_precision bf16, 20 steps", ok, seconds=seconds, returncode=result.returncode)
        if not ok:
            print(result.stderr[-3000:])


# ----------------------------------------------------------------------------------------------------
# Timings (hf_txl only: fast path vs eager reference, memory vs recomputation)
# ----------------------------------------------------------------------------------------------------


def timed(fn, repeats: int, device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_paths(device, quick: bool) -> None:
    batch, tgt = 8, 128
    repeats = 3 if quick else 10
    for size in ("small",) if quick else ("small", "mid"):
        for bf16 in (False, True):
            eager, fast = pair(config(size, dropout=0.1), device)
            row = {}
            for name, model in (("eager", eager), ("sdpa", fast)):
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                ids = torch.randint(1, 204, (batch, tgt), device=device)
                state = {"mems": None}

                def train_step(model=model, optimizer=optimizer, ids=ids, state=state, bf16=bf16):
                    model.train()
                    with autocast(device, bf16):
                        out = model(ids, mems=state["mems"], labels=ids)
                    out.loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    state["mems"] = out.mems

                def eval_step(model=model, ids=ids, state=state, bf16=bf16):
                    model.eval()
                    with torch.inference_mode(), autocast(device, bf16):
                        state["mems"] = model(ids, mems=state["mems"]).mems

                row[f"train_{name}_tok_s"] = batch * tgt / timed(train_step, repeats, device)
                state["mems"] = None
                row[f"eval_{name}_tok_s"] = batch * tgt / timed(eval_step, repeats, device)
            row["train_speedup"] = row["train_sdpa_tok_s"] / row["train_eager_tok_s"]
            row["eval_speedup"] = row["eval_sdpa_tok_s"] / row["eval_eager_tok_s"]
            RESULTS["timings"][f"{size}_{'bf16' if bf16 else 'fp32'}"] = row
            print(f"      {size} {'bf16' if bf16 else 'fp32'}: " + ", ".join(f"{k} {v:,.1f}" for k, v in row.items()))
    # generation: memory vs recomputation
    model = TxlForCausalLM(config("small" if quick else "mid", mem_len=256 if quick else 512)).to(device).eval()
    prompt = torch.randint(1, 204, (1, 256 if quick else 512), device=device)
    new = 64 if quick else 256
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with_memory = timed(lambda: model.generate(prompt, **kwargs), 1 if quick else 2, device) / new
    without = timed(lambda: model.generate(prompt, use_cache=False, **kwargs), 1, device) / new
    RESULTS["timings"]["generate_ms_per_token"] = {"memory": 1000 * with_memory, "recompute": 1000 * without}
    print(f"      generate: {1000 * with_memory:.2f} ms/token with memory, {1000 * without:.2f} without "
          f"(x{without / with_memory:.1f})")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="Fewer steps and smaller sizes (a smoke run).")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":  # exact comparisons need full fp32 products
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        RESULTS["device"] = torch.cuda.get_device_name(device)
    else:
        RESULTS["device"] = f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {RESULTS['device']}, torch {torch.__version__}", flush=True)
    assert pair(config("tiny"), device)[0].config._attn_implementation == "eager"
    started = time.time()
    check_fast_path_equals_eager(device)
    check_cached_generation(device)
    check_bf16_training_follows_fp32(device, steps=40 if args.quick else 150)
    check_train_script(device)
    time_paths(device, args.quick)
    RESULTS["seconds"] = time.time() - started
    RESULTS["failures"] = FAILURES
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(RESULTS, indent=1))
    print(f"{len(FAILURES)} failed of {len(RESULTS['checks'])} checks; {RESULTS['seconds']:.0f} s -> {out}")
    return len(FAILURES)


if __name__ == "__main__":
    sys.exit(main())
