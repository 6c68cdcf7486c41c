"""Timing worker of ``bench_speed.py``: one long-lived process per side, driven by JSON lines on stdin.

Runs under the project's interpreter (side ``txl``: hf_txl) or under the reference virtual environment (side
``ref``: transformers 4.35.2 ``TransfoXLLMHeadModel``); it imports nothing from hf_txl on the reference side.
Every command answers one JSON line on stdout: timings of each step, and the peak resident memory above the
idle process (sampled every 2 ms; the allocator is trimmed before each command).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import resource
import statistics
import sys
import threading
import time
import warnings

import torch

warnings.filterwarnings("ignore")
SIDE = sys.argv[1]  # "ref" or "txl"
MODEL = None
STATE = {}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak RSS above the RSS at entry (after gc and malloc_trim), sampled by a thread."""

    def __enter__(self):
        gc.collect()
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.start = self.peak = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.mib = (self.peak - self.start) / 2**20
        self.abs_mib = self.peak / 2**20


def autocast(spec):
    if spec == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


def build(args):
    """(ref side) A random 4.35.2 model with a plain softmax, saved as safetensors."""
    from transformers import TransfoXLConfig, TransfoXLLMHeadModel

    torch.manual_seed(args["seed"])
    c = args["config"]
    config = TransfoXLConfig(
        vocab_size=c["vocab_size"], cutoffs=[], d_model=c["d_model"], d_embed=c["d_model"], div_val=1,
        n_layer=c["n_layer"], n_head=c["n_head"], d_head=c["d_head"], d_inner=c["d_inner"], mem_len=c["mem_len"],
        clamp_len=-1, same_length=False, pre_lnorm=False, untie_r=True, dropout=c["dropout"], dropatt=0.0,
        tie_word_embeddings=True, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model = TransfoXLLMHeadModel(config)
    with torch.no_grad():  # move away from the init so that every term matters in the sanity check
        for name, param in model.named_parameters():
            if "layer_norm.weight" in name:
                param.add_(torch.randn_like(param) * 0.05)
            elif "bias" in name:
                param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(args["dir"], safe_serialization=True)
    return {"params": sum(p.numel() for p in model.parameters())}


def load(args):
    global MODEL
    MODEL = None
    gc.collect()
    if SIDE == "ref":
        from transformers import TransfoXLLMHeadModel

        MODEL = TransfoXLLMHeadModel.from_pretrained(args["dir"])
        # 4.35.2's (adaptive) softmax fails under CPU autocast when given labels (index_put of bf16 values into a
        # float32 buffer); run it in float32 with autocast off. The rest of the model stays under autocast.
        crit_forward = MODEL.crit.forward

        def crit_fp32(hidden, labels=None, keep_order=False):
            if not torch.is_autocast_enabled("cpu"):  # e.g. a model converted to bf16 (to_dtype)
                return crit_forward(hidden, labels, keep_order)
            with torch.autocast("cpu", enabled=False):
                return crit_forward(hidden.float(), labels, keep_order)

        MODEL.crit.forward = crit_fp32
    else:
        sys.path.insert(0, args["repo"])
        from transformers import AutoModelForCausalLM

        import hf_txl  # noqa: F401  (registers the transfo-xl legacy loader)

        MODEL = AutoModelForCausalLM.from_pretrained(args["dir"], attn_implementation=args.get("attn", "sdpa"))
    STATE.clear()
    return {
        "class": type(MODEL).__name__,
        "params": sum(p.numel() for p in MODEL.parameters()),
        "maxrss_mib": maxrss_mib(),
    }


def compile_model(args):
    """(txl) Wrap the model in torch.compile (compiled at the first calls of the next command)."""
    global MODEL
    MODEL = torch.compile(MODEL)
    STATE.clear()
    return {}


def set_memory(mem_len, same_length=None, clamp_len=None):
    if SIDE == "ref":
        MODEL.transformer.reset_memory_length(mem_len)
        if same_length is not None:
            MODEL.transformer.same_length = same_length
        if clamp_len is not None:
            MODEL.transformer.clamp_len = clamp_len
    else:
        MODEL.config.mem_len = mem_len
        if same_length is not None:
            MODEL.config.same_length = same_length
        if clamp_len is not None:
            MODEL.config.clamp_len = clamp_len


def memory_settings():
    """(mem_len, same_length, clamp_len) as they are now, for :func:`set_memory` to restore."""
    if SIDE == "ref":
        t = MODEL.transformer
        return t.mem_len, t.same_length, t.clamp_len
    c = MODEL.config
    return c.mem_len, c.same_length, c.clamp_len


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def forward(ids, mems, labels=None, in_place=False):
    """One segment; ``in_place`` (hf_txl, evaluation): the memory passed as ``cache=`` and updated in place, as
    hf_txl's ``evaluate()`` does, instead of ``mems=`` (left as it was, as ``scripts/train.py`` passes it)."""
    if SIDE == "ref":
        out = MODEL(input_ids=ids, mems=mems, labels=labels)
        return out, out.mems
    if in_place:
        out = MODEL(input_ids=ids, cache=mems, labels=labels)
        return out, out.cache
    out = MODEL(input_ids=ids, mems=mems, labels=labels)
    return out, out.mems


# ----------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------


def logprobs(args):
    """Log-probabilities of two consecutive segments in eval mode (the sanity check that both sides agree)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, MODEL.config.vocab_size, (2, 2 * args["tgt_len"]), generator=gen)
    MODEL.eval()
    set_memory(args["mem_len"])
    mems, outs = None, []
    with torch.no_grad():
        for seg in ids.split(args["tgt_len"], dim=1):
            if SIDE == "ref":
                out = MODEL(input_ids=seg, mems=mems)
                outs.append(out.prediction_scores)
            else:
                out = MODEL(input_ids=seg, mems=mems)
                outs.append(torch.log_softmax(out.logits.float(), -1))
            mems = out.mems
    return {"logprobs": torch.cat(outs, 1).flatten().tolist()}


def train(args):
    """Training steps (forward with loss, backward, AdamW step) carrying the memory; seconds per step."""
    torch.manual_seed(0)
    set_memory(args["mem_len"])
    MODEL.train()
    key = ("opt", args.get("fused", True))
    if key not in STATE:
        STATE.clear()
        STATE[key] = torch.optim.AdamW(MODEL.parameters(), lr=args.get("lr", 2.5e-4), fused=args.get("fused", True))
    opt = STATE[key]
    batch, tgt_len, vocab = args["batch"], args["tgt_len"], MODEL.config.vocab_size
    data = args.get("data")
    gen = torch.Generator().manual_seed(args.get("seed", 0))
    mems, times, losses = None, [], []
    with PeakMemory() as mem:
        for step in range(args["warmup"] + args["steps"]):
            if data is not None:
                ids = torch.tensor(data[step % len(data)])
            else:
                ids = torch.randint(0, vocab, (batch, tgt_len), generator=gen)
            t0 = time.perf_counter()
            with autocast(args.get("autocast")):
                out, mems = forward(ids, mems, labels=ids)
                loss = out.loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= args["warmup"]:
                times.append(time.perf_counter() - t0)
            losses.append(float(loss))
    return {"times": times, "losses": losses, "peak_mib": mem.mib, "peak_abs_mib": mem.abs_mib}


def evaluate(args):
    """Evaluation segments with memory and the loss (inference mode on both sides); seconds per segment. Optional
    ``same_length`` / ``clamp_len`` (the enwik8 evaluation setting), restored afterwards. ``maxrss_mib`` is the
    process's RSS high-water so far (``ru_maxrss``: in a fresh worker, the load and this evaluation)."""
    saved = memory_settings()
    set_memory(args["mem_len"], args.get("same_length"), args.get("clamp_len"))
    MODEL.eval()
    batch, tgt_len, vocab = args["batch"], args["tgt_len"], MODEL.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    mems, times = None, []
    with PeakMemory() as mem, torch.inference_mode(), autocast(args.get("autocast")):
        for step in range(args["warmup"] + args["steps"]):
            ids = torch.randint(0, vocab, (batch, tgt_len), generator=gen)
            t0 = time.perf_counter()
            out, mems = forward(ids, mems, labels=ids, in_place=True)
            float(out.loss)
            if step >= args["warmup"]:
                times.append(time.perf_counter() - t0)
    set_memory(*saved)
    return {"times": times, "peak_mib": mem.mib, "peak_abs_mib": mem.abs_mib, "maxrss_mib": maxrss_mib()}


def generate(args):
    """``generate()`` of ``new_tokens`` greedy tokens after a random prompt; total seconds and the tokens."""
    set_memory(args["mem_len"])
    MODEL.eval()
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(1, MODEL.config.vocab_size, (1, args["prompt_len"]), generator=gen)
    n = args["new_tokens"]
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.inference_mode():  # warm-up (first-call costs of generate and of the kernels), not timed
        MODEL.generate(prompt, **dict(kwargs, max_new_tokens=2, min_new_tokens=2))
    with PeakMemory() as mem, torch.inference_mode():
        t0 = time.perf_counter()
        out = MODEL.generate(prompt, **kwargs)
        seconds = time.perf_counter() - t0
    assert out.shape[1] == args["prompt_len"] + n, out.shape
    return {"times": [seconds], "tokens": out[0, -n:].tolist(), "peak_mib": mem.mib, "peak_abs_mib": mem.abs_mib}


def recompute(args):
    """(txl) Full recomputation, no memory: one forward of the whole sequence per new token, timed at the given
    sequence lengths (the greedy step's cost at that length)."""
    MODEL.eval()
    gen = torch.Generator().manual_seed(3)
    seq = torch.randint(1, MODEL.config.vocab_size, (1, max(args["lengths"])), generator=gen)
    result = {}
    with PeakMemory() as mem, torch.inference_mode():
        for length in args["lengths"]:
            runs = []
            for _ in range(args["repeats"]):
                t0 = time.perf_counter()
                MODEL(input_ids=seq[:, :length], use_cache=False).logits[:, -1].argmax(-1)
                runs.append(time.perf_counter() - t0)
            result[str(length)] = statistics.median(runs)
    return {"step_seconds": result, "peak_mib": mem.mib, "peak_abs_mib": mem.abs_mib}


def table9(args):
    """(txl) Per-token evaluation time at attention length L: a segment of L tokens with an L-token memory
    (same_length: every query sees L keys) vs a window of L tokens recomputed for every token (one forward, no
    memory: ``legacy_zero_mems`` is off for it, or the window would also attend to ``mem_len`` = L zero vectors)."""
    L = args["attn_len"]
    MODEL.eval()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1, MODEL.config.vocab_size, (1, 3 * L), generator=gen)
    xl, window = [], []
    with PeakMemory() as mem, torch.inference_mode():
        set_memory(L, same_length=True)
        mems = MODEL(input_ids=ids[:, :L]).mems  # memory full
        for r in range(args["repeats"]):
            t0 = time.perf_counter()
            MODEL(input_ids=ids[:, L : 2 * L], mems=mems)
            xl.append((time.perf_counter() - t0) / L)
            with legacy_zero_mems(False):
                t0 = time.perf_counter()
                MODEL(input_ids=ids[:, r : r + L], use_cache=False).logits[:, -1].argmax(-1)
                window.append(time.perf_counter() - t0)
        set_memory(args["mem_len"], same_length=False)
    return {"xl": statistics.median(xl), "window": statistics.median(window), "peak_mib": mem.mib}


