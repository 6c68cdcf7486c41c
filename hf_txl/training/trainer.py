"""Training with transformers' ``Trainer``, the memory carried: ``TxlStreamDataset`` and ``TxlTrainer``.

    train = TxlStreamDataset.from_corpus(corpus["train"], tokenizer, batch_size=8, tgt_len=128)
    valid = TxlStreamDataset.from_corpus(corpus["validation"], tokenizer, batch_size=8, tgt_len=128)
    args = TrainingArguments("out", per_device_train_batch_size=8, max_steps=1000, logging_steps=50)
    trainer = TxlTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid)
    trainer.train()                                  # or trainer.train(resume_from_checkpoint=True)
    trainer.evaluate()                               # eval_loss, eval_bpc, eval_perplexity: the whole split, in order

Transformer-XL carries a memory from one segment to the next, so row r at step t+1 must continue row r at step t
(``hf_txl.training.data.StreamBatcher``). A ``Trainer`` shuffles examples, deals whole batches to processes and
starts every step from nothing. ``TxlStreamDataset`` orders its items so that a sequential sampler and Accelerate's
batch dealing (batch k to process k mod P) give every process exactly the rows ``StreamBatcher.from_accelerator``
gives it; ``TxlTrainer`` keeps that order, checks it at every step, and keeps each process's memory from one step
to the next (through gradient-accumulation micro-batches, reset when an epoch starts), in its checkpoints, and
apart from evaluation. With the same model, data, optimizer and schedule, it trains as ``hf_txl.train`` does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainerCallback, default_data_collator
from transformers.trainer_utils import get_last_checkpoint

from .checkpointing import load_mems, save_mems
from .data import StreamBatcher, tokenize_to_array
from .evaluation import evaluate_stream
from .faults import EXIT_PREEMPTED, StopRequest

__all__ = ["TrainingPreempted", "TxlStreamDataset", "TxlTrainer"]

#: Written into every ``TxlTrainer`` checkpoint (next to Trainer's own files).
STATE_FILE = "txl_state.json"  # the stream settings the memory belongs to (main process)
MEMORY_FILE = "txl_memory_{rank}.safetensors"  # each process's memory
POSITION_FILE = "txl_position_{rank}.json"  # each process's next segment


class TxlStreamDataset(Dataset):
    """A 1-D token stream as map-style items in the order a sequential ``Trainer`` must read them.

    The stream is cut into ``S = batch_size x num_processes`` contiguous streams of ``L = (N - 1) // S`` inputs
    (``StreamBatcher``'s arithmetic). Item ``i`` is segment ``t`` of stream ``s``, where
    ``i = (t * num_processes + p) * batch_size + b`` and ``s = p * batch_size + b``: read sequentially in batches of
    ``batch_size``, batch ``k = t * num_processes + p`` holds segment ``t`` of process ``p``'s streams, and dealing
    batch ``k`` to process ``k mod num_processes`` (Accelerate's default) gives process ``p`` at step ``t`` exactly
    ``StreamBatcher(tokens, batch_size, tgt_len, num_processes, process_index=p).batch_at(t)``.

    Each item: ``input_ids`` [T], ``shift_labels`` [T] (the next token of the stream), ``segment`` (t) and ``stream``
    (s). The last segment of the streams may be shorter than ``tgt_len``; every row of a batch has the same length.
    """

    def __init__(self, token_ids: np.ndarray | torch.Tensor, *, batch_size: int, tgt_len: int, num_processes: int = 1):
        self.batcher = StreamBatcher(token_ids, batch_size=batch_size, tgt_len=tgt_len, num_processes=num_processes)
        self.token_ids = self.batcher.tokens  # numpy, 1-D
        self.batch_size, self.tgt_len, self.num_processes = batch_size, tgt_len, num_processes
        self.num_segments = len(self.batcher)  # per stream, per epoch
        self.stream_len = self.batcher.stream_len

    @classmethod
    def from_corpus(cls, dataset_split, tokenizer, *, text_column: str = "text", append_eos: bool = False, **sizes):
        """Tokenize a ``datasets`` split (``hf_txl.tokenize_to_array``: rows in order, ``append_eos`` puts the
        tokenizer's end-of-text token after each row) and cut it: ``sizes`` = batch_size, tgt_len, num_processes."""
        return cls(tokenize_to_array(dataset_split, tokenizer, text_column, append_eos=append_eos), **sizes)

    @classmethod
    def from_text(cls, text: str, tokenizer, **sizes):
        """Tokenize one text (``tokenizer(text, add_special_tokens=False)``) and cut it into streams."""
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return cls(np.asarray(ids, dtype=np.int64), **sizes)

    def __len__(self) -> int:
        return self.num_segments * self.batcher.num_streams

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range [0, {len(self)})")
        batch_index, row = divmod(index, self.batch_size)
        segment, process = divmod(batch_index, self.num_processes)
        stream = process * self.batch_size + row
        start = stream * self.stream_len + segment * self.tgt_len
        stop = stream * self.stream_len + min((segment + 1) * self.tgt_len, self.stream_len)
        window = torch.from_numpy(self.token_ids[start : stop + 1].astype(np.int64))  # [T + 1]
        return {"input_ids": window[:-1], "shift_labels": window[1:], "segment": segment, "stream": stream}

    def expected_streams(self, process_index: int) -> list[int]:
        """The streams (rows, in order) of process ``process_index``."""
        return list(range(process_index * self.batch_size, (process_index + 1) * self.batch_size))

    def settings(self) -> dict[str, int]:
        """What a checkpoint's memory belongs to: a resume must have the same (JSON-serialisable)."""
        return {
            "num_tokens": len(self.token_ids), "batch_size": self.batch_size, "tgt_len": self.tgt_len,
            "num_processes": self.num_processes,
        }  # fmt: skip


class TrainingPreempted(SystemExit):
    """``TxlTrainer.train`` stopped on SIGTERM / SIGUSR1 after checkpointing the step: exits the script with status
    75 (``EXIT_PREEMPTED``) unless caught; ``str()`` says where to resume."""

    def __init__(self, message: str):
        super().__init__(EXIT_PREEMPTED)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _StopOnSignal(TrainerCallback):
    """SIGTERM / SIGUSR1 during ``train()``: after the current optimizer step, every process agrees to save a
    checkpoint and stop (hf_txl.train's rule; transformers' Trainer itself has none)."""

    def __init__(self, trainer):
        self.trainer, self.request, self.stopped = trainer, StopRequest(), False

    def on_train_begin(self, args, state, control, **kwargs):
        self.stopped = False
        self.request.install()

    def on_step_end(self, args, state, control, **kwargs):
        if self.request.agreed(self.trainer.accelerator):  # a collective call, made by every process
            self.stopped = control.should_save = control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.request.uninstall()


class TxlTrainer(Trainer):
    """``transformers.Trainer`` for Transformer-XL: the segments in order, the memory carried.

    Constructed like ``Trainer``; ``train_dataset`` (and ``eval_dataset``) are :class:`TxlStreamDataset`. What differs:

    * the training items are read sequentially on every process; each step checks that this process received its
      own streams at the expected segment (``RuntimeError`` otherwise);
    * each process keeps its memory (detached, never synchronised) from one micro-batch to the next, gradient
      accumulation included, and resets it when an epoch starts or the segment index does not continue;
    * ``evaluate()`` runs the whole eval split in order with a memory of its own (``eval_loss`` per token,
      ``eval_bpc`` = loss / ln 2, ``eval_perplexity``), leaving the training memory as it was;
    * every checkpoint holds each process's memory and position (``txl_*`` files); ``train(resume_from_checkpoint=
      ...)`` restores them, and refuses a checkpoint of another number of processes, batch size, ``tgt_len`` or
      token stream before anything is loaded or written;
    * settings that would break the order raise ``ValueError`` naming the argument;
    * ``model.config.use_cache`` keeps its value (``Trainer`` sets it from ``TrainingArguments.use_cache``);
    * SIGTERM / SIGUSR1 during ``train()`` finish the optimizer step, save a checkpoint (whatever ``save_strategy``)
      and raise :class:`TrainingPreempted` (a ``SystemExit`` with status 75) on every process.

    The loss of a micro-batch is its mean over tokens, divided by the number of micro-batches of its window (the
    last window of an epoch may be shorter), as ``hf_txl.train`` does.
    """

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None, **kwargs):
        config = getattr(_base_model(model), "config", None)
        use_cache = getattr(config, "use_cache", None)
        super().__init__(
            model=model, args=args, data_collator=data_collator or default_data_collator,
            train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs,
        )  # fmt: skip
        if config is not None and use_cache is not None:
            config.use_cache = use_cache  # the memory is carried regardless; a saved model keeps its setting
        self.loss_is_scaled_for_ga = False  # a per-micro-batch mean: Trainer divides it by the window's length
        self._check_settings()
        self._memory = None  # this process's training memory (a TxlCache)
        self._next_segment = None  # the segment that continues it
        self._stop = _StopOnSignal(self)
        self.add_callback(self._stop)

    # ---- settings -------------------------------------------------------------------------------

    def _check_settings(self) -> None:
        args, train = self.args, self.train_dataset
        if train is not None and not isinstance(train, TxlStreamDataset):
            raise ValueError(
                f"TxlTrainer: train_dataset must be a TxlStreamDataset (got {type(train).__name__}); build it with "
                "TxlStreamDataset.from_corpus(split, tokenizer, batch_size=..., tgt_len=...)."
            )
        for name, dataset in _named_datasets(self.eval_dataset):
            if not isinstance(dataset, TxlStreamDataset):
                raise ValueError(f"TxlTrainer: {name} must be a TxlStreamDataset (got {type(dataset).__name__}).")
        refused = {
            "train_sampling_strategy": (
                args.train_sampling_strategy in ("group_by_length", "batch_rebalance"),
                f"{args.train_sampling_strategy!r} reorders the segments; leave it 'random' or 'sequential' "
                "(TxlTrainer reads them in order either way)",
            ),
            "auto_find_batch_size": (args.auto_find_batch_size, "a changed batch size breaks the streams; set False"),
            "ignore_data_skip": (args.ignore_data_skip, "a resumed run must skip the segments already trained on"),
            "accelerator_config.split_batches": (
                args.accelerator_config.split_batches, "a split batch gives each process a slice of other rows",
            ),
            "n_gpu": (
                args.n_gpu > 1,
                f"DataParallel over {args.n_gpu} GPUs splits the rows; run one process per GPU (accelerate launch)",
            ),
        }  # fmt: skip
        for name, (bad, why) in refused.items():
            if bad:
                raise ValueError(f"TxlTrainer: {name}: {why}.")
        if train is None:
            return
        if args.per_device_train_batch_size != train.batch_size:
            raise ValueError(
                f"TxlTrainer: per_device_train_batch_size={args.per_device_train_batch_size} but the train_dataset "
                f"was cut for batch_size={train.batch_size}; make them equal."
            )
        if train.num_processes != args.world_size:
            raise ValueError(
                f"TxlTrainer: the train_dataset was made for num_processes={train.num_processes} but this run has "
                f"{args.world_size} process(es); build it with num_processes={args.world_size} "
                "(e.g. TrainingArguments(...).world_size)."
            )

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        extra = ("shift_labels", "segment", "stream")  # segment and stream are read by compute_loss
        self._signature_columns += [c for c in extra if c not in self._signature_columns]

    def _get_train_sampler(self, train_dataset=None) -> SequentialSampler:
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    # ---- the memory -----------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The model on this micro-batch with the memory of the segment before it (``loss``: mean over tokens)."""
        segment, stream = inputs.pop("segment", None), inputs.pop("stream", None)
        if not model.training or segment is None:  # outside training (e.g. predict): no memory of its own
            out = model(**inputs)
            return (out.loss, out) if return_outputs else out.loss
        segment = self._check_rows(segment, stream)
        memory = self._memory if segment == self._next_segment else None  # a new epoch, or a break in the order
        out = model(input_ids=inputs["input_ids"], shift_labels=inputs["shift_labels"], mems=memory, use_cache=True)
        self._memory, self._next_segment = out.mems, segment + 1
        return (out.loss, out) if return_outputs else out.loss

    def _check_rows(self, segment: torch.Tensor, stream: torch.Tensor) -> int:
        """This process's rows must be its own streams, all at one segment: else ``RuntimeError``."""
        expected = self.train_dataset.expected_streams(self.args.process_index)
        segments = segment.tolist()
        if stream.tolist() != expected or len(set(segments)) != 1:
            raise RuntimeError(
                f"TxlTrainer: process {self.args.process_index} received streams {stream.tolist()} at segments "
                f"{segments}, expected streams {expected} at one segment: the batches were not dealt in order "
                "(a custom sampler, collator or get_train_dataloader, or Accelerate's dispatch settings)."
            )
        return segments[0]

    # ---- evaluation -----------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The whole eval split in order with a memory of its own (``hf_txl.training.evaluate_stream``): loss per
        token, bits per token (bpc for characters), perplexity, tokens; the training memory is not touched."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("TxlTrainer.evaluate: pass an eval_dataset (a TxlStreamDataset).")
        if isinstance(dataset, dict):
            metrics = {}
            for name, split in dataset.items():
                metrics.update(self.evaluate(split, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        if not isinstance(dataset, TxlStreamDataset):
            raise ValueError(f"TxlTrainer.evaluate: eval_dataset must be a TxlStreamDataset, not {type(dataset)}.")
        figures = evaluate_stream(
            self.model_wrapped, dataset.token_ids, batch_size=dataset.batch_size, tgt_len=dataset.tgt_len,
            accelerator=self.accelerator,
        )  # fmt: skip
        metrics = {
            f"{metric_key_prefix}_loss": figures["loss"], f"{metric_key_prefix}_bpc": figures["bpc"],
            f"{metric_key_prefix}_perplexity": figures["perplexity"], f"{metric_key_prefix}_tokens": figures["tokens"],
            f"{metric_key_prefix}_runtime": figures["seconds"],
            f"{metric_key_prefix}_tokens_per_second": figures["tokens_per_s"],
        }  # fmt: skip
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ---- checkpoints ----------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial) -> None:
        """Each process's memory and position first, then Trainer's files (its trainer_state.json is the last)."""
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        rank = self.args.process_index
        save_mems(self._memory, folder / MEMORY_FILE.format(rank=rank))
        (folder / POSITION_FILE.format(rank=rank)).write_text(json.dumps({"next_segment": self._next_segment}))
        if self.args.should_save:
            settings = {**self.train_dataset.settings(), "world_size": self.args.world_size}
            (folder / STATE_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True))
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """``Trainer.train``; a checkpoint to resume from is checked first (another number of processes, batch
        size, ``tgt_len`` or token stream, or no saved memory: ``ValueError``, nothing loaded or written)."""
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        if isinstance(path, (str, os.PathLike)):
            self._check_checkpoint(Path(path))
        try:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        finally:
            self._stop.request.uninstall()
        if self._stop.stopped:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            raise TrainingPreempted(
                f"stopped by {self._stop.request.name} after step {self.state.global_step}: checkpoint {folder} "
                "written; continue with train(resume_from_checkpoint=True) on the same number of processes."
            )
        return output

    def _check_checkpoint(self, path: Path) -> None:
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise ValueError(
                f"TxlTrainer: checkpoint {path} holds no saved memory ({STATE_FILE} is missing: not written by "
                "TxlTrainer, or killed while saving); resume from a complete TxlTrainer checkpoint."
            )
        saved = json.loads(state_file.read_text())
        current = {**self.train_dataset.settings(), "world_size": self.args.world_size}
        differing = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if differing:
            details = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in differing.items())
            hint = (
                f" Resume with {saved['world_size']} process(es)." if "world_size" in differing else
                " Resume with the dataset and batch settings the checkpoint was written with."
            )  # fmt: skip
            raise ValueError(
                f"TxlTrainer: cannot resume from {path}: the memory belongs to other streams ({details}).{hint}"
            )
        missing = [
            name for rank in range(self.args.world_size)
            for name in (MEMORY_FILE.format(rank=rank), POSITION_FILE.format(rank=rank)) if not (path / name).is_file()
        ]  # fmt: skip
        if missing:
            raise ValueError(f"TxlTrainer: checkpoint {path} is incomplete ({', '.join(missing)} missing).")

    def _load_rng_state(self, checkpoint) -> None:
        """Trainer's RNG states, then this process's memory and position (called once when a resumed run starts)."""
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        rank = self.args.process_index
        self._memory = load_mems(Path(checkpoint) / MEMORY_FILE.format(rank=rank), self.args.device)
        position = json.loads((Path(checkpoint) / POSITION_FILE.format(rank=rank)).read_text())
        self._next_segment = position["next_segment"]


def _base_model(model):
    """The model under a PEFT wrapper (or the model)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _named_datasets(datasets) -> list[tuple[str, Any]]:
    if datasets is None:
        return []
    if isinstance(datasets, dict):
        return [(f"eval_dataset[{name!r}]", d) for name, d in datasets.items()]
    return [("eval_dataset", datasets)]
