#!/usr/bin/env python
"""Train with transformers' ``Trainer`` (``hf_txl.TxlTrainer``), the memory carried, from ``hf_txl.train``'s flags.

    python scripts/train_with_trainer.py --preset tiny --output_dir txl-trainer
    accelerate launch scripts/train_with_trainer.py --preset tiny --output_dir txl-trainer       # any launcher
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 scripts/train_with_trainer.py ...

The corpus, tokenizer, model, AdamW parameter groups and learning-rate schedule are built exactly as
``scripts/train.py`` builds them (same flags, same seed), then trained by ``TxlTrainer``: with the same flags the
two give the same per-step losses and final weights (tests/test_trainer_equivalence.py). Supported here: the data,
model, optimizer and schedule flags, ``--gradient_accumulation_steps``, ``--max_grad_norm``, ``--logging_steps``,
``--eval_steps``, ``--checkpointing_steps`` (steps or ``epoch``), ``--checkpoints_total_limit``,
``--resume_from_checkpoint`` (a path or ``latest``), ``--mixed_precision bf16``, ``--torch_compile``. The output
directory holds the model, its tokenizer and ``log_history.json`` (the Trainer's logs).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import set_seed
from transformers import TrainingArguments, get_scheduler

from hf_txl import TxlForCausalLM, TxlStreamDataset, TxlTrainer
from hf_txl.training.args import PROG, UsageError, parse_args, user_errors
from hf_txl.training.progress import make_optimizer
from hf_txl.training.runtime import configure_cpu_threads
from hf_txl.training.train import build_config, get_token_streams
from hf_txl.training.trainer import TrainingPreempted


def training_arguments(args) -> TrainingArguments:
    """``hf_txl.train``'s flags as ``TrainingArguments`` (the optimizer and schedule are passed to the Trainer)."""
    every = args.checkpointing_steps
    save = {"save_strategy": "no"}
    if every == "epoch":
        save = {"save_strategy": "epoch"}
    elif every:
        save = {"save_strategy": "steps", "save_steps": every}
    return TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_steps=args.max_train_steps or -1,
        max_grad_norm=args.max_grad_norm, logging_steps=args.logging_steps, seed=args.seed,
        eval_strategy="steps" if args.eval_steps else "no", eval_steps=args.eval_steps or None,
        save_total_limit=args.checkpoints_total_limit or None, bf16=args.mixed_precision == "bf16",
        torch_compile=args.torch_compile, report_to="none", disable_tqdm=True, **save,
    )  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv, description=__doc__)
    training_args = training_arguments(args)  # sets up the processes (ACCELERATE_USE_CPU, torchrun's variables)
    state = PartialState()
    if state.device.type == "cpu":
        configure_cpu_threads(args.num_threads, state.num_processes)
    set_seed(args.seed)  # before the model is built, as scripts/train.py does
    tokenizer, train_ids, eval_ids = get_token_streams(args, state)
    config = build_config(args, tokenizer)
    model = TxlForCausalLM._from_config(config, attn_implementation=args.attn_implementation)
    with user_errors():
        train = TxlStreamDataset(
            train_ids, batch_size=args.per_device_train_batch_size, tgt_len=args.tgt_len,
            num_processes=state.num_processes,
        )  # fmt: skip
        valid = TxlStreamDataset(eval_ids, batch_size=args.per_device_eval_batch_size, tgt_len=args.eval_tgt_len)
    steps_per_epoch = math.ceil(train.num_segments / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or math.ceil((args.num_train_epochs or 1.0) * steps_per_epoch)
    betas = (args.adam_beta1, args.adam_beta2)
    optimizer = make_optimizer(model, learning_rate=args.learning_rate, weight_decay=args.weight_decay, betas=betas)
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps, num_training_steps=max_steps
    )
    training_args.max_steps = max_steps
    trainer = TxlTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=valid,
        optimizers=(optimizer, scheduler), processing_class=tokenizer,
    )  # fmt: skip
    resume = {"latest": True}.get(args.resume_from_checkpoint, args.resume_from_checkpoint)
    with user_errors():
        trainer.train(resume_from_checkpoint=resume)
    metrics = trainer.evaluate()
    trainer.save_model(args.output_dir)  # weights, config, code files; the tokenizer (processing_class) too
    if trainer.is_world_process_zero():
        history = json.dumps(trainer.state.log_history, indent=1)
        Path(args.output_dir, "log_history.json").write_text(history)
        print(f"Validation: loss {metrics['eval_loss']:.4f} nats/token, bpc {metrics['eval_bpc']:.4f}")
        print(f"Model written to {args.output_dir}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingPreempted as stopped:  # SIGTERM / SIGUSR1: the step is checkpointed; exit status 75
        print(f"{PROG}: {stopped}", file=sys.stderr)
        raise
