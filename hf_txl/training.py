"""The library side of ``hf_txl.train``: evaluation with memory, the optimizer, the metrics log, the CPU thread
count, and the export of a trained model directory.

Checkpoints live in ``hf_txl.checkpointing``. ``scripts/evaluate.py`` uses the evaluation part.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import StreamBatcher

# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------


#: The ``evaluate`` metric module (shipped as package data): ``evaluate.load(METRIC_PATH)`` works offline.
METRIC_PATH = str(Path(__file__).parent / "metrics" / "txl_lm")


@functools.cache
def keep_freed_memory_in_process() -> bool:
    """Tell glibc's allocator to keep freed blocks instead of returning them to the system (Linux only).

    By default glibc serves blocks above a (dynamic) threshold with ``mmap`` and trims the heap after frees, so every
    training or evaluation step of a small model pays page faults on fresh activation buffers; keeping them cuts
    the time of a small model's evaluation step by about a quarter and of its training step by about 6% on the CPU
    (``bench/bench_allocator.py``). The cost: the process keeps its peak heap. ``scripts/train.py`` and
    ``scripts/evaluate.py`` call this at start; the library itself never changes process settings.
    Returns whether the settings were applied.
    """
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, 2**30))


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU multiplies bf16 matrices natively (x86 AVX512-BF16 or AMX, ARM BF16), from
    ``/proc/cpuinfo``; None where that cannot be read. Without it, CPU bf16 autocast converts in software and is
    several times slower than fp32 (``bench/README.md``: 63 vs 341 GFLOP/s on the development VM)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def load_metric():
    """The ``txl_lm`` evaluate metric, loaded once per process from the package (no network, no cache files)."""
    return _import_evaluate_library().load(METRIC_PATH, keep_in_memory=True)


def _import_evaluate_library():
    """The ``evaluate`` library, even when a folder holding a script named evaluate.py (this project's
    ``scripts/``) is first on ``sys.path``, as it is for ``python scripts/train.py``."""
    module = sys.modules.get("evaluate")
    if module is not None and hasattr(module, "load"):
        return module
    sys.modules.pop("evaluate", None)
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "evaluate.py").is_file()]
    try:
        return importlib.import_module("evaluate")
    finally:
        sys.path[:] = saved


def lm_metrics(nll_sum: float, num_tokens: int) -> dict[str, float]:
    """Mean loss (nats/token), bits per token (loss / ln 2) and perplexity (exp loss), computed by the
    ``txl_lm`` metric module from a summed loss over ``num_tokens`` tokens."""
    metric = load_metric()
    metric.add_batch(losses=[float(nll_sum)], num_tokens=[int(num_tokens)])
    figures = metric.compute()
    return {name: figures[name] for name in ("loss", "bpc", "perplexity")}


def headline(metrics: dict, unit: str) -> str:
    """The figure a model is judged by, for a log line: bits per character (per byte) for character (byte) models,
    perplexity per word (per token) otherwise. ``metrics`` holds ``loss``, ``bpc``, ``perplexity``; ``unit`` is
    :func:`hf_txl.tokenization_txl.token_unit` of the model's tokenizer."""
    if unit in ("char", "byte"):
        bits = "bits/byte" if unit == "byte" else "bpc"
        return f"loss {metrics['loss']:.4f} nats/{unit}, {bits} {metrics['bpc']:.4f}"
    per = "word" if unit == "word" else "token"
    return f"perplexity {metrics['perplexity']:.2f} per {per}, loss {metrics['loss']:.4f}"


@contextlib.contextmanager
def memory_settings(config, *, mem_len=None, clamp_len=None, same_length=None):
    """Temporarily change the memory-related config fields (evaluation may use a longer memory)."""
    saved = (config.mem_len, config.clamp_len, config.same_length)
    try:
        if mem_len is not None:
            config.mem_len = mem_len
        if clamp_len is not None:
            config.clamp_len = clamp_len
        if same_length is not None:
            config.same_length = same_length
        config.validate_txl()
        yield config
    finally:
        config.mem_len, config.clamp_len, config.same_length = saved


