#!/usr/bin/env python
"""One prepared run of the accelerator paths: SDPA and flex_attention (eager-mode and, on CUDA, compiled) == the eager
reference, cache == recomputation, bf16 training follows fp32, ``scripts/train.py`` under bf16, hf_txl's own speed
ratios, and the training tokens/s of the base models on one device: NVIDIA's WikiText-103 base configuration next to
its published A100 figures, and the paper's enwik8 base, on a GPU (or any device).

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
import math
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


def pair(cfg: TxlConfig, device, implementation: str = "sdpa"):
    """The same weights with the eager reference and with ``implementation``."""
    torch.manual_seed(0)
    eager = TxlForCausalLM(copy.deepcopy(cfg)).to(device)  # own configs: the implementation lives in the config
    eager.set_attn_implementation("eager")
    fast = TxlForCausalLM(copy.deepcopy(cfg)).to(device)
    fast.load_state_dict(eager.state_dict())
    fast.set_attn_implementation(implementation)
    return eager, fast


def guarded(name: str, fn, *args) -> None:
    """Run one check or timing; an exception is recorded as a failure (with its message) and the run goes on: this
    script is run once on a lent machine, so one broken part must not hide the others."""
    try:
        fn(*args)
    except Exception as error:  # noqa: BLE001 - reported, counted as a failure
        check(f"{name} ran", False, error=f"{type(error).__name__}: {str(error)[:300]}")
        import traceback

        traceback.print_exc()


def autocast(device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


# ----------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------


def padded_segments(device):
    """Ids for two segments of 24 tokens, and a mask for the first that left-pads row 0 by 5."""
    ids = torch.randint(1, 204, (3, 48), device=device)
    mask = torch.ones(3, 24, dtype=torch.long, device=device)
    mask[0, :5] = 0
    return ids, mask


def two_segments(model, ids, mask, bf16: bool, device):
    """Logits of the second of two segments (the first left-padded in row 0) and the gradient of its loss."""
    model.zero_grad()
    with autocast(device, bf16):
        first = model(ids[:, :24], attention_mask=mask)
        second = model(ids[:, 24:], mems=first.mems, labels=ids[:, 24:])
    second.loss.backward()
    inner = getattr(model, "_orig_mod", model)  # a compiled model's parameters
    return second.logits.detach(), torch.cat([p.grad.flatten() for p in inner.parameters()])


def check_equal_to_eager(eager, variants, device) -> None:
    """Each ``(name, model)`` of ``variants`` against ``eager`` over :func:`two_segments`, fp32 (tolerance 1e-4)
    and bf16 autocast (6e-2; gradients relative to their largest entry)."""
    ids, mask = padded_segments(device)
    for bf16, tol in ((False, 1e-4), (True, 6e-2)):
        ref_logits, ref_grads = two_segments(eager, ids, mask, bf16, device)
        scale = float(ref_grads.abs().max())
        for name, model in variants:
            logits, grads = two_segments(model, ids, mask, bf16, device)
            check(f"{name}, bf16={bf16}", max_diff(logits, ref_logits) < tol
                  and max_diff(grads, ref_grads) < tol * max(1.0, scale), logits_max_diff=max_diff(logits, ref_logits),
                  grad_max_diff=max_diff(grads, ref_grads), grad_scale=scale)  # fmt: skip


def check_fast_path_equals_eager(device) -> None:
    """sdpa == eager: outputs and gradients of two segments (the second with memory and left padding in the first),
    post-norm and pre-norm, fp32 and bf16."""
    for pre_lnorm in (False, True):
        eager, fast = pair(config("tiny", pre_lnorm=pre_lnorm, clamp_len=20), device)
        check_equal_to_eager(eager, [(f"sdpa == eager, pre_lnorm={pre_lnorm}", fast)], device)


def check_flex_equals_eager(device) -> None:
    """flex_attention == eager over the same two segments: eager-mode flex (unfused; on the CPU its gradients come
    from the eager fallback, flex has no CPU backward) and, on CUDA, the model under ``torch.compile`` (the fused
    flex kernel)."""
    eager, flex = pair(config("tiny", clamp_len=20), device, "flex_attention")
    variants = [("flex_attention (eager-mode) == eager", flex)]
    if device.type == "cuda":
        variants.append(("flex_attention (compiled) == eager", torch.compile(flex)))
    else:
        print("      (compiled flex_attention: CUDA only here; the CPU has no fused flex kernel with gradients)")
    check_equal_to_eager(eager, variants, device)


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


def bf16_is_emulated(device) -> bool:
    """A CPU without native bf16 products (AVX512-BF16, AMX, ARM BF16): its bf16 autocast converts in software, tens
    of times slower than fp32 (a 40-step run of the small model: 5 minutes on an AVX2 CPU), so its bf16 timings are
    not results, and ``--quick`` checks bf16 training on the tiny model there."""
    if device.type != "cpu":
        return False
    from hf_txl.training import cpu_has_native_bf16

    return cpu_has_native_bf16() is False


def check_bf16_training_follows_fp32(device, steps: int, size: str = "small") -> None:
    text = (ROOT / "hf_txl" / "training" / "corpus" / "tiny_shakespeare.txt").read_text()[:200_000]
    vocab = {c: i + 1 for i, c in enumerate(sorted(set(text)))}
    stream = torch.tensor([vocab[c] for c in text], device=device)
    batch, tgt = 16, 64
    rows = stream[: (len(stream) // batch) * batch].view(batch, -1)
    curves = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = TxlForCausalLM(config(size, vocab_size=len(vocab) + 1, dropout=0.1)).to(device).train()
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
          fp32_final=mean[False][-1], bf16_final=mean[True][-1], model=size)  # fmt: skip
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


def train_step_with_memory(model, optimizer, ids, device, bf16: bool):
    """A training step over ``ids`` (their own labels) that carries the memory from one call to the next."""
    memory = {"mems": None}

    def step():
        model.train()
        with autocast(device, bf16):
            out = model(ids, mems=memory["mems"], labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        memory["mems"] = out.mems

    return step


def time_paths(device, quick: bool) -> None:
    batch, tgt = 8, 128
    repeats = 3 if quick else 10
    emulated = bf16_is_emulated(device)
    for size in ("small",) if quick else ("small", "mid"):
        if emulated:
            RESULTS["timings"][f"{size}_bf16"] = "skipped: bf16 emulated on this CPU"
            print(f"      {size} bf16: skipped (bf16 emulated on this CPU: not a result)")
        for bf16 in (False,) if emulated else (False, True):
            eager, fast = pair(config(size, dropout=0.1), device)
            row = {}
            for name, model in (("eager", eager), ("sdpa", fast)):
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                ids = torch.randint(1, 204, (batch, tgt), device=device)
                state = {"mems": None}
                train_step = train_step_with_memory(model, optimizer, ids, device, bf16)

                def eval_step(model=model, ids=ids, state=state, bf16=bf16):
                    model.eval()
                    with torch.inference_mode(), autocast(device, bf16):
                        state["mems"] = model(ids, mems=state["mems"]).mems

                row[f"train_{name}_tok_s"] = batch * tgt / timed(train_step, repeats, device)
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


def time_compiled_attention(device, quick: bool) -> None:
    """(CUDA) The mid config's bf16 training step with SDPA eager-mode, SDPA under ``torch.compile`` and flex_attention
    under ``torch.compile`` (its fused kernel; ``dropatt`` 0), tokens/s."""
    if device.type != "cuda":
        print("      (compiled attention timings: CUDA only)")
        return
    batch, tgt = 8, 128
    row = {}
    for name, implementation, compiled in (("sdpa", "sdpa", False), ("sdpa_compiled", "sdpa", True),
                                           ("flex_compiled", "flex_attention", True)):  # fmt: skip
        torch.manual_seed(0)
        model = TxlForCausalLM(config("mid", dropout=0.1)).to(device).train()
        model.set_attn_implementation(implementation)
        step_model = torch.compile(model, dynamic=False) if compiled else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(1, 204, (batch, tgt), device=device)
        train_step = train_step_with_memory(step_model, optimizer, ids, device, bf16=True)

        started = time.time()
        for _ in range(3):  # compilation (first segment, then with memory)
            train_step()
        row[f"{name}_first_steps_s"] = time.time() - started
        row[f"{name}_tok_s"] = batch * tgt / timed(train_step, 3 if quick else 20, device)
    RESULTS["timings"]["mid_bf16_train_attention"] = row
    print("      mid bf16 train: " + ", ".join(f"{k} {v:,.1f}" for k, v in row.items()))


# NVIDIA DeepLearningExamples, Transformer-XL for PyTorch (README, "Training performance: NVIDIA DGX A100 (8x A100
# 40GB)", base model, 1 GPU, batch 32 per GPU, pytorch-20.06 container, LAMB optimizer, apex AMP O2 fp16).
NVIDIA_WT103_BASE_ONE_A100 = {"tf32": 41_527, "amp": 59_961}


def base_model_runs(quick: bool):
    """(name, config, batch, tgt_len, zipf): NVIDIA's WikiText-103 base (16L, d_model 512, 8 x 64, d_inner 2048,
    adaptive softmax with cutoffs [19997, 39997, 199997] over 267,735 words, tied, dropout 0.1; tgt = mem = 192,
    batch 32) and the paper's enwik8 base (12L, 512, 8 x 64, 2048; tgt = mem = 512, batch 22). ``quick``: the same
    structures at a toy size (a smoke run; its figures compare with nothing)."""
    wt103 = dict(vocab_size=267_735, cutoffs=[19_997, 39_997, 199_997], div_val=1, d_model=512, n_layer=16,
                 n_head=8, d_head=64, d_inner=2048, mem_len=192, tie_word_embeddings=True,
                 proj_share_all_but_first=True)  # fmt: skip
    enwik8 = dict(vocab_size=204, d_model=512, n_layer=12, n_head=8, d_head=64, d_inner=2048, mem_len=512)
    runs = [("wt103_base", wt103, 32, 192, True), ("enwik8_base", enwik8, 22, 512, False)]
    if quick:
        toy = dict(d_model=64, n_layer=2, n_head=2, d_head=32, d_inner=128, mem_len=32)
        runs = [("wt103_base", dict(wt103, vocab_size=3000, cutoffs=[200, 400, 2000], **toy), 2, 32, True),
                ("enwik8_base", dict(enwik8, **toy), 2, 32, False)]  # fmt: skip
    for name, values, batch, tgt, zipf in runs:
        yield name, TxlConfig(**values, dropout=0.1, dropatt=0.0, pad_token_id=0), batch, tgt, zipf


def time_base_models(device, quick: bool) -> None:
    """Training tokens/s of the base models on this one device (the ``sdpa`` path, fused AdamW, gradient clipping at
    0.25, the memory carried): TF32 (CUDA; fp32 elsewhere), AMP fp16 with a GradScaler (NVIDIA's published mode) and
    AMP bf16. WikiText-103 ids are drawn from a Zipf law (p ~ 1/rank, about 80% in the head cluster as in real text)
    so that the adaptive softmax does the work it does on real data; NVIDIA's figures are printed next to them (an
    A100 40GB with LAMB: a different GPU and optimizer, so a reference, not a like-for-like race)."""
    modes = [("tf32" if device.type == "cuda" else "fp32", None), ("amp_fp16", torch.float16),
             ("amp_bf16", torch.bfloat16)]  # fmt: skip
    for name, cfg, batch, tgt, zipf in base_model_runs(quick):
        weights = 1.0 / torch.arange(1, cfg.vocab_size + 1, dtype=torch.float64)
        row = {}
        for mode, dtype in modes:
            torch.manual_seed(0)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            model = TxlForCausalLM(cfg).to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=2.5e-4, fused=device.type == "cuda")
            scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
            gen = torch.Generator().manual_seed(0)
            state = {"mems": None, "losses": []}

            def train_step(model=model, optimizer=optimizer, scaler=scaler, state=state, dtype=dtype, gen=gen,
                           cfg=cfg, batch=batch, tgt=tgt, zipf=zipf, weights=weights):  # fmt: skip
                if zipf:
                    ids = torch.multinomial(weights, batch * (tgt + 1), replacement=True, generator=gen)
                else:
                    ids = torch.randint(0, cfg.vocab_size, (batch * (tgt + 1),), generator=gen)
                ids = ids.view(batch, tgt + 1).to(device)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    out = model(ids[:, :-1], mems=state["mems"], shift_labels=ids[:, 1:])
                scaler.scale(out.loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                state["mems"] = out.mems
                state["losses"].append(out.loss.item())

            tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            if mode == "tf32":
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            try:
                for _ in range(2):
                    train_step()
                seconds = timed(train_step, 2 if quick else 10, device)
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            row[f"{mode}_tok_s"] = batch * tgt / seconds
            if device.type == "cuda":
                row[f"{mode}_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            finite = all(math.isfinite(loss) for loss in state["losses"])
            check(f"{name} training, {mode}: finite losses", finite, last_loss=state["losses"][-1])
            del model, optimizer
        if name == "wt103_base" and device.type == "cuda" and not quick:
            row["vs_nvidia_a100_tf32"] = row["tf32_tok_s"] / NVIDIA_WT103_BASE_ONE_A100["tf32"]
            row["vs_nvidia_a100_amp_fp16"] = row["amp_fp16_tok_s"] / NVIDIA_WT103_BASE_ONE_A100["amp"]
            row["nvidia_a100_tok_s"] = dict(NVIDIA_WT103_BASE_ONE_A100)
        RESULTS["timings"][f"{name}_train"] = dict(row, batch=batch, tgt_len=tgt, mem_len=cfg.mem_len)
        print(f"      {name} train (batch {batch}, tgt {tgt}, mem {cfg.mem_len}): "
              + ", ".join(f"{k} {v:,.2f}" for k, v in row.items() if not isinstance(v, dict)))  # fmt: skip


def write_results(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(RESULTS, indent=1))


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
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    bf16_size = "tiny" if args.quick and bf16_is_emulated(device) else "small"
    parts = [
        ("sdpa == eager", check_fast_path_equals_eager, device),
        ("flex_attention == eager", check_flex_equals_eager, device),
        ("cached generation", check_cached_generation, device),
        ("bf16 training", check_bf16_training_follows_fp32, device, 40 if args.quick else 150, bf16_size),
        ("scripts/train.py", check_train_script, device),
        ("speed ratios", time_paths, device, args.quick),
        ("base models' training", time_base_models, device, args.quick),
        ("compiled attention", time_compiled_attention, device, args.quick),
    ]
    for name, fn, *fn_args in parts:  # results are written after each part: a run cut short keeps what it measured
        part_started = time.time()
        guarded(name, fn, *fn_args)
        seconds = RESULTS.setdefault("part_seconds", {})[name] = time.time() - part_started
        print(f"      ({name}: {seconds:.0f} s)", flush=True)
        RESULTS["seconds"], RESULTS["failures"] = time.time() - started, FAILURES
        write_results(out)
    print(f"{len(FAILURES)} failed of {len(RESULTS['checks'])} checks; {RESULTS['seconds']:.0f} s -> {out}")
    return len(FAILURES)


if __name__ == "__main__":
    sys.exit(main())
