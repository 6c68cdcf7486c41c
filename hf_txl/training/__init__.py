"""The training and publishing half of hf_txl (the model itself is the flat ``*_txl.py`` files one level up).

    train.py          the Accelerate training script (``accelerate launch scripts/train.py``,
                      ``python -m hf_txl.train``)
    args.py           its flags, presets (presets.py) and ``--config_overrides`` (overrides.py)
    data.py           corpora through ``datasets``, tokenized to one stream, cut into per-process rows (StreamBatcher)
    checkpointing.py  checkpoints written atomically, with each process's memory, for an exact resume
    trainer.py        transformers' Trainer with the memory carried (TxlTrainer, TxlStreamDataset)
    evaluation.py     evaluation with memory over a whole split, and its metrics
    runtime.py        the process: CPU threads, allocator, native bf16, FSDP on CPU processes
    progress.py       optimizer groups, the metrics log and progress bar
    export.py         the trained model directory (weights, tokenizer, code files, card)
    model_card.py     the model card (README.md) and its loss curve
    hub.py            loading from and pushing to the Hugging Face Hub
    corpus/           the bundled default corpus (Tiny Shakespeare)
    metrics/txl_lm/   the ``evaluate`` metric module (loads offline: ``evaluate.load(METRIC_PATH)``)

The names below are importable from ``hf_txl.training`` directly; they load their module (and its dependencies:
datasets, accelerate) on first use.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "evaluation": ("METRIC_PATH", "evaluate_stream", "headline", "lm_metrics", "load_metric", "memory_settings"),
    "runtime": (
        "accelerate_pinned_one_thread",
        "configure_cpu_threads",
        "cpu_has_native_bf16",
        "enable_fsdp_on_cpu",
        "keep_freed_memory_in_process",
        "physical_cores",
    ),
    "progress": ("JsonLog", "TrainingProgress", "make_optimizer"),
    "export": ("export_model_dir", "share_tied_tensors", "unsharded_class"),
    "trainer": ("TxlStreamDataset", "TxlTrainer"),
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