@torch.inference_mode()
def evaluate_stream(
    model,
    tokens,
    *,
    batch_size: int,
    tgt_len: int,
    mem_len: int | None = None,
    clamp_len: int | None = None,
    same_length: bool | None = None,
    accelerator=None,
    max_steps: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Loss over a token stream processed in order with memory, as in the paper's evaluation.

    The stream is cut into ``batch_size x num_processes`` contiguous rows (each process evaluates its own);
    every input position is scored once against the next token of the stream (only the very last token of
    the stream, and the tail that does not fill a row, go unscored). Totals are summed over processes.
    Returns ``loss``, ``bpc``, ``perplexity`` (from the ``txl_lm`` metric, once, after the sums of all
    processes are reduced), ``tokens``, ``seconds`` and ``tokens_per_s``.

    Runs under ``torch.inference_mode`` (no autograd bookkeeping); without gradients and in eval mode the model
    also reuses the projected keys and values of its memory from one segment to the next (see ``TxlCache``).
    """
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    device = accelerator.device if accelerator is not None else next(unwrapped.parameters()).device
    num_processes = accelerator.num_processes if accelerator is not None else 1
    process_index = accelerator.process_index if accelerator is not None else 0
    batcher = StreamBatcher(
        tokens, batch_size=batch_size, tgt_len=tgt_len, num_processes=num_processes,
        process_index=process_index, device=device,
    )  # fmt: skip
    was_training = unwrapped.training
    unwrapped.eval()
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    started = time.perf_counter()
    steps = len(batcher) if not max_steps else min(max_steps, len(batcher))
    iterator = batcher
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batcher, total=steps, desc="eval", leave=False)
    with memory_settings(unwrapped.config, mem_len=mem_len, clamp_len=clamp_len, same_length=same_length):
        mems = None
        for index, batch in enumerate(iterator):
            if index >= steps:
                break
            out = unwrapped(input_ids=batch["input_ids"], cache=mems)  # updated in place: see MemoryStore
            mems = out.cache
            logits = out.logits.float().flatten(0, 1)
            nll_sum += F.cross_entropy(logits, batch["shift_labels"].flatten(), reduction="sum").double()
            count += batch["shift_labels"].numel()
    if accelerator is not None:
        nll_sum = accelerator.reduce(nll_sum, reduction="sum")
        count = accelerator.reduce(count, reduction="sum")
    seconds = time.perf_counter() - started
    unwrapped.train(was_training)
    metrics = lm_metrics(nll_sum.item(), int(count.item()))
    metrics.update(tokens=int(count.item()), seconds=seconds, tokens_per_s=count.item() / max(seconds, 1e-9))
    return metrics


# ----------------------------------------------------------------------------------------------------
# CPU threads
# ----------------------------------------------------------------------------------------------------


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads do not speed up matrix products)."""
    import psutil  # an Accelerate dependency

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else physical
    return max(1, min(physical, allowed))


def _launcher_process(max_depth: int = 4) -> int | None:
    """The pid of the ``accelerate launch`` process above this one (Linux ``/proc``), if any."""
    pid = os.getppid()
    for _ in range(max_depth):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        if any(b"accelerate" in part for part in cmdline[:3]):
            return pid
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the parent's pid
        if pid <= 1:
            return None
    return None


def accelerate_pinned_one_thread() -> bool:
    """Whether ``accelerate launch`` (not the user) set ``OMP_NUM_THREADS=1`` for this process.

    Without ``--cpu``, ``accelerate launch`` passes ``OMP_NUM_THREADS=1`` to its processes on a CPU-only machine
    unless told otherwise, which halves the training speed on 2 cores. It was the user's choice when the launcher
    itself was started with ``OMP_NUM_THREADS`` set or with ``--num_cpu_threads_per_process``; both are read from
    the launcher's ``/proc`` entries (its environment as it was started, and its command line).
    """
    if os.environ.get("OMP_NUM_THREADS") != "1" or "ACCELERATE_DYNAMO_BACKEND" not in os.environ:
        return False
    launcher = _launcher_process()
    if launcher is None:
        return False
    try:
        environ = Path(f"/proc/{launcher}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{launcher}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    user_set_env = any(entry.startswith(b"OMP_NUM_THREADS=") for entry in environ)
    user_set_flag = any(part.startswith(b"--num_cpu_threads_per_process") for part in cmdline)
    return not (user_set_env or user_set_flag)


def configure_cpu_threads(requested: int | None, local_processes: int) -> str:
    """Set torch's intra-op thread count for a CPU run and return a sentence saying how many and why.

    ``requested`` (``--num_threads``) wins when given. Otherwise, when ``accelerate launch`` pinned the process to
    one thread by default, use physical cores / local processes; an explicit ``OMP_NUM_THREADS`` or
    ``--num_cpu_threads_per_process`` is kept.
    """
    if requested:
        torch.set_num_threads(requested)
        return f"{requested} CPU thread(s) per process (--num_threads)"
    if accelerate_pinned_one_thread():
        threads = max(1, physical_cores() // max(local_processes, 1))
        torch.set_num_threads(threads)
        return (
            f"{threads} CPU thread(s) per process (physical cores / {local_processes} local process(es); "
            "accelerate launch's default of 1 replaced, choose with --num_threads)"
        )
    source = "OMP_NUM_THREADS" if "OMP_NUM_THREADS" in os.environ else "torch's default"
    return f"{torch.get_num_threads()} CPU thread(s) per process ({source}; choose with --num_threads)"


def enable_fsdp_on_cpu(accelerator) -> bool:
    """Honour ``accelerate launch --use_fsdp`` (``ACCELERATE_USE_FSDP=true``) on CPU processes; whether it did.

    Accelerate 1.15 turns FSDP on only for GPU-like devices: with ``--cpu`` / ``ACCELERATE_USE_CPU=true`` it
    silently runs plain DDP (``MULTI_CPU``) instead. torch's FSDP2 (``fully_shard``) itself works on CPU with
    gloo, so this sets what Accelerate sets on a GPU (``AcceleratorState.__init__``): distributed type FSDP, in
    both state singletons, and the plugin read from the launcher's environment. Call it right after creating the
    Accelerator, before ``prepare``.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wanted or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin, state.distributed_type = plugin, DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


# ----------------------------------------------------------------------------------------------------
# Optimizer, metrics log, export
# ----------------------------------------------------------------------------------------------------


def make_optimizer(model, *, learning_rate: float, weight_decay: float, betas: tuple[float, float], fused: bool = True):
    """AdamW; no weight decay on biases, LayerNorms, embeddings and the position biases u, v.

    ``fused`` runs one kernel per parameter group instead of a Python loop over tensors; it also works on the
    sharded DTensor parameters of FSDP2 (DTensor implements the fused AdamW kernel), CPU included.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.dim() < 2 or "word_emb" in name or "r_w_bias" in name or "r_r_bias" in name
        (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


class JsonLog:
    """Append-only JSON-lines metrics log (``log.jsonl``); on resume, records after the checkpoint's step are
    dropped so the log reads as one uninterrupted run."""

    def __init__(self, path: Path, enabled: bool, from_step: int = 0):
        self.path, self.enabled = Path(path), enabled
        if enabled and self.path.exists():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if line and json.loads(line)["step"] <= from_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class TrainingProgress:
    """A run's progress as people and tools see it: a progress bar (loss, learning rate, tokens/s), the
    ``log.jsonl`` records (``JsonLog``) and, with ``tracking``, the Accelerate trackers.

    Training records every ``logging_steps`` steps and at the last one: ``loss`` (mean over the step's micro-steps
    and processes), ``lr``, ``tokens_per_s`` (all processes, since the previous record) and ``epoch``. Evaluation
    records carry ``eval_<metric>``, the final one ``final: true``.
    """

    def __init__(self, accelerator, output_dir, *, total_steps, start_step, logging_steps, tokens_per_micro_step,
                 tracking=False):  # fmt: skip
        from tqdm.auto import tqdm

        self.accelerator, self.tracking = accelerator, tracking
        self.total_steps, self.logging_steps, self.tokens_per_micro_step = (
            total_steps,
            logging_steps,
            tokens_per_micro_step,
        )
        self.log = JsonLog(Path(output_dir) / "log.jsonl", accelerator.is_main_process, from_step=start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not accelerator.is_local_main_process)
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def micro_step(self) -> None:
        self.window_tokens += self.tokens_per_micro_step

    def step(self, step: int, *, loss: float, lr: float, epoch: int) -> None:
        tokens_per_s = self.window_tokens / max(time.perf_counter() - self.window_start, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        if step % self.logging_steps == 0 or step == self.total_steps:
            self._record(step, {"loss": loss, "lr": lr, "tokens_per_s": tokens_per_s}, "", epoch=epoch)
            self.window_tokens, self.window_start = 0, time.perf_counter()

    def evaluation(self, step: int, metrics: dict, *, message: str, final: bool = False) -> None:
        self._record(step, metrics, "eval_", **({"final": True} if final else {}))
        if final:
            self.accelerator.print(message)
        elif self.accelerator.is_local_main_process:
            self.bar.write(message)

    def _record(self, step: int, metrics: dict, prefix: str, **extra) -> None:
        self.log.write({"step": step, **extra, **{f"{prefix}{k}": v for k, v in metrics.items()}})
        if self.tracking:
            self.accelerator.log({f"{prefix or 'train_'}{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def unsharded_class(model):
    """Give an FSDP2 model its own class back for a while (``FSDPTxlForCausalLM`` -> ``TxlForCausalLM``).

    ``fully_shard`` swaps the class of each module it wraps for a subclass defined in torch; ``save_pretrained``
    would then copy torch's FSDP source files as the model's code and name them in ``config.json``'s ``auto_map``.
    A no-op for any other model.
    """
    from torch.distributed.fsdp import FSDPModule

    sharded_class = type(model)
    if not issubclass(sharded_class, FSDPModule):
        yield model
        return
    model.__class__ = next(c for c in sharded_class.__mro__ if not issubclass(c, FSDPModule))
    try:
        yield model
    finally:
        model.__class__ = sharded_class


def share_tied_tensors(model, state_dict: dict) -> dict:
    """``state_dict`` with every name of a tied parameter (one object under several names, e.g. ``lm_head.weight``
    and ``transformer.word_emb.weight``) pointing at one tensor.

    Full weights gathered from FSDP shards hold a separate copy per name; ``save_pretrained`` drops the duplicates
    of shared tensors only, so without this the export would store the tied weight twice (and differ from an
    unsharded run's).
    """
    shared, first_name = dict(state_dict), {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in shared:
            shared[name] = shared[first_name.setdefault(id(param), name)]
    return shared


def export_model_dir(
    output_dir: str | os.PathLike,
    model,
    tokenizer,
    *,
    state_dict: dict | None = None,
    eval_results: dict,
    training_args: dict,
    repo_id: str | None = None,
) -> None:
    """Write a trained model directory (call on the main process only): weights, config, generation config,
    tokenizer, the flat code files, ``eval_results.json``, ``training_args.json`` and the model card (README.md)
    with its loss curve. ``model`` is the unwrapped model; ``state_dict`` the full weights when they were
    gathered from shards (``accelerator.get_state_dict``)."""
    from . import __version__
    from .model_card import write_model_card

    output_dir = Path(output_dir)
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if state_dict is not None:
        state_dict = share_tied_tensors(model, state_dict)
    with unsharded_class(model):
        model.save_pretrained(output_dir, state_dict=state_dict)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "eval_results.json").write_text(json.dumps(eval_results, indent=2))
    record = {**training_args, "hf_txl_version": __version__}
    (output_dir / "training_args.json").write_text(json.dumps(record, indent=2))
    write_model_card(output_dir, repo_id=repo_id)
