"""Pieces of the training loop that need care: evaluation with memory, and exact, atomic checkpoints.

Used by ``scripts/train.py`` and ``scripts/evaluate.py``.

A checkpoint is a directory ``<output_dir>/checkpoints/step_<N>`` holding

* what ``accelerator.save_state`` writes (weights as safetensors, optimizer, scheduler, every process's RNG
  states; Accelerate reads its ``.bin``/``.pkl`` files back with ``torch.load(weights_only=True)``),
* ``mems_<rank>.safetensors``: the training memory of every process,
* ``stream_<rank>.json``: every process's stream position,
* ``trainer_state.json``: step counter, model config and the arguments of the run.

It is written to a hidden temporary directory and renamed into place when complete, so a run killed while
saving leaves the previous checkpoint untouched and loadable.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .cache_txl import TxlCache
from .data import StreamBatcher

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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
            out = unwrapped(input_ids=batch["input_ids"], mems=mems)
            mems = out.mems
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
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_checkpoint(output_dir: str | os.PathLike, name: str) -> Path:
    """``latest`` (the newest complete checkpoint in ``output_dir``) or a path to one."""
    if name == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no checkpoint under {Path(output_dir) / CHECKPOINTS}; "
                "start without --resume_from_checkpoint, or pass the path of a checkpoint directory."
            )
        return found[-1][1]
    path = Path(name)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {name}: not a complete checkpoint (no {TRAINER_STATE} there). "
            f"Checkpoints live in <output_dir>/{CHECKPOINTS}/step_<N>; 'latest' picks the newest."
        )
    return path


def save_mems(mems: TxlCache | None, path: Path) -> None:
    tensors, metadata = {}, {}
    if mems is not None and not mems.is_empty:
        tensors = {f"layer_{i}": m.detach().contiguous().cpu() for i, m in enumerate(mems)}
        if mems.padding_mask is not None:
            tensors["padding_mask"] = mems.padding_mask.contiguous().cpu()
        metadata["seen_tokens"] = str(mems.get_seq_length())
    save_file(tensors, str(path), metadata=metadata)


def load_mems(path: Path, device) -> TxlCache | None:
    tensors = load_file(str(path), device=str(device))
    if not tensors:
        return None
    with safe_open(str(path), framework="pt") as handle:
        seen = (handle.metadata() or {}).get("seen_tokens")
    layers = sorted((k for k in tensors if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
    memory = [tensors[k] for k in layers]
    return TxlCache(memory, tensors.get("padding_mask"), seen_tokens=None if seen is None else int(seen))


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    *,
    mems: TxlCache | None,
    stream_state: dict,
    trainer_state: dict[str, Any],
    keep_last: int = 2,
    kill_hook=None,
) -> Path:
    """Write checkpoint ``step`` atomically (all processes must call this), keep the newest ``keep_last``."""
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        for stale in root.glob(".tmp_step_*") if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    rank = accelerator.process_index
    save_mems(mems, tmp / f"mems_{rank}.safetensors")
    (tmp / f"stream_{rank}.json").write_text(json.dumps(stream_state))
    if kill_hook is not None:
        kill_hook("during_save", step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
        if final.exists():  # the same step saved again after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> tuple[dict[str, Any], TxlCache | None, dict]:
    """Restore model, optimizer, scheduler and RNG states; return (trainer_state, this process's mems,
    this process's stream position)."""
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    saved_processes = trainer_state.get("num_processes", 1)
    if saved_processes != accelerator.num_processes:
        raise ValueError(
            f"Checkpoint {path} was written by {saved_processes} process(es) but this run has "
            f"{accelerator.num_processes}; the memory and stream positions are per process. Resume with "
            f"--num_processes {saved_processes}."
        )
    accelerator.load_state(str(path))
    rank = accelerator.process_index
    mems = load_mems(path / f"mems_{rank}.safetensors", accelerator.device)
    stream_state = json.loads((path / f"stream_{rank}.json").read_text())
    return trainer_state, mems, stream_state
