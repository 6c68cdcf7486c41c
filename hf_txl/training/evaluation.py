"""Evaluation with memory: the whole split in order, as the paper evaluates (``evaluate_stream``), its metrics
(loss per token, bits per character or perplexity per word) and the ``evaluate`` metric module shipped with
hf_txl (``METRIC_PATH``). ``hf_txl.training.train`` and ``scripts/evaluate.py`` use it.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import StreamBatcher

#: The ``evaluate`` metric module (shipped as package data): ``evaluate.load(METRIC_PATH)`` works offline.
METRIC_PATH = str(Path(__file__).parent / "metrics" / "txl_lm")


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