def batch_prompts(batch, width, vocab):
    """Left-padded prompts ``[batch, width]`` and their attention mask: row 0 is ``width`` tokens long, the others
    between ``width // 4`` and ``width`` (each row drawn from its own seed, so that the first rows of a larger batch
    are those of a smaller one). Also the prompts themselves, unpadded."""
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    prompts = []
    for row in range(batch):
        gen = torch.Generator().manual_seed(100 + row)
        n = width if row == 0 else int(torch.randint(width // 4, width + 1, (1,), generator=gen))
        prompt = torch.randint(1, vocab, (n,), generator=gen)
        ids[row, width - n :], mask[row, width - n :] = prompt, 1
        prompts.append(prompt)
    return ids, mask, prompts


@contextlib.contextmanager
def legacy_zero_mems(flag):
    """(txl) ``config.legacy_zero_mems`` set to ``flag`` (None: as it is) inside the block. The 4.x zero memory sits at
    other distances from the tokens of rows padded differently, so a padded row computes exactly what its prompt
    alone computes only without it."""
    if SIDE == "ref" or flag is None:
        yield
        return
    saved = MODEL.config.legacy_zero_mems
    MODEL.config.legacy_zero_mems = flag
    try:
        yield
    finally:
        MODEL.config.legacy_zero_mems = saved


ALONE = {}  # (width, new_tokens, mem_len) -> log-probabilities of the prompts generated alone (generate_alone)


def _greedy(ids, n, mask=None):
    """Greedy tokens ``[B, n]`` and the log-probabilities of every step ``[B, n, V]`` (float32)."""
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    if mask is not None:
        kwargs["attention_mask"] = mask
    out = MODEL.generate(ids, return_dict_in_generate=True, output_scores=True, **kwargs)
    assert out.sequences.shape == (ids.shape[0], ids.shape[1] + n), out.sequences.shape
    return out.sequences[:, ids.shape[1] :], torch.stack(out.scores, 1).float().log_softmax(-1)


def generate_batch(args):
    """``generate()`` of ``new_tokens`` greedy tokens for a batch of left-padded prompts (:func:`batch_prompts`;
    batch 1: row 0 alone, unpadded), with their ``attention_mask`` (not on the ref side: 4.35.2's ``generate`` rejects
    one, its rows then attend to the padding as if it were text). Total seconds (the step scores are kept, [B, V] per
    step, as ``output_scores`` does); after the timing, the largest difference of the rows' log-probabilities from
    those of their prompts generated alone (:func:`generate_alone`, run first), over every step and token."""
    set_memory(args["mem_len"])
    MODEL.eval()
    ids, mask, _ = batch_prompts(args["batch"], args["width"], MODEL.config.vocab_size)
    use_mask = mask if args["mask"] and args["batch"] > 1 and SIDE != "ref" else None
    n = args["new_tokens"]
    with legacy_zero_mems(args.get("legacy_zero_mems")):
        with torch.inference_mode():  # warm-up, not timed
            _greedy(ids, 2, use_mask)
        with PeakMemory() as mem, torch.inference_mode():
            t0 = time.perf_counter()
            tokens, logp = _greedy(ids, n, use_mask)
            seconds = time.perf_counter() - t0
    alone = ALONE.get((args["width"], n, args["mem_len"]))
    diffs = []
    if alone is not None:
        for row in range(min(args["batch"], len(alone))):
            a, b = logp[row], alone[row]
            finite = a.isfinite() & b.isfinite()  # (min_new_tokens masks the end token: -inf on both)
            diffs.append((a - b)[finite].abs().max().item() if bool((finite == (a.isfinite() | b.isfinite())).all())
                         else float("inf"))  # fmt: skip
    return {
        "times": [seconds], "tokens": tokens.tolist(), "masked": use_mask is not None, "max_logp_diff": diffs,
        "peak_mib": mem.mib, "peak_abs_mib": mem.abs_mib,
    }  # fmt: skip


def generate_alone(args):
    """The first ``rows`` prompts of :func:`batch_prompts`, each generated alone (batch 1, unpadded, greedy): what the
    rows of a correct batched generation equal (the memory covers prompt and new tokens). Their log-probabilities are
    kept for :func:`generate_batch`."""
    set_memory(args["mem_len"])
    MODEL.eval()
    _, _, prompts = batch_prompts(args["rows"], args["width"], MODEL.config.vocab_size)
    with legacy_zero_mems(args.get("legacy_zero_mems")), torch.inference_mode():
        runs = [_greedy(prompt[None], args["new_tokens"]) for prompt in prompts]
    ALONE[(args["width"], args["new_tokens"], args["mem_len"])] = [logp[0] for _, logp in runs]
    return {"tokens": [tokens[0].tolist() for tokens, _ in runs]}


def to_dtype(args):
    """Convert the model's weights (and so its memory and caches) to ``dtype``: ``model.to(torch.bfloat16)``."""
    MODEL.to(getattr(torch, args["dtype"]))
    STATE.clear()
    return {"dtype": str(next(MODEL.parameters()).dtype)}


def step_bytes(args):
    """(txl) The bytes a batch-1 greedy step must read, taken from the model and from the cache ``generate()``
    leaves (memory ``mem_len``, prompt ``prompt_len``): every parameter once at its dtype, except W_{k,R}
    (``r_proj``: its product with R is cached), plus per layer the memory's projected keys/values for the step's
    ``M + 1`` key positions (``kv`` ``[2, B, H, M, D]`` and the new token's) and the ``M + 1`` positions of the
    cached position term ``r_head`` ``[H, K', D]`` that the step reads."""
    set_memory(args["mem_len"])
    MODEL.eval()
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(1, MODEL.config.vocab_size, (1, args["prompt_len"]), generator=gen)
    with torch.inference_mode():
        out = MODEL.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)  # fmt: skip
    cache = getattr(out, "cache", None) or out.past_key_values
    params = {id(p): p for p in MODEL.parameters()}  # tied weights once
    weights = sum(p.numel() * p.element_size() for p in params.values())
    r_proj = sum(layer.attn.r_proj.weight.numel() * layer.attn.r_proj.weight.element_size()
                 for layer in MODEL.transformer.layers)  # fmt: skip
    kv = r_head = 0
    shapes = []
    for layer in cache.layers:
        two, batch, n_head, mlen, d_head = layer.kv.shape
        klen = mlen + 1
        kv += two * batch * n_head * klen * d_head * layer.kv.element_size()
        r_head += n_head * min(klen, layer.r_head.shape[1]) * d_head * layer.r_head.element_size()
        shapes.append(dict(kv=list(layer.kv.shape), r_head=list(layer.r_head.shape)))
    weight_bytes = weights - r_proj
    return {
        "parameter_bytes": weights, "r_proj_bytes": r_proj, "weight_bytes": weight_bytes, "kv_bytes": kv,
        "r_head_bytes": r_head, "total_bytes": weight_bytes + kv + r_head, "dtype": str(layer.kv.dtype),
        "memory_positions": mlen, "shapes": shapes[0], "n_layer": len(shapes),
    }  # fmt: skip


def bandwidth(args):
    """Memory bandwidth: ``dst.copy_(src)`` of an ``mib`` MiB float32 tensor, read + write bytes counted; best and
    median bytes/s over ``repeats`` copies after one warm-up, in each of 3 fresh pairs of buffers. Also the read-only
    rate (``src.sum()``)."""
    n = args["mib"] * 2**20 // 4
    times, reads = [], []  # copies; read-only streams (a sum), what a matrix-vector product does with its weights
    for _ in range(3):  # fresh buffers each time: the rate moves with where the pages land (up to 1.5x here)
        src = torch.empty(n).uniform_()
        dst = torch.empty_like(src)
        dst.copy_(src)
        src.sum()
        for _ in range(args["repeats"]):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            src.sum()
            reads.append(time.perf_counter() - t0)
        del src, dst
    moved = 2 * n * 4
    read = n * 4
    return {"best": moved / min(times), "median": moved / statistics.median(times), "bytes": moved,
            "read_best": read / min(reads), "read_median": read / statistics.median(reads)}  # fmt: skip


def gemm(args):
    """Best-of GEMM throughput (FLOP/s) of an n x n matrix product."""
    n = args["n"]
    dtype = getattr(torch, args["dtype"])
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(args["repeats"]):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return {"flops": 2 * n**3 / best}


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::baddbmm_")


def gemm_flops(name, shapes):
    """FLOPs of one recorded matrix product, from its operands' shapes."""
    first, second = shapes[1:3] if name.startswith(("aten::addmm", "aten::baddbmm")) else shapes[:2]
    return 2 * math.prod(first) * second[-1]


def train_gemms(args):
    """(txl) The training step's matrix products alone: one step's mm / addmm / bmm / baddbmm calls recorded (as
    the CPU kernels see them: shapes, strides, dtypes, scalars), then replayed on fresh tensors of the same layouts
    without autograd; seconds per replay (median) and the recorded FLOPs. The step cannot be faster than this (the
    ceiling of its achieved fraction of the GEMM peak, at these shapes)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, f_args=(), kwargs=None):
            kwargs = kwargs or {}
            if func._schema.name in GEMM_OPS:
                spec = [(tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in f_args]
                calls.append((func, spec, dict(kwargs)))
            return func(*f_args, **kwargs)

    one = dict(args, warmup=2, steps=1)
    train(one)  # warm-up (and the optimizer's state)
    with Record():
        train(dict(one, warmup=0))
    gen = torch.Generator().manual_seed(0)

    def tensor(shape, stride, dtype):
        return torch.empty_strided(shape, stride, dtype=dtype).copy_(torch.randn(shape, generator=gen))

    replay = [(func, [tensor(*a) if isinstance(a, tuple) else a for a in spec], kwargs) for func, spec, kwargs in calls]
    times = []
    with torch.no_grad():
        for _ in range(args.get("repeats", 5) + 1):
            t0 = time.perf_counter()
            for func, f_args, kwargs in replay:
                func(*f_args, **kwargs)
            times.append(time.perf_counter() - t0)
    flops = sum(gemm_flops(func._schema.name, [a[0] for a in spec if isinstance(a, tuple)]) for func, spec, _ in calls)
    return {"seconds": statistics.median(times[1:]), "flops": flops, "calls": len(calls)}


def weight_stream(args):
    """(txl) The matrix-vector products of one generation step alone: every weight a token must read (the
    layers' q/k/v, output and feed-forward projections, and the output layer; W_{k,R} R is cached), applied to one
    token's vector, as the model computes them (``hf_txl.kernels_txl.project``: on the CPU the split-weight product or
    ``F.linear``, the form ``cpu_product_form`` chose for this CPU) and through ``nn.Linear``. Median seconds per
    step of each: the floor of torch's kernels on this machine."""
    from hf_txl.kernels_txl import project

    linears = []
    for layer in MODEL.transformer.layers:
        linears += [layer.attn.qkv_proj, layer.attn.o_proj, layer.ff.fc_in, layer.ff.fc_out]
    linears.append(MODEL.lm_head)
    inputs = [torch.randn(1, 1, linear.in_features) for linear in linears]
    result = {}
    with torch.inference_mode():
        for key, apply in (("seconds", project), ("seconds_nn_linear", lambda linear, x: linear(x))):
            times = []
            for _ in range(args["repeats"]):
                t0 = time.perf_counter()
                for linear, x in zip(linears, inputs):
                    apply(linear, x)
                times.append(time.perf_counter() - t0)
            result[key] = statistics.median(times[len(times) // 4 :])
    result["weight_bytes"] = sum(linear.weight.numel() * linear.weight.element_size() for linear in linears)
    return result


def bare_step(args):
    """(txl) One generation step's maths written out with bare tensor operations: no modules, no memory object, no
    masks, no `generate` loop; the memory's keys/values and position terms are preallocated (``mem_len`` positions,
    the window moving by one per call as in generation). Median seconds per step, eager and (``compile``) under
    ``torch.compile``: what a step costs when only its kernels are left (post-norm, per-layer u/v models only). The
    kernels are the model's: its few-row products and one-query position term (in the form
    ``cpu_product_form`` chose) and the head-major keys/values and position terms."""
    import torch.nn.functional as F

    from hf_txl.kernels_txl import cpu_product_form, scaled_position_scores, split_weight_linear

    few_row_linear = split_weight_linear if cpu_product_form() == "column" else F.linear

    config, model = MODEL.config, MODEL.transformer
    assert not config.pre_lnorm and config.untie_r and not config.uses_adaptive(), "post-norm, untie_r, plain softmax"
    n_head, d_head, d_model, klen = config.n_head, config.d_head, config.d_model, args["mem_len"] + 1
    inner, scale = n_head * d_head, d_head**-0.5
    layers = [
        (l.attn.qkv_proj.weight, l.attn.o_proj.weight, l.attn.layer_norm, l.ff.fc_in, l.ff.fc_out, l.ff.layer_norm,
         l.attn.r_w_bias, l.attn.r_r_bias)
        for l in model.layers
    ]  # fmt: skip
    span = 2 * klen  # the window moves through a store twice its length
    kv_store = [torch.randn(2, 1, n_head, span, d_head) for _ in layers]  # keys, values head-major, as the cache
    hidden_store = [torch.randn(1, span, d_model) for _ in layers]
    r_heads = [torch.randn(n_head, klen, d_head) for _ in layers]
    embedding, head = model.word_emb.weight, MODEL.lm_head

    def step(token, kv_views, hidden_views):
        h = F.embedding(token, embedding) * d_model**0.5  # [1, 1, d]
        for (w_qkv, w_o, ln1, fc_in, fc_out, ln2, u, v), kv, hidden_out, r in zip(
            layers, kv_views, hidden_views, r_heads
        ):
            hidden_out.copy_(h)
            q, new_kv = few_row_linear(h, w_qkv, None).split([inner, 2 * inner], -1)
            kv[:, :, :, -1:].copy_(new_kv.view(1, 1, 2, n_head, d_head).permute(2, 0, 3, 1, 4))
            k, val = kv[0], kv[1]  # [1, H, K, D]
            q = q.view(1, n_head, d_head)  # [1, H, D]
            position = scaled_position_scores(q[:, :, None], r, v, scale)  # [1, H, 1, K], the model's product form
            out = F.scaled_dot_product_attention((q + u)[:, :, None], k, val, attn_mask=position, scale=scale)
            h = F.layer_norm(h + few_row_linear(out.reshape(1, 1, inner), w_o, None), (d_model,), ln1.weight,
                             ln1.bias, ln1.eps)  # fmt: skip
            ff = few_row_linear(F.relu(few_row_linear(h, fc_in.weight, fc_in.bias)), fc_out.weight,
                                     fc_out.bias)  # fmt: skip
            h = F.layer_norm(h + ff, (d_model,), ln2.weight, ln2.bias, ln2.eps)
        return few_row_linear(h, head.weight, head.bias)

    def timed(fn, repeats):
        token, times = torch.tensor([[1]]), []
        for i in range(repeats):
            start = i % klen
            kv_views = [kv[:, :, :, start : start + klen] for kv in kv_store]
            hidden_views = [hs[:, start + klen - 1 : start + klen] for hs in hidden_store]
            t0 = time.perf_counter()
            fn(token, kv_views, hidden_views)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[len(times) // 4 :])

    result = {}
    with torch.inference_mode():
        result["eager"] = timed(step, args["repeats"])
        if args.get("compile"):
            compiled = torch.compile(step, dynamic=False)
            timed(compiled, 3)  # compilation
            result["compiled"] = timed(compiled, args["repeats"])
    return result


# --- section "precision": float32, bf16 and int8 weights of one model, hf_txl only -----------------------------

PRECISIONS = {}  # "fp32", "bf16", "int8": the model of precision_load in each precision


def precision_build(args):
    """(txl) A random hf_txl model of ``config`` saved to ``dir`` (the precision rows' model)."""
    from hf_txl import TxlConfig, TxlForCausalLM

    torch.manual_seed(args["seed"])
    TxlForCausalLM(TxlConfig(**args["config"])).save_pretrained(args["dir"])
    return {}


def precision_load(args):
    """(txl) The model of ``dir`` as a user loads it in three precisions: float32, ``dtype=torch.bfloat16`` and int8
    weight-only (``TorchAoConfig(Int8WeightOnlyConfig())``), through ``AutoModelForCausalLM.from_pretrained``."""
    from transformers import AutoModelForCausalLM

    import hf_txl  # noqa: F401
    from hf_txl.training.hub import precision_kwargs

    PRECISIONS.clear()
    gc.collect()
    kinds = {"fp32": {}, "bf16": precision_kwargs("bfloat16"), "int8": precision_kwargs(quantize="int8")}
    for name, kwargs in kinds.items():
        PRECISIONS[name] = AutoModelForCausalLM.from_pretrained(args["dir"], **kwargs).eval()
    return {"weight_types": {name: type(m.transformer.layers[0].ff.fc_in.weight).__name__ for name, m in
                             PRECISIONS.items()}}  # fmt: skip


@contextlib.contextmanager
def kernels_before_low_precision(before: bool):
    """With ``before``: hf_txl's paths for bf16 and int8 weights as they were before its low-precision kernels (one
    bf16 row through ``addmv``, a bf16 projection cache read by bf16 SDPA, int8 weights through torchao's own
    dispatch), to show both in one run."""
    import hf_txl.kernels_txl as kernels
    import hf_txl.modeling_txl as modeling

    kernels.packed_form()
    saved = kernels.PACKED_FORM, kernels.int8_weight_parts, modeling.inference_projection_dtype
    if before:
        kernels.PACKED_FORM = ""
        kernels.int8_weight_parts = lambda layer: None
        modeling.inference_projection_dtype = lambda hidden, dtype, implementation: dtype
    try:
        yield
    finally:
        kernels.PACKED_FORM, kernels.int8_weight_parts, modeling.inference_projection_dtype = saved


def precision_generate(args):
    """(txl) ``generate()`` of ``new_tokens`` greedy tokens after a random prompt with the ``precision`` model (its
    memory ``mem_len``); the time of a step is taken between the first and the last new token (a streamer's clock:
    the prompt's forward pass is not in it)."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.stamps = []

        def put(self, value):
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    model = PRECISIONS[args["precision"]]
    model.config.mem_len = args["mem_len"]
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(1, model.config.vocab_size, (1, args["prompt_len"]), generator=gen)
    n = args["new_tokens"]
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    with kernels_before_low_precision(args["before"]), torch.inference_mode():
        model.generate(prompt, **dict(kwargs, max_new_tokens=3, min_new_tokens=3))  # warm-up (packing), not timed
        clock = Clock()
        with PeakMemory() as mem:
            out = model.generate(prompt, streamer=clock, **kwargs)
        step_bytes = precision_step_bytes(model, args["mem_len"])
    assert out.shape[1] == args["prompt_len"] + n and len(clock.stamps) == n + 1, (out.shape, len(clock.stamps))
    step = (clock.stamps[-1] - clock.stamps[1]) / (n - 1)  # stamps[0]: the prompt; [1]: the first new token
    return {"times": [step], "peak_mib": mem.mib, "step_bytes": step_bytes}


def tensor_bytes(tensor) -> int:
    """Bytes a product reads from a weight: an int8 weight-only tensor (torchao) its int8 values and scales."""
    if hasattr(tensor, "qdata") and hasattr(tensor, "scale"):
        return tensor.qdata.numel() * tensor.qdata.element_size() + tensor.scale.numel() * tensor.scale.element_size()
    return tensor.numel() * tensor.element_size()


def precision_step_bytes(model, mem_len) -> dict:
    """The bytes a batch-1 step must read: every weight once (not ``r_proj``, whose product the cache keeps) and per
    layer the cached keys/values and position term of ``mem_len + 1`` positions, at the dtype the cache keeps."""
    params = {id(p): p for p in model.parameters()}
    weights = sum(tensor_bytes(p) for p in params.values())
    weights -= sum(tensor_bytes(layer.attn.r_proj.weight) for layer in model.transformer.layers)
    probe = torch.zeros(1, 2, dtype=torch.long)
    with torch.inference_mode():
        cache = model(probe, use_cache=True).cache
    kv_dtype = cache.layers[0].kv.dtype
    c = model.config
    per_layer = 3 * c.n_head * c.d_head * (mem_len + 1)  # keys, values, position term
    cache_bytes = c.n_layer * per_layer * torch.empty((), dtype=kv_dtype).element_size()
    return {"weight_bytes": weights, "cache_bytes": cache_bytes, "cache_dtype": str(kv_dtype).replace("torch.", ""),
            "total_bytes": weights + cache_bytes}  # fmt: skip


def precision_quality(args):
    """(txl) The cost of bf16 and int8 on a trained model (``dir``, with its tokenizer): the log-probability of every
    next token of the bundled corpus's validation split, carried through segments of ``tgt_len`` with the memory
    (``batch`` streams), in each precision; the validation loss of each and the mean |log p - log p(fp32)|."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_txl  # noqa: F401
    from hf_txl.training.data import load_corpus, tokenize_to_array
    from hf_txl.training.hub import precision_kwargs

    tokenizer = AutoTokenizer.from_pretrained(args["dir"])
    ids = torch.as_tensor(tokenize_to_array(load_corpus()["validation"], tokenizer)).long()
    batch, tgt_len = args["batch"], args["tgt_len"]
    streams = ids[: len(ids) // batch * batch].view(batch, -1)
    log_p = {}
    for name, kwargs in {"fp32": {}, "bf16": precision_kwargs("bfloat16"),
                         "int8": precision_kwargs(quantize="int8")}.items():  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(args["dir"], **kwargs).eval()
        cache, pieces = None, []
        with torch.inference_mode():
            for start in range(0, streams.shape[1] - 1, tgt_len):
                targets = streams[:, start + 1 : start + tgt_len + 1]
                out = model(streams[:, start : start + targets.shape[1]], cache=cache, use_cache=True)
                cache = out.cache
                pieces.append(torch.log_softmax(out.logits.float(), -1).gather(-1, targets[..., None])[..., 0])
        log_p[name] = torch.cat(pieces, 1).double()
    fp32 = log_p["fp32"]
    return {name: {"loss": -lp.mean().item(), "mean_abs_logp_diff": (lp - fp32).abs().mean().item(),
                   "max_abs_logp_diff": (lp - fp32).abs().max().item(), "tokens": lp.numel(),
                   "mem_len": AutoModelForCausalLM.from_pretrained(args["dir"]).config.mem_len}
            for name, lp in log_p.items()}  # fmt: skip


COMMANDS = dict(build=build, load=load, compile=compile_model, logprobs=logprobs, train=train, evaluate=evaluate,
                generate=generate, recompute=recompute, table9=table9, gemm=gemm,
                weight_stream=weight_stream, bare_step=bare_step, bandwidth=bandwidth, step_bytes=step_bytes,
                to_dtype=to_dtype, generate_batch=generate_batch, generate_alone=generate_alone,
                train_gemms=train_gemms, precision_build=precision_build, precision_load=precision_load,
                precision_generate=precision_generate, precision_quality=precision_quality)  # fmt: skip


def keep_freed_memory():
    """The allocator setting of hf_txl's scripts (``hf_txl.training.keep_freed_memory_in_process``), repeated here
    because the reference side cannot import hf_txl; applied to both sides alike."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)) and bool(libc.mallopt(m_trim_threshold, 2**30))


def main():
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    kept = os.environ.get("BENCH_KEEP_FREED") == "1" and keep_freed_memory()
    print(
        json.dumps(
            {"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(), "keep_freed_memory": kept}
        ),
        flush=True,
    )
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = COMMANDS[request.pop("cmd")](request)
        except Exception as error:  # reported to the orchestrator, which stops
            import traceback

            reply = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
